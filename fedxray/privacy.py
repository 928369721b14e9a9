"""Differential privacy you can state as a number: the accountant, update clipping, Poisson client
sampling and DP-FedAvg (client-level DP at the server). Per-patient DP-SGD at each hospital lives
in fedxray.dpsgd; both report their epsilon through `epsilon` here.

Accounting is Opacus's RDP accountant (Mironov 2017; the Poisson-subsampled Gaussian of Mironov,
Talwar and Zhang 2019): a well-kept, audited implementation, installable wherever torch >= 2.0 is
(opacus 1.6 needs torch >= 2.6; 1.5.x works with torch >= 2.0). It is imported only when a run
asks for DP, so fedxray without DP needs no opacus.
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .strategies import Strategy, _check_updates

log = logging.getLogger(__name__)

MODES = ("example", "client")
# A guarantee weaker than this is reported as not meaningful (an adversary's odds may move by e**10).
MEANINGFUL_EPSILON = 10.0
_NOISE_STREAM = 0xD9   # keeps the server's noise apart from the clients' streams
_SAMPLING_STREAM = 0xD5


def _opacus():
    try:
        import opacus
        from opacus.accountants import RDPAccountant
        from opacus.accountants.utils import get_noise_multiplier
    except ImportError:
        raise ImportError("differential privacy (Config.dp) needs Opacus for its accountant and per-sample "
                          "gradients: pip install 'opacus>=1.5' (or pip install -e '.[privacy]'); with a torch "
                          "older than 2.6 install 'opacus>=1.5,<1.6', or pip replaces your torch") from None
    return opacus, RDPAccountant, get_noise_multiplier


def accountant_name() -> str:
    opacus, _, _ = _opacus()
    return f"RDP (opacus {opacus.__version__} RDPAccountant, default orders)"


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """epsilon at delta after `steps` Poisson-subsampled Gaussian steps (sampling probability
    sample_rate, noise standard deviation noise_multiplier * clip), by Opacus's RDP accountant.
    0 before any step; infinite without noise."""
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    _, RDPAccountant, _ = _opacus()
    acc = RDPAccountant()
    acc.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    with warnings.catch_warnings():   # "optimal order is the largest/smallest alpha": still a valid upper bound
        warnings.filterwarnings("ignore", message="Optimal order is the")
        return float(acc.get_epsilon(delta=float(delta)))


def noise_for_epsilon(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The noise multiplier whose epsilon after `steps` steps at sample_rate is at most
    target_epsilon (Opacus's binary search, to within 0.01 below the target)."""
    _, _, get_noise_multiplier = _opacus()
    try:
        return float(get_noise_multiplier(target_epsilon=float(target_epsilon), target_delta=float(delta),
                                          sample_rate=float(sample_rate), steps=int(steps), accountant="rdp"))
    except ValueError as e:
        raise ValueError(f"dp_target_epsilon={target_epsilon} at delta {delta:.3g} over {steps} steps at sampling "
                         f"rate {sample_rate:.3g} cannot be reached ({e}); raise dp_target_epsilon or train fewer "
                         f"steps") from None


def default_delta(units: int) -> float:
    """The run's delta when Config.dp_delta is None: 1e-5, or 0.1 / units when that is smaller
    (units: training patients for "example", clients for "client"), so that delta stays well
    below 1 / units (a mechanism that publishes one unit's data outright has delta 1 / units)."""
    return min(1e-5, 0.1 / max(int(units), 1))


def judged(eps: float) -> str:
    """epsilon in words, saying plainly when it is not a meaningful guarantee."""
    if math.isinf(eps):
        return "epsilon = inf: no privacy guarantee (no noise)"
    if eps > MEANINGFUL_EPSILON:
        return (f"epsilon = {eps:.3g}: a guarantee this weak is not meaningful (an attacker's odds may move by a "
                f"factor e^{eps:.0f}); more noise, more clients sampled less often, or fewer rounds lower it")
    return f"epsilon = {eps:.3g}"


# ---------------------------------------------------------------------- clipping
def flat_delta(state: Mapping[str, Tensor], reference: Mapping[str, Tensor], keys: Sequence[str]) -> Tensor:
    """state - reference over keys, as one float64 vector (on the CPU)."""
    return torch.cat([(state[k].detach().to("cpu", torch.float64) - reference[k].detach().to("cpu", torch.float64))
                      .flatten() for k in keys]) if keys else torch.zeros(0, dtype=torch.float64)


def clip(vector: Tensor, clip_norm: float) -> tuple[Tensor, float]:
    """vector scaled to L2 norm at most clip_norm (same direction), and its norm before."""
    norm = float(torch.linalg.vector_norm(vector))
    if norm > clip_norm:
        vector = vector * (clip_norm / norm)
    return vector, norm


def unflatten(vector: Tensor, like: Mapping[str, Tensor], keys: Sequence[str]) -> dict[str, Tensor]:
    """A flat float64 vector back into tensors shaped as like's (still float64)."""
    out, at = {}, 0
    for k in keys:
        n = like[k].numel()
        out[k] = vector[at:at + n].view(like[k].shape)
        at += n
    return out


def clipped_state(state: Mapping[str, Tensor], global_state: Mapping[str, Tensor], clip_norm: float
                  ) -> tuple[dict[str, Tensor], float]:
    """global_state + the update (state - global_state) clipped to L2 norm clip_norm, as one
    vector over every entry, in each entry's dtype; and the update's norm before clipping. What a
    client sends under client-level DP."""
    keys = list(global_state)
    vector, norm = clip(flat_delta(state, global_state, keys), clip_norm)
    parts = unflatten(vector, global_state, keys)
    return {k: (global_state[k].detach().to("cpu", torch.float64) + parts[k]).to(state[k].dtype)
            for k in keys}, norm


# ---------------------------------------------------------------------- sampling
def poisson_clients(num_clients: int, sample_rate: float, seed: int, round_num: int) -> list[int]:
    """Each client independently with probability sample_rate (Poisson sampling, what the RDP
    accountant's amplification by subsampling assumes); may be none. A function of (seed, round)."""
    from .client import derive_seed
    rng = np.random.default_rng(derive_seed(seed, round_num, _SAMPLING_STREAM))
    return np.flatnonzero(rng.random(num_clients) < sample_rate).tolist()


# ---------------------------------------------------------------------- DP-FedAvg
@dataclass(frozen=True)
class ClientDPSpec:
    """Client-level DP of a run: each round samples every client with probability sample_rate;
    updates are clipped to clip_norm; the server adds N(0, (noise_multiplier * clip_norm)^2)."""
    noise_multiplier: float
    clip_norm: float
    sample_rate: float
    num_rounds: int
    delta: float

    def epsilon_after(self, rounds: int) -> float:
        return epsilon(self.noise_multiplier, self.sample_rate, rounds, self.delta)


class ClientLevelDP(Strategy):
    """DP-FedAvg (McMahan et al. 2018, "Learning differentially private recurrent language models")
    around another strategy.

    Each update (a client's exchanged parameters minus the global ones, one flat vector) is
    clipped to L2 norm clip_norm (by the client before it sends it, and again here: a client that
    did not clip is clipped and logged); the server adds Gaussian noise of standard deviation
    noise_multiplier * clip_norm to their sum and divides by the expected number of clients per
    round, sample_rate * num_clients: McMahan et al.'s fixed-denominator estimator. The average is
    unweighted: weighting by example counts would let one large hospital move the sum by more than
    clip_norm, breaking the sensitivity bound; and dividing by the number actually sampled would
    make the denominator depend on who took part. Clients are Poisson-sampled (poisson_clients),
    as the accountant assumes; a round may sample none and still adds noise.

    The noised average then goes to the wrapped strategy as the single update of the round: FedAvg
    takes it as is, FedAvgM and the FedOpt family step on it (post-processing keeps the
    guarantee). Strategies whose aggregate is not a sum of updates (median, trimmed mean) or whose
    clients send more than their update (SCAFFOLD's control variates) are refused by Config.

    The noise is drawn from (seed, round), so a run is reproducible and resumes bit for bit; that
    also means anyone who knows the seed can subtract it. A deployment draws it from a secret seed.
    """

    def __init__(self, inner: Strategy, spec: ClientDPSpec, seed: int):
        self.inner, self.spec, self.seed = inner, spec, int(seed)
        self.name, self.paper = inner.name, inner.paper
        self.defaults, self.slots, self.buffers = inner.defaults, inner.slots, inner.buffers
        self.num_clients = inner.num_clients
        self.objective = inner.objective

    @property
    def hyperparameters(self) -> dict[str, float]:
        return self.inner.hyperparameters

    def __repr__(self) -> str:
        return f"ClientLevelDP({self.inner!r}, {self.spec})"

    def reset(self) -> None:
        self.inner.reset()

    def payload(self, client_id, global_state):
        return self.inner.payload(client_id, global_state)

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state, global_state) -> None:
        self.inner.load_state_dict(state, global_state)

    def aggregate(self, global_state, updates, round_num):
        if updates:
            _check_updates(global_state, updates, round_num)
        keys = self._keys(global_state)
        total = torch.zeros(sum(global_state[k].numel() for k in keys), dtype=torch.float64)
        for i, u in enumerate(updates):
            vector, norm = clip(flat_delta(u.state, global_state, keys), self.spec.clip_norm)
            if norm > self.spec.clip_norm * (1 + 1e-5):
                log.warning("round %d: client %s sent an update of L2 norm %.4g > dp_clip_norm %g (it did not clip): "
                            "clipped at the server", round_num, u.client_id if u.client_id is not None else i,
                            norm, self.spec.clip_norm)
            total += vector
        return self.aggregate_sum(global_state, total, round_num)

    def aggregate_sum(self, global_state, total: Tensor, round_num: int) -> dict[str, Tensor]:
        """The round's new global state from the sum of the clipped updates (one float64 vector
        over the exchanged entries in global_state's order): noise added, divided by the expected
        number of clients, stepped by the wrapped strategy. What a server that only learns the sum
        (secure aggregation, fedxray.flower.secure) calls; it cannot re-clip, so it relies on
        every client having clipped its own update."""
        keys = self._keys(global_state)
        size = sum(global_state[k].numel() for k in keys)
        if tuple(total.shape) != (size,):
            raise ValueError(f"round {round_num}: the sum of the updates has shape {tuple(total.shape)}, expected "
                             f"({size},) (the exchanged entries in order)")
        total = total.to(torch.float64) + self.noise(size, round_num)
        mean = total / (self.spec.sample_rate * self.num_clients)
        parts = unflatten(mean, global_state, keys)
        from .client import ClientUpdate
        noised = {k: (global_state[k].to("cpu", torch.float64) + parts[k]).to(global_state[k].dtype) for k in keys}
        new = self.inner.combine(global_state, [ClientUpdate(state=noised, num_examples=1, train_loss=math.nan)],
                                 round_num)
        return {k: new[k].cpu() for k in global_state}

    def _keys(self, global_state) -> list[str]:
        keys = list(global_state)
        not_float = [k for k in keys if not global_state[k].is_floating_point() or k in self.buffers]
        if not_float:
            raise ValueError(f"client-level DP clips and noises parameters only, but the exchanged state holds "
                             f"{not_float[:3]} (buffers or integers): with DP on, layer4's BatchNorm must be a "
                             f"GroupNorm (fedxray.model.private_norm)")
        return keys

    def noise(self, size: int, round_num: int) -> Tensor:
        """The round's Gaussian noise: standard deviation noise_multiplier * clip_norm per coordinate."""
        from .client import derive_seed
        if self.spec.noise_multiplier == 0:   # (0 * an infinite clip is NaN, not 0)
            return torch.zeros(size, dtype=torch.float64)
        gen = torch.Generator().manual_seed(derive_seed(self.seed, round_num, _NOISE_STREAM))
        return torch.randn(size, generator=gen, dtype=torch.float64) * (self.spec.noise_multiplier * self.spec.clip_norm)


def client_spec(config, num_clients: int) -> Optional[ClientDPSpec]:
    """The client-level DP of config (None unless config.dp == "client"), its noise computed from
    dp_target_epsilon when that is given."""
    if config.dp != "client":
        return None
    delta = config.dp_delta if config.dp_delta is not None else default_delta(num_clients)
    q = config.fraction_fit
    noise = config.dp_noise_multiplier
    if noise is None:
        noise = noise_for_epsilon(config.dp_target_epsilon, delta, q, config.num_rounds)
    else:
        _opacus()   # the accountant must be there before a run starts
    return ClientDPSpec(noise_multiplier=noise, clip_norm=config.dp_clip_norm, sample_rate=q,
                        num_rounds=config.num_rounds, delta=delta)
