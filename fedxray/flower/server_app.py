"""The Flower ServerApp: FedAvg over the hospitals' SuperNodes, the global model evaluated
centrally on the server's val/test folders, the same files as fedxray.run_federated, and a resume
from the last checkpoint in output-dir when the server is restarted."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from ..aggregation import state_nbytes
from ..cache import build_image_cache
from ..checkpoint import (CHECKPOINT, CONFIG, FINAL_MODEL, HISTORY, HISTORY_COLUMNS, RUN_INFO, CheckpointError,
                          check_resume, clean_orphans, image_list_digest, load_checkpoint, save_checkpoint,
                          save_final_model)
from ..client import ClientUpdate, DivergenceError
from ..config import Config
from ..data import LABELS, NIHDataset, load_nih
from ..features import build_feature_cache
from ..federated import RUN_LOCK, metric_rows, predict, run_info, train_rows
from ..io import atomic_write_text, file_lock
from ..model import build_model, exchanged_keys, get_state, state_problems, trunk_digest
from .records import TRUNK_DIGEST, to_record, to_state
from .runconfig import (FaultPolicy, check_supported, config_from_run_config, fault_policy, log_to_flower,
                        server_paths)
from .strategy import Dropped, FedXrayAvg

log = logging.getLogger(__name__)


class ServerRun:
    """The server's side of a Flower run: the global model, its central evaluation on val and
    test, and the history, config, checkpoint, run info and final model, in FederatedRun's formats.

    A restarted server resumes from the checkpoint in output_dir after the same checks as the
    in-process resume (fedxray.checkpoint.check_resume): same experiment config, weights and
    trunk, same val and test images, and the same image list on every client (their digests, from
    the query). With image_cache/feature_cache on, val and test go through the same caches as in
    the in-process run (in config.cache_dir).
    """

    def __init__(self, config: Config, val_dir: Path, test_dir: Path, output_dir: Path,
                 faults: FaultPolicy = FaultPolicy()):
        check_supported(config)
        self.config = c = config
        self.output_dir = output_dir
        self.faults = faults
        self.device = c.resolve_device()
        self.amp_dtype = c.resolve_amp(self.device)
        torch.manual_seed(c.seed)   # as FederatedRun: the random fc (and a random trunk) follow the seed
        self.model = build_model(len(LABELS), c.weights).to(self.device)
        if self.device.type == "cuda":
            self.model.to(memory_format=torch.channels_last)
        self.keys = exchanged_keys(self.model, c.bn_policy)
        self.global_state = get_state(self.model, self.keys)
        self.trunk_digest = trunk_digest(self.model)
        extra = self._load_data(load_nih(val_dir), load_nih(test_dir))
        self.rows: list[dict] = []
        self.pending_rows: list[dict] = []   # the round's training rows, until its evaluation
        self.round = 0
        self.inputs = {"trunk": self.trunk_digest, "val": image_list_digest(self.val_frame),
                       "test": image_list_digest(self.test_frame)}
        self.info = run_info(
            self.model, self.device, self.amp_dtype, self.global_state, client_examples=[],
            val_examples=len(self.val_data), test_examples=len(self.test_data), engine="flower",
            flwr=_flwr_version(), exchanged_record_bytes=to_record(self.global_state).count_bytes(), **extra)

    def _load_data(self, val: pd.DataFrame, test: pd.DataFrame) -> dict:
        """val and test datasets as FederatedRun makes them: PNGs, the image cache, or cached
        features. Returns the run-info entries of the caches."""
        c = self.config
        if not (c.image_cache or c.feature_cache):
            self.val_frame, self.test_frame = val, test
            self.val_data, self.test_data = (NIHDataset(f, c.image_size, preload=c.preload) for f in (val, test))
            return {}
        cache = build_image_cache(pd.concat([val, test]), c.image_size, c.cache_dir, progress=c.progress)
        self.val_frame, self.test_frame = cache.usable(val), cache.usable(test)
        info = {"image_cache": str(cache.directory), "excluded_images": sorted(cache.excluded)}
        make = cache.dataset
        if c.feature_cache:
            both = cache.dataset(pd.concat([self.val_frame, self.test_frame]).drop_duplicates("image"))
            features = build_feature_cache(self.model, both, self.device, batch_size=c.eval_batch_size,
                                           amp_dtype=self.amp_dtype, dtype=getattr(torch, c.feature_dtype),
                                           progress=c.progress)
            info.update(feature_cache=features.placement, feature_cache_bytes=features.nbytes)
            make = features.dataset
        self.val_data, self.test_data = make(self.val_frame), make(self.test_frame)
        return info

    # ------------------------------------------------------------------ start or resume
    def start(self, client_examples: dict[int, int], client_digests: dict[int, str]) -> None:
        """Resume from output_dir's checkpoint when there is one (checked), else start fresh:
        config.json and run_info.json (the usable examples of each client), then round 0."""
        self.info["client_examples"] = [client_examples[k] for k in sorted(client_examples)]
        self.inputs.update({f"client_{k}": d for k, d in sorted(client_digests.items())})
        self.output_dir.mkdir(parents=True, exist_ok=True)
        clean_orphans(self.output_dir)
        if (self.output_dir / CHECKPOINT).exists():
            try:
                self._resume()
            except CheckpointError as e:   # its remedy speaks of the notebook's resume=False
                raise CheckpointError(f"{e} (on Flower: choose another output-dir, or delete "
                                      f"{self.output_dir / CHECKPOINT} to start over)") from None
            return
        for name in (HISTORY, FINAL_MODEL):
            (self.output_dir / name).unlink(missing_ok=True)
        self.config.save(self.output_dir / CONFIG)
        atomic_write_text(self.output_dir / RUN_INFO, json.dumps(self.info, indent=2) + "\n")
        self.evaluate_round(0, to_record(self.global_state))

    def _resume(self) -> None:
        path = self.output_dir / CHECKPOINT
        ckpt = load_checkpoint(path)
        check_resume(ckpt, path, self.config, self.info, self.inputs)
        problems = state_problems(ckpt["global_state"], self.global_state)
        if problems:
            raise CheckpointError(f"{path}: its global state does not fit this model ({'; '.join(problems[:3])}); "
                                  f"use another output-dir")
        self.global_state = {k: v.to(self.device) for k, v in ckpt["global_state"].items()}
        self.rows = ckpt["history"]
        self.round = ckpt["round"]
        log.info("resuming %s after round %d of %d", self.output_dir, self.round, self.config.num_rounds)

    # ------------------------------------------------------------------ rounds
    def run(self, grid: Grid, strategy: FedXrayAvg) -> None:
        """The rounds not yet done, then final_model.pt. A failed round (strategy.RoundFailed)
        stops the run before anything of that round is written."""
        c = self.config
        settings = ConfigRecord({TRUNK_DIGEST: self.trunk_digest})
        for r in range(self.round + 1, c.num_rounds + 1):
            log.info("[ROUND %d/%d]", r, c.num_rounds)
            messages = strategy.configure_train(r, to_record(self.global_state), ConfigRecord(dict(settings)), grid)
            replies = strategy.exchange(grid, messages, self.faults.round_timeout)
            arrays, _ = strategy.aggregate_train(r, replies)
            self.evaluate_round(r, arrays)
        self.save_final()

    def record_train(self, r: int, client_ids: list[int], updates: list[ClientUpdate],
                     dropped: list[Dropped]) -> None:
        """The round's training and communication rows, as FederatedRun writes them, and one row
        per dropped client (split "comm", metric "dropped_<why>", value 1)."""
        rows = train_rows(r, client_ids, updates, self.global_state)   # sent: before aggregation
        sent_to = len(client_ids) + sum(d.why != "offline" for d in dropped)
        for row in rows:
            if row["metric"] == "bytes_sent":
                row["value"] = float(state_nbytes(self.global_state) * sent_to)
        rows += [dict(round=r, split="comm", client=str(d.client_id), metric=f"dropped_{d.why}", value=1.0)
                 for d in dropped]
        self.pending_rows = rows

    def evaluate(self, split: str) -> list[dict]:
        data = self.val_data if split == "val" else self.test_data
        if len(data) == 0:
            return []
        self.model.load_state_dict(self.global_state, strict=False)
        probs, labels = predict(self.model, data, self.config.eval_batch_size, self.device, self.amp_dtype)
        return metric_rows(self.round, split, "global", probs, labels)

    def evaluate_round(self, server_round: int, arrays: ArrayRecord) -> None:
        """Take the new global state, evaluate it, then save history and checkpoint (round 0 is
        the initial model, as in FederatedRun)."""
        c = self.config
        self.global_state = {k: v.to(self.device) for k, v in to_state(arrays).items()}
        self.round = server_round
        rows, self.pending_rows = self.pending_rows, []
        try:
            rows += self.evaluate("val")
            if c.test_every_round or 0 < server_round == c.num_rounds:
                rows += self.evaluate("test")
        except DivergenceError as e:
            raise DivergenceError(
                f"round {server_round}, the average of the replies that passed their checks: {e}. Either the "
                f"clients' training diverged (see their logs and train losses) or a reply is poisoned within "
                f"the checks' bounds; nothing of round {server_round} was saved, the checkpoint of round "
                f"{server_round - 1} is kept") from None
        self.rows += rows
        self.save_checkpoint()
        summary = {f"{row['split']} {row['metric']}": round(row["value"], 4) for row in rows
                   if row["client"] in ("global", "all") and row["metric"] in ("train_loss", "loss", "mean_auroc")}
        log.info("round %d saved: %s", server_round, summary)

    def history(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=HISTORY_COLUMNS)

    def save_checkpoint(self) -> None:
        """History, then checkpoint, each atomically, in FederatedRun's format."""
        save_checkpoint(self.output_dir, self.round, self.global_state,
                        {k: {} for k in range(self.config.num_clients)}, self.rows, self.config, self.info,
                        self.inputs)

    def save_final(self) -> None:
        self.model.load_state_dict(self.global_state, strict=False)
        save_final_model(self.output_dir, self.model, self.config, self.info)


def _flwr_version() -> str:
    from importlib.metadata import version
    return version("flwr")


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    log_to_flower()
    config = config_from_run_config(context.run_config)
    paths = server_paths(context.run_config)
    faults = fault_policy(context.run_config, config)
    paths.output_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(paths.output_dir / RUN_LOCK, wait=False, purpose=f"a fedxray run in {paths.output_dir}"):
        server = ServerRun(config, paths.val_dir, paths.test_dir, paths.output_dir, faults)
        strategy = FedXrayAvg(config, server.keys, faults, on_train=server.record_train)
        strategy.connect(grid)
        server.start(strategy.client_examples, strategy.client_digests)
        server.run(grid, strategy)
    log.info("fedxray Flower run finished: %s", paths.output_dir)
