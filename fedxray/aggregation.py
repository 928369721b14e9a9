"""FedAvg: the example-weighted average of client states, keyed by parameter name."""
from __future__ import annotations

import operator
from typing import Mapping, Sequence

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

    first = states[0]
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        for key, ref in first.items():
            acc = torch.zeros(ref.shape, dtype=torch.float64, device=ref.device)
            for state, n in zip(states, counts):
                if n:
                    acc.add_(state[key].to(ref.device, torch.float64), alpha=n)
            acc.div_(total)
            if not ref.is_floating_point():
                acc.round_()
            out[key] = acc.to(ref.dtype)
    return out


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

