"""The federated round loop: sampled clients fit, the strategy combines their updates, the global
model is evaluated every round into a long-format history, with atomic checkpoints and resume. The
run's parts (data, caches, model, clients) come ready-made from fedxray.parts; the centralized and
local-only baselines run the same loop over the same parts."""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch

from . import history as hist
from .checkpoint import (CHECKPOINT, CONFIG, HISTORY, RUN_INFO, CheckpointError, check_resume, clean_orphans,
                         is_seconds, load_checkpoint, payload_digest, restore_rng, save_checkpoint)
from .client import Client, derive_seed
from .config import Config
from .device import DivergenceError, predict
from .io import atomic_write, atomic_write_text, file_lock
from .model import EXCHANGED_PREFIXES, ChestXrayResNet, state_problems
from .privacy import poisson_clients
from .parts import RunParts, cap_splits, centralized, local_only, prepare, reuse  # noqa: F401  (cap_splits: public here)
from .progress import bar
from .saved_model import FINISHED, finished, load_final, save_final
from .selection import BestRound
from .strategies import Strategy

log = logging.getLogger(__name__)

RUN_LOCK = ".lock"   # held by the process running in an output folder
_SAMPLING_STREAM = 0x5A3F   # keeps the client-sampling RNG apart from the clients' own streams


@dataclass
class RunResult:
    history: pd.DataFrame
    model: Optional[ChestXrayResNet]   # None for a run that kept no weights
    output_dir: Path
    info: dict


def sample_clients(num_clients: int, fraction: float, seed: int, round_num: int) -> list[int]:
    """The clients that train in a round: max(1, round(fraction * K)), a function of (seed, round)."""
    m = max(1, int(round(fraction * num_clients)))
    rng = np.random.default_rng(derive_seed(seed, round_num, _SAMPLING_STREAM))
    return sorted(rng.choice(num_clients, size=m, replace=False).tolist())


def round_clients(config: Config, round_num: int) -> list[int]:
    """The clients that train in a round: sample_clients, or under client-level DP each client with
    probability fraction_fit (Poisson, as its accountant assumes; possibly none)."""
    if config.dp == "client":
        return poisson_clients(config.num_clients, config.fraction_fit, config.seed, round_num)
    return sample_clients(config.num_clients, config.fraction_fit, config.seed, round_num)


def planned_rounds(config: Config, upto: Optional[int] = None) -> dict[int, int]:
    """Client id -> the rounds among 1..upto (default: all) it is sampled to train in."""
    out = dict.fromkeys(range(config.num_clients), 0)
    for r in range(1, (config.num_rounds if upto is None else upto) + 1):
        for k in round_clients(config, r):
            out[k] += 1
    return out


def privacy_rows(config: Config, strategy: Strategy, round_num: int, updates: Sequence) -> list[dict]:
    """The round's epsilon rows (split "privacy"): the federation's under client-level DP, each
    trained client's as it reported it under per-patient DP-SGD; none without DP."""
    if config.dp == "client":
        return [hist.row(round_num, "privacy", hist.GLOBAL, "epsilon", strategy.spec.epsilon_after(round_num))]
    if config.dp == "example":
        return [hist.row(round_num, "privacy", u.client_id, "epsilon", u.epsilon) for u in updates]
    return []


def evaluate(parts: RunParts, global_state: dict[str, torch.Tensor], round_num: int, split: str,
             clients: Sequence[Client] = ()) -> list[dict]:
    """History rows of the global model on val, test or a site's test (hist.site_split). Under
    personalization (config.local_keys; clients given, each with its own kept entries) every
    client's model (global weights + its own entries) is evaluated, and the global row is their
    averaged prediction."""
    data = parts.eval_data(split)
    if len(data) == 0:
        return []
    personal = bool(parts.config.local_keys) and clients
    probs, labels = _predict_each(parts, data, global_state, [cl.local_state for cl in clients] if personal else [])
    if not personal:
        return hist.metric_rows(round_num, split, hist.GLOBAL, probs[0], labels)
    rows = [r for cl, p in zip(clients, probs) for r in hist.metric_rows(round_num, split, cl.client_id, p, labels)]
    return rows + hist.metric_rows(round_num, split, hist.GLOBAL, np.mean(probs, axis=0), labels)


def _predict_each(parts: RunParts, data, global_state: dict[str, torch.Tensor],
                  local_states: Sequence[dict]) -> tuple[list[np.ndarray], np.ndarray]:
    """Probabilities on data of the global model, or (local_states given: personalization) of each
    client's model, the global weights with its own kept entries; and the labels."""
    c, model = parts.config, parts.model
    out, labels = [], None
    for state in [{**global_state, **s} for s in local_states] or [global_state]:
        model.load_state_dict(state, strict=False)
        probs, labels = predict(model, data, c.eval_batch_size, parts.device, parts.amp_dtype)
        out.append(probs)
    return out, labels


def test_predictions(parts: RunParts, global_state: dict[str, torch.Tensor],
                     local_states: Optional[dict] = None) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and labels of a trained model on the parts' test set, in the order of
    parts.splits["test"] (whose patient_id column the bootstrap resamples): the global state, or
    under personalization (local_states: client id -> its kept entries) the mean of the clients'
    models, as evaluate scores it. For a saved run: fedxray.saved_model.load_final(path)["state"]
    and ["local_states"]."""
    personal = bool(parts.config.local_keys) and local_states
    probs, labels = _predict_each(parts, parts.test_data, global_state,
                                  [s for _, s in sorted(local_states.items())] if personal else [])
    return np.mean(probs, axis=0), labels


def final_rows(parts: RunParts, best: BestRound, num_rounds: int, clients: Sequence[Client] = ()) -> list[dict]:
    """What a run adds once its rounds are done: the test rows of the selected round's model (scored
    here, once, unless test_every_round scored every round), its rows on each site's own test
    (config.site_test_fraction; once, whatever test_every_round) and the row naming that round. The
    clients take the selected round's local states (personalization), which the final model saves."""
    for cl in clients:
        cl.local_state = {k: v.to(cl.local_state[k].device) for k, v in best.local_states.get(cl.client_id, {}).items()} \
            if cl.local_state else {}
    rows = [] if parts.config.test_every_round else evaluate(parts, best.global_state, best.round, "test", clients)
    for k in range(len(parts.site_tests)):
        rows += evaluate(parts, best.global_state, best.round, hist.site_split(k), clients)
    return rows + [best.row(num_rounds)]


class FederatedRun:
    """One federated experiment over prepared parts: its global state, its strategy's server
    state, and its history and checkpoints in output_dir.

    While it trains, output_dir holds checkpoint.pt (every round); when it ends, one sealed file
    replaces it (fedxray.saved_model): final_model.pt with what was trained, or final_result.pt
    when keep_model is False (the local-only clients). Running it again then trains nothing.
    trunk_dir: where a random trunk is stored once (default: output_dir's parent's trunks/).
    name: the progress bar's label (default: the strategy).
    start_state: the global state round 1 starts from (default: the parts' initial state), e.g. a
    trained model to fine-tune; it is one of the run's inputs (a resume from another is refused)."""

    def __init__(self, parts: RunParts, output_dir: str | Path, keep_model: bool = True,
                 trunk_dir: Optional[str | Path] = None, name: Optional[str] = None,
                 start_state: Optional[dict[str, torch.Tensor]] = None):
        self.parts = parts
        self.config = parts.config
        self.output_dir = Path(output_dir)
        self.keep_model, self.trunk_dir = keep_model, trunk_dir
        self.name = name or parts.config.strategy
        self.strategy = parts.strategy   # built with the parts, from their config
        self.model, self.clients = parts.model, parts.clients
        self.start_state = None
        if start_state is not None:
            initial = parts.initial_state()
            self.start_state = checked_state({k: v.detach().cpu() for k, v in start_state.items()},
                                             initial, Path(output_dir), "the start state")
        self.global_state = self.start_state if self.start_state is not None else parts.initial_state()
        if self.config.secagg:
            log.warning("secagg=True in process: the model and aggregation of a Flower SecAgg+ run (GroupNorm, "
                        "exact sums); there is no network here and nothing is secured")
        self.rows: list[dict] = []
        self.round = 0
        self.seconds = 0.0               # training and evaluation time, summed over resumes
        self.best = BestRound(self.config.select_round)   # the round reported, tested and saved
        self.inputs = parts.inputs()
        if self.start_state is not None:
            self.inputs["start_state"] = payload_digest(self.start_state)
        self.info = parts.info()

    @property
    def client_frames(self) -> list[pd.DataFrame]:
        return self.parts.client_frames

    def evaluate(self, round_num: int, split: str) -> list[dict]:
        return evaluate(self.parts, self.global_state, round_num, split, self.clients)

    # ------------------------------------------------------------------ rounds
    def run(self, resume: bool = True, progress: Optional[bool] = None) -> RunResult:
        """The rounds not yet done, holding the output folder's lock (a second process running in
        the same folder is refused, naming the first). resume=False starts over."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with file_lock(self.output_dir / RUN_LOCK, wait=False, purpose=f"a fedxray run in {self.output_dir}"):
            clean_orphans(self.output_dir)
            return self._run(resume, self.config.progress if progress is None else progress)

    def _run(self, resume: bool, progress: bool) -> RunResult:
        c = self.config
        done = finished(self.output_dir) if resume else None
        if done is not None:
            self._load_final(done)
            return RunResult(self.history(), self.model if self.keep_model else None, self.output_dir, self.info)
        if resume and (self.output_dir / CHECKPOINT).exists():
            self._load_checkpoint()
        else:
            self._start_fresh()
        rounds = bar(range(self.round + 1, c.num_rounds + 1), desc=self.name, enabled=progress,
                     initial=self.round, total=c.num_rounds, unit="round")
        self._postfix(rounds)
        for r in rounds:
            self._round(r, rounds)
            self._postfix(rounds)
        rounds.close()
        t0 = time.perf_counter()
        self.rows += final_rows(self.parts, self.best, self.round, self.clients)
        self.global_state = {k: self.best.global_state[k].to(v.device) for k, v in self.global_state.items()}
        self.seconds += time.perf_counter() - t0
        self.model.load_state_dict(self.global_state, strict=False)
        self._save_final()
        return RunResult(self.history(), self.model if self.keep_model else None, self.output_dir, self.info)

    def _postfix(self, rounds, client: Optional[str] = None) -> None:
        """The bar's postfix: the round done, its validation AUROC and what runs now; redrawn at
        most once a second (an exported notebook keeps every redraw)."""
        auroc = hist.last_value(self.rows, "val", "mean_auroc")
        rounds.set_postfix_str(f"round {self.round}/{self.config.num_rounds}, val AUROC {auroc:.3f}"
                               + (f", {client}" if client else ""), refresh=False)
        if time.monotonic() - getattr(rounds, "drawn_at", 0.0) >= 1.0:
            rounds.refresh()
            rounds.drawn_at = time.monotonic()

    def _start_fresh(self) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for name in (CHECKPOINT, HISTORY, *FINISHED):
            (self.output_dir / name).unlink(missing_ok=True)
        self.config.save(self.output_dir / CONFIG)
        self.strategy.reset()   # parts reused by a second run must not carry the first run's server state
        self.best = BestRound(self.config.select_round)
        self.global_state = {k: v.clone() for k, v in (self.start_state or self.parts.initial_state()).items()}
        atomic_write_text(self.output_dir / RUN_INFO, json.dumps(self.info, indent=2) + "\n")
        t0 = time.perf_counter()
        self.rows = self.evaluate(0, "val")
        if self.config.test_every_round:
            self.rows += self.evaluate(0, "test")
        self.round, self.seconds = 0, time.perf_counter() - t0
        self._save_checkpoint()

    def _round(self, r: int, rounds) -> None:
        c = self.config
        t0 = time.perf_counter()
        chosen = round_clients(c, r)
        kept = f"the checkpoint of round {r - 1} in {self.output_dir} is kept"
        updates, sent_bytes = [], []
        for i, k in enumerate(chosen):
            self._postfix(rounds, f"training client {k} ({i + 1} of {len(chosen)})")
            payload = self.strategy.payload(k, self.global_state)
            sent_bytes.append(hist.message_bytes(self.global_state, payload))
            try:
                updates.append(self.clients[k].fit(self.global_state, round_num=r, payload=payload))
            except DivergenceError as e:
                raise type(e)(f"{e}; {kept}") from None
        self._postfix(rounds, "evaluating")
        # The strategy's server state changes only once the round is saved: a round that fails
        # after aggregation must leave it as the checkpoint has it.
        before = self.strategy.state_dict()
        new_state = self.strategy.aggregate(self.global_state, updates, r)
        try:
            rows = hist.train_rows(r, chosen, updates, sent_bytes) + privacy_rows(c, self.strategy, r, updates)
            rows += evaluate(self.parts, new_state, r, "val", self.clients)
            if c.test_every_round:
                rows += evaluate(self.parts, new_state, r, "test", self.clients)
        except DivergenceError as e:
            self.strategy.load_state_dict(before, self.global_state)
            raise DivergenceError(f"round {r}, the {self.strategy.name} aggregate of clients {chosen}: {e}; "
                                  f"{kept}") from None
        self.global_state = new_state
        self.rows += rows
        self.round = r
        self.best.offer(r, rows, new_state, {cl.client_id: cl.local_state for cl in self.clients})
        self.seconds += time.perf_counter() - t0
        self._save_checkpoint()

    def history(self) -> pd.DataFrame:
        return hist.frame(self.rows)

    # ------------------------------------------------------------------ persistence
    def _save_checkpoint(self) -> None:
        save_checkpoint(self.output_dir, self.round, self.global_state,
                        {cl.client_id: cl.local_state for cl in self.clients}, self.rows, self.config,
                        self.info, self.inputs, extra={"strategy": self.strategy.state_dict(),
                                                       "seconds": float(self.seconds),
                                                       "best": self.best.state_dict(self.round)})

    def _load_checkpoint(self) -> None:
        """Resume from the verified checkpoint, after checking it was written by this very
        experiment: same config, weights, trunk and images (else CheckpointError says what changed)."""
        path = self.output_dir / CHECKPOINT
        ckpt = load_checkpoint(path)
        check_resume(ckpt, path, self.config, self.info, self.inputs)
        self.global_state = checked_state(ckpt["global_state"], self.global_state, path, "global_state")
        self._restore_local_states(ckpt["local_states"], path)
        restore_strategy(self.strategy, ckpt, path, self.global_state)
        self.seconds = checked_seconds(ckpt["extra"].get("seconds", 0.0), path)
        self.rows = ckpt["history"]
        self.round = ckpt["round"]
        restore_selection(self.best, ckpt, path, self.global_state,
                          {cl.client_id: cl.local_state for cl in self.clients})
        restore_rng(ckpt)
        for k, n in planned_rounds(self.config, self.round).items():   # each client's accountant
            self.clients[k].rounds_trained = n
        log.info("resuming %s after round %d of %d", self.output_dir, self.round, self.config.num_rounds)

    def _load_final(self, path: Path) -> None:
        """A finished run of this very experiment (the checks of a resume): its history, and its
        trained state when it kept one. Nothing is trained again."""
        rec, state = read_finished(path, self.config, self.info, self.inputs, self.model)
        if self.keep_model and not state:
            raise CheckpointError(f"{path} kept no weights, but this run keeps its model: delete it, or start "
                                  f"over with resume=False")
        if state:
            self.model.load_state_dict(state, strict=False)
            self.global_state = {k: state[k].to(v.device) for k, v in self.global_state.items()}
            self._restore_local_states(rec["local_states"], path)
        self.rows, self.round, self.seconds = rec["history"], rec["round"], rec["seconds"]
        hist_frame = self.history()
        atomic_write(self.output_dir / HISTORY, lambda tmp: hist_frame.to_csv(tmp, index=False))
        (self.output_dir / CHECKPOINT).unlink(missing_ok=True)   # left by a stop just before it was removed
        log.info("%s finished earlier (%d rounds): nothing to train", self.output_dir, self.round)

    def _restore_local_states(self, saved: dict, path: Path) -> None:
        """Each client's local state (FedBN's BatchNorm; empty otherwise), checked against its own."""
        for cl in self.clients:
            cl.local_state = checked_state(saved.get(cl.client_id, {}), cl.local_state, path,
                                           f"client {cl.client_id}'s local state")

    def _save_final(self) -> None:
        save_final(self.output_dir, self.model, self.round, {cl.client_id: cl.local_state for cl in self.clients},
                   self.rows, self.config, self.info, self.inputs, self.seconds, keep_model=self.keep_model,
                   trunk_dir=self.trunk_dir)
        (self.output_dir / CHECKPOINT).unlink(missing_ok=True)


def read_finished(path: Path, config: Config, info: dict, inputs: dict, model: ChestXrayResNet) -> tuple[dict, dict]:
    """A finished run's record (fedxray.saved_model) after the checks of a resume (same config,
    weights, trunk and images; all its rounds), and its trained state checked against model's
    layer4 and fc ({} for a run that kept no weights). Both drivers read finished runs with it."""
    rec = load_final(path)
    check_resume(rec, path, config, info, inputs)
    if rec["round"] != config.num_rounds:
        raise CheckpointError(f"{path} says round {rec['round']} of {config.num_rounds}: delete it, or start "
                              f"over with resume=False")
    if not rec["state"]:
        return rec, {}
    own = {k: v for k, v in model.state_dict().items() if k.startswith(EXCHANGED_PREFIXES)}
    return rec, checked_state(rec["state"], own, path, "the trained state")


def checked_seconds(value, path: Path) -> float:
    if not is_seconds(value):
        raise CheckpointError(f"{path}: its run time {value!r} is not a number of seconds; delete it, or start "
                              f"over with resume=False")
    return value


def checked_state(saved: dict, expected: dict, path: Path, what: str) -> dict:
    """saved, when it has exactly the keys, shapes and dtypes of expected (the model's own) and
    finite values."""
    problems = state_problems(saved, expected)
    if problems:
        raise CheckpointError(f"{path}: {what} does not fit this model ({'; '.join(problems[:3])}); "
                              f"use another output_dir, or resume=False to start over")
    return saved


def restore_strategy(strategy: Strategy, ckpt: dict, path: Path, global_state: dict) -> None:
    """Load the strategy's server state (momentum, moments, control variates) from a checkpoint,
    after the strategy's own checks."""
    saved = ckpt["extra"].get("strategy")
    if saved is None:
        raise CheckpointError(f"{path} holds no server state of strategy {strategy.name!r}: use another "
                              f"output_dir, or resume=False to start over")
    try:
        strategy.load_state_dict(saved, global_state)
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{path}: its {strategy.name} server state cannot be used ({e}); use another "
                              f"output_dir, or resume=False to start over") from None


def restore_selection(best: BestRound, ckpt: dict, path: Path, global_state: dict, local_states: dict) -> None:
    """Load the model-selection state (the best round so far and its states) from a checkpoint,
    checked against the run's own states."""
    saved = ckpt["extra"].get("best")
    if saved is None:
        raise CheckpointError(f"{path} holds no model-selection state (written by an older fedxray?): use "
                              f"another output_dir, or resume=False to start over")
    try:
        best.load_state_dict(saved, ckpt["round"], global_state, local_states, path)
    except ValueError as e:
        raise CheckpointError(f"{e}; use another output_dir, or resume=False to start over") from None


def run_federated(config: Config, splits: dict[str, pd.DataFrame], output_dir: str | Path,
                  resume: bool = True, client_frames: Optional[Sequence[pd.DataFrame]] = None,
                  parts: Optional[RunParts] = None, trunk_dir: Optional[str | Path] = None) -> RunResult:
    """config.strategy over config.num_clients clients built from splits['train'] (or client_frames);
    parts: already prepared ones (fedxray.parts), e.g. to run several strategies on one partition.
    trunk_dir: see FederatedRun."""
    parts = reuse(parts, config) if parts is not None else prepare(config, splits, client_frames)
    return FederatedRun(parts, output_dir, trunk_dir=trunk_dir).run(resume=resume)


def run_centralized(config: Config, splits: dict[str, pd.DataFrame], output_dir: str | Path,
                    resume: bool = True, parts: Optional[RunParts] = None,
                    trunk_dir: Optional[str | Path] = None) -> RunResult:
    """The centralized baseline: one client holding all training data, same rounds and epochs, plain
    FedAvg (ordinary training). parts: reuse the federated run's caches, model and partition."""
    parts = reuse(parts, config) if parts is not None else prepare(config, splits)
    return FederatedRun(centralized(parts), output_dir, trunk_dir=trunk_dir, name="centralized").run(resume=resume)


def run_local_only(config: Config, splits: dict[str, pd.DataFrame], output_dir: str | Path,
                   resume: bool = True, parts: Optional[RunParts] = None, keep_models: bool = False,
                   trunk_dir: Optional[str | Path] = None) -> pd.DataFrame:
    """The local-only baseline: each client trains alone on its partition (the federated run's),
    evaluated on the same val and test sets (and every site's test). Returns the combined history
    with 'client' naming the client whose model was evaluated. Each client's run keeps only its
    history (final_result.pt), unless keep_models."""
    parts = reuse(parts, config) if parts is not None else prepare(config, splits)
    return _each_client(lambda k: local_only(parts, k), len(parts.client_frames), output_dir, resume, keep_models,
                        trunk_dir, "local-only", "a local-only baseline")


def run_finetuned(config: Config, splits: dict[str, pd.DataFrame], output_dir: str | Path,
                  start_state: dict[str, torch.Tensor], epochs: int = 1, resume: bool = True,
                  parts: Optional[RunParts] = None, keep_models: bool = False,
                  trunk_dir: Optional[str | Path] = None) -> pd.DataFrame:
    """Personalization by local fine-tuning: each client trains the federated model (start_state,
    e.g. FedAvg's final state) alone on its own training patients for `epochs` passes (one round
    of config's local training with local_epochs=epochs: a fresh optimizer, the same lr), and the
    result is scored on val, test and every site's test. Returns the combined history as
    run_local_only does ('client' = the client whose fine-tuned model was evaluated; round 0 is the
    federated model before fine-tuning)."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"fine-tuning epochs must be an integer >= 1, got {epochs!r}")
    if config.local_keys:
        raise ValueError(f"run_finetuned fine-tunes one global model; config.local_keys={config.local_keys!r} "
                         f"is personalized already (each client has its own model)")
    parts = reuse(parts, config) if parts is not None else prepare(config, splits)
    tuned = dataclasses.replace(config, num_rounds=1, local_epochs=epochs, lr_schedule="constant")
    return _each_client(lambda k: local_only(parts, k, tuned), len(parts.client_frames), output_dir, resume,
                        keep_models, trunk_dir, "fine-tuned", "fine-tuning", start_state)


def _each_client(parts_of, num_clients: int, output_dir: str | Path, resume: bool, keep_models: bool,
                 trunk_dir, label: str, purpose: str, start_state: Optional[dict] = None) -> pd.DataFrame:
    """One single-client run per client in output_dir/client_<k> (parts_of(k): its parts), and
    their combined history (the global rows, i.e. that client's model, and its training size)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(output_dir / RUN_LOCK, wait=False, purpose=f"{purpose} in {output_dir}"):
        frames = []
        for k in range(num_clients):
            run = FederatedRun(parts_of(k), output_dir / f"client_{k}", keep_model=keep_models,
                               trunk_dir=trunk_dir, name=f"{label} client {k}", start_state=start_state)
            h = run.run(resume=resume).history
            # The global model's rows (this client's model) and the client's training-set size (its
            # weight in local_only_table's size-weighted mean).
            size = (h["split"] == "train") & (h["metric"] == "num_examples")
            h = h[(h["client"].astype(str) == hist.GLOBAL) | size].copy()
            h["client"] = str(k)
            frames.append(h)
        table = pd.concat(frames, ignore_index=True)
        atomic_write(output_dir / HISTORY, lambda tmp: table.to_csv(tmp, index=False))
        return table
