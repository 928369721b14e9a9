"""Training-time augmentation of chest X-rays: one batched affine warp plus brightness/contrast, on the device.

The random numbers come from a CPU torch.Generator (B x 6 per batch) and the pixel work is one
`affine_grid` + `grid_sample` call and a few elementwise operations on whatever device the batch
is on, so an augmented batch is the same function of the seed on the CPU and on a GPU (up to the
devices' float rounding) and the GPU never waits for a CPU-side per-image transform.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from .data import IMAGENET_MEAN, IMAGENET_STD

# The columns of a parameter tensor [B, 6], one row per image (see Augmentation.draw / apply).
PARAMS = ("angle_deg", "scale", "translate_x", "translate_y", "brightness", "contrast")

# field -> (lowest, highest, whether highest itself is allowed): a scale or brightness magnitude of 1
# would allow a factor of 0.
_LIMITS = {"rotation_deg": (0.0, 180.0, True), "scale": (0.0, 1.0, False), "translate": (0.0, 1.0, True),
           "brightness": (0.0, 1.0, False), "contrast": (0.0, 1.0, True)}


@dataclass(frozen=True)
class Augmentation:
    """Random small affine changes and brightness/contrast jitter of a batch of model-ready X-rays.

    Each magnitude m gives a per-image value drawn uniformly in [-m, m] (angles, translations) or
    a factor in [1 - m, 1 + m] (scale, brightness, contrast). The defaults are the mild changes
    seen between real chest films: patient positioning (a few degrees of tilt, the chest a little
    larger or smaller and off-centre in the field) and exposure.

    There is deliberately no horizontal flip: a chest X-ray is not mirror-symmetric. The heart
    lies to the patient's left (the image's right on a PA film), as do the aortic knob and the
    stomach bubble; a flipped film shows dextrocardia, a real and rare anomaly, and would teach
    the model that Cardiomegaly can sit on either side. Vertical flips and large rotations are
    left out for the same reason (no film is taken upside down).

    Calling it, `aug(x, generator)`: x is a float batch [B, 3, H, W] as fedxray feeds the model (a
    gray image replicated to 3 channels, ImageNet-normalised per channel, on any device, any
    memory format); generator is a CPU torch.Generator. Returns a new batch of the same shape,
    dtype, device and memory format; with all magnitudes 0 it returns x itself.
    """

    rotation_deg: float = 7.0   # degrees, either way (positive = counter-clockwise on screen)
    scale: float = 0.1          # zoom factor in [0.9, 1.1], about the image centre
    translate: float = 0.06     # shift, as a fraction of the width (x) and of the height (y)
    brightness: float = 0.1     # gray multiplied by a factor in [0.9, 1.1]
    contrast: float = 0.1       # gray spread about the image's mean by a factor in [0.9, 1.1]

    def __post_init__(self):
        for f in fields(self):
            low, high, high_ok = _LIMITS[f.name]
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or not (low <= v and (v <= high if high_ok else v < high)):
                bound = f"<= {high:g}" if high_ok else f"< {high:g}"
                raise ValueError(f"Augmentation.{f.name} must be a number >= {low:g} and {bound} "
                                 f"(default {f.default}; 0 turns it off), got {v!r}")

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.apply(x, self.draw(x.shape[0], generator))

    def draw(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """Per-image parameters [batch_size, 6] (columns: PARAMS), float64 on the CPU.

        Always draws 6 uniforms per image, whatever the magnitudes, so that turning one change off
        leaves the others' draws as they were."""
        u = torch.rand((batch_size, len(PARAMS)), generator=generator, dtype=torch.float64) * 2 - 1   # [-1, 1)
        m = torch.tensor([self.rotation_deg, self.scale, self.translate, self.translate, self.brightness,
                          self.contrast], dtype=torch.float64)
        offset = torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
        return offset + m * u   # a zero magnitude gives exactly 0 (or 1) for every image

    @staticmethod
    def apply(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """x changed by given per-image parameters [B, 6] (columns: PARAMS). Each image is rotated by
        angle_deg (counter-clockwise as displayed) and scaled by scale about its centre, then
        shifted by translate_x * W pixels right and translate_y * H pixels down (torchvision's
        affine(-angle_deg, [translate_x * W, translate_y * H], scale), whose angle is clockwise, and
        rotate(angle_deg)'s direction); the gray outside the
        source image is 0 (black). Then gray g becomes clamp(brightness * (mu + contrast * (g - mu)),
        0, 1), mu the mean gray of that image (after the warp). A stage whose parameters are the
        identity for every image is skipped, so identity parameters return x itself."""
        if x.dim() != 4 or x.shape[1] != len(IMAGENET_MEAN):
            raise ValueError(f"augmentation expects a batch [B, 3, H, W] of normalised images, got shape "
                             f"{tuple(x.shape)}")
        if params.shape != (x.shape[0], len(PARAMS)):
            raise ValueError(f"params must be [B, {len(PARAMS)}] ({', '.join(PARAMS)}) for a batch of "
                             f"{x.shape[0]}, got shape {tuple(params.shape)}")
        p = params.detach().to("cpu", torch.float64)
        geometric = bool((p[:, :4] != torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64)).any())
        photometric = bool((p[:, 4:] != 1).any())
        if not (geometric or photometric):
            return x
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        # grid_sample and the mean want float32 at least; fp16/bf16 batches are computed in float32.
        work = torch.promote_types(x.dtype, torch.float32)
        h, w = x.shape[-2:]
        # theta and the photometric factors are computed on the CPU in float64 (the same on every
        # device) and reach the device with the normalisation constants in one copy, from pinned
        # memory and asynchronous: a plain copy to a GPU makes the CPU wait for every queued kernel
        # first, once per batch.
        b = x.shape[0]
        host = torch.cat([_theta(p, h, w).flatten(), p[:, 4:].flatten(),
                          torch.tensor(IMAGENET_MEAN + IMAGENET_STD, dtype=torch.float64)]).to(work)
        if x.device.type == "cuda":
            dev = host.pin_memory().to(x.device, non_blocking=True)
        else:
            dev = host.to(x.device)
        theta, factors = dev[:6 * b].view(b, 2, 3), dev[6 * b:8 * b].view(b, 2)
        mean, std = dev[8 * b:8 * b + 3].view(1, 3, 1, 1), dev[8 * b + 3:].view(1, 3, 1, 1)
        out = x.to(work)
        if geometric:
            # grid_sample pads with 0; 0 in normalised space is mid-gray (ImageNet's mean), a bright
            # frame no film has. Sampling x - black and adding black back pads with gray 0 instead
            # (bilinear sampling is linear), i.e. with the value of black in each channel.
            black = -mean / std
            grid = F.affine_grid(theta, [b, 3, h, w], align_corners=False)
            out = F.grid_sample(out - black, grid, mode="bilinear", padding_mode="zeros",
                                align_corners=False) + black
        if photometric:
            gray = out * std + mean                                        # undo the normalisation
            mu = gray.mean(dim=(-2, -1), keepdim=True)
            k, c = factors[:, 0].view(-1, 1, 1, 1), factors[:, 1].view(-1, 1, 1, 1)
            gray = (k * (mu + c * (gray - mu))).clamp_(0.0, 1.0)
            out = (gray - mean) / std                                       # redo it
        out = out.to(x.dtype)
        return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def _theta(params: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """affine_grid's matrices [B, 2, 3]: for each output pixel, where to read in the input, in
    grid_sample's normalised coordinates (-1..1 across each side, so pixel units differ for x and y)."""
    angle = torch.deg2rad(params[:, 0])
    cos, sin, s = torch.cos(angle), torch.sin(angle), params[:, 1]
    # The forward map in pixels (x right, y down) is p -> s * R p + t, with R = [[cos, sin], [-sin, cos]]
    # (counter-clockwise as displayed); grid_sample needs its inverse p = R^T (q - t) / s.
    inv = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2) / s.view(-1, 1, 1)
    t = torch.stack([params[:, 2] * w, params[:, 3] * h], -1)                        # pixels
    to_norm = torch.tensor([2.0 / w, 2.0 / h], dtype=params.dtype)
    # In normalised units q_n = D q with D = diag(2/w, 2/h): p_n = D inv D^-1 q_n - D inv t.
    lin = to_norm.view(1, 2, 1) * inv / to_norm.view(1, 1, 2)
    shift = -to_norm * (inv @ t.unsqueeze(-1)).squeeze(-1)
    return torch.cat([lin, shift.unsqueeze(-1)], dim=-1)
