"""A federated client: one hospital's data, trained locally on layer4 + fc from the global weights."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from .data import LABELS, DataError
from .device import DivergenceError, autocast, batches, forward_of, is_feature_data, place_model, to_input
from .model import bn_keys, exchanged_keys, get_state, local_keys_of
from .dpsgd import PatientDPSGD, PatientDPSpec, patient_codes, per_example_bce, poisson_patient_batches, spec_for
from .objectives import Objective
from .privacy import clipped_state


# A mean BCE per finding this high means confidently wrong logits of about +-100 on average: no
# model that is learning gets near it (an untrained head gives 0.69), only one whose weights ran away.
DIVERGED_LOSS = 100.0
_AUGMENT_STREAM = 0xA06   # keeps the augmentation draws apart from the batch order's
_DP_NOISE_STREAM = 0xD7   # DP-SGD's noise


class NonFiniteLossError(DivergenceError):
    """A NaN or infinite training loss."""


def non_finite_entries(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point entries of a state holding NaN or infinity."""
    return [k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


@dataclass(frozen=True)
class ClientUpdate:
    state: dict[str, torch.Tensor]   # copies of the exchanged entries, on the CPU
    num_examples: int                # examples held by the client (FedAvg's weight)
    train_loss: float                # data loss (BCE) averaged over every example seen
    client_id: Optional[int] = None  # who sent it (SCAFFOLD keeps one control variate per client)
    # What the client's objective sends besides its state (SCAFFOLD: its new control variate,
    # keyed by parameter name); empty for most strategies.
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    # Per-patient DP-SGD (Config.dp "example"): the client's epsilon after this round; else None.
    epsilon: Optional[float] = None


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers such as (seed, round, client_id), independent of call order."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


# The local optimizers, by Config.optimizer name.
OPTIMIZERS = ("adam", "sgd")
# The client learning rate by round, by Config.lr_schedule name (see scheduled_lr).
LR_SCHEDULES = ("constant", "cosine", "step")


def scheduled_lr(lr: float, schedule: str, round_num: int, num_rounds: int) -> float:
    """The client learning rate in round round_num (1..num_rounds) of a run: "constant" lr;
    "cosine" lr * (1 + cos(pi * (round_num - 1) / num_rounds)) / 2 (lr in round 1, falling towards
    0 without reaching it); "step" lr, then lr / 10 from round floor(num_rounds / 2) + 1 and lr / 100
    from round floor(3 * num_rounds / 4) + 1 (no decay for a 1-round run)."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    if not 1 <= round_num <= num_rounds:
        raise ValueError(f"round {round_num} is outside the run's rounds 1..{num_rounds}")
    if schedule == "cosine":
        return lr * (1 + math.cos(math.pi * (round_num - 1) / num_rounds)) / 2
    if schedule == "step":
        return lr * 0.1 ** sum(round_num > b for b in {num_rounds // 2, 3 * num_rounds // 4} if b >= 1)
    return lr


def make_optimizer(params, name: str, lr: float, momentum: float = 0.9,
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


class Client:
    """Holds one client's dataset and trains the shared model object on it.

    fit() loads the global weights into the (reused) model, trains local_epochs with a fresh
    optimizer and returns a ClientUpdate. All its randomness derives from (seed, round, client_id),
    so a client trains the same whatever order or process it runs in. The entries local_keys names
    (fedxray.model.LOCAL_KEY_GROUPS: "bn" = FedBN, "fc" = FedPer) never leave the client and persist
    between its rounds, in local_state.
    """

    def __init__(self, client_id: int, dataset: Dataset, model: nn.Module, *, local_epochs: int = 1,
                 batch_size: int = 32, lr: float = 1e-3, optimizer: str = "adam", momentum: float = 0.9,
                 weight_decay: float = 0.0, seed: int = 0, local_keys: str = "",
                 device: torch.device | str = "cpu", amp_dtype: Optional[torch.dtype] = None,
                 num_workers: int = 0, objective: Optional[Objective] = None,
                 augment: Optional[Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = None,
                 lr_schedule: str = "constant", num_rounds: Optional[int] = None,
                 pos_weight: Optional[torch.Tensor] = None, dp_sgd: Optional[PatientDPSpec] = None,
                 clip_update: Optional[float] = None):
        if len(dataset) == 0:
            raise ValueError(f"client {client_id} has no training examples")
        self.client_id = int(client_id)
        self.dataset = dataset
        self.model = model
        self.local_epochs = local_epochs
        self.batch_size = batch_size
        self.lr, self.optimizer, self.momentum, self.weight_decay = lr, optimizer, momentum, weight_decay
        self.seed = seed
        self.local_keys = local_keys
        self.device = torch.device(device)
        self.amp_dtype = amp_dtype
        self.num_workers = num_workers
        self.objective = objective if objective is not None else Objective()   # plain BCE
        # augment(x, generator): random changes to a batch of model-ready images on the device
        # (fedxray.augment.Augmentation); training batches only, drawn from (seed, round, client).
        self.augment = augment
        if lr_schedule != "constant" and num_rounds is None:
            raise ValueError(f"client {client_id}: lr_schedule {lr_schedule!r} needs the run's num_rounds")
        scheduled_lr(lr, lr_schedule, 1, num_rounds or 1)   # checks the schedule's name
        self.lr_schedule, self.num_rounds = lr_schedule, num_rounds
        # BCE's weight of each finding's positives (negatives / positives over the federation), or None.
        self.pos_weight = None if pos_weight is None else torch.as_tensor(pos_weight, dtype=torch.float32)
        if self.pos_weight is not None and tuple(self.pos_weight.shape) != (len(LABELS),):
            raise ValueError(f"client {client_id}: pos_weight must hold one weight per finding ({len(LABELS)}), "
                             f"got shape {tuple(self.pos_weight.shape)}")
        if augment is not None and is_feature_data(dataset):
            raise ValueError(f"client {client_id}: augmentation needs images, but its dataset holds cached trunk "
                             f"features (fixed outputs of the trunk): turn off feature_cache or augment")
        self.keys = exchanged_keys(model, local_keys)
        # Privacy: per-patient DP-SGD (dp_sgd), or the L2 bound of the update sent (clip_update, the
        # client's part of client-level DP). Either way no training loss is reported.
        if dp_sgd is not None and clip_update is not None:
            raise ValueError(f"client {client_id}: dp_sgd and clip_update are the two DP modes: choose one")
        if (dp_sgd is not None or clip_update is not None) and bn_keys(model):
            raise ValueError(f"client {client_id}: differential privacy needs layer4's BatchNorm replaced "
                             f"(fedxray.model.private_norm)")
        self.dp_sgd, self.clip_update = dp_sgd, clip_update
        self.dp_codes = patient_codes(dataset) if dp_sgd is not None else None
        self.rounds_trained = 0   # rounds this client trained in, for its accountant
        # The entries that stay here (FedBN's BatchNorm, FedPer's head), starting from the model as built.
        self.local_state = get_state(model, local_keys_of(model, local_keys))

    @classmethod
    def from_config(cls, client_id: int, dataset: Dataset, model: nn.Module, config, device: torch.device,
                    objective: Optional[Objective] = None, pos_weight: Optional[torch.Tensor] = None,
                    dp_delta: Optional[float] = None) -> "Client":
        """A Client with the local-training fields of a fedxray.Config and its strategy's objective;
        pos_weight: the federation's (fedxray.objectives.pos_weight_from_counts), when config.pos_weight;
        dp_delta: the run's delta for config.dp "example" (fedxray.privacy.default_delta of the
        federation's patients, when config.dp_delta is None)."""
        c = config
        if c.pos_weight and pos_weight is None:
            raise ValueError(f"client {client_id}: config.pos_weight is on, but no pos_weight was given: compute "
                             f"it from the federation's label counts (fedxray.objectives.pos_weight_from_counts)")
        dp_sgd = None
        if c.dp == "example":
            if dp_delta is None:
                raise ValueError(f"client {client_id}: config.dp is 'example' but no dp_delta was given")
            dp_sgd = spec_for(c, len(dataset), dp_delta)
        from .augment import Augmentation
        return cls(client_id, dataset, model, local_epochs=c.local_epochs, batch_size=c.batch_size, lr=c.lr,
                   optimizer=c.optimizer, momentum=c.momentum, weight_decay=c.weight_decay, seed=c.seed,
                   local_keys=c.local_keys, device=device,
                   amp_dtype=None if c.dp == "example" else c.resolve_amp(device),
                   num_workers=c.num_workers, objective=objective,
                   augment=Augmentation() if c.augment else None, lr_schedule=c.lr_schedule,
                   num_rounds=c.num_rounds, pos_weight=pos_weight if c.pos_weight else None,
                   dp_sgd=dp_sgd, clip_update=c.dp_clip_norm if c.dp == "client" else None)

    def fit(self, global_state: Mapping[str, torch.Tensor], round_num: int,
            payload: Optional[Mapping[str, torch.Tensor]] = None) -> ClientUpdate:
        """Train from global_state in round round_num (which seeds this round's shuffle: required, so
        that two rounds never silently reuse one order); payload: the strategy's extra tensors for
        this client (SCAFFOLD's correction)."""
        if isinstance(round_num, bool) or not isinstance(round_num, int) or round_num < 1:
            raise ValueError(f"client {self.client_id}: round_num must be the round number (an integer >= 1), "
                             f"got {round_num!r}; it seeds the round's shuffle")
        missing = sorted(set(self.keys) - set(global_state))
        extra = sorted(set(global_state) - set(self.keys))
        if missing or extra:
            raise KeyError(f"client {self.client_id}: global state does not match the exchanged keys "
                           f"(missing {missing[:3]}, unexpected {extra[:3]})")
        bad = non_finite_entries(global_state)
        if bad:
            raise ValueError(f"client {self.client_id}, round {round_num}: the global state it received has "
                             f"non-finite values in {len(bad)} entries (first {bad[0]!r}): the server's model is "
                             f"corrupt, not this client's training; nothing was trained")
        model = place_model(self.model, self.device)
        model.load_state_dict({**global_state, **self.local_state}, strict=False)
        model.train()   # the trunk's FrozenBatchNorm2d cannot drift; layer4's BN learns
        params = [p for p in model.parameters() if p.requires_grad]
        # The objective's terms act on the trainable parameters that travel (FedBN's local BN stays out).
        shared = {name: p for name, p in model.named_parameters() if p.requires_grad and name in global_state}
        anchor = {name: global_state[name].detach().to(self.device) for name in shared}
        payload = {k: v.detach().to(self.device) for k, v in (payload or {}).items()}
        forward = forward_of(model, self.dataset)   # cached features: layer4+fc only
        lr = self.lr_at(round_num)
        opt = make_optimizer(params, self.optimizer, lr, self.momentum, self.weight_decay)
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        loss_fn = nn.BCEWithLogitsLoss(pos_weight=None if self.pos_weight is None else self.pos_weight.to(self.device))
        gen = torch.Generator().manual_seed(derive_seed(self.seed, round_num, self.client_id))
        aug_gen = torch.Generator().manual_seed(derive_seed(self.seed, round_num, self.client_id, _AUGMENT_STREAM))
        loader = batches(self.dataset, self.batch_size, self.device, shuffle=True, generator=gen,
                         num_workers=self.num_workers)
        # The loss sum stays on the device (float64) and is checked once per epoch: a per-step
        # .item() or isfinite() would make the CPU wait for the GPU after every batch.
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        bad_inputs = torch.zeros((), dtype=torch.bool, device=self.device)
        check_inputs = is_feature_data(self.dataset)
        first_loss = None   # of the received weights, before any local step: tells whose fault a divergence is
        seen = steps = 0
        if self.dp_sgd is not None:
            total, seen, steps = self._train_dp(model, forward, opt, shared, anchor, payload, aug_gen, round_num)
        else:
            for epoch in range(self.local_epochs):
                for x, y in loader:
                    x = to_input(x, self.device, self.amp_dtype)
                    if self.augment is not None:
                        x = self.augment(x, aug_gen)
                    y = y.to(self.device, non_blocking=True)
                    if check_inputs:   # cached features are read back from disk: they can be damaged
                        bad_inputs |= ~torch.isfinite(x).all()
                    with autocast(self.device, self.amp_dtype):
                        loss = loss_fn(forward(x).float(), y)   # the data loss, what train_loss reports
                    if first_loss is None:
                        first_loss = loss.detach()
                    penalty = self.objective.penalty(shared, anchor, payload)   # fp32, outside autocast
                    objective = loss if penalty is None else loss + penalty
                    opt.zero_grad(set_to_none=True)
                    scaler.scale(objective).backward()
                    scaler.step(opt)
                    scaler.update()
                    total += loss.detach().double() * len(y)   # mean loss of the batch, weighted by its size
                    seen += len(y)
                    steps += 1
                self._check_epoch(total, bad_inputs, first_loss, round_num, epoch)
        state = get_state(model, self.keys)
        bad = non_finite_entries(state)
        if bad:
            raise DivergenceError(f"client {self.client_id}, round {round_num}: its weights became NaN or "
                                  f"infinite in {len(bad)} entries (first {bad[0]!r}) with a finite loss; "
                                  f"{self._advice()}")
        train_loss = total.item() / max(seen, 1)
        if train_loss > DIVERGED_LOSS:
            self._check_received(first_loss, round_num)
            raise DivergenceError(f"client {self.client_id}, round {round_num}: training loss {train_loss:.3g} "
                                  f"(an untrained head gives 0.69): its weights ran away; {self._advice()}")
        if self.local_state:
            self.local_state = get_state(model, self.local_state)
        with torch.no_grad():
            sent_back = self.objective.reply(shared, anchor, payload, steps, lr)
        self.rounds_trained += 1
        if self.clip_update is not None:   # client-level DP: nothing unclipped leaves the client
            state = clipped_state(state, global_state, self.clip_update)[0]
        private = self.dp_sgd is not None or self.clip_update is not None
        return ClientUpdate(state=state, num_examples=len(self.dataset),
                            train_loss=math.nan if private else train_loss,   # under DP it is not sent
                            client_id=self.client_id,
                            extra={k: v.detach().to("cpu", copy=True) for k, v in sent_back.items()},
                            epsilon=self.dp_sgd.epsilon_after(self.rounds_trained) if self.dp_sgd else None)

    def _check_epoch(self, total: torch.Tensor, bad_inputs: torch.Tensor, first_loss, round_num: int,
                     epoch: int) -> None:
        if bool(bad_inputs):
            where = getattr(getattr(self.dataset, "cache", None), "path", None) or "the dataset"
            raise DataError(f"client {self.client_id}, round {round_num}: its input batches hold NaN or "
                             f"infinite values, read from {where}: the cached features are damaged, not "
                             f"the training. Delete that file to rebuild it")
        if not torch.isfinite(total):
            self._check_received(first_loss, round_num)
            raise NonFiniteLossError(
                f"client {self.client_id}, round {round_num}: training loss became {total.item()} in "
                f"local epoch {epoch + 1}; {self._advice()}")

    def _fetch(self, idx: np.ndarray, aug_gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The images (or cached features) and labels of the examples idx, on the device."""
        if is_feature_data(self.dataset):
            x, y = self.dataset.batch(torch.as_tensor(idx, dtype=torch.long))
        else:
            x, y = default_collate([self.dataset[int(i)] for i in idx])
        x = to_input(x, self.device, None)
        if self.augment is not None:
            x = self.augment(x, aug_gen)
        return x, y.to(self.device)

    def _train_dp(self, model, forward, opt, shared, anchor, payload, aug_gen: torch.Generator,
                  round_num: int) -> tuple[torch.Tensor, int, int]:
        """One round of per-patient DP-SGD (fedxray.dpsgd): Poisson-sampled patients each step, their
        clipped gradients summed and noised, then the optimizer's step (plus the objective's penalty,
        which depends on no patient). Returns the summed data loss, images seen and steps."""
        spec = self.dp_sgd
        dp = PatientDPSGD(spec, self.dp_codes, self.batch_size)
        sampler = torch.Generator().manual_seed(derive_seed(self.seed, round_num, self.client_id))
        noise = torch.Generator().manual_seed(derive_seed(self.seed, round_num, self.client_id, _DP_NOISE_STREAM))
        trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
        losses = per_example_bce(None if self.pos_weight is None else self.pos_weight.to(self.device))
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        bad_inputs = torch.zeros((), dtype=torch.bool, device=self.device)
        check_inputs = is_feature_data(self.dataset)
        first_loss, seen, steps = None, 0, 0
        per_epoch = spec.steps_per_round // self.local_epochs
        gsm = dp.attach(model)
        try:
            for epoch in range(self.local_epochs):
                for idx in poisson_patient_batches(self.dp_codes, spec.sample_rate, per_epoch, sampler):
                    def fetch(part):
                        nonlocal bad_inputs
                        x, y = self._fetch(part, aug_gen)
                        if check_inputs:
                            bad_inputs |= ~torch.isfinite(x).all()
                        return x, y

                    def example_losses(x, y):
                        return losses(forward(x).float(), y)

                    opt.zero_grad(set_to_none=True)
                    loss_sum, n = dp.grads(trained, idx, fetch, example_losses, noise, self.device)
                    if first_loss is None and n:
                        first_loss = loss_sum / n
                    penalty = self.objective.penalty(shared, anchor, payload)
                    if penalty is not None:
                        penalty.backward()   # adds to the noised .grad: it depends on no patient
                    opt.step()
                    total += loss_sum
                    seen += n
                    steps += 1
                self._check_epoch(total, bad_inputs, first_loss, round_num, epoch)
        finally:
            dp.detach(gsm)
        return total, seen, steps

    def lr_at(self, round_num: int) -> float:
        """The learning rate of round round_num (the schedule's, see scheduled_lr)."""
        if self.lr_schedule == "constant":
            return self.lr
        return scheduled_lr(self.lr, self.lr_schedule, round_num, self.num_rounds)

    def _check_received(self, first_loss: Optional[torch.Tensor], round_num: int) -> None:
        """Blame the global model, not this client's training, when it was already diverged on arrival."""
        # A finite but huge loss before any step is the received weights' doing; a NaN there can
        # also be fp16 overflow in this client's forward pass, so that keeps the usual advice.
        if first_loss is not None and DIVERGED_LOSS < float(first_loss) < float("inf"):
            raise DivergenceError(
                f"client {self.client_id}, round {round_num}: the global model it received already has a loss "
                f"of {float(first_loss):.3g} on its first batch, before any local step: the server's model is "
                f"corrupt or poisoned (an update within the server's bounds?), not this client's training. "
                f"Restart the server from a checkpoint before the bad round")

    def _advice(self) -> str:
        tips = f"lower lr (now {self.lr}; 1e-4 is usual for a pretrained layer4 with Adam)"
        if self.optimizer == "sgd":
            tips += ", or use Adam"
        if self.amp_dtype == torch.float16:
            tips += ", or turn off mixed precision (amp='off')"
        return tips + ", and start over (resume=False or another output_dir)"
