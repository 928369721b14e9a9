"""ResNet-34 with a 14-logit multi-label head, a frozen trunk (conv1..layer3) and a trainable
layer4 + fc: the only part that is trained and exchanged."""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Mapping

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet
from torchvision.ops.misc import FrozenBatchNorm2d

from .io import atomic_write

log = logging.getLogger(__name__)

# The one value that says what travels between clients and server.
EXCHANGED_PREFIXES: tuple[str, ...] = ("layer4.", "fc.")
TRUNK: tuple[str, ...] = ("conv1", "bn1", "layer1", "layer2", "layer3")
WEIGHTS_ENV = "FEDXRAY_WEIGHTS"
# Which of the exchanged entries stay on each client (Config.local_keys): comma-separated groups, ""
# = none (FedAvg). "bn": layer4's BatchNorm, statistics and affine parameters (FedBN, Li et al. 2021);
# "fc": the classification head (FedPer, Arivazhagan et al. 2019: only layer4 travels).
LOCAL_KEY_GROUPS = ("bn", "fc")


class ChestXrayResNet(ResNet):
    """torchvision's ResNet-34 (same state-dict keys) whose trunk is frozen and runs without autograd.

    The trunk's BatchNorms are FrozenBatchNorm2d: their statistics cannot move, whatever
    train()/eval() mode the model is in (requires_grad=False alone does not stop them).
    """

    weights_source: str = "random"

    def __init__(self, num_classes: int = 14):
        super().__init__(BasicBlock, [3, 4, 6, 3], num_classes=num_classes)
        for name in TRUNK:
            setattr(self, name, _freeze(getattr(self, name)))

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """conv1..layer3: the layer3 feature map, computed without autograd."""
        with torch.no_grad():
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            return self.layer3(self.layer2(self.layer1(x)))

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """layer4 + pooling + fc: logits from layer3 features."""
        x = self.avgpool(self.layer4(features))
        return self.fc(torch.flatten(x, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


def _freeze(module: nn.Module) -> nn.Module:
    """Swap every BatchNorm2d for a FrozenBatchNorm2d copy and stop gradients."""
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        with torch.no_grad():
            frozen.weight.copy_(module.weight)
            frozen.bias.copy_(module.bias)
            frozen.running_mean.copy_(module.running_mean)
            frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        setattr(module, name, _freeze(child))
    for p in module.parameters(recurse=False):
        p.requires_grad_(False)
    return module


# Groups of the GroupNorm that replaces layer4's BatchNorm under differential privacy (Wu & He 2018's default).
PRIVATE_NORM_GROUPS = 32


def private_norm(model: nn.Module) -> nn.Module:
    """layer4's BatchNorms replaced, in place, by GroupNorm (PRIVATE_NORM_GROUPS groups, followed by
    a copy: _Copy) starting from the BatchNorm's affine weight and bias: what differential privacy needs, as Opacus's
    ModuleValidator recommends. A BatchNorm in training mode mixes the images of a batch, which
    per-example clipping cannot bound, and its running statistics are averages of private images
    that no clipping or noise covers. GroupNorm normalises each image on its own and keeps no
    statistics; its weight and bias are ordinary parameters, clipped and noised with the rest.
    (Frozen BatchNorm was measured worse on the demo: README, Privacy.)"""
    for prefix in EXCHANGED_PREFIXES:
        module = getattr(model, prefix.rstrip("."))
        for name, child in list(module.named_modules()):
            if isinstance(child, nn.BatchNorm2d):
                parent = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
                norm = nn.GroupNorm(PRIVATE_NORM_GROUPS, child.num_features, eps=child.eps)
                with torch.no_grad():
                    norm.weight.copy_(child.weight)
                    norm.bias.copy_(child.bias)
                setattr(parent, name.rsplit(".", 1)[-1], nn.Sequential(norm, _Copy()).to(child.weight.device))
    return model


class _Copy(nn.Module):
    """A copy of its input. After each private GroupNorm: ResNet's blocks change a norm's output in
    place (ReLU(inplace=True), out += identity), which autograd forbids on the output of the
    per-sample-gradient hooks Opacus puts on the norm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


def local_groups(local_keys: str) -> tuple[str, ...]:
    """The groups named by a Config.local_keys value ("" -> (), "bn,fc" -> ("bn", "fc")); ValueError
    for an unknown, repeated or unordered group (one spelling per setting, so one run folder)."""
    if not isinstance(local_keys, str):
        raise ValueError(f"local_keys must be a string of groups from {LOCAL_KEY_GROUPS}, e.g. 'bn' or 'bn,fc', "
                         f"got {local_keys!r}")
    groups = tuple(g for g in local_keys.split(",")) if local_keys else ()
    unknown = [g for g in groups if g not in LOCAL_KEY_GROUPS]
    if unknown:
        raise ValueError(f"local_keys {local_keys!r}: unknown group {unknown[0]!r}; the groups are "
                         f"{LOCAL_KEY_GROUPS} ('bn' = FedBN, 'fc' = FedPer), comma-separated, '' = none")
    canonical = ",".join(g for g in LOCAL_KEY_GROUPS if g in groups)
    if local_keys != canonical:
        raise ValueError(f"local_keys {local_keys!r}: write it {canonical!r} (each group once, in the order "
                         f"{LOCAL_KEY_GROUPS}, no spaces)")
    return groups


def local_keys_of(model: nn.Module, local_keys: str = "") -> list[str]:
    """State keys that stay on each client under local_keys (see LOCAL_KEY_GROUPS)."""
    groups = local_groups(local_keys)
    keys = bn_keys(model) if "bn" in groups else []
    if "fc" in groups:
        keys += [k for k in model.state_dict() if k.startswith("fc.")]
    return keys


def exchanged_keys(model: nn.Module, local_keys: str = "") -> list[str]:
    """Names of the parameters and buffers that travel: everything under EXCHANGED_PREFIXES, less
    the entries local_keys keeps on each client."""
    local = set(local_keys_of(model, local_keys))
    return [k for k in model.state_dict() if k.startswith(EXCHANGED_PREFIXES) and k not in local]


def bn_keys(model: nn.Module) -> list[str]:
    """State keys of the trainable BatchNorm layers (selected by type, not by name)."""
    keys = []
    for mname, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and mname.startswith(EXCHANGED_PREFIXES):
            keys += [f"{mname}.{k}" for k in m.state_dict()]
    return keys


def buffer_keys(model: nn.Module) -> list[str]:
    """State keys that are buffers, not parameters (BatchNorm running statistics and batch counts):
    no gradient moves them, so a server optimizer must not treat their change as one."""
    return [name for name, _ in model.named_buffers()]


def get_state(model: nn.Module, keys) -> dict[str, torch.Tensor]:
    """Detached CPU copies of the named entries (a state_dict is a live reference)."""
    sd = model.state_dict()
    return {k: sd[k].detach().to("cpu", copy=True) for k in keys}


def state_problems(state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> list[str]:
    """What makes state unfit to load where reference lives: missing or unexpected keys, another
    shape or dtype, non-finite values. Empty when it fits."""
    missing = [k for k in reference if k not in state]
    extra = [k for k in state if k not in reference]
    problems = []
    if missing:
        problems.append(f"{len(missing)} key(s) missing (first {missing[0]!r})")
    if extra:
        problems.append(f"{len(extra)} unexpected key(s) (first {extra[0]!r})")
    for k, ref in reference.items():
        t = state.get(k)
        if t is None:
            continue
        if t.dtype != ref.dtype:
            problems.append(f"{k!r} has dtype {t.dtype}, expected {ref.dtype}")
        elif tuple(t.shape) != tuple(ref.shape):
            problems.append(f"{k!r} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
        elif t.is_floating_point() and not bool(torch.isfinite(t).all()):
            problems.append(f"{k!r} holds {int((~torch.isfinite(t)).sum())} NaN or infinite value(s)")
    return problems


def trunk_digest(model: nn.Module) -> str:
    """SHA-256 of every state entry that is not exchanged (the frozen trunk). The trunk never
    travels, so whatever depends on it (cached features, a remote hospital's model) checks this."""
    h = hashlib.sha256()
    for key, t in sorted(model.state_dict().items()):
        if not key.startswith(EXCHANGED_PREFIXES):
            h.update(key.encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def build_model(num_classes: int = 14, weights: str | os.PathLike | None = "auto") -> ChestXrayResNet:
    """ResNet-34 with num_classes logits; trunk frozen, layer4 + fc trainable.

    weights: "imagenet" (torchvision IMAGENET1K_V1 from the torch cache, else downloaded),
    a path to a local .pth, None (random), or "auto": imagenet, else the file named by the
    FEDXRAY_WEIGHTS environment variable, else random init with a loud warning.
    model.weights_source records what was actually used.
    """
    torch_model = ChestXrayResNet(num_classes)
    if weights is None or weights == "random":
        state, source = None, "random"
    elif weights == "imagenet":
        state, source = _imagenet_state(), "imagenet"
    elif weights == "auto":
        state, source = _auto_state()
    else:
        state, source = _file_state(Path(weights)), f"file:{weights}"
    if state is not None:
        _load_backbone(torch_model, state, source)
    torch_model.weights_source = source
    return torch_model


def _auto_state():
    try:
        return _imagenet_state(), "imagenet"
    except RuntimeError as e:
        reason = str(e)
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        return _file_state(Path(env)), f"file:{env}"
    log.warning("=" * 70 + "\nNO PRETRAINED WEIGHTS: %s\n%s is not set either. The model starts "
                "from RANDOM weights; its frozen trunk is then random features and results will be "
                "far below published ones. Attach resnet34 ImageNet weights and set %s=/path/to.pth "
                "or weights='/path/to.pth'.\n" + "=" * 70, reason, WEIGHTS_ENV, WEIGHTS_ENV)
    return None, "random (ImageNet weights unavailable)"


def _imagenet_state() -> dict[str, torch.Tensor]:
    """torchvision's ResNet-34 IMAGENET1K_V1 weights, from the torch hub cache, else downloaded into
    it. fedxray announces the download in its own log: torch.hub would print it on stdout, which a
    notebook shows after the warning (stderr) that the download failed."""
    from torchvision.models import ResNet34_Weights
    url = ResNet34_Weights.IMAGENET1K_V1.url
    name = Path(url).name
    cached = Path(torch.hub.get_dir()) / "checkpoints" / name
    if cached.is_file():
        try:
            return torch.load(cached, map_location="cpu", weights_only=True)
        except Exception as e:
            raise RuntimeError(f"the ImageNet weights for ResNet-34 in the torch cache, {cached}, cannot be "
                               f"read ({type(e).__name__}: {e}): delete the file to download it again, or "
                               f"pass weights='/path/to/{name}' or set {WEIGHTS_ENV}") from e
    log.info("trying to download the ImageNet weights for ResNet-34 from %s to %s", url, cached)
    state: dict[str, torch.Tensor] = {}

    def fetch(tmp: str) -> None:
        # Into a temporary file renamed only once it has loaded: a failed or garbled download
        # (an HTML page from a proxy) leaves nothing in the cache for the next run to trip on.
        torch.hub.download_url_to_file(url, tmp, progress=False)   # prints nothing, unlike torch.hub.load*
        state.update(torch.load(tmp, map_location="cpu", weights_only=True))

    try:
        atomic_write(cached, fetch)
    except Exception as e:  # URLError, socket errors, HTTP errors: all mean "not available here"
        raise RuntimeError(
            f"ImageNet weights for ResNet-34 could not be loaded ({type(e).__name__}: {e}). They are "
            f"not in the torch cache ({cached}) and could not be downloaded (internet off?). On Kaggle, "
            f"attach a dataset holding {name} and pass weights='/kaggle/input/.../"
            f"{name}' or set {WEIGHTS_ENV}.") from e
    return state


def _file_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist (from weights= or {WEIGHTS_ENV})")
    from .checkpoint import check_safe_torch   # checkpoint imports config and data, not model
    check_safe_torch(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RuntimeError(f"cannot read weights file {path}: {e}") from e
    if isinstance(obj, dict) and "checksum" in obj:   # written by fedxray: verify before use
        from .checkpoint import seal_problem
        problem = seal_problem(obj)
        if problem:
            raise RuntimeError(f"weights file {path} {problem}; use an intact copy")
        from .saved_model import KIND, load_model   # a run's final_model.pt: rebuilt with its trunk
        if obj.get("kind") == KIND:
            try:
                return load_model(path).state_dict()
            except ValueError as e:   # CheckpointError: names the file and the remedy
                raise RuntimeError(str(e)) from None
    for key in ("model", "state_dict", "global_state"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise RuntimeError(f"{path} holds no state dict of tensors (expected a ResNet-34 state_dict)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _load_backbone(model: ChestXrayResNet, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a ResNet-34 state dict; its fc is used only if it has our number of classes."""
    own = model.state_dict()
    fc_ok = all(k in state and state[k].shape == own[k].shape for k in ("fc.weight", "fc.bias"))
    if not fc_ok:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        log.info("%s: fc has another shape; the %d-logit head starts from random init",
                 source, model.fc.out_features)
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked") or k in own}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise RuntimeError(f"{source} is not a ResNet-34 state dict: {e}") from e
    missing = [k for k in result.missing_keys if not k.startswith("fc.") or fc_ok]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"{source} is not a ResNet-34 state dict: missing {missing[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}")
