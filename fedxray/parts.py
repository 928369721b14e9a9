"""A run's setup, apart from its round loop: capped splits, caches, datasets, the partition, the
model, the strategy and the clients, built once. The federated loop, the two baselines and the
Flower server and clients all start from these functions, so every driver sees the same data in
the same form."""
from __future__ import annotations

import dataclasses
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch

from .aggregation import state_nbytes
from .cache import ImageCache, build_image_cache
from .checkpoint import image_list_digest
from .client import Client
from .config import Config
from .data import LABELS, NIHDataset
from .features import FeatureCache, build_feature_cache
from .model import (ChestXrayResNet, buffer_keys, build_model, exchanged_keys, private_norm, get_state,
                    trunk_digest)
from .objectives import label_counts, pos_weight_from_counts
from .history import is_site_split
from .partition import hold_out_site_tests, partition
from .privacy import ClientLevelDP, client_spec, default_delta
from .strategies import Strategy, make_strategy


def cap_by_patient(frame: pd.DataFrame, max_images: Optional[int], seed: int) -> pd.DataFrame:
    """At most max_images rows, taking whole patients in a seeded order (None = no cap)."""
    if max_images is None or len(frame) <= max_images:
        return frame
    patients = np.random.default_rng(seed).permutation(np.unique(frame["patient_id"]))
    sizes = frame.groupby("patient_id").size().reindex(patients).to_numpy()
    keep = patients[np.cumsum(sizes) <= max_images]
    if len(keep) == 0:
        keep = patients[:1]
    return frame[frame["patient_id"].isin(keep)].reset_index(drop=True)


def cap_splits(splits: dict[str, pd.DataFrame], max_images: Optional[int], seed: int) -> dict[str, pd.DataFrame]:
    """Cap 'train' at max_images (whole patients); val and test shrink by the same ratio, so a
    quick run is quick everywhere."""
    train = splits["train"]
    if max_images is None or len(train) <= max_images:
        return dict(splits)
    ratio = max_images / len(train)
    out = {k: cap_by_patient(f, max(1, int(len(f) * ratio)), seed) for k, f in splits.items()}
    out["train"] = cap_by_patient(train, max_images, seed)
    return out


class DataSource:
    """frame -> dataset for one process: PNGs decoded per item, rows of the image cache, or the
    frozen trunk's cached features, as the config says. The one place that decides this, for the
    in-process run, the Flower server (val and test) and each Flower site.

    With a cache, `usable(frame)` drops the images that could not be decoded (logged and listed in
    the cache's index), so a client's example count is the count training weighs."""

    def __init__(self, config: Config, frames: Sequence[pd.DataFrame], cache_dir: Optional[str | Path] = None):
        self.config = c = config
        self.image_cache: Optional[ImageCache] = None
        self.feature_cache: Optional[FeatureCache] = None
        if c.image_cache or c.feature_cache:   # decode every PNG once
            self.image_cache = build_image_cache(pd.concat(list(frames)), c.image_size,
                                                 c.cache_dir if cache_dir is None else cache_dir, progress=c.progress)

    def usable(self, frame: pd.DataFrame) -> pd.DataFrame:
        return frame if self.image_cache is None else self.image_cache.usable(frame)

    def compute_features(self, model: ChestXrayResNet, frames: Sequence[pd.DataFrame], device: torch.device,
                         amp_dtype: Optional[torch.dtype], placement: str = "auto") -> None:
        """With feature_cache on, run the frozen trunk once over every image of frames."""
        c = self.config
        if not c.feature_cache:
            return
        images = self.image_cache.dataset(pd.concat(list(frames)).drop_duplicates("image"))
        self.feature_cache = build_feature_cache(
            model, images, device, batch_size=c.eval_batch_size, amp_dtype=amp_dtype, placement=placement,
            dtype=getattr(torch, c.feature_dtype), progress=c.progress)

    def dataset(self, frame: pd.DataFrame):
        if self.feature_cache is not None:
            return self.feature_cache.dataset(frame)
        if self.image_cache is not None:
            return self.image_cache.dataset(frame)
        return NIHDataset(frame, self.config.image_size, preload=self.config.preload)

    def info(self) -> dict:
        """The run-info entries of the caches."""
        out = {}
        if self.image_cache is not None:
            out.update(image_cache=str(self.image_cache.directory), excluded_images=sorted(self.image_cache.excluded))
        if self.feature_cache is not None:
            out.update(feature_cache=self.feature_cache.placement, feature_cache_bytes=self.feature_cache.nbytes)
        return out


def model_for(config: Config, device: torch.device) -> ChestXrayResNet:
    """The run's model on its device: the random parts (fc, or everything with weights=None) follow
    config.seed only, so the server and every site build the same one."""
    torch.manual_seed(config.seed)
    model = build_model(len(LABELS), config.weights)
    if config.group_norm:   # DP or secure aggregation: layer4's BatchNorm becomes GroupNorm, no statistics
        private_norm(model)
    model = model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return model


def strategy_for(config: Config, model: ChestXrayResNet) -> Strategy:
    """config.strategy with its hyperparameters; the model's buffers (BatchNorm statistics) are
    named so that a server optimizer averages them instead of stepping on them."""
    strategy = make_strategy(config.strategy, buffers=buffer_keys(model), num_clients=config.num_clients,
                             **config.strategy_hyperparameters())
    spec = client_spec(config, config.num_clients)
    return strategy if spec is None else ClientLevelDP(strategy, spec, config.seed)


def run_info(model: ChestXrayResNet, device: torch.device, amp_dtype: Optional[torch.dtype],
             exchanged: dict[str, torch.Tensor], strategy: Optional[Strategy] = None, **extra) -> dict:
    """What a run actually used (weights, device, precision, versions, sizes, the strategy's
    resolved hyperparameters), for run_info.json."""
    return {
        "weights_source": model.weights_source, "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "amp_dtype": str(amp_dtype).replace("torch.", "") if amp_dtype else "off",
        "torch": str(torch.__version__), "python": platform.python_version(),
        "exchanged_keys": len(exchanged), "exchanged_bytes": state_nbytes(exchanged),
        **({"strategy": strategy.name, "strategy_hyperparameters": dict(strategy.hyperparameters)}
           if strategy is not None else {}),
        **extra,
    }


def client_partition(config: Config, splits: dict[str, pd.DataFrame],
                     client_frames: Optional[Sequence[pd.DataFrame]] = None
                     ) -> tuple[dict[str, pd.DataFrame], list[pd.DataFrame], DataSource]:
    """The capped splits and the clients' tables exactly as a run will use them (images that cannot
    be decoded left out before partitioning), and the data source that serves them. Builds the image
    cache when the config asks for one; builds no model. The clients' tables still hold their site
    test patients (see site_tests)."""
    c = config
    capped = cap_splits(splits, c.max_images, c.seed)
    source = DataSource(c, [*capped.values(), *(client_frames or [])])
    capped = {k: source.usable(f) for k, f in capped.items()}
    if client_frames is None:
        client_frames = partition(capped["train"], c.num_clients, scheme=c.partition, alpha=c.alpha,
                                  seed=c.seed, column=c.partition_column,
                                  min_client_patients=c.min_client_patients,
                                  min_client_images=c.min_client_images, balanced_sizes=c.balanced_sizes)
    else:
        client_frames = [source.usable(f) for f in client_frames]
    if len(client_frames) != c.num_clients:
        raise ValueError(f"{len(client_frames)} client tables given for num_clients={c.num_clients}")
    return capped, list(client_frames), source


def site_tests(config: Config, client_frames: Sequence[pd.DataFrame]) -> tuple[list[pd.DataFrame], list[pd.DataFrame]]:
    """(each client's training table, each site's own test table): config.site_test_fraction of every
    client's patients held out (fedxray.partition.hold_out_site_tests); no site tests at 0."""
    if not config.site_test_fraction:
        return list(client_frames), []
    return hold_out_site_tests(list(client_frames), config.site_test_fraction, config.seed)


@dataclass
class RunParts:
    """Everything a federated run needs before its first round, built once by `prepare`. The
    baselines (`centralized`, `local_only`) reuse its caches, datasets and model."""
    config: Config
    device: torch.device
    amp_dtype: Optional[torch.dtype]
    splits: dict[str, pd.DataFrame]      # capped, usable rows of train, val and test
    client_frames: list[pd.DataFrame]
    source: DataSource
    model: ChestXrayResNet
    initial: dict[str, torch.Tensor]     # layer4 + fc as built (CPU copies): every run starts here
    val_data: object
    test_data: object
    strategy: Strategy
    clients: list[Client] = field(default_factory=list)
    site_tests: list[pd.DataFrame] = field(default_factory=list)   # site k's own test patients (split site_k)
    site_test_data: list = field(default_factory=list)

    @property
    def keys(self) -> list[str]:
        return exchanged_keys(self.model, self.config.local_keys)

    def eval_data(self, split: str):
        """The dataset of an evaluation split: "val", "test" or a site's test ("site_<k>")."""
        if split in ("val", "test"):
            return self.val_data if split == "val" else self.test_data
        if is_site_split(split) and int(split.split("_")[1]) < len(self.site_test_data):
            return self.site_test_data[int(split.split("_")[1])]
        raise ValueError(f"no evaluation split {split!r} in these parts: 'val', 'test' or "
                         f"site_0..site_{len(self.site_test_data) - 1} (config.site_test_fraction)")

    def initial_state(self) -> dict[str, torch.Tensor]:
        """The global state every run of these parts starts from (the exchanged entries as built)."""
        return {k: self.initial[k].clone() for k in self.keys}

    def inputs(self) -> dict[str, str]:
        """What identifies this run's inputs (trunk, val, test, each client's images and labels); a
        resume whose inputs differ is refused."""
        return {"trunk": trunk_digest(self.model), "val": image_list_digest(self.splits["val"]),
                "test": image_list_digest(self.splits["test"]),
                **{f"client_{k}": image_list_digest(f) for k, f in enumerate(self.client_frames)},
                **{f"site_test_{k}": image_list_digest(f) for k, f in enumerate(self.site_tests)}}

    def info(self) -> dict:
        return {**run_info(self.model, self.device, self.amp_dtype, self.initial_state(), self.strategy,
                           client_examples=[len(cl.dataset) for cl in self.clients],
                           val_examples=len(self.val_data), test_examples=len(self.test_data),
                           **({"site_test_examples": [len(d) for d in self.site_test_data]}
                              if self.site_test_data else {})),
                **self.source.info(), **privacy_info(self.config, self.strategy, self.clients)}

    def with_clients(self, config: Config, client_frames: Sequence[pd.DataFrame]) -> "RunParts":
        """The same data source, model and evaluation sets, with other clients (a baseline's): each
        starts from the model as built, not as the last run left it."""
        self.model.load_state_dict(self.initial, strict=False)
        strategy = strategy_for(config, self.model)
        # pos_weight from the clients' label counts (what each would report), the same for all of them;
        # none for the Flower server's parts, which hold no clients (it gathers the counts by query).
        weight = (pos_weight_from_counts(label_counts(f) for f in client_frames)
                  if config.pos_weight and client_frames else None)
        delta = example_delta(config, client_frames)
        clients = [Client.from_config(k, self.source.dataset(f), self.model, config, self.device, strategy.objective,
                                      pos_weight=weight, dp_delta=delta)
                   for k, f in enumerate(client_frames)]
        return dataclasses.replace(self, config=config, client_frames=list(client_frames), strategy=strategy,
                                   clients=clients)


def example_delta(config: Config, client_frames: Sequence[pd.DataFrame]) -> Optional[float]:
    """The run's delta under per-patient DP-SGD: config.dp_delta, else default_delta of the
    federation's training patients; None without dp "example"."""
    if config.dp != "example":
        return None
    if config.dp_delta is not None:
        return config.dp_delta
    return default_delta(sum(f["patient_id"].nunique() for f in client_frames))


def privacy_info(config: Config, strategy: Strategy, clients: Sequence[Client], specs: Optional[dict] = None) -> dict:
    """What run_info.json records of a DP run: the mechanism and its unit, the accountant, delta,
    the noise, and the final epsilon (per client for "example", assuming each trains in every
    round it is sampled for; for the federation for "client"); {} without DP. specs: client id ->
    PatientDPSpec, in place of the clients' own (a Flower server holds no clients)."""
    from .privacy import accountant_name, judged
    if config.dp is None:
        return {}
    if config.dp == "client":
        spec = strategy.spec
        eps = spec.epsilon_after(config.num_rounds)
        return {"privacy": {
            "dp": "client", "unit": "hospital (client)",
            "mechanism": "DP-FedAvg (McMahan et al. 2018): updates clipped to L2 dp_clip_norm, Gaussian noise on the "
                         "sum, fixed denominator (expected clients per round); Poisson client sampling",
            "accountant": accountant_name(), "delta": spec.delta, "noise_multiplier": spec.noise_multiplier,
            "clip_norm": spec.clip_norm, "sample_rate": spec.sample_rate, "steps": config.num_rounds,
            "final_epsilon": eps, "judged": judged(eps)}}
    from .federated import planned_rounds
    planned = planned_rounds(config)
    if specs is None:
        specs = {cl.client_id: cl.dp_sgd for cl in clients}
    ids = sorted(specs)
    eps = [specs[k].epsilon_after(planned[k]) for k in ids]
    return {"privacy": {
        "dp": "example", "unit": "patient",
        "mechanism": "DP-SGD (Abadi et al. 2016) per patient: patients Poisson-sampled each step, each patient's "
                     "mean-loss gradient clipped to L2 dp_clip_norm, Gaussian noise, fixed denominator",
        "accountant": accountant_name(), "delta": specs[ids[0]].delta if ids else None,
        "clip_norm": config.dp_clip_norm,
        "noise_multiplier": [specs[k].noise_multiplier for k in ids],
        "sample_rate": [specs[k].sample_rate for k in ids],
        "steps_per_round": [specs[k].steps_per_round for k in ids],
        "rounds_trained": [planned[k] for k in ids],
        "final_epsilon": eps, "judged": [judged(e) for e in eps]}}


def prepare(config: Config, splits: dict[str, pd.DataFrame],
            client_frames: Optional[Sequence[pd.DataFrame]] = None) -> RunParts:
    """Build a run's parts once: capped splits, caches, the partition (or the given client_frames),
    the model, cached features when asked, the strategy and one Client per table."""
    capped, frames, source = client_partition(config, splits, client_frames)
    frames, tests = site_tests(config, frames)
    return assemble(config, capped, frames, source, tests)


def assemble(config: Config, splits: dict[str, pd.DataFrame], client_frames: Sequence[pd.DataFrame],
             source: DataSource, site_test_frames: Sequence[pd.DataFrame] = ()) -> RunParts:
    """RunParts over tables already usable in source: the seeded model, cached features of val,
    test, every client's images and every site test when asked, the strategy and one Client per
    table (none for the Flower server, whose clients are the hospitals)."""
    c = config
    device = c.resolve_device()
    amp_dtype = c.resolve_amp(device)
    model = model_for(c, device)
    source.compute_features(model, [splits["val"], splits["test"], *client_frames, *site_test_frames], device,
                            amp_dtype)
    parts = RunParts(config=c, device=device, amp_dtype=amp_dtype, splits=dict(splits), client_frames=[],
                     source=source, model=model, initial=get_state(model, exchanged_keys(model)),
                     val_data=source.dataset(splits["val"]), test_data=source.dataset(splits["test"]),
                     strategy=strategy_for(c, model), site_tests=list(site_test_frames),
                     site_test_data=[source.dataset(f) for f in site_test_frames])
    return parts.with_clients(c, client_frames)


# The fields that shape a run's parts (data, caches, partition, model); the others (strategy, local
# training, rounds, sampling) may differ between runs over the same parts.
SETUP_FIELDS = ("num_clients", "image_size", "partition", "alpha", "partition_column", "min_client_patients",
                "min_client_images", "balanced_sizes", "site_test_fraction", "max_images", "preload",
                "weights", "seed", "image_cache", "feature_cache", "feature_dtype", "cache_dir", "device", "amp",
                "eval_batch_size", "num_workers", "progress")


def reuse(parts: RunParts, config: Config) -> RunParts:
    """parts for config: the same parts when the config is theirs, else the same data, caches and
    model with clients of this config (its strategy and local training), when it shares their
    SETUP_FIELDS; otherwise ValueError naming the fields that differ."""
    if config == parts.config:
        return parts
    differ = {k: (getattr(parts.config, k), getattr(config, k)) for k in SETUP_FIELDS
              if getattr(parts.config, k) != getattr(config, k)}
    if parts.config.group_norm != config.group_norm:   # DP and secagg swap layer4's BatchNorm for GroupNorm
        differ["dp"] = (parts.config.dp, config.dp)
        differ["secagg"] = (parts.config.secagg, config.secagg)
    if differ:
        raise ValueError(f"these parts were prepared for another setup ({differ}, prepared vs now): prepare "
                         f"new parts with fedxray.parts.prepare(config, splits)")
    return parts.with_clients(config, parts.client_frames)


def baseline_config(config: Config, num_clients: int = 1) -> Config:
    """The config of a baseline run: one client, every round, plain FedAvg (a single client's FedAvg
    is ordinary training), no partition, no further cap (the parts are capped already). Client-level
    DP has no meaning for one client and is dropped (the model keeps its GroupNorm, so the
    baselines are the same network); per-patient DP-SGD stays."""
    private = {} if config.dp != "client" else \
        {f.name: f.default for f in dataclasses.fields(Config) if f.name.startswith("dp")}
    return dataclasses.replace(config.with_strategy("fedavg"), num_clients=num_clients, fraction_fit=1.0,
                               partition="iid", partition_column=None, balanced_sizes=False, max_images=None,
                               **private)


def centralized(parts: RunParts) -> RunParts:
    """The centralized baseline's parts: one client holding every client's training images (in
    the train table's order when they are its rows, as after `partition`)."""
    frame = pd.concat(parts.client_frames, ignore_index=True)
    train = parts.splits["train"]
    in_train = train[train["image"].isin(set(frame["image"]))].reset_index(drop=True)
    if len(in_train) == len(frame):
        frame = in_train
    return parts.with_clients(baseline_config(parts.config), [frame])


def local_only(parts: RunParts, client_id: int, config: Optional[Config] = None) -> RunParts:
    """The local-only baseline of one client: it trains alone on its own partition (with config's
    local training, default the parts'; e.g. fine-tuning's)."""
    return parts.with_clients(baseline_config(config or parts.config), [parts.client_frames[client_id]])
