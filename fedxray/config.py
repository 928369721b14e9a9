"""One dataclass with every hyperparameter of a run; it is saved next to every result."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

# Each set of allowed values lives with the code that implements it; Config checks against them.
from .client import LR_SCHEDULES, OPTIMIZERS
from .device import AMP_MODES
from .features import FEATURE_DTYPES as _FEATURE_DTYPES
from .model import local_groups
from .partition import SCHEMES as PARTITIONS
from .privacy import MODES as DP_MODES
from .selection import SELECT_ROUNDS
from .strategies import STRATEGIES, make_strategy

FEATURE_DTYPES = tuple(str(t).removeprefix("torch.") for t in _FEATURE_DTYPES)
# Fields that change how a run executes but not what it computes: a resume may differ in them.
RUNTIME_FIELDS = ("device", "num_workers", "progress", "image_cache", "cache_dir", "preload")
# The strategies' hyperparameters, named as Flower 1.42's flwr.serverapp.strategy names them.
# None = the strategy's default (fedxray.strategies: Flower's, where that is not plain FedAvg).
STRATEGY_FIELDS = ("proximal_mu", "server_learning_rate", "server_momentum", "eta", "beta_1", "beta_2",
                   "tau", "beta")

# The notebook's None parameters resolve to these, by dataset. NIH: 224 px is what the ImageNet
# weights saw; PNGs decoded once into the image cache; test AUROC only after the last round
# (25,596 test images). Demo: small images and cached trunk features, so that the notebook with
# its two baselines runs in minutes on a CPU; its test set is small enough to score every round.
# The field local_keys replaced, and what each of its values means in the new one.
LEGACY_BN_POLICY = {"average": "", "local": "bn"}

DATASET_DEFAULTS = {
    "nih": {"image_size": 224, "num_rounds": 10, "test_every_round": False,
            "image_cache": True, "feature_cache": False, "site_test_fraction": 0.1},
    "demo": {"image_size": 64, "num_rounds": 10, "test_every_round": False,
             "image_cache": True, "feature_cache": True, "site_test_fraction": 0.2},
}


@dataclass
class Config:
    """Every hyperparameter of a run, with its default; saved as config.json next to every result
    and inside every checkpoint and final model.

    Build one with ``Config(field=value, ...)``; with ``Config.for_dataset("nih" | "demo", ...)``,
    whose fields named in DATASET_DEFAULTS (image_size, num_rounds, test_every_round, image_cache,
    feature_cache, site_test_fraction) take that dataset's value when given as None (the notebook's parameters cell);
    or with ``config.with_strategy(name, **hyperparameters)``, which keeps only the hyperparameters
    that strategy uses. Building a Config checks the values it can (ValueError naming the field);
    the rest (weights, device, a partition the data cannot hold) fail where they are used. Config
    refuses a strategy hyperparameter that the chosen strategy does not use (it must stay None)
    and a combination the strategy cannot run (scaffold needs optimizer "sgd" and momentum 0).
    A run resumes from its checkpoint only under the same config, except in RUNTIME_FIELDS
    (device, num_workers, progress, image_cache, cache_dir, preload): they change how a run
    executes, not what it computes, so a resume may differ in them (same_experiment).

    Attributes
    ----------
    Federation:

    num_clients : int, default 5
        Clients (sites) the training patients are split among; >= 1 and at most the number of
        training patients.
    num_rounds : int, default 10
        Federated rounds; >= 1. The global model is evaluated at round 0 (untrained) and after
        every round. DATASET_DEFAULTS: "nih" 10, "demo" 10 (at 5 the demo's FedAvg was still
        rising: test mean AUROC 0.754 with 5 rounds, 0.784 with 10, measured on the synthetic demo).
    fraction_fit : float, default 1.0
        Share of the clients that train each round, in (0, 1]: max(1, round(fraction_fit *
        num_clients)) of them, drawn from (seed, round).
    local_epochs : int, default 1
        Passes each sampled client makes over its own data per round; >= 1.

    Local optimisation (a fresh optimizer every round, as in FedAvg, McMahan et al. 2017):

    batch_size : int, default 32
        Training images per client step; >= 1.
    lr : float, default 0.001
        Learning rate of the client optimizer; > 0.
    optimizer : str, default 'adam'
        Client optimizer: "adam" or "sgd" (torch.optim.Adam, torch.optim.SGD).
    momentum : float, default 0.9
        SGD momentum, >= 0 and usually below 1; used only with optimizer "sgd". Strategy scaffold
        needs 0.
    weight_decay : float, default 0.0
        The client optimizer's weight decay (L2 penalty added to the gradient), >= 0.
    lr_schedule : str, default 'constant'
        The client learning rate by round (fedxray.client.scheduled_lr): "constant" (lr every
        round), "cosine" (lr * (1 + cos(pi * (r - 1) / num_rounds)) / 2 in round r: lr in round 1,
        near 0 in the last) or "step" (lr, then lr / 10 from half the rounds and lr / 100 from
        three quarters, the classic ResNet schedule). Constant by default: on the synthetic demo
        (random trunk) cosine was no better at 10 rounds and worse at 5, step worse at 5 (README,
        "The training recipe"); not measured with ImageNet weights.
    pos_weight : bool, default False
        Weigh each finding's positive examples in the BCE loss by negatives / positives, counted
        over the whole federation (each client reports its label counts, never its images;
        fedxray.objectives.pos_weight_from_counts): rare findings weigh more. A finding without a
        positive anywhere keeps weight 1. The reported train_loss is then the weighted loss.

    Data:

    image_size : int, default 224
        Side in pixels of the square grayscale images the model sees; >= 64 (ResNet-34
        downsamples 32x, and layer4's BatchNorm needs more than one value per channel).
        DATASET_DEFAULTS: "nih" 224 (what the ImageNet weights saw), "demo" 64.
    partition : str, default 'iid'
        How the training patients are split among the clients, whole patients at a time
        (fedxray.partition): "iid" (shuffled and dealt round-robin), "dirichlet" (label skew: each
        class's patients cut among clients in Dir(alpha) proportions), "column" (one site per value
        of partition_column), "quantity" (size skew: client shares ~ Dir(alpha), labels iid).
        Clients without a positive image of some finding are logged as a WARNING
        (fedxray.partition.zero_positive_findings).
    alpha : float, default 0.5
        Dirichlet concentration of partitions "dirichlet" and "quantity"; > 0, smaller = more
        skewed. Ignored by "iid" and "column". Not comparable with the same alpha in single-label
        papers: "dirichlet" draws on one class per patient (their rarest finding, or "No
        Finding"), and an NIH image often carries several findings; measure the skew with
        fedxray.label_skew and fedxray.client_finding_table.
    partition_column : str or None, default None
        Metadata column whose values are the sites of partition "column"; None = "view" (PA
        upright outpatients vs AP bedside). Must stay None for the other schemes.
    balanced_sizes : bool, default False
        Partition "dirichlet" only: every client gets the same number of patients (to one) while
        its label mix follows the Dirichlet draw (classes dealt rarest first, each in its drawn
        proportions among the clients with room left); False = client sizes follow the draw too
        (size skew on top of label skew). Must stay False for the other schemes.
    min_client_patients : int, default 1
        Fewest patients a client may hold, >= 0, in every scheme: a random split (iid, dirichlet,
        quantity) that leaves a client short is drawn again, up to fedxray.partition.MAX_DRAWS
        times, then refused with a ValueError; "quantity" reserves it per client by
        construction; "column" refuses a short site. The default 1 (no empty client) holds in
        every scheme but "dirichlet" without balanced_sizes at a tiny alpha with many clients
        (the demo at alpha 0.05 with 50 clients: 15 classes cannot reach 50 clients). Raise it
        for skewed splits: on NIH's 25,207 training patients, "quantity" at alpha 0.5 (seed 0)
        gives a client of 21 patients at 5 clients and of 3 at 20.
    min_client_images : int, default 1
        Fewest training images a client may hold, >= 0; drawn again or refused as
        min_client_patients. The default 1 holds wherever min_client_patients 1 does (every
        patient has an image).
    site_test_fraction : float, default 0.0
        Share of each client's patients held out as that site's own test set ("site test"), in
        [0, 1): drawn from the site's patients after partitioning (so each site's test looks like
        the site), never trained on, scored once with the reported model of every run
        (history splits "site_0", "site_1", ...; fedxray.crosssite.eval_matrix). 0 = none. In
        process only. DATASET_DEFAULTS: "nih" 0.1 (about 1,600 images per site at 5 sites), "demo"
        0.2 (its sites hold about 100 training patients each).
    max_images : int or None, default None
        Cap on the training images, for quick runs: >= 1, taken as whole patients in a seeded
        order (validation and test shrink by the same ratio); None = no cap.
    augment : bool, default False
        Random small rotations, scaling, translations, brightness and contrast of each training
        batch, on the device (fedxray.augment.Augmentation; no horizontal flip: the heart's side
        is anatomy). Needs images: refused with feature_cache True (the cached trunk outputs are
        fixed); Config.for_dataset turns a dataset's default feature_cache off for it.
    preload : bool, default False
        Decode every image once into memory when the datasets are built (small data only);
        unused when a cache serves the images. In RUNTIME_FIELDS.

    Strategy: how the server combines updates and what clients minimise (fedxray.strategies;
    README "Strategies"). Hyperparameters carry Flower 1.42's names; None = the strategy's default
    (Flower's, except where that is plain FedAvg or was measured to wreck the model). One the
    chosen strategy does not use must stay None.

    strategy : str, default 'fedavg'
        The federated algorithm (fedxray.strategies.STRATEGIES): "fedavg", "fedprox", "fedavgm",
        "fedadam", "fedyogi", "fedadagrad", "median", "trimmed_mean" or "scaffold".
    proximal_mu : float or None, default None
        fedprox: weight mu of the term (mu / 2) * ||w - w_global||^2 each client adds to its
        loss; in [0, inf), 0 = FedAvg. None = fedprox 0.01.
    server_learning_rate : float or None, default None
        fedavgm, scaffold: the server's step size, > 0 (scaffold at 1.0 = FedAvg's average).
        None = fedavgm 0.1, scaffold 1.0.
    server_momentum : float or None, default None
        fedavgm: server momentum, in [0, 1); 0 with server_learning_rate 1 = FedAvg. None =
        fedavgm 0.9.
    eta : float or None, default None
        fedadam, fedyogi, fedadagrad: server learning rate, > 0. None = fedadam 0.01, fedyogi
        0.01, fedadagrad 0.01.
    beta_1 : float or None, default None
        fedadam, fedyogi: first-moment decay, in [0, 1). None = fedadam 0.9, fedyogi 0.9.
    beta_2 : float or None, default None
        fedadam, fedyogi: second-moment decay, in [0, 1). None = fedadam 0.99, fedyogi 0.99.
    tau : float or None, default None
        fedadam, fedyogi, fedadagrad: adaptivity (added to sqrt(v)), > 0. None = fedadam 0.001,
        fedyogi 0.001, fedadagrad 0.001.
    beta : float or None, default None
        trimmed_mean: fraction of client values cut at each end of every coordinate, in
        [0, 0.5). None = trimmed_mean 0.2.

    Model:

    weights : str or None, default 'auto'
        Initial ResNet-34 weights: "auto" (torchvision's ImageNet weights, else the .pth named by
        $FEDXRAY_WEIGHTS, else random with a loud warning), "imagenet", a path to a .pth file, or
        None (random). run_info.json records what was used.
    local_keys : str, default ''
        Which of layer4 + fc stay on each client instead of travelling (personalization;
        fedxray.model.LOCAL_KEY_GROUPS): "" (nothing: one global model), "bn" (FedBN, Li et al.
        2021: layer4's BatchNorm statistics and affine parameters), "fc" (FedPer, Arivazhagan et
        al. 2019: the head; only layer4 travels) or "bn,fc". Each client's kept entries persist
        between its rounds and are saved with the run; each client is scored with its own model
        (the global weights plus its kept entries) and the "global" rows average the clients'
        predictions. The frozen trunk's BatchNorm never moves. Replaces bn_policy ("average" = "",
        "local" = "bn"; older config files are read with the new name). In process only.

    Privacy (fedxray.privacy, fedxray.dpsgd; README "Privacy"). Needs Opacus (pip install
    'opacus>=1.5'). With dp set, layer4's BatchNorm is replaced by GroupNorm (a BatchNorm in
    training mode mixes a batch's images, and its statistics are unprotected averages of private
    images; GroupNorm normalises each image alone and keeps none; fedxray.model.private_norm), clients send no training loss (not covered by
    the guarantee), and the history gets an "epsilon" row per round (split "privacy").

    dp : str or None, default None
        None (no DP); "example": DP-SGD at each hospital with the *patient* as the unit (patients
        Poisson-sampled each step, each patient's gradient clipped to dp_clip_norm, Gaussian noise;
        fedxray.dpsgd), each client with its own accountant and epsilon; "client": DP-FedAvg
        (McMahan et al. 2018): clients Poisson-sampled with probability fraction_fit each round,
        each update clipped to dp_clip_norm, Gaussian noise added at the server to their sum,
        divided by the expected number of clients (an unweighted average; fedxray.privacy). One
        epsilon for the whole federation, per hospital. With few clients all taking part every
        round it is enormous: the run says so.
    dp_noise_multiplier : float or None, default None
        Noise standard deviation in units of dp_clip_norm, >= 0 (0 = no noise: epsilon infinite).
        Exactly one of dp_noise_multiplier and dp_target_epsilon is given when dp is set.
    dp_target_epsilon : float or None, default None
        The epsilon to end the run at (> 0): the noise multiplier is computed from it by Opacus's
        RDP accountant for the run's rounds, sampling and delta (per client for "example", from
        its own size; assuming it trains every round).
    dp_clip_norm : float, default 1.0
        L2 bound C on each patient's gradient ("example") or each client's update ("client"); > 0,
        inf allowed only without noise (the non-private reference).
    dp_delta : float or None, default None
        delta of the (epsilon, delta) guarantee, in (0, 1). None = 1e-5, or 0.1 / units when
        that is smaller (units: the federation's training patients for "example", the clients for
        "client"; fedxray.privacy.default_delta).
    secagg : bool, default False
        Secure aggregation on Flower (SecAgg+, Bell et al. 2020, through Flower's own protocol;
        fedxray.flower.secure): the server learns only the sum of the clients' updates. Like dp, it
        turns layer4's BatchNorm into GroupNorm (running statistics are unbounded and cannot be
        quantised for the secure sum). In process there is no network and nothing to secure: a
        run with secagg=True trains the same model with exact sums, the reference a Flower
        SecAgg+ run is compared with. Strategies that need each update (median, trimmed_mean) or
        send more than it (scaffold) are refused.

    Evaluation:

    eval_batch_size : int, default 128
        Images per batch when scoring validation and test, and when computing cached features;
        >= 1 (it may exceed batch_size: no gradients are kept).
    select_round : str, default 'best_val'
        Which round's global model the run reports, tests and saves (fedxray.selection):
        "best_val" = the round (>= 1) with the highest validation mean AUROC, the earliest on a
        tie; "last" = the last round. The history keeps every round and names the chosen one
        (metric "selected_round"); test never takes part in the choice.
    test_every_round : bool, default True
        Score the test set at round 0 and after every round; False = only once, at the end, the
        selected round's model (see select_round; validation is scored every round either way).
        DATASET_DEFAULTS: "nih" False (25,596 test images), "demo" False (~2,070 test images:
        scoring them every round took FedAvg from about 75 s to 115 s on 2 CPU cores, and as much
        again for each baseline and compared strategy).

    Execution:

    seed : int, default 0
        The one seed of a run: the training cap, the partition, the model's initialisation, the
        clients sampled each round and each client's batch order.
    device : str, default 'auto'
        torch device that trains and evaluates: "auto" = "cuda" when present, else "cpu"; or
        any torch device string ("cpu", "cuda:1"). In RUNTIME_FIELDS.
    amp : str, default 'auto'
        Mixed precision: "auto" (bf16 where the GPU has it natively, fp16 on older GPUs, off on
        the CPU), "bf16", "fp16" (with a GradScaler) or "off" (fp32).
    num_workers : int, default 0
        DataLoader worker processes of each client's training loader, >= 0; 0 = load in the
        main process. In RUNTIME_FIELDS.
    progress : bool, default True
        Show text progress bars: one per training run (round, latest validation AUROC and the
        client training in its postfix) and transient ones for cache builds. In RUNTIME_FIELDS.

    Speed (fedxray.cache, fedxray.features):

    image_cache : bool, default False
        Decode every PNG once (grayscale, resized to image_size) into a uint8 memory map in
        cache_dir, reused by later runs and checked row by row; results are bitwise the same. In
        RUNTIME_FIELDS.
        DATASET_DEFAULTS: "nih" True, "demo" True.
    feature_cache : bool, default False
        Run the frozen trunk once per image and train layer4 + fc on its cached layer3 output
        (builds the image cache first); results are the same to float tolerance (float16
        storage: to fp16 rounding of layer3's output). Kept on the GPU when it fits, else in a
        memory-mapped file beside the image cache. DATASET_DEFAULTS: "nih" False, "demo" True.
    feature_dtype : str, default 'float16'
        Storage of cached features: "float16" (half the memory) or "float32". Used only with
        feature_cache.
    cache_dir : str or None, default None
        Folder of the image cache. None = $FEDXRAY_CACHE_DIR, else /kaggle/working/fedxray_cache
        on Kaggle, else data/cache in the repository (~/.cache/fedxray outside it). In
        RUNTIME_FIELDS.
    """

    # Federation
    num_clients: int = 5
    num_rounds: int = 10
    fraction_fit: float = 1.0
    local_epochs: int = 1
    # Local optimisation
    batch_size: int = 32
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    pos_weight: bool = False
    # Data
    image_size: int = 224
    partition: str = "iid"
    alpha: float = 0.5
    partition_column: Optional[str] = None
    balanced_sizes: bool = False
    min_client_patients: int = 1
    min_client_images: int = 1
    site_test_fraction: float = 0.0
    max_images: Optional[int] = None
    augment: bool = False
    preload: bool = False
    # Strategy: None = the strategy's default; one the strategy does not use must stay None
    strategy: str = "fedavg"
    proximal_mu: Optional[float] = None
    server_learning_rate: Optional[float] = None
    server_momentum: Optional[float] = None
    eta: Optional[float] = None
    beta_1: Optional[float] = None
    beta_2: Optional[float] = None
    tau: Optional[float] = None
    beta: Optional[float] = None
    # Model
    weights: Optional[str] = "auto"
    local_keys: str = ""
    # Privacy
    dp: Optional[str] = None
    dp_noise_multiplier: Optional[float] = None
    dp_target_epsilon: Optional[float] = None
    dp_clip_norm: float = 1.0
    dp_delta: Optional[float] = None
    secagg: bool = False
    # Evaluation
    eval_batch_size: int = 128
    select_round: str = "best_val"
    test_every_round: bool = True
    # Execution
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    num_workers: int = 0
    progress: bool = True
    # Speed
    image_cache: bool = False
    feature_cache: bool = False
    feature_dtype: str = "float16"
    cache_dir: Optional[str] = None

    def __post_init__(self):
        def need(cond: bool, msg: str):
            if not cond:
                raise ValueError(f"Config: {msg}")
        for name in ("num_clients", "num_rounds", "local_epochs", "batch_size", "image_size",
                     "eval_batch_size"):
            need(int(getattr(self, name)) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(0.0 < self.fraction_fit <= 1.0, f"fraction_fit must be in (0, 1], got {self.fraction_fit}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.alpha > 0, f"alpha must be > 0, got {self.alpha}")
        need(self.lr_schedule in LR_SCHEDULES,
             f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        need(self.select_round in SELECT_ROUNDS,
             f"select_round must be one of {SELECT_ROUNDS}, got {self.select_round!r}")
        for name in ("pos_weight", "augment"):
            need(isinstance(getattr(self, name), bool), f"{name} must be True or False, got {getattr(self, name)!r}")
        need(not (self.augment and self.feature_cache),
             "augment=True and feature_cache=True cannot go together: augmentation changes the images, so "
             "the trunk's cached outputs would be stale and augment would do nothing. Set feature_cache=False "
             "to augment, or augment=False to keep the feature cache")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        need(self.amp in AMP_MODES, f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        try:
            local_groups(self.local_keys)
        except ValueError as e:
            need(False, str(e))
        need(_is_number(self.site_test_fraction) and 0 <= self.site_test_fraction < 1,
             f"site_test_fraction must be a number in [0, 1), got {self.site_test_fraction!r}")
        need(self.feature_dtype in FEATURE_DTYPES,
             f"feature_dtype must be one of {FEATURE_DTYPES}, got {self.feature_dtype!r}")
        need(self.partition in PARTITIONS, f"partition must be one of {PARTITIONS}, got {self.partition!r}")
        need(self.max_images is None or self.max_images >= 1, "max_images must be >= 1 or None")
        for name in ("min_client_patients", "min_client_images"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                 f"{name} must be an integer >= 0, got {value!r}")
        need(isinstance(self.balanced_sizes, bool), f"balanced_sizes must be True or False, got "
             f"{self.balanced_sizes!r}")
        need(self.strategy in STRATEGIES, f"strategy must be one of {tuple(STRATEGIES)}, got {self.strategy!r}")
        cls = STRATEGIES[self.strategy]
        unused = [f"{k}={getattr(self, k)!r}" for k in STRATEGY_FIELDS
                  if getattr(self, k) is not None and k not in cls.defaults]
        need(not unused, f"{', '.join(unused)} set, but strategy {self.strategy!r} does not use it (its "
             f"hyperparameters: {sorted(cls.defaults) or 'none'}); leave it None, or build the config with "
             f"Config.with_strategy, which keeps only the strategy's own")
        try:
            make_strategy(self.strategy, num_clients=self.num_clients, **self.strategy_hyperparameters())
        except ValueError as e:
            need(False, str(e))
        problems = cls.config_problems(self)
        need(not problems, f"strategy {self.strategy!r} cannot run with " + "; ".join(problems))
        problems = self.privacy_problems()
        need(not problems, "; ".join(problems))
        need(self.image_size >= 64, f"image_size must be >= 64: ResNet-34 downsamples 32x and layer4's "
             f"BatchNorm needs more than one value per channel, got {self.image_size}")

    def privacy_problems(self) -> list[str]:
        """What is wrong with the dp fields, or what breaks the guarantee, by name (empty: none)."""
        out = self.secagg_problems()
        if self.dp is None:
            set_ = [k for k in ("dp_noise_multiplier", "dp_target_epsilon", "dp_delta") if getattr(self, k) is not None]
            return out + ([f"{', '.join(set_)} set, but dp is None: set dp='example' or 'client', or leave them None"]
                          if set_ else [])
        if self.dp not in DP_MODES:
            return out + [f"dp must be None, 'example' or 'client', got {self.dp!r}"]
        noise, target, clip_norm, delta = self.dp_noise_multiplier, self.dp_target_epsilon, self.dp_clip_norm, self.dp_delta
        if (noise is None) == (target is None):
            out.append("dp needs exactly one of dp_noise_multiplier and dp_target_epsilon, got "
                       f"{noise!r} and {target!r}")
        if noise is not None and not (_is_number(noise) and math.isfinite(noise) and noise >= 0):
            out.append(f"dp_noise_multiplier must be a finite number >= 0, got {noise!r}")
        if target is not None and not (_is_number(target) and math.isfinite(target) and target > 0):
            out.append(f"dp_target_epsilon must be a finite number > 0, got {target!r}")
        if not (_is_number(clip_norm) and clip_norm > 0):
            out.append(f"dp_clip_norm must be > 0, got {clip_norm!r}")
        elif math.isinf(clip_norm) and not (noise == 0):
            out.append("dp_clip_norm=inf bounds nothing: allowed only with dp_noise_multiplier=0 (the reference "
                       "without privacy)")
        if delta is not None and not (_is_number(delta) and 0 < delta < 1):
            out.append(f"dp_delta must lie in (0, 1), got {delta!r}")
        if self.pos_weight:
            out.append("pos_weight=True with dp: each client's label counts would leave it unprotected; set "
                       "pos_weight=False")
        if "bn" in str(self.local_keys).split(","):
            out.append(f"local_keys={self.local_keys!r} with dp: under DP layer4's BatchNorm is a GroupNorm (no "
                       f"statistics to keep local); leave 'bn' out of local_keys")
        if self.dp == "client" and self.strategy in ("median", "trimmed_mean", "scaffold"):
            why = ("its clients send control variates besides their clipped update" if self.strategy == "scaffold"
                   else "its aggregate is not a sum of updates, so noise calibrated to one update's bound does not "
                        "cover it")
            out.append(f"strategy={self.strategy!r} with dp='client': {why}; use fedavg, fedprox, fedavgm or the "
                       f"FedOpt family")
        if self.dp == "example" and self.amp in ("fp16", "bf16"):
            out.append(f"amp={self.amp!r} with dp='example': per-patient gradients are computed in float32 (Opacus); "
                       f"set amp='auto' or 'off'")
        return out

    def secagg_problems(self) -> list[str]:
        """What secure aggregation cannot do, by name (empty: none or nothing wrong)."""
        if not isinstance(self.secagg, bool):
            return [f"secagg must be true or false, got {self.secagg!r}"]
        if not self.secagg:
            return []
        out = []
        if self.strategy in ("median", "trimmed_mean", "scaffold"):
            why = ("its clients send control variates besides their update" if self.strategy == "scaffold"
                   else "its aggregate needs each client's update, which secure aggregation hides")
            out.append(f"strategy={self.strategy!r} with secagg: {why}; use fedavg, fedprox, fedavgm or the FedOpt "
                       f"family")
        if "bn" in str(self.local_keys).split(","):
            out.append(f"local_keys={self.local_keys!r} with secagg: under secagg layer4's BatchNorm is a GroupNorm; "
                       f"leave 'bn' out of local_keys")
        return out

    @property
    def group_norm(self) -> bool:
        """Whether layer4's BatchNorm is a GroupNorm (fedxray.model.private_norm): under dp or secagg."""
        return self.dp is not None or bool(self.secagg)

    def strategy_hyperparameters(self) -> dict[str, float]:
        """The strategy's hyperparameters that are set (None ones take the strategy's default)."""
        return {k: getattr(self, k) for k in STRATEGY_FIELDS if getattr(self, k) is not None}

    def with_strategy(self, strategy: str, **hyperparameters: Optional[float]) -> "Config":
        """A copy running `strategy`: of the hyperparameters given (e.g. every one of the notebook's
        parameters cell), it keeps those the strategy uses and clears the rest."""
        unknown = sorted(set(hyperparameters) - set(STRATEGY_FIELDS))
        if unknown:
            raise ValueError(f"Config.with_strategy: {unknown} are not strategy hyperparameters {STRATEGY_FIELDS}")
        if strategy not in STRATEGIES:
            raise ValueError(f"Config: strategy must be one of {tuple(STRATEGIES)}, got {strategy!r}")
        own = STRATEGIES[strategy].defaults
        return dataclasses.replace(self, strategy=strategy,
                                   **{k: hyperparameters.get(k) if k in own else None for k in STRATEGY_FIELDS})

    @classmethod
    def for_dataset(cls, dataset: str, **fields: Any) -> "Config":
        """A Config for "nih" or "demo" whose fields in DATASET_DEFAULTS take the dataset's
        default when given as None (the notebook's parameters cell)."""
        if dataset not in DATASET_DEFAULTS:
            raise ValueError(f"dataset must be one of {sorted(DATASET_DEFAULTS)}, got {dataset!r}")
        defaults = dict(DATASET_DEFAULTS[dataset])
        if fields.get("augment") and fields.get("feature_cache") is None:
            defaults["feature_cache"] = False   # the dataset's default yields to asking for augmentation
        chosen = {k: v for k, v in fields.items() if v is not None or k not in defaults}
        return cls(**{**defaults, **chosen})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        """A Config from a saved config.json; fields added since it was written take their default,
        and bn_policy (before local_keys) is read as local_keys ("average" = "", "local" = "bn")."""
        d = dict(d)
        if "bn_policy" in d and "local_keys" not in d:
            old = d.pop("bn_policy")
            if old not in LEGACY_BN_POLICY:
                raise ValueError(f"Config: bn_policy {old!r} is none of {sorted(LEGACY_BN_POLICY)}")
            d["local_keys"] = LEGACY_BN_POLICY[old]
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"Config: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        from .io import atomic_write_text
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    def same_experiment(self, other: "Config") -> bool:
        a, b = self.to_dict(), other.to_dict()
        return all(a[k] == b[k] for k in a if k not in RUNTIME_FIELDS)

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolve_amp(self, device: torch.device) -> Optional[torch.dtype]:
        """The autocast dtype, or None for full fp32."""
        if self.amp == "off" or (self.amp == "auto" and device.type != "cuda"):
            return None
        # Capability, not is_bf16_supported(): the latter says True on a T4 via slow emulation.
        native_bf16 = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)
        if self.amp == "bf16" or (self.amp == "auto" and native_bf16):
            return torch.bfloat16
        return torch.float16   # T4 and P100 have no bf16: fp16 with a GradScaler


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
