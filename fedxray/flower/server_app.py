"""The Flower ServerApp: FedAvg over the hospitals' SuperNodes, the global model evaluated
centrally on the server's val/test folders, and the same files as fedxray.run_federated."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from ..client import ClientUpdate
from ..config import Config
from ..data import LABELS, NIHDataset, load_nih
from ..federated import (CHECKPOINT, CONFIG, FINAL_MODEL, HISTORY, HISTORY_COLUMNS, RUN_INFO,
                         metric_rows, predict, run_info, save_checkpoint, save_final_model, train_rows)
from ..io import atomic_write_text
from ..model import build_model, exchanged_keys, get_state, trunk_digest
from .records import TRUNK_DIGEST, to_record, to_state
from .runconfig import check_supported, config_from_run_config, server_paths
from .strategy import FedXrayAvg

log = logging.getLogger(__name__)


class ServerRun:
    """The server's side of a Flower run: the global model, its central evaluation on val and
    test, and the history, config, checkpoint, run info and final model, in FederatedRun's formats.
    The Flower app cannot resume: it refuses an output folder that holds a checkpoint."""

    def __init__(self, config: Config, val_dir: Path, test_dir: Path, output_dir: Path):
        check_supported(config)
        if (output_dir / CHECKPOINT).exists():
            raise FileExistsError(f"{output_dir} holds {CHECKPOINT} from an earlier run; the Flower app does "
                                  f"not resume. Choose another output-dir or delete that folder.")
        self.config = c = config
        self.output_dir = output_dir
        self.device = c.resolve_device()
        self.amp_dtype = c.resolve_amp(self.device)
        torch.manual_seed(c.seed)   # as FederatedRun: the random fc (and a random trunk) follow the seed
        self.model = build_model(len(LABELS), c.weights).to(self.device)
        if self.device.type == "cuda":
            self.model.to(memory_format=torch.channels_last)
        self.keys = exchanged_keys(self.model, c.bn_policy)
        self.global_state = get_state(self.model, self.keys)
        self.trunk_digest = trunk_digest(self.model)
        self.val_data = NIHDataset(load_nih(val_dir), c.image_size, preload=c.preload)
        self.test_data = NIHDataset(load_nih(test_dir), c.image_size, preload=c.preload)
        self.rows: list[dict] = []
        self.round = 0
        self.info = run_info(
            self.model, self.device, self.amp_dtype, self.global_state, client_examples=[],
            val_examples=len(self.val_data), test_examples=len(self.test_data), engine="flower",
            flwr=_flwr_version(), exchanged_record_bytes=to_record(self.global_state).count_bytes())

    def start(self, client_examples: dict[int, int]) -> None:
        """Write config.json and run_info.json (the examples each client holds, by client id)."""
        self.info["client_examples"] = [client_examples[k] for k in sorted(client_examples)]
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for name in (HISTORY, FINAL_MODEL):
            (self.output_dir / name).unlink(missing_ok=True)
        self.config.save(self.output_dir / CONFIG)
        atomic_write_text(self.output_dir / RUN_INFO, json.dumps(self.info, indent=2) + "\n")

    def record_train(self, r: int, client_ids: list[int], updates: list[ClientUpdate]) -> None:
        """The round's training and communication rows, as FederatedRun writes them."""
        rows = train_rows(r, client_ids, updates, self.global_state)   # sent: before aggregation
        self.rows += rows

    def evaluate(self, split: str) -> list[dict]:
        data = self.val_data if split == "val" else self.test_data
        if len(data) == 0:
            return []
        self.model.load_state_dict(self.global_state, strict=False)
        probs, labels = predict(self.model, data, self.config.eval_batch_size, self.device, self.amp_dtype)
        return metric_rows(self.round, split, "global", probs, labels)

    def evaluate_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Flower's evaluate_fn: take the new global state, evaluate it, save history and checkpoint.
        Round 0 is the initial model, as in FederatedRun."""
        c = self.config
        self.global_state = {k: v.to(self.device) for k, v in to_state(arrays).items()}
        self.round = server_round
        rows = self.evaluate("val")
        if c.test_every_round or 0 < server_round == c.num_rounds:
            rows += self.evaluate("test")
        self.rows += rows
        self.save_checkpoint()
        return MetricRecord({f"{row['split']}_{row['metric']}": float(row["value"]) for row in rows
                             if row["metric"] in ("loss", "mean_auroc")})

    def history(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=HISTORY_COLUMNS)

    def save_checkpoint(self) -> None:
        """History, then checkpoint, each atomically, in FederatedRun's format."""
        save_checkpoint(self.output_dir, self.round, self.global_state,
                        {k: {} for k in range(self.config.num_clients)}, self.rows, self.config, self.info)

    def save_final(self) -> None:
        self.model.load_state_dict(self.global_state, strict=False)
        save_final_model(self.output_dir, self.model, self.config, self.info)


def _flwr_version() -> str:
    from importlib.metadata import version
    return version("flwr")


def _log_to_flower() -> None:
    """Send fedxray's log records where Flower's go (the SuperLink's log, `flwr log`)."""
    ours, flowers = logging.getLogger("fedxray"), logging.getLogger("flwr")
    for handler in flowers.handlers:
        if handler not in ours.handlers:
            ours.addHandler(handler)
    ours.setLevel(logging.INFO)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    _log_to_flower()
    config = config_from_run_config(context.run_config)
    paths = server_paths(context.run_config)
    server = ServerRun(config, paths.val_dir, paths.test_dir, paths.output_dir)
    strategy = FedXrayAvg(config, server.keys, on_train=server.record_train)
    strategy.connect(grid)
    server.start(strategy.client_examples)
    result = strategy.start(grid=grid, initial_arrays=to_record(server.global_state),
                            num_rounds=config.num_rounds, timeout=strategy.timeout,
                            train_config=ConfigRecord({TRUNK_DIGEST: server.trunk_digest}),
                            evaluate_fn=server.evaluate_round)
    server.global_state = to_state(result.arrays)   # the last round's, as evaluated
    server.save_final()
    log.info("fedxray Flower run finished: %s", paths.output_dir)
