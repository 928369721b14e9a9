"""The Flower ServerApp: the run's fedxray strategy over the hospitals' SuperNodes, the global model
evaluated centrally on the server's val/test folders, the same files as fedxray.run_federated, and a resume
from the last checkpoint in output-dir when the server is restarted."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Optional

import pandas as pd
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from .. import history as hist
from ..checkpoint import (CHECKPOINT, CONFIG, HISTORY, RUN_INFO, CheckpointError, check_resume, clean_orphans,
                          load_checkpoint, restore_rng, save_checkpoint)
from ..client import ClientUpdate, DivergenceError
from ..config import Config
from ..data import load_nih
from ..federated import (RUN_LOCK, checked_seconds, checked_state, evaluate, final_rows, privacy_rows, read_finished,
                          restore_selection, restore_strategy)
from ..selection import BestRound
from ..io import atomic_write_text, file_lock
from ..parts import DataSource, RunParts, assemble, privacy_info
from ..saved_model import FINISHED, finished, save_final
from .records import TRUNK_DIGEST, to_record, to_state
from .runconfig import (FaultPolicy, check_supported, config_from_run_config, fault_policy, log_to_flower,
                        server_paths)
from .strategy import Dropped, FedXrayStrategy

log = logging.getLogger(__name__)


def server_parts(config: Config, val: pd.DataFrame, test: pd.DataFrame) -> RunParts:
    """The parts of a run as the server holds them: val and test through the run's DataSource (PNGs,
    the image cache or cached features, in config.cache_dir), the seeded model and the run's
    fedxray strategy, built by the functions fedxray.parts builds the in-process run with. It
    holds no clients: their data stays at the hospitals."""
    source = DataSource(config, [val, test])
    return assemble(config, {"val": source.usable(val), "test": source.usable(test)}, [], source)


class ServerRun:
    """The server's side of a Flower run: the global model, the fedxray strategy that combines the
    replies (and its server state), central evaluation on val and test, and the history, config,
    checkpoint, run info and final model, in FederatedRun's formats.

    A restarted server resumes from the checkpoint in output_dir after the same checks as the
    in-process resume (fedxray.checkpoint.check_resume): same experiment config, weights and
    trunk, same val and test images, and the same image list on every client (their digests, from
    the query); the strategy's server state (momentum, moments, control variates) comes back from
    the checkpoint, so a resumed run ends as the uninterrupted one.
    """

    def __init__(self, config: Config, val_dir: Path, test_dir: Path, output_dir: Path,
                 faults: FaultPolicy = FaultPolicy()):
        check_supported(config)
        self.config = config
        self.output_dir = Path(output_dir)
        self.faults = faults
        self.parts = server_parts(config, load_nih(val_dir), load_nih(test_dir))
        self.model, self.strategy = self.parts.model, self.parts.strategy
        self.keys = self.parts.keys
        self.global_state = self.parts.initial_state()
        self.rows: list[dict] = []
        self.pending_rows: list[dict] = []   # the round's training rows, until its evaluation
        self.round = 0
        self.seconds = 0.0                   # rounds' wall time, summed over restarts
        self.done = False                    # a finished run found in output_dir
        self.best = BestRound(config.select_round)   # the round reported, tested and saved
        self.round_started = time.perf_counter()
        self.inputs = self.parts.inputs()    # the clients' image lists are added from the query
        self.trunk_digest = self.inputs["trunk"]
        self.info = {**self.parts.info(), "engine": "flower", "flwr": _flwr_version(),
                     "exchanged_record_bytes": to_record(self.global_state).count_bytes()}

    def flower_strategy(self) -> FedXrayStrategy:
        """The Flower Strategy of this run, around this server's fedxray strategy, recording each
        round's training rows here."""
        return FedXrayStrategy(self.config, self.strategy, self.faults, on_train=self.record_train)

    # ------------------------------------------------------------------ start or resume
    def start(self, client_examples: dict[int, int], client_digests: dict[int, str],
              dp_specs: Optional[dict] = None) -> None:
        """Resume from output_dir's checkpoint when there is one (checked), else start fresh:
        config.json and run_info.json (the usable examples of each client; under per-patient
        DP-SGD each client's accounting, dp_specs, from the sizes they reported), then round 0."""
        self.info["client_examples"] = [client_examples[k] for k in sorted(client_examples)]
        if self.config.dp == "example":
            self.info.update(privacy_info(self.config, self.strategy, [], dp_specs or {}))
        self.inputs.update({f"client_{k}": d for k, d in sorted(client_digests.items())})
        self.output_dir.mkdir(parents=True, exist_ok=True)
        clean_orphans(self.output_dir)
        done = finished(self.output_dir)
        if done is not None:
            self._finished(done)
            return
        if (self.output_dir / CHECKPOINT).exists():
            try:
                self._resume()
            except CheckpointError as e:   # its remedy speaks of the notebook's resume=False
                raise CheckpointError(f"{e} (on Flower: choose another output-dir, or delete "
                                      f"{self.output_dir / CHECKPOINT} to start over)") from None
            return
        for name in (HISTORY, *FINISHED):
            (self.output_dir / name).unlink(missing_ok=True)
        self.config.save(self.output_dir / CONFIG)
        atomic_write_text(self.output_dir / RUN_INFO, json.dumps(self.info, indent=2) + "\n")
        self.evaluate_round(0, to_record(self.global_state))

    def _resume(self) -> None:
        """As FederatedRun resumes: the checked global state, the strategy's server state, the
        history and the RNG states."""
        path = self.output_dir / CHECKPOINT
        ckpt = load_checkpoint(path)
        check_resume(ckpt, path, self.config, self.info, self.inputs)
        self.global_state = checked_state(ckpt["global_state"], self.global_state, path, "global_state")
        restore_strategy(self.strategy, ckpt, path, self.global_state)
        self.seconds = checked_seconds(ckpt["extra"].get("seconds", 0.0), path)
        self.rows = ckpt["history"]
        self.round = ckpt["round"]
        restore_selection(self.best, ckpt, path, self.global_state, {})
        restore_rng(ckpt)
        log.info("resuming %s after round %d of %d", self.output_dir, self.round, self.config.num_rounds)

    def _finished(self, path: Path) -> None:
        """A run that already ended in output_dir, after the checks of a resume: nothing to do."""
        try:
            rec, state = read_finished(path, self.config, self.info, self.inputs, self.model)
            if not state:
                raise CheckpointError(f"{path} holds no weights")
        except CheckpointError as e:   # its remedy speaks of the notebook's resume=False
            raise CheckpointError(f"{e} (on Flower: choose another output-dir, or delete {path} to start "
                                  f"over)") from None
        self.global_state = {k: state[k].to(v.device) for k, v in self.global_state.items()}
        self.rows, self.round, self.seconds, self.done = rec["history"], rec["round"], rec["seconds"], True
        log.info("%s holds a finished run (%d rounds): nothing to do", self.output_dir, self.round)

    # ------------------------------------------------------------------ rounds
    def run(self, grid: Grid, flower: FedXrayStrategy, context: Optional[Context] = None) -> None:
        """The rounds not yet done, then final_model.pt. A failed round (strategy.RoundFailed, or a
        diverged aggregate) stops the run before anything of that round is written, with the
        strategy's server state as the last checkpoint has it. With secagg each round runs
        through Flower's SecAgg+ workflow (FedXrayStrategy.train_secure), which needs the
        ServerApp's context."""
        c = self.config
        if self.done:
            return
        settings = ConfigRecord({TRUNK_DIGEST: self.trunk_digest})
        for r in range(self.round + 1, c.num_rounds + 1):
            log.info("[ROUND %d/%d]", r, c.num_rounds)
            self.round_started = time.perf_counter()
            before = self.strategy.state_dict()
            if c.secagg:
                arrays, _ = flower.train_secure(r, to_record(self.global_state), ConfigRecord(dict(settings)), grid,
                                                context)
            else:
                messages = flower.configure_train(r, to_record(self.global_state), ConfigRecord(dict(settings)), grid)
                replies = flower.exchange(grid, messages, self.faults.round_timeout)
                arrays, _ = flower.aggregate_train(r, replies)
            try:
                self.evaluate_round(r, arrays)
            except DivergenceError:
                self.strategy.load_state_dict(before, self.global_state)
                raise
        self.rows += final_rows(self.parts, self.best, self.round)
        self.global_state = {k: self.best.global_state[k].to(v.device) for k, v in self.global_state.items()}
        self.save_final()

    def record_train(self, r: int, client_ids: list[int], updates: list[ClientUpdate],
                     dropped: list[Dropped], sent_bytes: list[int], received_bytes: Optional[int] = None) -> None:
        """The round's training, privacy and communication rows, as FederatedRun writes them
        (sent_bytes: each message sent, the dropped clients' too; received_bytes: what SecAgg+
        received, when the updates hold no state), and one row per dropped client (split "comm",
        metric "dropped_<why>", value 1)."""
        rows = hist.train_rows(r, client_ids, updates, sent_bytes, received_bytes)
        rows += privacy_rows(self.config, self.strategy, r, updates)
        rows += [hist.row(r, "comm", d.client_id, f"dropped_{d.why}", 1.0) for d in dropped]
        self.pending_rows = rows

    def evaluate_round(self, server_round: int, arrays: ArrayRecord) -> None:
        """Evaluate a new global state, then take it and save history and checkpoint (round 0 is
        the initial model, as in FederatedRun). A diverged one is neither taken nor saved."""
        c = self.config
        state = {k: v.to(self.parts.device) for k, v in to_state(arrays).items()}
        rows, self.pending_rows = self.pending_rows, []
        try:
            rows += evaluate(self.parts, state, server_round, "val")
            if c.test_every_round:
                rows += evaluate(self.parts, state, server_round, "test")
        except DivergenceError as e:
            raise DivergenceError(
                f"round {server_round}, the {self.strategy.name} aggregate of the replies that passed their "
                f"checks: {e}. Either the clients' training diverged (see their logs and train losses) or a "
                f"reply is poisoned within the checks' bounds; nothing of round {server_round} was saved, the "
                f"checkpoint of round {server_round - 1} is kept") from None
        self.global_state = state
        self.round = server_round
        self.rows += rows
        self.best.offer(server_round, rows, state, {})
        if server_round > 0:
            self.seconds += time.perf_counter() - self.round_started
        self.save_checkpoint()
        summary = {f"{row['split']} {row['metric']}": round(row["value"], 4) for row in rows
                   if row["client"] in (hist.GLOBAL, hist.ALL)
                   and row["metric"] in ("train_loss", "loss", "mean_auroc")}
        log.info("round %d saved: %s", server_round, summary)

    def history(self) -> pd.DataFrame:
        return hist.frame(self.rows)

    def save_checkpoint(self) -> None:
        """History, then checkpoint, each atomically, in FederatedRun's format (the strategy's server
        state in its extra)."""
        save_checkpoint(self.output_dir, self.round, self.global_state,
                        {k: {} for k in range(self.config.num_clients)}, self.rows, self.config, self.info,
                        self.inputs, extra={"strategy": self.strategy.state_dict(), "seconds": float(self.seconds),
                                                       "best": self.best.state_dict(self.round)})

    def save_final(self) -> None:
        """final_model.pt (fedxray.saved_model) in place of the checkpoint, as FederatedRun ends."""
        self.model.load_state_dict(self.global_state, strict=False)
        save_final(self.output_dir, self.model, self.round, {}, self.rows, self.config, self.info, self.inputs,
                   self.seconds)
        (self.output_dir / CHECKPOINT).unlink(missing_ok=True)


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
        strategy = server.flower_strategy()
        strategy.connect(grid)
        server.start(strategy.client_examples, strategy.client_digests, strategy.dp_specs)
        server.run(grid, strategy, context)
    log.info("fedxray Flower run finished: %s", paths.output_dir)
