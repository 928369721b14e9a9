"""Benchmark: `python -m fedxray.bench [--quick | --smoke] [--out PATH]` (default: data/bench.json).

Measures in one run, on the same images: the training throughput (images/s) of a naive Kaggle
pipeline (PIL open, convert('RGB'), resize in __getitem__, fp32, batch 32, the whole model in
train mode, K loader workers), of fedxray's image-cache path (without and with the default
fedxray.augment.Augmentation, batched on the device: their ratio is augmentation's cost, and the
augmentation alone is timed too) and of its feature-cache path, with and without per-patient
DP-SGD on the GroupNorm model DP uses (all through the real Client.fit);
the time to build each cache per image; decoding cost; peak memory.
The full mode (for a GPU machine) adds NIH-sized synthetic data written straight into the cache
(86,524 training + 25,596 test images), a batch-size sweep, and a whole federated run at NIH size
(5 clients, 10 rounds of 1 local epoch, test AUROC every round) timed once the image cache exists.
--quick is the small CPU mode CI runs to prove it works; --smoke is smaller still, for the tests.
Times are medians of timed repeats after warm-up; ratios compare numbers from the same run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

from .augment import Augmentation
from .cache import build_image_cache, usable_cores
from .client import Client
from .config import Config
from .features import build_feature_cache
from .data import IMAGENET_MEAN, IMAGENET_STD, LABELS, label_matrix, load_gray, load_nih
from .federated import FederatedRun
from .history import select
from .parts import prepare
from .model import build_model, exchanged_keys, get_state

NIH_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "nih-sample"
NIH_TRAIN, NIH_TEST = 86_524, 25_596
NIH_TEST_PATIENTS = 2_797


@dataclass
class Plan:
    """What one mode measures. Sizes are images; *_batches are DataLoader batches."""
    image_size: int
    real_images: int                   # PNGs read by the naive pipeline and cached (at most what exists)
    naive_batch: int = 32
    naive_workers: tuple[int, ...] = (4,)
    naive_warmup: int = 2              # batches; >= 2 x workers on a GPU, so the prefetch queue drains
    naive_steps: int = 5               # batches per timed repeat
    repeats: int = 3
    epoch_images: int = 512            # one client epoch of the cached paths (the sample, repeated)
    batch_size: int = 32               # image-cache path
    feature_batch_size: int = 128      # feature-cache path
    loader_workers: int = 0            # Client.fit DataLoader workers for the image-cache path
    decode_images: int = 8             # single-core decode comparison
    sweep: tuple[int, ...] = ()
    sweep_images: int = 512
    fed_train: int = 256               # synthetic federated run
    fed_test: int = 64
    fed_clients: int = 2
    fed_rounds: int = 2
    fed_batch: int = 64
    boot_images: int = NIH_TEST        # patient bootstrap (fedxray.evaluation): NIH's official test split
    boot_patients: int = NIH_TEST_PATIENTS
    boot_replicates: int = 1000


PLANS = {
    "smoke": Plan(image_size=64, real_images=4, naive_batch=4, naive_workers=(0,), naive_warmup=1,
                  naive_steps=1, repeats=1, epoch_images=8, batch_size=4, feature_batch_size=4,
                  decode_images=2, sweep=(4,), sweep_images=8, fed_train=16, fed_test=4,
                  fed_rounds=1, fed_batch=4, boot_images=200, boot_patients=60, boot_replicates=20),
    "quick": Plan(image_size=64, real_images=32, naive_workers=(2,), naive_warmup=2, naive_steps=2,
                  repeats=3, epoch_images=96, decode_images=16, sweep=(16, 64), sweep_images=64),
    "full": Plan(image_size=224, real_images=240, naive_workers=(16, 4), naive_warmup=40, naive_steps=10,
                 repeats=5, epoch_images=NIH_TRAIN // 5, batch_size=256, feature_batch_size=1024,
                 loader_workers=4, decode_images=24, sweep=(32, 64, 128, 256, 512, 1024),
                 sweep_images=8192, fed_train=NIH_TRAIN, fed_test=NIH_TEST, fed_clients=5,
                 fed_rounds=10, fed_batch=1024),
}


# --------------------------------------------------------------------------- the naive pipeline

class NaivePNGDataset(Dataset):
    """What a typical Kaggle notebook does: decode, convert to RGB and resize on every access."""

    def __init__(self, paths: list[str], labels: np.ndarray, size: int):
        from torchvision import transforms
        self.paths, self.labels = paths, labels
        self.transform = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(),
                                             transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image
        img = Image.open(self.paths[i]).convert("RGB")
        return self.transform(img), torch.from_numpy(self.labels[i])


def naive_model() -> nn.Module:
    """A plain torchvision ResNet-34 (ordinary BatchNorm everywhere), only layer4 + fc trainable,
    the whole model in train mode, as a naive notebook would have it."""
    from torchvision.models import resnet34
    model = resnet34(num_classes=len(LABELS))
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(("layer4.", "fc.")))
    return model.train()


def naive_throughput(frame: pd.DataFrame, plan: Plan, workers: int, device: torch.device) -> dict:
    ds = NaivePNGDataset(frame["path"].tolist(), label_matrix(frame), plan.image_size)
    total = (plan.naive_warmup + plan.repeats * plan.naive_steps) * plan.naive_batch
    sampler = RandomSampler(ds, replacement=True, num_samples=total, generator=torch.Generator().manual_seed(0))
    batches = iter(DataLoader(ds, batch_size=plan.naive_batch, sampler=sampler, num_workers=workers))
    torch.manual_seed(0)
    model = naive_model().to(device)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loss_fn = nn.BCEWithLogitsLoss()

    def step() -> None:
        x, y = next(batches)
        loss = loss_fn(model(x.to(device)), y.to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss.item()

    return _rates(step, plan.naive_warmup, plan.repeats, plan.naive_steps, plan.naive_batch, device)


def _rates(step: Callable[[], None], warmup: int, repeats: int, steps: int, per_step: int,
           device: torch.device) -> dict:
    """Images/s: the median of `repeats` timed windows of `steps` calls, after `warmup` calls."""
    for _ in range(warmup):
        step()
    rates = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        rates.append(steps * per_step / (time.perf_counter() - t))
    return {"images_per_s": statistics.median(rates), "repeats": [round(r, 2) for r in rates]}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- the cached paths

def _client_epoch(dataset, batch_size: int, device: torch.device, amp_dtype: Optional[torch.dtype],
                  num_workers: int = 0, augment: Optional[Augmentation] = None) -> Callable[[], None]:
    """One local epoch of the real Client.fit per call (one model reused, fresh optimizer, next round)."""
    torch.manual_seed(0)
    model = build_model(len(LABELS), weights=None).to(device)
    state = get_state(model, exchanged_keys(model))
    client = Client(0, dataset, model, batch_size=batch_size, lr=1e-4, device=device,
                    amp_dtype=amp_dtype, num_workers=num_workers, augment=augment)
    rounds = iter(range(1, 10_000))
    return lambda: client.fit(state, round_num=next(rounds))


def client_throughput(dataset, batch_size: int, plan: Plan, device: torch.device,
                      amp_dtype: Optional[torch.dtype], repeats: int, num_workers: int = 0) -> dict:
    """One local epoch of the real Client.fit per repeat."""
    epoch = _client_epoch(dataset, batch_size, device, amp_dtype, num_workers)
    _reset_gpu_peak(device)
    out = _rates(epoch, 1, repeats, 1, len(dataset), device)
    return {**out, "batch_size": batch_size, "gpu_peak_bytes": _gpu_peak(device)}


def paired_throughput(dataset, batch_size: int, device: torch.device, amp_dtype: Optional[torch.dtype],
                      repeats: int, num_workers: int, augment: Augmentation) -> tuple[dict, dict]:
    """client_throughput without and with augment, their timed epochs interleaved (ABBA...), so
    that a change in the machine's load or clock hits both alike: their ratio is what matters."""
    epochs = [_client_epoch(dataset, batch_size, device, amp_dtype, num_workers, aug) for aug in (None, augment)]
    return _interleaved(epochs, len(dataset), batch_size, repeats, device)


DP_BATCH = 32   # DP-SGD keeps one gradient per image of a chunk: 52 MB each for layer4 + fc


def dp_sgd_cost(dataset, device: torch.device, repeats: int) -> Optional[tuple[dict, dict]]:
    """Epochs of the real Client.fit on cached features with layer4's GroupNorm (private_norm),
    batch DP_BATCH, without and with per-patient DP-SGD (noise 1, clip 1; Opacus's per-image
    gradients), interleaved as paired_throughput: their ratio is DP-SGD's cost. DP-SGD's epoch
    sees len(dataset) images on average (Poisson sampling). None without opacus."""
    import importlib.util
    if importlib.util.find_spec("opacus") is None:
        return None
    from .dpsgd import PatientDPSpec, steps_per_round
    from .model import private_norm

    def epoch(dp: bool) -> Callable[[], None]:
        torch.manual_seed(0)
        model = private_norm(build_model(len(LABELS), weights=None)).to(device)
        state = get_state(model, exchanged_keys(model))
        q, steps = steps_per_round(len(dataset), DP_BATCH, 1)
        client = Client(0, dataset, model, batch_size=DP_BATCH, lr=1e-4, device=device,
                        dp_sgd=PatientDPSpec(1.0, 1.0, q, steps, 1e-5) if dp else None)
        rounds = iter(range(1, 10_000))
        return lambda: client.fit(state, round_num=next(rounds))
    return _interleaved([epoch(False), epoch(True)], len(dataset), DP_BATCH, repeats, device)


def _interleaved(epochs: list[Callable[[], None]], images: int, batch_size: int, repeats: int,
                 device: torch.device) -> tuple[dict, dict]:
    """Images/s of two epoch functions, one warm-up each, then timed in ABBA order."""
    rates: list[list[float]] = [[], []]
    peaks: list[Optional[int]] = [None, None]
    for i in (0, 1):
        epochs[i]()   # warm-up
    for r in range(repeats):
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):
            _reset_gpu_peak(device)
            _sync(device)
            t = time.perf_counter()
            epochs[i]()
            _sync(device)
            rates[i].append(images / (time.perf_counter() - t))
            peak = _gpu_peak(device)
            peaks[i] = peak if peaks[i] is None else max(peaks[i], peak)
    return tuple({"images_per_s": statistics.median(rates[i]), "repeats": [round(v, 2) for v in rates[i]],
                  "batch_size": batch_size, "gpu_peak_bytes": peaks[i]} for i in (0, 1))


def augment_alone(plan: Plan, device: torch.device) -> dict:
    """Images/s of the default Augmentation by itself on a model-ready batch (batch_size x 3 x
    image_size^2, channels_last on a GPU as Client.fit feeds it): a figure the noise of timing
    whole epochs cannot hide when augmentation is a few percent of a training step."""
    aug, gen = Augmentation(), torch.Generator().manual_seed(0)
    x = torch.randn(plan.batch_size, 3, plan.image_size, plan.image_size, device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return _rates(lambda: aug(x, gen), 3, plan.repeats, 10, plan.batch_size, device)


def augment_cost(throughput: dict, alone: dict) -> dict:
    """What augmentation costs the image-cache path: the ratio of the throughputs with and without
    it and the time it adds per image (both from whole epochs, so within their noise), and the
    time of augmentation alone per image."""
    plain, aug = throughput["image_cache"]["images_per_s"], throughput["image_cache_augment"]["images_per_s"]
    return {"throughput_ratio": aug / plain, "added_us_per_image": 1e6 * (1 / aug - 1 / plain),
            "alone_images_per_s": alone["images_per_s"], "alone_us_per_image": 1e6 / alone["images_per_s"],
            "alone_repeats": alone["repeats"], "augmentation": dataclasses.asdict(Augmentation())}


def _reset_gpu_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _gpu_peak(device: torch.device) -> Optional[int]:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def decode_costs(paths: list[str], size: int) -> dict:
    """ms per image on one core (median): fedxray.load_gray (grayscale, reduce then resize) vs a
    naive convert('RGB') + resize. Files are read once first; the two alternate per image, so a
    change in the machine's load hits both."""
    from PIL import Image

    def rgb(p: str) -> np.ndarray:
        with Image.open(p) as img:
            return np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR))

    methods = {"load_gray_ms": lambda p: load_gray(p, size), "rgb_resize_ms": rgb}
    times: dict[str, list[float]] = {name: [] for name in methods}
    for p in paths:
        Path(p).read_bytes()
        for name, fn in methods.items():
            t = time.perf_counter()
            fn(p)
            times[name].append(1e3 * (time.perf_counter() - t))
    return {name: statistics.median(ts) for name, ts in times.items()}


# --------------------------------------------------------------------------- data

def real_frame(plan: Plan, data_dir: Optional[Path], workdir: Path) -> tuple[pd.DataFrame, str]:
    """The PNGs every path is measured on: the real NIH sample when present, else synthetic
    drawings written by fedxray.demo at 1024 px (decode costs then differ from real X-rays)."""
    source = data_dir or (NIH_SAMPLE if (NIH_SAMPLE / "Data_Entry_2017.csv").is_file() else None)
    if source is not None:
        frame, what = load_nih(source, drop_missing=True), f"real NIH PNGs from {source}"
    else:
        from .demo import make_demo_dataset
        patients = max(2, min(12, plan.real_images // 2))   # ~1 s per 1024 px drawing; sampled with replacement
        demo = make_demo_dataset(workdir / "demo", num_patients=patients, image_size=1024, progress=False)
        frame, what = load_nih(demo), "SYNTHETIC 1024 px demo PNGs (no NIH sample found)"
    frame = frame.sort_values("image").head(plan.real_images).reset_index(drop=True)
    return frame, f"{len(frame)} {what}"


def synthetic_gray(path: str, size: int) -> np.ndarray:
    """The image cache's loader for synthetic data: 'synthetic:<i>:<label bits>' -> noise with one
    bright band per finding (learnable, so AUROC rises), never a PNG."""
    _, i, bits = path.split(":")
    rng = np.random.default_rng(int(i))
    img = rng.integers(40, 140, (size, size), dtype=np.uint8)
    for j in range(len(LABELS)):
        if int(bits) >> j & 1:
            row = j * size // len(LABELS)
            img[row:row + max(1, size // 64)] += 100
    return img


def synthetic_frame(n: int, seed: int, prefix: str) -> pd.DataFrame:
    """n NIH-like rows (about 3.6 images per patient, label prevalences of 2-18%) with
    'synthetic:' paths for synthetic_gray."""
    rng = np.random.default_rng(seed)
    prevalence = np.array([.10, .025, .12, .18, .05, .06, .013, .05, .04, .02, .022, .015, .03, .002])
    labels = (rng.random((n, len(LABELS))) < prevalence).astype(np.uint8)
    bits = labels @ (1 << np.arange(len(LABELS)))
    frame = pd.DataFrame({"image": [f"{prefix}{i:06d}.png" for i in range(n)],
                          "patient_id": np.arange(n) // 4 + (0 if prefix == "train" else 10**6),
                          "view": "PA", "path": [f"synthetic:{seed * 10**7 + i}:{b}" for i, b in enumerate(bits)]})
    for j, name in enumerate(LABELS):
        frame[name] = labels[:, j]
    return frame


def repeated(frame: pd.DataFrame, n: int) -> pd.DataFrame:
    """frame's rows cycled to n rows: an epoch of any length over the same images."""
    return frame.iloc[np.arange(n) % len(frame)].reset_index(drop=True)


# --------------------------------------------------------------------------- the run

def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "cores_usable": usable_cores(),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "torch": torch.__version__, "python": platform.python_version()}


def run(mode: str, device: torch.device, workdir: Path, data_dir: Optional[Path] = None,
        naive_workers: Optional[tuple[int, ...]] = None, log: Callable[[str], None] = print) -> dict:
    plan = PLANS[mode]
    if naive_workers:
        plan = dataclasses.replace(plan, naive_workers=naive_workers)
    amp = Config(amp="auto").resolve_amp(device)
    result: dict = {"mode": mode, "device": str(device), "amp": str(amp).replace("torch.", "") if amp else "off",
                    "machine": machine(), "plan": dataclasses.asdict(plan), "throughput": {}, "build": {}}
    frame, what = real_frame(plan, data_dir, workdir)
    result["data"] = what
    log(f"data: {what}, trained at {plan.image_size} px on {device} (amp {result['amp']})")
    paths = frame["path"].tolist()

    result["decode"] = decode_costs(paths[:plan.decode_images], plan.image_size)
    log(f"decode: {result['decode']}")
    for k in plan.naive_workers:
        result["throughput"][f"naive_{k}w"] = r = naive_throughput(frame, plan, k, device)
        log(f"naive pipeline, {k} workers: {r['images_per_s']:.1f} images/s")

    t = time.perf_counter()
    cache = build_image_cache(frame, plan.image_size, workdir / "cache", progress=False)
    dt = time.perf_counter() - t
    result["build"]["image_cache"] = {"s_per_image": dt / len(frame), "images": len(frame),
                                      "processes": usable_cores(),
                                      "nih_projection_s": dt / len(frame) * (NIH_TRAIN + NIH_TEST)}
    epoch = repeated(frame, plan.epoch_images)
    plain, augmented = paired_throughput(cache.dataset(epoch), plan.batch_size, device, amp, plan.repeats,
                                         plan.loader_workers, Augmentation())
    result["throughput"]["image_cache"], result["throughput"]["image_cache_augment"] = plain, augmented
    result["augment_cost"] = augment_cost(result["throughput"], augment_alone(plan, device))
    log(f"image cache: {plain['images_per_s']:.1f} images/s, with augmentation "
        f"{augmented['images_per_s']:.1f} images/s")

    torch.manual_seed(0)
    model = build_model(len(LABELS), weights=None).to(device)
    t = time.perf_counter()
    features = build_feature_cache(model, cache.dataset(frame), device, batch_size=plan.feature_batch_size,
                                   amp_dtype=amp, placement="device", progress=False)
    _sync(device)
    result["build"]["feature_cache"] = {"s_per_image": (time.perf_counter() - t) / len(frame),
                                        "images": len(frame), "bytes_per_image": features.nbytes // len(frame)}
    result["throughput"]["feature_cache"] = r = client_throughput(
        features.dataset(epoch), plan.feature_batch_size, plan, device, amp, plan.repeats)
    log(f"feature cache: {r['images_per_s']:.1f} images/s")
    paired = dp_sgd_cost(features.dataset(epoch), device, plan.repeats)
    if paired is not None:
        result["throughput"]["feature_cache_groupnorm"], result["throughput"]["feature_cache_dp_sgd"] = paired
        log(f"feature cache, GroupNorm: {paired[0]['images_per_s']:.1f} images/s, with per-patient DP-SGD "
            f"{paired[1]['images_per_s']:.1f} images/s")

    result["sweep"] = []
    for bs in plan.sweep:
        part = repeated(frame, plan.sweep_images)
        for path, ds in (("image_cache", cache.dataset(part)), ("feature_cache", features.dataset(part))):
            workers = plan.loader_workers if path == "image_cache" else 0
            r = client_throughput(ds, bs, plan, device, amp, max(1, plan.repeats // 2), workers)
            result["sweep"].append({"path": path, **r})
            log(f"sweep {path} batch {bs}: {r['images_per_s']:.1f} images/s")
    del features

    result["federated"] = federated_run(plan, device, workdir, log)
    result["bootstrap"] = bootstrap_speed(plan, log)
    result["host_peak_rss_bytes"] = {
        "self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}
    naive = result["throughput"][f"naive_{plan.naive_workers[0]}w"]["images_per_s"]
    result["speedup_vs_naive"] = {f"{k} vs naive_{plan.naive_workers[0]}w": v["images_per_s"] / naive
                                  for k, v in result["throughput"].items() if not k.startswith("naive")}
    return result


def bootstrap_speed(plan: Plan, log: Callable[[str], None]) -> dict:
    """fedxray.bootstrap_auroc's time on a test set of NIH's official size (images, patients,
    14 findings at NIH's test prevalence about 5%), random scores; median of plan.repeats calls."""
    from .evaluation import bootstrap_auroc
    rng = np.random.default_rng(0)
    per_patient = np.ones(plan.boot_patients, dtype=int)   # every patient one image, the rest spread at random
    np.add.at(per_patient, rng.integers(0, plan.boot_patients, plan.boot_images - plan.boot_patients), 1)
    ids = np.repeat(np.arange(plan.boot_patients), per_patient)
    y = (rng.random((plan.boot_images, len(LABELS))) < 0.05).astype(np.uint8)
    scores = rng.random(y.shape) + 0.3 * y
    times = []
    for _ in range(max(1, plan.repeats)):
        t = time.perf_counter()
        bootstrap_auroc(y, scores, ids, n_boot=plan.boot_replicates, seed=0)
        times.append(time.perf_counter() - t)
    out = {"images": plan.boot_images, "patients": plan.boot_patients, "findings": len(LABELS),
           "replicates": plan.boot_replicates, "seconds": sorted(times)[len(times) // 2], "runs": len(times)}
    log(f"patient bootstrap: {out['replicates']} replicates of {out['images']} images ({out['patients']} patients): "
        f"{out['seconds']:.1f} s")
    return out


def federated_run(plan: Plan, device: torch.device, workdir: Path, log: Callable[[str], None]) -> dict:
    """A whole federated run on synthetic data written straight into the image cache (its write
    is timed), with the feature cache; test AUROC every round."""
    train = synthetic_frame(plan.fed_train, seed=1, prefix="train")
    test = synthetic_frame(plan.fed_test, seed=2, prefix="test")
    t = time.perf_counter()
    build_image_cache(pd.concat([train, test]), plan.image_size, workdir / "cache", progress=False,
                      loader=synthetic_gray)
    write_s = time.perf_counter() - t
    log(f"synthetic image cache: {len(train) + len(test)} images written in {write_s:.1f} s")
    config = Config(num_clients=plan.fed_clients, num_rounds=plan.fed_rounds, local_epochs=1,
                    batch_size=plan.fed_batch, eval_batch_size=plan.fed_batch, lr=1e-3,
                    image_size=plan.image_size, weights=None, feature_cache=True, test_every_round=True,
                    cache_dir=str(workdir / "cache"), progress=False, device=str(device), seed=0)
    _reset_gpu_peak(device)
    t = time.perf_counter()
    fed = FederatedRun(prepare(config, {"train": train, "val": train.iloc[:0], "test": test}), workdir / "run")
    setup_s = time.perf_counter() - t
    t = time.perf_counter()
    res = fed.run(resume=False, progress=False)
    run_s = time.perf_counter() - t
    h = res.history
    auroc = select(h, "test", "mean_auroc")
    out = {"train_images": len(train), "test_images": len(test), "clients": plan.fed_clients,
           "rounds": plan.fed_rounds, "batch_size": plan.fed_batch, "image_cache_write_s": write_s,
           "setup_s_with_feature_cache": setup_s, "setup_ms_per_image": 1e3 * setup_s / (len(train) + len(test)),
           "feature_cache": fed.parts.source.feature_cache.placement,
           "feature_cache_bytes": fed.parts.source.feature_cache.nbytes, "rounds_s": run_s,
           "total_s_once_image_cache_exists": setup_s + run_s,
           "test_mean_auroc_by_round": [round(v, 4) for v in auroc["value"]],
           "gpu_peak_bytes": _gpu_peak(device)}
    log(f"federated run: setup {setup_s:.1f} s + {plan.fed_rounds} rounds {run_s:.1f} s")
    return out


def table(result: dict) -> str:
    """The report printed by the CLI."""
    m = result["machine"]
    gib = 1 << 30
    lines = [f"fedxray bench ({result['mode']}) on {m['cpu']}, {m['cores_usable']} of {m['cpu_count']} cores, "
             f"GPU: {m['gpu'] or 'none'}; device {result['device']}, amp {result['amp']}; torch {m['torch']}",
             f"data: {result['data']}, {result['plan']['image_size']} px", "",
             f"{'path':<28}{'batch':>7}{'images/s':>12}{'x naive':>10}{'GPU peak GiB':>14}"]
    naive_key = f"naive_{result['plan']['naive_workers'][0]}w"
    naive = result["throughput"][naive_key]["images_per_s"]
    for k, v in result["throughput"].items():
        bs = v.get("batch_size", result["plan"]["naive_batch"])
        peak = f"{v['gpu_peak_bytes'] / gib:.2f}" if v.get("gpu_peak_bytes") else "-"
        lines.append(f"{k:<28}{bs:>7}{v['images_per_s']:>12.1f}{v['images_per_s'] / naive:>10.1f}{peak:>14}")
    d, b = result["decode"], result["build"]
    if "augment_cost" in result:
        a = result["augment_cost"]
        lines += ["", f"augmentation (default Augmentation, on {result['device']}): image-cache throughput "
                      f"x{a['throughput_ratio']:.3f} with it ({a['added_us_per_image']:+.0f} us/image); "
                      f"augmentation alone {a['alone_images_per_s']:.0f} images/s "
                      f"({a['alone_us_per_image']:.0f} us/image)"]
    t = result["throughput"]
    if "feature_cache_dp_sgd" in t:
        lines += ["", f"per-patient DP-SGD (Opacus per-image gradients, batch {DP_BATCH}, feature cache): throughput "
                      f"x{t['feature_cache_dp_sgd']['images_per_s'] / t['feature_cache_groupnorm']['images_per_s']:.3f} "
                      f"of the same GroupNorm model without DP"]
    if "bootstrap" in result:
        bs = result["bootstrap"]
        lines += ["", f"patient bootstrap of AUROC (fedxray.bootstrap_auroc, {bs['findings']} findings): "
                      f"{bs['replicates']} replicates of {bs['images']:,} images ({bs['patients']:,} patients) in "
                      f"{bs['seconds']:.1f} s (median of {bs['runs']}, CPU)"]
    lines += ["", f"decode one PNG, one core: load_gray {d['load_gray_ms']:.1f} ms, "
                  f"convert('RGB') + resize {d['rgb_resize_ms']:.1f} ms",
              f"image cache build: {1e3 * b['image_cache']['s_per_image']:.2f} ms/image wall over "
              f"{b['image_cache']['processes']} processes (NIH's 112,120 images: "
              f"~{b['image_cache']['nih_projection_s'] / 60:.1f} min)",
              f"feature cache build: {1e3 * b['feature_cache']['s_per_image']:.2f} ms/image, "
              f"{b['feature_cache']['bytes_per_image'] / 1024:.1f} KiB/image"]
    if result["sweep"]:
        lines += ["", "throughput vs batch size (images/s):"]
        sizes = sorted({s["batch_size"] for s in result["sweep"]})
        lines.append(f"{'path':<16}" + "".join(f"{s:>10}" for s in sizes))
        for path in ("image_cache", "feature_cache"):
            rates = {s["batch_size"]: s["images_per_s"] for s in result["sweep"] if s["path"] == path}
            lines.append(f"{path:<16}" + "".join(f"{rates[s]:>10.0f}" for s in sizes))
    f = result["federated"]
    lines += ["", f"federated run: {f['train_images']} train / {f['test_images']} test synthetic images, "
                  f"{f['clients']} clients, {f['rounds']} rounds, batch {f['batch_size']}, features on "
                  f"{f['feature_cache']}: setup (feature cache) {f['setup_s_with_feature_cache']:.1f} s "
                  f"({f['setup_ms_per_image']:.2f} ms/image) + "
                  f"rounds {f['rounds_s']:.1f} s = {f['total_s_once_image_cache_exists']:.1f} s "
                  f"(image cache written in {f['image_cache_write_s']:.1f} s); "
                  f"test AUROC by round {f['test_mean_auroc_by_round']}"]
    rss = result["host_peak_rss_bytes"]
    lines.append(f"host peak RSS: {rss['self'] / gib:.2f} GiB (largest child {rss['children'] / gib:.2f} GiB)")
    return "\n".join(lines)


def default_out(package_dir: Path = Path(__file__).resolve().parent) -> Path:
    """data/bench.json in fedxray's repository checkout (git ignores data/), else ./bench.json."""
    data = package_dir.parent / "data"
    return data / "bench.json" if data.is_dir() else Path("bench.json")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedxray.bench", description=__doc__.split("\n\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small CPU mode (CI), under two minutes")
    size.add_argument("--smoke", action="store_true", help="smaller still, for the test suite")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON result (default: data/bench.json in the repository, else ./bench.json)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cpu for --quick/--smoke, else auto)")
    p.add_argument("--workers", type=int, nargs="+", default=None,
                   help="naive pipeline DataLoader workers, one measurement each (full default: 16 4)")
    p.add_argument("--data", type=Path, default=None, help="an NIH-layout folder (default ../shared/nih-sample)")
    p.add_argument("--workdir", type=Path, default=None, help="where caches go (default: a temporary folder)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 for --quick/--smoke on the CPU, where OpenMP threads "
                        "fighting the loader workers and other jobs for 2 cores can run 10x slower; else torch's)")
    args = p.parse_args(argv)
    mode = "quick" if args.quick else "smoke" if args.smoke else "full"
    device = torch.device(args.device or ("cpu" if mode != "full" else "cuda" if torch.cuda.is_available() else "cpu"))
    threads = args.threads or (1 if mode != "full" and device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="fedxray-bench-", dir=args.workdir) as tmp:
        t = time.perf_counter()
        result = run(mode, device, Path(tmp), args.data, tuple(args.workers) if args.workers else None,
                     log=lambda s: print(s, file=sys.stderr, flush=True))
        result["wall_s"] = time.perf_counter() - t
    out = args.out or default_out()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"\nwall {result['wall_s']:.0f} s; JSON written to {out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
