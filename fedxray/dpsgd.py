"""DP-SGD at a hospital with the patient as the unit (Abadi et al. 2016, "Deep learning with
differential privacy", with per-user clipping as in McMahan et al. 2018).

An NIH patient has one to a few hundred images, so a guarantee per image would protect a patient
with k images only as a group of k (about k * epsilon). Here each step samples *patients*
independently with probability sample_rate (Poisson, as the accountant assumes), takes the
gradient of each sampled patient's mean image loss, clips it to L2 norm clip_norm over every
trained parameter, sums, adds N(0, (noise_multiplier * clip_norm)^2) per coordinate and divides by
the expected number of patients per step (sample_rate * patients; a fixed denominator). Adding or
removing one patient moves the sum by at most clip_norm: epsilon is per patient.

Per-image gradients come from Opacus's GradSampleModule (hooks that compute them for every
layer4 convolution and fc in one backward pass); they are summed per patient here, which Opacus's
DPOptimizer (per-sample clipping) cannot do. layer4's BatchNorm must be replaced by GroupNorm
(fedxray.model.private_norm): a BatchNorm in training mode mixes the images of a batch.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Optional

import numpy as np
import torch
from torch import Tensor, nn

from .privacy import _opacus, epsilon


@dataclass(frozen=True)
class PatientDPSpec:
    """One client's DP-SGD: sample_rate = batch_size / its images (so a step sees batch_size
    images on average), steps_per_round = local_epochs * ceil(1 / sample_rate)."""
    noise_multiplier: float
    clip_norm: float
    sample_rate: float
    steps_per_round: int
    delta: float

    def epsilon_after(self, rounds_trained: int) -> float:
        """epsilon per patient after this client trained rounds_trained rounds."""
        return epsilon(self.noise_multiplier, self.sample_rate, rounds_trained * self.steps_per_round, self.delta)


def steps_per_round(num_images: int, batch_size: int, local_epochs: int) -> tuple[float, int]:
    """(sample_rate, steps per round) of a client with num_images images."""
    q = min(1.0, batch_size / num_images)
    return q, local_epochs * math.ceil(1 / q)


def spec_for(config, num_examples: int, delta: float) -> PatientDPSpec:
    """The per-patient DP-SGD of a client holding num_examples images under config (dp "example"):
    sampling rate and steps from its size, the noise given or computed from dp_target_epsilon for
    every round of the run. The server of a Flower run computes the same from the sizes the
    clients report, to check the epsilon each one sends."""
    from .privacy import noise_for_epsilon
    q, steps = steps_per_round(num_examples, config.batch_size, config.local_epochs)
    noise = config.dp_noise_multiplier
    if noise is None:
        noise = noise_for_epsilon(config.dp_target_epsilon, delta, q, steps * config.num_rounds)
    return PatientDPSpec(noise_multiplier=noise, clip_norm=config.dp_clip_norm, sample_rate=q,
                         steps_per_round=steps, delta=delta)


def patient_codes(dataset) -> np.ndarray:
    """Each example's patient as 0..P-1, from the dataset's frame (its patient_id column)."""
    frame = getattr(dataset, "frame", None)
    if frame is None or "patient_id" not in frame:
        raise ValueError("per-patient DP-SGD needs each image's patient: the client's dataset has no frame with a "
                         "patient_id column")
    return np.unique(frame["patient_id"].to_numpy(), return_inverse=True)[1].astype(np.int64)


def poisson_patient_batches(codes: np.ndarray, sample_rate: float, steps: int,
                            generator: torch.Generator) -> Iterator[np.ndarray]:
    """For each of `steps` steps, the indices of the images of the patients sampled (each patient
    independently with probability sample_rate), grouped by patient; may be empty."""
    num_patients = int(codes.max()) + 1 if len(codes) else 0
    order = np.argsort(codes, kind="stable")
    starts = np.searchsorted(codes[order], np.arange(num_patients + 1))
    for _ in range(steps):
        chosen = torch.nonzero(torch.rand(num_patients, generator=generator) < sample_rate).flatten().numpy()
        yield np.concatenate([order[starts[p]:starts[p + 1]] for p in chosen]) if len(chosen) else \
            np.zeros(0, dtype=np.int64)


class PatientDPSGD:
    """Noised per-patient gradients for one client: `grads` fills each trained parameter's .grad
    for one step; the client's optimizer then steps as usual (Adam on noised gradients is still
    DP: post-processing)."""

    def __init__(self, spec: PatientDPSpec, codes: np.ndarray, chunk: int):
        self.spec, self.codes, self.chunk = spec, codes, max(1, int(chunk))
        self.num_patients = int(codes.max()) + 1

    def attach(self, model: nn.Module):
        """Opacus's per-sample-gradient hooks on model (remove with detach)."""
        _opacus()   # a clear error when opacus is missing
        from opacus.grad_sample import GradSampleModule
        return GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=False)

    @staticmethod
    def detach(gsm) -> None:
        gsm._close()

    def grads(self, params: Mapping[str, nn.Parameter], idx: np.ndarray, fetch: Callable[[np.ndarray], tuple],
              example_losses: Callable[[Tensor, Tensor], Tensor], generator: torch.Generator,
              device: torch.device) -> tuple[Tensor, int]:
        """Set p.grad of every parameter in params to the step's noised mean of clipped per-patient
        gradients. idx: the step's images, grouped by patient (poisson_patient_batches); fetch(idx)
        -> (x, y) on the device; example_losses(x, y) -> one loss per image (the forward pass runs
        inside). Returns the summed data loss of the images and their count (for the client's own
        divergence checks; never sent)."""
        names = list(params)
        codes = self.codes[idx]
        patients, local = np.unique(codes, return_inverse=True)
        counts = np.bincount(local, minlength=len(patients)).astype(np.float64)
        # One image per patient in one chunk (the usual case): the per-image gradients are the per-patient ones.
        single = 0 < len(idx) <= self.chunk and len(patients) == len(idx)
        sums: dict[str, Tensor] = {} if single else \
            {n: torch.zeros((len(patients), *params[n].shape), dtype=torch.float32, device=device) for n in names}
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for start in range(0, len(idx), self.chunk):
            part = idx[start:start + self.chunk]
            where = torch.as_tensor(local[start:start + self.chunk], device=device)
            weight = torch.as_tensor(1.0 / counts[local[start:start + self.chunk]], dtype=torch.float32, device=device)
            x, y = fetch(part)
            losses = example_losses(x, y)
            with warnings.catch_warnings():   # cached features need no input gradient: the hooks still fire
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                (losses * weight).sum().backward()   # per image: grad of its share of its patient's mean loss
            loss_sum += losses.detach().double().sum()
            for n in names:
                p = params[n]
                if single:
                    sums[n] = p.grad_sample[torch.argsort(where)] if not bool((where == torch.arange(
                        len(where), device=device)).all()) else p.grad_sample
                else:
                    sums[n].index_add_(0, where, p.grad_sample.float())
                p.grad_sample = None
                p.grad = None
        total = torch.zeros(len(patients), dtype=torch.float64, device=device)
        for n in names if len(patients) else ():
            total += torch.linalg.vector_norm(sums[n].flatten(1), dim=1).double().square()
        factor = (self.spec.clip_norm / total.sqrt().clamp_min(1e-12)).clamp(max=1.0).float()
        std = self.spec.noise_multiplier * self.spec.clip_norm if self.spec.noise_multiplier > 0 else 0.0
        denominator = self.spec.sample_rate * self.num_patients
        for n in names:
            g = torch.tensordot(factor, sums[n], dims=1) if len(patients) else torch.zeros_like(params[n])
            if std > 0:
                g = g + std * torch.randn(g.shape, generator=generator).to(device)
            params[n].grad = (g / denominator).to(params[n].dtype)
        return loss_sum, len(idx)


def per_example_bce(pos_weight: Optional[Tensor] = None) -> Callable[[Tensor, Tensor], Tensor]:
    """BCE with logits averaged over the findings of each image: one loss per image."""
    def losses(logits: Tensor, y: Tensor) -> Tensor:
        return nn.functional.binary_cross_entropy_with_logits(logits, y, pos_weight=pos_weight,
                                                              reduction="none").mean(1)
    return losses
