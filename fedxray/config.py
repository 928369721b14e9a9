"""One dataclass with every hyperparameter of a run; it is saved next to every result."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

# Each set of allowed values lives with the code that implements it; Config checks against them.
from .client import OPTIMIZERS
from .device import AMP_MODES
from .features import FEATURE_DTYPES as _FEATURE_DTYPES
from .model import BN_POLICIES
from .partition import SCHEMES as PARTITIONS
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
DATASET_DEFAULTS = {
    "nih": {"image_size": 224, "num_rounds": 10, "test_every_round": False,
            "image_cache": True, "feature_cache": False},
    "demo": {"image_size": 64, "num_rounds": 5, "test_every_round": True,
             "image_cache": True, "feature_cache": True},
}


@dataclass
class Config:
    # Federation
    num_clients: int = 5
    num_rounds: int = 10
    fraction_fit: float = 1.0          # share of clients sampled each round (at least one)
    local_epochs: int = 1
    # Local optimisation: a fresh optimizer every round, as in FedAvg (McMahan et al. 2017)
    batch_size: int = 32
    lr: float = 1e-3
    optimizer: str = "adam"            # "adam" or "sgd"
    momentum: float = 0.9              # sgd only
    weight_decay: float = 0.0
    # Data
    image_size: int = 224
    partition: str = "iid"             # "iid", "dirichlet" (label skew), "column", "quantity"
    alpha: float = 0.5                 # Dirichlet concentration: small = more skewed
    partition_column: Optional[str] = None   # for partition="column"; None = "view"
    max_images: Optional[int] = None   # cap on training images (whole patients), for quick runs
    preload: bool = False              # decode every image once into memory (small data only)
    # Strategy: how the server combines updates and what clients minimise (fedxray.strategies;
    # README "Strategies"). Hyperparameters a strategy does not use must stay None.
    strategy: str = "fedavg"           # fedavg, fedprox, fedavgm, fedadam, fedyogi, fedadagrad, median,
                                       # trimmed_mean, scaffold
    proximal_mu: Optional[float] = None           # fedprox: weight of (mu/2)*||w - w_global||^2 (0.01)
    server_learning_rate: Optional[float] = None  # fedavgm (0.1), scaffold (1.0): server step size
    server_momentum: Optional[float] = None       # fedavgm: server momentum (0.9)
    eta: Optional[float] = None        # fedadam, fedyogi, fedadagrad: server learning rate (0.01)
    beta_1: Optional[float] = None     # fedadam, fedyogi: first-moment decay (0.9)
    beta_2: Optional[float] = None     # fedadam, fedyogi: second-moment decay (0.99)
    tau: Optional[float] = None        # fedadam, fedyogi, fedadagrad: adaptivity (1e-3)
    beta: Optional[float] = None       # trimmed_mean: fraction cut at each end (0.2)
    # Model
    weights: Optional[str] = "auto"    # "auto", "imagenet", a .pth path, or None (random)
    bn_policy: str = "average"         # layer4 BatchNorm: "average" with the weights, or "local" (FedBN)
    # Evaluation
    eval_batch_size: int = 128
    test_every_round: bool = True      # False: test only after the last round
    # Execution
    seed: int = 0
    device: str = "auto"               # "auto" = cuda when present, else cpu
    amp: str = "auto"                  # "auto" = bf16 where supported, fp16 on older GPUs, off on CPU
    num_workers: int = 0
    progress: bool = True
    # Speed (fedxray.cache). The image cache gives the same results bitwise; cached features give
    # them to float tolerance (fp16 storage: to fp16 rounding of layer3's output).
    image_cache: bool = False          # decode every PNG once into a uint8 memory map in cache_dir
    feature_cache: bool = False        # run the frozen trunk once per image; train layer4+fc on its
                                       # output (builds the image cache first)
    feature_dtype: str = "float16"     # storage of cached features: "float16" or "float32"
    cache_dir: Optional[str] = None    # None: /kaggle/working/fedxray_cache on Kaggle, else data/cache

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
        need(self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        need(self.amp in AMP_MODES, f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        need(self.bn_policy in BN_POLICIES, f"bn_policy must be one of {BN_POLICIES}, got {self.bn_policy!r}")
        need(self.feature_dtype in FEATURE_DTYPES,
             f"feature_dtype must be one of {FEATURE_DTYPES}, got {self.feature_dtype!r}")
        need(self.partition in PARTITIONS, f"partition must be one of {PARTITIONS}, got {self.partition!r}")
        need(self.max_images is None or self.max_images >= 1, "max_images must be >= 1 or None")
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
        need(self.image_size >= 64, f"image_size must be >= 64: ResNet-34 downsamples 32x and layer4's "
             f"BatchNorm needs more than one value per channel, got {self.image_size}")

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
        defaults = DATASET_DEFAULTS[dataset]
        chosen = {k: v for k, v in fields.items() if v is not None or k not in defaults}
        return cls(**{**defaults, **chosen})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
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
