"""The federated training loop: rounds of client fits and FedAvg, evaluation every round, a
long-format history, atomic checkpoints and resume; centralized and local-only baselines reuse it."""
from __future__ import annotations

import dataclasses
import json
import logging
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from .aggregation import fedavg, state_nbytes
from .cache import build_image_cache
from .checkpoint import (CHECKPOINT, CONFIG, FINAL_MODEL, HISTORY, HISTORY_COLUMNS, RUN_INFO, CheckpointError,
                         check_resume, clean_orphans, image_list_digest, load_checkpoint, restore_rng,
                         save_checkpoint, save_final_model)
from .client import Client, ClientUpdate, DivergenceError, autocast, batches, derive_seed, is_feature_data, to_input
from .config import Config
from .data import LABELS, NIHDataset
from .features import build_feature_cache
from .io import atomic_write, atomic_write_text, file_lock
from .metrics import auroc_per_finding, mean_auroc
from .model import ChestXrayResNet, build_model, exchanged_keys, get_state, state_problems, trunk_digest
from .partition import partition

log = logging.getLogger(__name__)

RUN_LOCK = ".lock"   # held by the process running in an output folder
_SAMPLING_STREAM = 0x5A3F   # keeps the client-sampling RNG apart from the clients' own streams


@dataclass
class RunResult:
    history: pd.DataFrame
    model: ChestXrayResNet
    output_dir: Path
    info: dict


def sample_clients(num_clients: int, fraction: float, seed: int, round_num: int) -> list[int]:
    """The clients that train in a round: max(1, round(fraction * K)), a function of (seed, round)."""
    m = max(1, int(round(fraction * num_clients)))
    rng = np.random.default_rng(derive_seed(seed, round_num, _SAMPLING_STREAM))
    return sorted(rng.choice(num_clients, size=m, replace=False).tolist())


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


@torch.no_grad()
def predict(model: nn.Module, dataset, batch_size: int, device: torch.device,
            amp_dtype: Optional[torch.dtype] = None) -> tuple[np.ndarray, np.ndarray]:
    """Sigmoid probabilities and labels over a dataset (images, cached images or cached features),
    in its order."""
    model.eval()
    forward = model.head if is_feature_data(dataset) else model
    probs, labels = [], []
    for x, y in batches(dataset, batch_size, device):
        x = to_input(x, device, amp_dtype)
        with autocast(device, amp_dtype):
            logits = forward(x)
        probs.append(torch.sigmoid(logits.float()).cpu())
        labels.append(y.cpu())
    model.train()
    if not probs:
        return np.zeros((0, len(LABELS)), np.float32), np.zeros((0, len(LABELS)), np.float32)
    probs = torch.cat(probs).numpy()
    bad = ~np.isfinite(probs).all(axis=1)
    if bad.any():
        raise DivergenceError(f"the model gives non-finite predictions for {int(bad.sum())} of {len(probs)} "
                              f"images: its weights diverged. Lower lr, or use Adam instead of SGD")
    return probs, torch.cat(labels).numpy()


def metric_rows(round_num: int, split: str, client, probs: np.ndarray, labels: np.ndarray) -> list[dict]:
    """loss (BCE averaged over examples and findings), mean_auroc and one AUROC per finding,
    all from pooled predictions."""
    p = np.clip(probs.astype(np.float64), 1e-7, 1 - 1e-7)
    loss = float(-(labels * np.log(p) + (1 - labels) * np.log(1 - p)).mean()) if len(p) else float("nan")
    auc = auroc_per_finding(labels, probs)
    rows = [dict(round=round_num, split=split, client=str(client), metric="loss", value=loss),
            dict(round=round_num, split=split, client=str(client), metric="mean_auroc", value=mean_auroc(auc))]
    rows += [dict(round=round_num, split=split, client=str(client), metric=f"auroc_{name}", value=float(a))
             for name, a in zip(LABELS, auc)]
    return rows


def train_rows(round_num: int, client_ids: Sequence[int], updates: Sequence[ClientUpdate],
               sent_state: dict[str, torch.Tensor]) -> list[dict]:
    """A round's training and communication rows: each client's loss and examples, their
    example-weighted mean loss, and the bytes the server sent (sent_state to every sampled
    client) and received (their updates)."""
    r = round_num
    rows = [dict(round=r, split="train", client=str(k), metric="train_loss", value=u.train_loss)
            for k, u in zip(client_ids, updates)]
    rows += [dict(round=r, split="train", client=str(k), metric="num_examples", value=float(u.num_examples))
             for k, u in zip(client_ids, updates)]
    n = sum(u.num_examples for u in updates)
    rows.append(dict(round=r, split="train", client="all", metric="train_loss",
                     value=sum(u.train_loss * u.num_examples for u in updates) / n))
    rows.append(dict(round=r, split="comm", client="server", metric="bytes_sent",
                     value=float(state_nbytes(sent_state) * len(client_ids))))
    rows.append(dict(round=r, split="comm", client="server", metric="bytes_received",
                     value=float(sum(state_nbytes(u.state) for u in updates))))
    return rows


def run_info(model: ChestXrayResNet, device: torch.device, amp_dtype: Optional[torch.dtype],
             exchanged: dict[str, torch.Tensor], **extra) -> dict:
    """What a run actually used (weights, device, precision, versions, sizes), for run_info.json."""
    return {
        "weights_source": model.weights_source, "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "amp_dtype": str(amp_dtype).replace("torch.", "") if amp_dtype else "off",
        "torch": str(torch.__version__), "python": platform.python_version(),
        "exchanged_keys": len(exchanged), "exchanged_bytes": state_nbytes(exchanged), **extra,
    }


class FederatedRun:
    """One federated experiment: config, data, clients, a global model, and its history on disk."""

    def __init__(self, config: Config, train: pd.DataFrame, val: pd.DataFrame, test: pd.DataFrame,
                 output_dir: str | Path, client_frames: Optional[Sequence[pd.DataFrame]] = None):
        self.config = c = config
        self.output_dir = Path(output_dir)
        self.device = c.resolve_device()
        self.amp_dtype = c.resolve_amp(self.device)
        capped = cap_splits({"train": train, "val": val, "test": test}, c.max_images, c.seed)
        train, val, test = capped["train"], capped["val"], capped["test"]
        self.image_cache = self.feature_cache = None
        if c.image_cache or c.feature_cache:   # decode once; undecodable images leave every table
            self.image_cache = build_image_cache(pd.concat([train, val, test, *(client_frames or [])]),
                                                 c.image_size, c.cache_dir, progress=c.progress)
            train, val, test = (self.image_cache.usable(f) for f in (train, val, test))
            if client_frames is not None:
                client_frames = [self.image_cache.usable(f) for f in client_frames]
        if client_frames is None:
            client_frames = partition(train, c.num_clients, scheme=c.partition, alpha=c.alpha,
                                      seed=c.seed, column=c.partition_column)
        if len(client_frames) != c.num_clients:
            raise ValueError(f"{len(client_frames)} client tables given for num_clients={c.num_clients}")
        self.client_frames = list(client_frames)
        torch.manual_seed(c.seed)   # the random fc (and any random init) depends on the seed only
        self.model = build_model(len(LABELS), c.weights).to(self.device)
        if self.device.type == "cuda":
            self.model.to(memory_format=torch.channels_last)
        self.keys = exchanged_keys(self.model, c.bn_policy)
        ds = self._dataset_maker([val, test, *self.client_frames])
        self.val_data, self.test_data = ds(val), ds(test)
        self.clients = [Client.from_config(k, ds(f), self.model, c, self.device)
                        for k, f in enumerate(self.client_frames)]
        self.global_state = get_state(self.model, self.keys)
        self.rows: list[dict] = []
        self.round = 0
        # What identifies this run's inputs; a resume whose inputs differ is refused.
        self.inputs = {"trunk": trunk_digest(self.model), "val": image_list_digest(val),
                       "test": image_list_digest(test),
                       **{f"client_{k}": image_list_digest(f) for k, f in enumerate(self.client_frames)}}
        self.info = run_info(
            self.model, self.device, self.amp_dtype, self.global_state,
            client_examples=[len(cl.dataset) for cl in self.clients],
            val_examples=len(self.val_data), test_examples=len(self.test_data))
        if self.image_cache is not None:
            self.info.update(image_cache=str(self.image_cache.directory),
                             excluded_images=sorted(self.image_cache.excluded))
        if self.feature_cache is not None:
            self.info.update(feature_cache=self.feature_cache.placement,
                             feature_cache_bytes=self.feature_cache.nbytes)

    def _dataset_maker(self, frames: list[pd.DataFrame]):
        """frame -> dataset: PNGs decoded per item, rows of the image cache, or cached features
        (computed here, once, by the frozen trunk over every image of frames)."""
        c = self.config
        if self.image_cache is None:
            return lambda f: NIHDataset(f, c.image_size, preload=c.preload)
        if not c.feature_cache:
            return self.image_cache.dataset
        images = self.image_cache.dataset(pd.concat(frames).drop_duplicates("image"))
        self.feature_cache = build_feature_cache(
            self.model, images, self.device, batch_size=c.eval_batch_size, amp_dtype=self.amp_dtype,
            dtype=getattr(torch, c.feature_dtype), progress=c.progress)
        return self.feature_cache.dataset

    # ------------------------------------------------------------------ evaluation
    def _personal_state(self, client: Client) -> dict[str, torch.Tensor]:
        return {**self.global_state, **client.local_state}

    def evaluate(self, round_num: int, split: str) -> list[dict]:
        """Metrics of the global model on val or test. Under FedBN every client's model (global
        weights + its own BatchNorm) is evaluated, and 'global' is their averaged prediction."""
        data = self.val_data if split == "val" else self.test_data
        if len(data) == 0:
            return []
        c = self.config
        if c.bn_policy == "average":
            self.model.load_state_dict(self.global_state, strict=False)
            probs, labels = predict(self.model, data, c.eval_batch_size, self.device, self.amp_dtype)
            return metric_rows(round_num, split, "global", probs, labels)
        rows, all_probs = [], []
        for cl in self.clients:
            self.model.load_state_dict(self._personal_state(cl), strict=False)
            probs, labels = predict(self.model, data, c.eval_batch_size, self.device, self.amp_dtype)
            rows += metric_rows(round_num, split, cl.client_id, probs, labels)
            all_probs.append(probs)
        return rows + metric_rows(round_num, split, "global", np.mean(all_probs, axis=0), labels)

    # ------------------------------------------------------------------ rounds
    def run(self, resume: bool = True, progress: Optional[bool] = None) -> RunResult:
        """The rounds not yet done, holding the output folder's lock (a second process running in
        the same folder is refused, naming the first)."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with file_lock(self.output_dir / RUN_LOCK, wait=False, purpose=f"a fedxray run in {self.output_dir}"):
            clean_orphans(self.output_dir)
            return self._run(resume, self.config.progress if progress is None else progress)

    def _run(self, resume: bool, progress: bool) -> RunResult:
        c = self.config
        if resume and (self.output_dir / CHECKPOINT).exists():
            self._load_checkpoint()
        else:
            self._start_fresh()
        from tqdm.auto import tqdm
        rounds = tqdm(range(self.round + 1, c.num_rounds + 1), desc="rounds", disable=not progress,
                      initial=self.round, total=c.num_rounds)
        for r in rounds:
            self._round(r, progress)
            rounds.set_postfix(val_auroc=self._last("val", "mean_auroc"), val_loss=self._last("val", "loss"))
        self.model.load_state_dict(self.global_state, strict=False)
        if not (self.output_dir / FINAL_MODEL).exists() or self.round == c.num_rounds:
            self._save_final()
        return RunResult(self.history(), self.model, self.output_dir, self.info)

    def _start_fresh(self) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for name in (CHECKPOINT, HISTORY, FINAL_MODEL):
            (self.output_dir / name).unlink(missing_ok=True)
        self.config.save(self.output_dir / CONFIG)
        atomic_write_text(self.output_dir / RUN_INFO, json.dumps(self.info, indent=2) + "\n")
        self.rows = self.evaluate(0, "val")
        if self.config.test_every_round:
            self.rows += self.evaluate(0, "test")
        self.round = 0
        self._save_checkpoint()

    def _round(self, r: int, progress: bool) -> None:
        from tqdm.auto import tqdm
        c = self.config
        chosen = sample_clients(c.num_clients, c.fraction_fit, c.seed, r)
        kept = f"the checkpoint of round {r - 1} in {self.output_dir} is kept"
        updates = []
        for k in tqdm(chosen, desc=f"round {r} clients", leave=False, disable=not progress):
            try:
                updates.append(self.clients[k].fit(self.global_state, round_num=r))
            except DivergenceError as e:
                raise type(e)(f"{e}; {kept}") from None
        sent = self.global_state
        self.global_state = fedavg([u.state for u in updates], [u.num_examples for u in updates])
        try:
            rows = train_rows(r, chosen, updates, sent)
            rows += self.evaluate(r, "val")
            if c.test_every_round or r == c.num_rounds:
                rows += self.evaluate(r, "test")
        except DivergenceError as e:
            raise DivergenceError(f"round {r}, the averaged model of clients {chosen}: {e}; {kept}") from None
        self.rows += rows
        self.round = r
        self._save_checkpoint()

    def _last(self, split: str, metric: str) -> float:
        vals = [row["value"] for row in self.rows
                if row["split"] == split and row["metric"] == metric and row["client"] == "global"]
        return round(vals[-1], 4) if vals else float("nan")

    def history(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=HISTORY_COLUMNS)

    # ------------------------------------------------------------------ persistence
    def _save_checkpoint(self) -> None:
        save_checkpoint(self.output_dir, self.round, self.global_state,
                        {cl.client_id: cl.local_state for cl in self.clients}, self.rows, self.config,
                        self.info, self.inputs)

    def _load_checkpoint(self) -> None:
        """Resume from the verified checkpoint, after checking it was written by this very
        experiment: same config, weights, trunk and images (else CheckpointError says what changed)."""
        path = self.output_dir / CHECKPOINT
        ckpt = load_checkpoint(path)
        check_resume(ckpt, path, self.config, self.info, self.inputs)
        self.global_state = _checked_state(ckpt["global_state"], self.global_state, path, "global_state")
        for cl in self.clients:
            saved = ckpt["local_states"].get(cl.client_id, {})
            cl.local_state = _checked_state(saved, cl.local_state, path, f"client {cl.client_id}'s local state")
        self.rows = ckpt["history"]
        self.round = ckpt["round"]
        restore_rng(ckpt)
        log.info("resuming %s after round %d of %d", self.output_dir, self.round, self.config.num_rounds)

    def _save_final(self) -> None:
        save_final_model(self.output_dir, self.model, self.config, self.info)


def _checked_state(saved: dict, expected: dict, path: Path, what: str) -> dict:
    """saved, when it has exactly the keys, shapes and dtypes of expected (the model's own) and
    finite values."""
    problems = state_problems(saved, expected)
    if problems:
        raise CheckpointError(f"{path}: {what} does not fit this model ({'; '.join(problems[:3])}); "
                              f"use another output_dir, or resume=False to start over")
    return saved


def run_federated(config: Config, splits: dict[str, pd.DataFrame], output_dir: str | Path,
                  resume: bool = True, client_frames: Optional[Sequence[pd.DataFrame]] = None) -> RunResult:
    """FedAvg over config.num_clients clients built from splits['train'] (or client_frames)."""
    run = FederatedRun(config, splits["train"], splits["val"], splits["test"], output_dir, client_frames)
    return run.run(resume=resume)


def run_centralized(config: Config, splits: dict[str, pd.DataFrame], output_dir: str | Path,
                    resume: bool = True) -> RunResult:
    """The centralized baseline: one client holding all training data, same rounds and epochs."""
    c = dataclasses.replace(config, num_clients=1, fraction_fit=1.0, partition="iid")
    return run_federated(c, splits, output_dir, resume=resume)


def run_local_only(config: Config, splits: dict[str, pd.DataFrame], output_dir: str | Path,
                   resume: bool = True) -> pd.DataFrame:
    """The local-only baseline: each client trains alone on its partition (same partition as the
    federated run), evaluated on the same val and test sets. Returns the combined history with
    'client' naming the client whose model was evaluated."""
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    with file_lock(Path(output_dir) / RUN_LOCK, wait=False, purpose=f"a local-only baseline in {output_dir}"):
        return _run_local_only(config, splits, Path(output_dir), resume)


def _run_local_only(config: Config, splits: dict[str, pd.DataFrame], output_dir: Path, resume: bool) -> pd.DataFrame:
    c = config
    splits = cap_splits(splits, c.max_images, c.seed)
    if c.image_cache or c.feature_cache:   # one cache over every image, which each client's run reuses
        cache = build_image_cache(pd.concat(list(splits.values())), c.image_size, c.cache_dir,
                                  progress=c.progress)
        # Partition the usable rows, exactly as FederatedRun does: the same clients as FedAvg's.
        splits = {k: cache.usable(f) for k, f in splits.items()}
    parts = partition(splits["train"], c.num_clients, scheme=c.partition, alpha=c.alpha, seed=c.seed,
                      column=c.partition_column)
    solo = dataclasses.replace(c, num_clients=1, fraction_fit=1.0, max_images=None)
    frames = []
    for k, part in enumerate(parts):
        h = run_federated(solo, {**splits, "train": part}, Path(output_dir) / f"client_{k}",
                          resume=resume, client_frames=[part]).history
        h = h[h["client"] == "global"].copy()
        h["client"] = str(k)
        frames.append(h)
    hist = pd.concat(frames, ignore_index=True)
    atomic_write(Path(output_dir) / HISTORY, lambda tmp: hist.to_csv(tmp, index=False))
    return hist
