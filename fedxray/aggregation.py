"""Combining client states, keyed by parameter name: FedAvg's example-weighted average and the
robust coordinate-wise median and trimmed mean (Yin et al. 2018)."""
from __future__ import annotations

import operator
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor


def fedavg(states: Sequence[Mapping[str, Tensor]], num_examples: Sequence[int]) -> dict[str, Tensor]:
    """Average client states, weighting client i by num_examples[i] / sum(num_examples).

    Pure: no I/O, inputs are not modified. Sums run in float64; each result is cast back to the
    key's dtype and lies on the device of states[0]. Keys come out in states[0]'s order.

    Integer buffers (BatchNorm's ``num_batches_tracked``): the same example-weighted mean, rounded
    to the nearest integer (half to even, as torch.round) and cast back to the integer dtype; exact
    while the values stay below 2**53. Bool tensors are refused: a flag has no meaningful average,
    so keep it out of the exchanged keys. Every problem raises ValueError naming the key, client
    index or value at fault: no states, a count per state missing, negative or non-integer counts,
    a zero total, key sets, shapes or dtypes that differ from client 0's, non-finite floats.
    """
    return {key: cast_back(acc, ref) for key, ref, acc in _weighted_means(states, num_examples)}


def weighted_mean(states: Sequence[Mapping[str, Tensor]], num_examples: Sequence[int]) -> dict[str, Tensor]:
    """FedAvg's example-weighted mean in float64, before the cast back (what server optimizers step
    from). The same checks as fedavg."""
    return {key: acc for key, _, acc in _weighted_means(states, num_examples)}


def _weighted_means(states: Sequence[Mapping[str, Tensor]], num_examples: Sequence[int]):
    """(key, client 0's tensor, the float64 example-weighted mean), one key at a time."""
    if len(states) == 0:
        raise ValueError("fedavg needs at least one client state, got none")
    if len(states) != len(num_examples):
        raise ValueError(f"got {len(states)} states but {len(num_examples)} example counts: "
                         f"pass one count per state")
    counts = [_count(n, i) for i, n in enumerate(num_examples)]
    total = sum(counts)
    if total == 0:
        raise ValueError(f"the example counts sum to zero ({counts}): nothing to average")
    _check_states(states)

    with torch.no_grad():
        for key, ref in states[0].items():
            acc = torch.zeros(ref.shape, dtype=torch.float64, device=ref.device)
            for state, n in zip(states, counts):
                if n:
                    acc.add_(state[key].to(ref.device, torch.float64), alpha=n)
            yield key, ref, acc.div_(total)


def cast_back(value: Tensor, ref: Tensor) -> Tensor:
    """A float64 result in ref's dtype: integer entries rounded half to even first (as torch.round)."""
    if not ref.is_floating_point():
        value = torch.round(value)
    return value.to(ref.dtype)


def coordinate_median(states: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """The element-wise median over clients, per key (unweighted, as Flower's FedMedian; an even
    count gives the mean of the two middle values, as np.median). Computed in float64 and cast
    back as fedavg does; the same input checks."""
    return {key: _from_numpy(np.median(stacked, axis=0), ref)
            for key, ref, stacked in _stacked(states, "coordinate_median")}


def trimmed_mean(states: Sequence[Mapping[str, Tensor]], beta: float) -> dict[str, Tensor]:
    """Per element, the mean over clients after dropping the int(beta * n) lowest and highest
    values (Flower 1.42's FedTrimmedAvg trim_mean, itself scipy.stats.trim_mean). Unweighted;
    computed in float64 and cast back as fedavg does."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < 0.5:
        raise ValueError(f"trimmed_mean: beta is the fraction cut at each end and must lie in [0, 0.5), "
                         f"got {beta!r}")
    out: dict[str, Tensor] = {}
    for key, ref, stacked in _stacked(states, "trimmed_mean"):
        low = int(beta * len(stacked))
        high = len(stacked) - low
        kept = np.partition(stacked, (low, high - 1), axis=0)[low:high]
        out[key] = _from_numpy(np.mean(kept, axis=0), ref)
    return out


def _stacked(states: Sequence[Mapping[str, Tensor]], what: str):
    """(key, client 0's tensor, the clients' values stacked on axis 0 as a float64 array), per key."""
    if len(states) == 0:
        raise ValueError(f"{what} needs at least one client state, got none")
    _check_states(states)
    for key, ref in states[0].items():
        yield key, ref, np.stack([s[key].detach().to("cpu", torch.float64).numpy() for s in states])


def _from_numpy(value, ref: Tensor) -> Tensor:
    """A float64 numpy result (a scalar for 0-d entries) cast back like ref, on ref's device."""
    return cast_back(torch.from_numpy(np.asarray(value, dtype=np.float64)).to(ref.device), ref)


def state_nbytes(state: Mapping[str, Tensor]) -> int:
    """Total bytes of the tensors in a state (what one client sends or receives per round)."""
    return sum(t.numel() * t.element_size() for t in state.values())


def _count(n, i: int) -> int:
    # operator.index accepts int, numpy and 0-d integer tensor counts but refuses 3.0 or "3":
    # a fractional count usually means a weight was passed where a number of examples belongs.
    if isinstance(n, bool):
        raise ValueError(f"example count of client {i} is a bool ({n}): pass the number of examples")
    try:
        value = operator.index(n)
    except TypeError:
        raise ValueError(f"example count of client {i} must be an integer number of examples, "
                         f"got {n!r}") from None
    if value < 0:
        raise ValueError(f"example count of client {i} is negative ({value})")
    return value


def _check_states(states: Sequence[Mapping[str, Tensor]]) -> None:
    first = states[0]
    for key, t in first.items():
        _check_tensor(key, t, 0)
    keys = set(first)
    for i, state in enumerate(states[1:], start=1):
        missing, extra = sorted(keys - set(state)), sorted(set(state) - keys)
        if missing or extra:
            raise ValueError(f"client {i} has different keys from client 0: missing {missing}, "
                             f"extra {extra}")
        for key, ref in first.items():
            t = state[key]
            _check_tensor(key, t, i)
            if t.shape != ref.shape:
                raise ValueError(f"client {i}: {key!r} has shape {tuple(t.shape)}, client 0 has "
                                 f"{tuple(ref.shape)}")
            if t.dtype != ref.dtype:
                raise ValueError(f"client {i}: {key!r} has dtype {t.dtype}, client 0 has {ref.dtype}")


def _check_tensor(key: str, t: Tensor, i: int) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"client {i}: {key!r} is a {type(t).__name__}, not a tensor")
    if t.dtype == torch.bool:
        raise ValueError(f"client {i}: {key!r} is a bool tensor, which FedAvg does not average; "
                         f"leave it out of the exchanged keys")
    if t.is_complex():
        raise ValueError(f"client {i}: {key!r} is complex ({t.dtype}), which fedavg does not support")
    if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"client {i}: {key!r} has {bad} non-finite value(s) (NaN or inf); the "
                         f"client's training diverged or its state is corrupt")

