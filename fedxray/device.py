"""Device plumbing: batches of a dataset (images, cached images or cached features), a batch moved
to the device and made ready for the model, mixed precision, and a model's predictions over a
dataset. It knows nothing of clients or federations."""
from __future__ import annotations

import contextlib
from typing import Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from .data import LABELS, normalize_gray

# Mixed precision (Config.amp): "auto" = bf16 where the GPU has it natively, fp16 on older GPUs,
# off on the CPU.
AMP_MODES = ("auto", "bf16", "fp16", "off")


def autocast(device: torch.device, amp_dtype: Optional[torch.dtype]):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def is_feature_data(dataset) -> bool:
    """True for precomputed trunk features (fedxray.features.FeatureDataset): only model.head runs."""
    return bool(getattr(dataset, "is_features", False))


def forward_of(model: nn.Module, dataset):
    """What runs on a dataset's batches: model.head on cached features, the whole model on images."""
    return model.head if is_feature_data(dataset) else model


class FeatureBatches:
    """Batches of cached features gathered by index where they live (no per-item DataLoader), in
    the order `order`, a DataLoader over range(n): the same draws as for an image dataset."""

    def __init__(self, dataset, order: DataLoader):
        self.dataset, self.order = dataset, order

    def __iter__(self):
        for idx in self.order:
            yield self.dataset.batch(idx)


def batches(dataset, batch_size: int, device: torch.device, *, shuffle: bool = False,
            generator: Optional[torch.Generator] = None, num_workers: int = 0):
    """Re-iterable (x, y) batches of a dataset; with shuffle, the order is drawn from generator."""
    if shuffle and generator is None:
        raise ValueError("shuffled batches need a seeded generator: pass generator= (a run's draws must "
                         "not depend on the global RNG)")
    if is_feature_data(dataset):
        return FeatureBatches(dataset, DataLoader(range(len(dataset)), batch_size=batch_size,
                                                  shuffle=shuffle, generator=generator))
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      num_workers=num_workers, pin_memory=device.type == "cuda", persistent_workers=False)


def to_input(x: torch.Tensor, device: torch.device, amp_dtype: Optional[torch.dtype]) -> torch.Tensor:
    """A batch on the device, ready for the model. uint8 images (the image cache) are normalised
    and expanded to 3 channels there; cached fp16 features run in fp32 when there is no autocast;
    channels_last on CUDA."""
    x = x.to(device, non_blocking=True)
    if x.dtype == torch.uint8:
        x = normalize_gray(x)
    elif amp_dtype is None and x.dtype != torch.float32:
        x = x.float()
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def place_model(model: nn.Module, device: torch.device) -> nn.Module:
    """The model on the device (channels_last on CUDA, where convolutions are faster that way)."""
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


class DivergenceError(FloatingPointError):
    """Training diverged (non-finite or runaway loss, weights or predictions); the run stops before
    aggregating and keeps its last good checkpoint."""


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """The model in eval mode inside the block, given back in the mode it came in (also on an error)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def predict(model: nn.Module, dataset, batch_size: int, device: torch.device,
            amp_dtype: Optional[torch.dtype] = None) -> tuple[np.ndarray, np.ndarray]:
    """Sigmoid probabilities and labels over a dataset (images, cached images or cached features),
    in its order, in eval mode; the model is given back in the mode it came in. Non-finite
    predictions raise DivergenceError."""
    forward = forward_of(model, dataset)
    probs, labels = [], []
    with eval_mode(model):
        for x, y in batches(dataset, batch_size, device):
            x = to_input(x, device, amp_dtype)
            with autocast(device, amp_dtype):
                logits = forward(x)
            probs.append(torch.sigmoid(logits.float()).cpu())
            labels.append(y.cpu())
    if not probs:
        return np.zeros((0, len(LABELS)), np.float32), np.zeros((0, len(LABELS)), np.float32)
    probs = torch.cat(probs).numpy()
    bad = ~np.isfinite(probs).all(axis=1)
    if bad.any():
        raise DivergenceError(f"the model gives non-finite predictions for {int(bad.sum())} of {len(probs)} "
                              f"images: its weights diverged. Lower lr, or use Adam instead of SGD")
    return probs, torch.cat(labels).numpy()
