"""Where the model looks: Grad-CAM (Selvaraju et al. 2017) of layer4 for a finding, scored against
boxes drawn around the findings (NIH's BBox_List_2017.csv, or the synthetic demo's own) by the
pointing game and the IoU of the thresholded heatmap, next to a baseline that looks at the centre.

Grad-CAM comes from captum's LayerGradCam, an optional dependency (``pip install 'captum>=0.7'``,
or the ``explain`` extra) imported only when a heatmap is computed. layer4 sees the image at 1/32 of
its size (7 x 7 at 224 pixels, 2 x 2 at the demo's 64): a heatmap is that coarse, upsampled. Its six
3 x 3 convolutions over so small a grid let every cell see the whole image, so what keeps a heatmap
local is filters that look locally (ImageNet's), not the architecture: on the demo, with layer4
trained from random weights, Grad-CAM's maximum lands in the boxes no more often than the image
centre does (measured: 12% against 16% of boxed findings at 64 pixels, 16% against 17% at 128).
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from .data import LABELS, load_gray
from .device import eval_mode

THRESHOLD = 0.5   # heatmap_iou's region: pixels at >= this fraction of the image's maximum
BOX_COLUMNS = ("x", "y", "w", "h")
_TIES = 1e-6      # values within this fraction of the maximum count as the maximum


def _captum():
    try:
        from captum.attr import LayerAttribution, LayerGradCam
    except ImportError as e:
        raise ImportError("Grad-CAM needs captum, which is not installed: pip install 'captum>=0.7' "
                          "(or pip install -e '.[explain]')") from e
    return LayerGradCam, LayerAttribution


# --------------------------------------------------------------------------- heatmaps

def model_input(images) -> "torch.Tensor":
    """What the model sees: uint8 grayscale [n, H, W] (fedxray.load_gray's images, stacked) is
    ImageNet-normalised into float [n, 3, H, W] as NIHDataset does; a float [n, 3, H, W] passes."""
    import torch
    from .data import normalize_gray
    x = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
    if x.dtype == torch.uint8 and x.ndim == 3:
        return normalize_gray(x)
    if x.is_floating_point() and x.ndim == 4 and x.shape[1] == 3:
        return x.float()
    raise ValueError(f"images must be uint8 grayscale [n, H, W] or float [n, 3, H, W] (the model's input), "
                     f"got {x.dtype} {tuple(x.shape)}")


def _finding_indices(finding: str | Sequence[str], n: int) -> list[int]:
    names = [finding] * n if isinstance(finding, str) else list(finding)
    if len(names) != n:
        raise ValueError(f"{len(names)} findings for {n} images: give one finding, or one per image")
    for name in names:
        if name not in LABELS:
            raise ValueError(f"finding {name!r} is not one of the 14 NIH findings {list(LABELS)}: spell it as "
                             f"fedxray.LABELS does (NIH's box file writes 'Infiltrate'; fedxray.read_boxes "
                             f"maps it to 'Infiltration')")
    return [LABELS.index(name) for name in names]


def gradcam(model, images, finding: str | Sequence[str], batch_size: int = 32, relu: bool = True) -> np.ndarray:
    """Grad-CAM heatmaps of layer4 for a finding: float32 [n, H, W] in [0, 1], one per image.

    images: uint8 grayscale [n, H, W] at the model's image size, or the model's float input
    [n, 3, H, W] (see :func:`model_input`). finding: a name in LABELS, or one per image. Each map
    is captum's LayerGradCam on model.layer4 for that finding's logit (layer4's channels weighed
    by their mean gradient), upsampled bilinearly to H x W (LayerAttribution.interpolate), then
    relu=True (Selvaraju et al.): ReLU'd (only what speaks for the finding) and divided by its
    maximum, a map with nothing positive staying all zero; relu=False: the signed map scaled to
    [0, 1] by its minimum and maximum (where the evidence for the finding is highest, also in an
    image where all of it is against; its maximum is the ReLU'd map's wherever that has one).
    The model runs in eval mode (BatchNorm uses its running statistics) and is given back in the
    mode it came in; no weight, buffer, gradient or requires_grad flag changes: captum takes the
    gradient with respect to layer4's output, so a frozen layer4 works too.
    """
    import torch
    LayerGradCam, LayerAttribution = _captum()
    x = model_input(images)
    if len(x) == 0:
        raise ValueError("no images to explain: give at least one")
    targets = _finding_indices(finding, len(x))
    device = next(model.parameters()).device
    cam = LayerGradCam(model, model.layer4)
    maps = []
    with eval_mode(model):
        for start in range(0, len(x), batch_size):
            batch = x[start:start + batch_size].to(device)
            a = cam.attribute(batch, target=targets[start:start + batch_size])
            a = LayerAttribution.interpolate(a, tuple(batch.shape[-2:]), interpolate_mode="bilinear")
            maps.append(a[:, 0].detach().float().cpu())
    out = torch.cat(maps).numpy()
    out = np.maximum(out, 0) if relu else out - out.min(axis=(1, 2), keepdims=True)
    span = out.max(axis=(1, 2), keepdims=True)
    return np.divide(out, span, out=np.zeros_like(out), where=span > 0).astype(np.float32)


# --------------------------------------------------------------------------- scoring

def _box_arrays(boxes: Sequence, n: int) -> list[np.ndarray]:
    if len(boxes) != n:
        raise ValueError(f"{len(boxes)} box lists for {n} heatmaps: give one list of boxes per heatmap")
    out = []
    for i, b in enumerate(boxes):
        arr = np.asarray(b, dtype=np.float64).reshape(-1, 4) if np.size(b) else np.zeros((0, 4))
        if len(arr) == 0:
            raise ValueError(f"heatmap {i} has no box: score only images with a box of their finding")
        if not np.isfinite(arr).all() or (arr[:, 2:] <= 0).any():
            raise ValueError(f"heatmap {i}: boxes must be finite (x, y, w, h) with w, h > 0, got {arr.tolist()}")
        out.append(arr)
    return out


def _heatmaps(heatmaps) -> np.ndarray:
    h = np.asarray(heatmaps, dtype=np.float64)
    if h.ndim != 3 or h.shape[0] == 0 or min(h.shape[1:]) == 0:
        raise ValueError(f"heatmaps must be [n, H, W] with n >= 1, got shape {h.shape}")
    if not np.isfinite(h).all():
        raise ValueError("heatmaps hold NaN or infinite values")
    return h


def _inside(px: float, py: float, boxes: np.ndarray) -> bool:
    x, y, w, h = boxes.T
    return bool(((x <= px) & (px <= x + w) & (y <= py) & (py <= y + h)).any())


def _box_mask(boxes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The pixels whose centre lies in one of the boxes (each box covers at least the pixel
    holding its own centre, however small it is)."""
    rows, cols = shape
    cy, cx = np.arange(rows)[:, None] + 0.5, np.arange(cols)[None, :] + 0.5
    mask = np.zeros(shape, bool)
    for x, y, w, h in boxes:
        mask |= (x <= cx) & (cx <= x + w) & (y <= cy) & (cy <= y + h)
        mask[min(max(int(y + h / 2), 0), rows - 1), min(max(int(x + w / 2), 0), cols - 1)] = True
    return mask


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 0.0


def peaks(heatmaps) -> np.ndarray:
    """Where each heatmap points: (x, y) of its maximum's pixel centre, float [n, 2]; NaN for a map
    with nothing positive. Where several pixels share the maximum (bilinear upsampling leaves a
    flat top in each border cell of layer4's grid), the one nearest the image centre, which is the
    winning cell's centre."""
    h = _heatmaps(heatmaps)
    n, rows, cols = h.shape
    dist = (np.arange(rows)[:, None] + 0.5 - rows / 2) ** 2 + (np.arange(cols)[None, :] + 0.5 - cols / 2) ** 2
    out = np.full((n, 2), np.nan)
    for i, m in enumerate(h):
        top = m.max()
        if top > 0:
            r, c = np.unravel_index(np.argmin(np.where(m >= top * (1 - _TIES), dist, np.inf)), m.shape)
            out[i] = c + 0.5, r + 0.5
    return out


def pointing_game(heatmaps, boxes: Sequence) -> np.ndarray:
    """The pointing game (Zhang et al. 2016): bool [n], whether each heatmap's maximum (see
    :func:`peaks`) lies in one of its boxes. boxes: per heatmap, [k, 4] (x, y, w, h) in the
    heatmap's pixels (x, y the top-left corner; :func:`scale_boxes`), edges included. A map with
    nothing positive points nowhere: a miss."""
    h = _heatmaps(heatmaps)
    where = peaks(h)
    return np.array([bool(np.isfinite(p).all()) and _inside(p[0], p[1], b)
                     for p, b in zip(where, _box_arrays(boxes, len(h)))])


def heatmap_iou(heatmaps, boxes: Sequence, threshold: float = THRESHOLD) -> np.ndarray:
    """IoU, float [n], of each heatmap's region (its pixels at >= threshold x its maximum; none for
    a map with nothing positive) with its boxes (the pixels whose centre is in one of them).

    The CAM literature thresholds a heatmap at a fraction of its maximum (Zhou et al. 2016 use
    0.2 and box the largest connected part; the ChestX-ray8 paper scores such boxes by IoU); here
    the region itself is compared pixel by pixel, at 0.5 by default, which leaves a quarter of
    the image to a 2 x 2 map's single peak cell.
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1] (a fraction of each heatmap's maximum), got {threshold!r}")
    h = _heatmaps(heatmaps)
    out = np.zeros(len(h))
    for i, (m, b) in enumerate(zip(h, _box_arrays(boxes, len(h)))):
        top = m.max()
        region = m >= threshold * top if top > 0 else np.zeros(m.shape, bool)
        out[i] = _iou(region, _box_mask(b, m.shape))
    return out


def centre_pointing(boxes: Sequence, shape: tuple[int, int]) -> np.ndarray:
    """The centre baseline's pointing game: bool [n], whether the image centre (W/2, H/2 of an
    H x W heatmap) lies in one of the boxes: a model that always points at the centre."""
    rows, cols = shape
    return np.array([_inside(cols / 2, rows / 2, b) for b in _box_arrays(boxes, len(boxes))])


def centre_iou(boxes: Sequence, shape: tuple[int, int]) -> np.ndarray:
    """The centre baseline's IoU: float [n], IoU of the boxes with the same boxes moved so that each
    is centred on the image. It knows each box's size and guesses only its place, so it is a
    generous baseline for the heatmap's IoU, which knows neither."""
    rows, cols = shape
    out = []
    for b in _box_arrays(boxes, len(boxes)):
        centred = b.copy()
        centred[:, 0], centred[:, 1] = (cols - b[:, 2]) / 2, (rows - b[:, 3]) / 2
        out.append(_iou(_box_mask(centred, shape), _box_mask(b, shape)))
    return np.array(out)


def image_sizes(paths: Sequence[str | os.PathLike]) -> list[tuple[int, int]]:
    """(width, height) of each image file, read from its header (not decoded): the pixel space of
    its boxes (NIH's PNGs are 1024 x 1024; Data_Entry_2017.csv's OriginalImage columns give the
    scanner's size, not the PNG's)."""
    from PIL import Image
    sizes = []
    for p in paths:
        with Image.open(p) as img:
            sizes.append(img.size)
    return sizes


def scale_boxes(boxes: pd.DataFrame, sizes: Mapping[str, tuple[int, int]],
                shape: tuple[int, int]) -> pd.DataFrame:
    """A copy of boxes (fedxray.read_boxes' table) with x, y, w, h moved from the pixels of the
    image each box was drawn on (sizes: image name -> (width, height)) to those of an H x W
    heatmap (shape): x and w times W / width, y and h times H / height."""
    missing = sorted(set(boxes["image"]) - set(sizes))
    if missing:
        raise ValueError(f"no image size for {len(missing)} boxed image(s), first {missing[0]!r}: give the "
                         f"size of every image the boxes are on")
    rows, cols = shape
    wh = np.array([sizes[name] for name in boxes["image"]], dtype=np.float64).reshape(-1, 2)
    out = boxes.copy()
    out["x"], out["w"] = boxes["x"] * cols / wh[:, 0], boxes["w"] * cols / wh[:, 0]
    out["y"], out["h"] = boxes["y"] * rows / wh[:, 1], boxes["h"] * rows / wh[:, 1]
    return out


# --------------------------------------------------------------------------- the table

def _checked(frame: pd.DataFrame, boxes: pd.DataFrame) -> None:
    for col in ("image", "path"):
        if col not in frame:
            raise ValueError(f"frame has no {col!r} column: give a metadata table from fedxray.load_nih")
    for col in ("image", "finding", *BOX_COLUMNS):
        if col not in boxes:
            raise ValueError(f"boxes have no {col!r} column: read them with fedxray.read_boxes")
    stray = sorted(set(boxes["image"]) - set(frame["image"]))
    if stray:
        raise ValueError(f"{len(stray)} boxed image(s) are not in frame, first {stray[0]!r}: keep the boxes of "
                         f"frame's images, boxes[boxes['image'].isin(frame['image'])]")
    _finding_indices(list(boxes["finding"]), len(boxes))


def _scaled(frame: pd.DataFrame, boxes: pd.DataFrame, image_size: int) -> pd.DataFrame:
    """boxes scaled from each image file's own size to image_size x image_size."""
    path = dict(zip(frame["image"], frame["path"]))
    images = sorted(set(boxes["image"]))
    return scale_boxes(boxes, dict(zip(images, image_sizes([path[i] for i in images]))), (image_size, image_size))


def localisation_scores(model, frame: pd.DataFrame, boxes: pd.DataFrame, image_size: int,
                        threshold: float = THRESHOLD, max_images: int | None = None, seed: int = 0,
                        relu: bool = False, batch_size: int = 32) -> pd.DataFrame:
    """Grad-CAM of every boxed (image, finding) pair of frame, scored against its boxes.

    frame: metadata with 'image' and 'path' (e.g. the test split); boxes: fedxray.read_boxes' table,
    only of frame's images. Images are read as the model sees them (load_gray at image_size), boxes
    scaled from each image file's own size (NIH: 1024; the demo: its image size) to image_size.
    max_images: score at most this many boxed images, a seeded draw (Grad-CAM of a 224-pixel
    image takes about 0.3 s on 2 CPU cores). relu: see :func:`gradcam`; False by default, so that
    the score says where the model looks for the finding also in an image where it finds none,
    not whether it finds it (AUROC says that); True counts a map with nothing positive as a miss.
    One row per pair: image, finding, boxes (how many), hit and centre_hit (pointing game), iou
    and centre_iou (threshold: see heatmap_iou), x and y (where the heatmap points, in
    image_size pixels).
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1] (a fraction of each heatmap's maximum), got {threshold!r}")
    if max_images is not None and (isinstance(max_images, bool) or not isinstance(max_images, (int, np.integer))
                                   or max_images < 1):
        raise ValueError(f"max_images must be None (all) or an integer >= 1, got {max_images!r}")
    _checked(frame, boxes)
    if len(boxes) == 0:
        raise ValueError("no boxes to score: select the boxes of frame's images first, and check that there are some")
    images = sorted(set(boxes["image"]))
    if max_images is not None and len(images) > max_images:
        chosen = np.random.default_rng(seed).choice(len(images), size=max_images, replace=False)
        boxes = boxes[boxes["image"].isin([images[i] for i in chosen])]
    pairs = _scaled(frame, boxes, image_size).groupby(["image", "finding"], sort=True)
    keys = list(pairs.groups)
    per_pair = [pairs.get_group(k).loc[:, list(BOX_COLUMNS)].to_numpy() for k in keys]
    path = dict(zip(frame["image"], frame["path"]))
    gray = {name: load_gray(path[name], image_size) for name in set(boxes["image"])}
    maps = gradcam(model, np.stack([gray[name] for name, _ in keys]), [f for _, f in keys], batch_size, relu)
    where, shape = peaks(maps), (image_size, image_size)
    return pd.DataFrame({
        "image": [name for name, _ in keys], "finding": [f for _, f in keys],
        "boxes": [len(b) for b in per_pair],
        "hit": pointing_game(maps, per_pair), "centre_hit": centre_pointing(per_pair, shape),
        "iou": heatmap_iou(maps, per_pair, threshold), "centre_iou": centre_iou(per_pair, shape),
        "x": where[:, 0], "y": where[:, 1]})


def gradcam_panels(model, frame: pd.DataFrame, image_size: int, boxes: pd.DataFrame | None = None,
                   n_images: int = 4, per_image: int = 3, seed: int = 0, relu: bool = False) -> dict:
    """What fedxray.plots.plot_gradcam_grid draws (its keyword arguments): n_images images of frame,
    boxed ones first (a seeded draw), each with per_image Grad-CAM panels: its boxed findings
    first, then the findings the model rates most likely; titled with the image, the finding and
    the model's probability, with the finding's boxes (in image_size pixels) where it has some.
    boxes: fedxray.read_boxes' table of frame's images, or None. relu: see :func:`gradcam` (False:
    the maps localisation_scores scores)."""
    import torch
    boxes = boxes if boxes is not None else pd.DataFrame(columns=["image", "finding", *BOX_COLUMNS])
    _checked(frame, boxes)
    rng = np.random.default_rng(seed)
    boxed = sorted(set(boxes["image"]))
    rest = sorted(set(frame["image"]) - set(boxed))
    chosen = [boxed[i] for i in rng.permutation(len(boxed))][:n_images]
    chosen += [rest[i] for i in rng.permutation(len(rest))][:n_images - len(chosen)]
    if not chosen:
        raise ValueError("frame holds no image: give the test split")
    path = dict(zip(frame["image"], frame["path"]))
    gray = np.stack([load_gray(path[name], image_size) for name in chosen])
    with eval_mode(model), torch.no_grad():
        device = next(model.parameters()).device
        probs = torch.sigmoid(model(model_input(gray).to(device)).float()).cpu().numpy()
    scaled = _scaled(frame, boxes[boxes["image"].isin(chosen)], image_size) if len(boxes) else boxes
    rows, findings, titles, panel_boxes = [], [], [], []
    for r, name in enumerate(chosen):
        own = scaled[scaled["image"] == name]
        ranked = [LABELS[j] for j in np.argsort(-probs[r], kind="stable")]
        first = [f for f in LABELS if f in set(own["finding"])]
        for finding in (first + [f for f in ranked if f not in first])[:per_image]:
            rows.append(r)
            findings.append(finding)
            titles.append(f"{name}\n{finding} p={probs[r, LABELS.index(finding)]:.2f}")
            panel_boxes.append(own.loc[own["finding"] == finding, list(BOX_COLUMNS)].to_numpy(float))
    return {"images": gray[rows], "heatmaps": gradcam(model, gray[rows], findings, relu=relu),
            "titles": titles, "boxes": panel_boxes}


def localisation_table(scores: pd.DataFrame) -> pd.DataFrame:
    """Per finding (LABELS order; only those scored), then "all" (every pair pooled): images scored,
    the pointing game's hit rate and the centre baseline's, the mean IoU and the centre
    baseline's. scores: :func:`localisation_scores`' rows."""
    if len(scores) == 0:
        raise ValueError("no scores: localisation_scores gave no row, so there is nothing to tabulate")
    def row(s: pd.DataFrame) -> dict:
        return {"images": len(s), "pointing": s["hit"].mean(), "pointing (centre)": s["centre_hit"].mean(),
                "IoU": s["iou"].mean(), "IoU (centre)": s["centre_iou"].mean()}
    table = {name: row(scores[scores["finding"] == name]) for name in LABELS if (scores["finding"] == name).any()}
    table["all"] = row(scores)
    return pd.DataFrame.from_dict(table, orient="index").astype({"images": int})
