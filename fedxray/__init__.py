"""fedxray: federated learning (FedAvg, FedProx, FedAdam, SCAFFOLD, ...) for NIH ChestX-ray14 with a
partly frozen ResNet-34."""
from .data import (LABELS, DataError, ImageDecodeError, NIHDataset, attach_paths, find_csv,
                   index_images, label_matrix, load_gray, load_nih, read_boxes, read_metadata, split_by_patient)
from .evaluation import bootstrap_auroc, expected_calibration_error, paired_bootstrap
from .aggregation import fedavg, state_nbytes
from .demo import is_demo_dataset, make_demo_dataset
from .metrics import auprc_per_finding, auroc_per_finding, mean_auroc
from .partition import client_finding_table, label_skew, partition, zero_positive_findings
from .model import EXCHANGED_PREFIXES, build_model
from .device import DivergenceError
from .client import Client, ClientUpdate, NonFiniteLossError
from .strategies import STRATEGIES, Strategy, make_strategy
from .config import Config
from .checkpoint import CheckpointError
from .parts import RunParts, prepare
from .federated import RunResult, run_centralized, run_federated, run_local_only
from .saved_model import load_model
from .augment import Augmentation
from .objectives import pos_weight_from_counts
from .selection import reported_round

__version__ = "0.1.0"

__all__ = [
    "LABELS", "DataError", "ImageDecodeError", "NIHDataset", "attach_paths", "find_csv", "index_images",
    "label_matrix", "load_gray", "load_nih", "read_boxes", "read_metadata", "split_by_patient",
    "bootstrap_auroc", "paired_bootstrap", "expected_calibration_error",
    "fedavg", "state_nbytes", "is_demo_dataset", "make_demo_dataset", "auprc_per_finding", "auroc_per_finding",
    "mean_auroc", "client_finding_table", "label_skew", "partition", "zero_positive_findings", "EXCHANGED_PREFIXES", "build_model",
    "Client", "ClientUpdate", "DivergenceError", "NonFiniteLossError", "STRATEGIES", "Strategy", "make_strategy",
    "CheckpointError", "Config", "RunParts", "prepare", "RunResult", "run_centralized", "run_federated",
    "run_local_only", "load_model", "Augmentation", "pos_weight_from_counts", "reported_round",
]
