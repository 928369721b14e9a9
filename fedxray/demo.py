"""SYNTHETIC demo data in the Kaggle NIH layout: chest-like drawings with one visible signature per
finding, so that fedxray runs end to end on a machine without the NIH data or internet.

The images are drawn shapes, not chest X-rays, and results on them say nothing about medicine.
Labels follow the NIH finding-combination frequencies (``nih_label_stats.csv``, derived from the
real Data_Entry_2017.csv by :func:`derive_label_stats`), with rare findings boosted.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from .data import LABELS, NO_FINDING, TEST_LIST, TRAIN_VAL_LIST, DataError, parse_finding_labels

log = logging.getLogger(__name__)

MANIFEST_NAME = "demo_manifest.json"
README_NAME = "README.txt"
CSV_NAME = "Data_Entry_2017.csv"
STATS_FILE = "nih_label_stats.csv"
# Bump when the drawing or sampling changes, so that an old dataset on disk is regenerated.
GENERATOR_VERSION = 1
IMAGES_PER_FOLDER = 500   # NIH has ~10,000 per images_0NN folder; smaller here so there are >= 2
MAX_BOOST = 40.0          # largest upweighting of any finding combination (Hernia's, by default)
CSV_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
              "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
# The six commonest (width, height, pixel spacing) of the NIH table, with their counts: the
# "original image" columns describe the scanner's image, never the stored PNG.
_ORIGINAL_GEOMETRY = ((2500, 2048, "0.168", 29986), (2992, 2991, "0.143", 21961),
                      (3056, 2544, "0.139", 15340), (2500, 2048, "0.171", 7141),
                      (2048, 2500, "0.168", 5817), (2021, 2021, "0.194311", 4264))
_OWN_ENTRY = re.compile(r"^(images_\d{3}|%s|%s|%s|%s|%s)$" % tuple(
    map(re.escape, (MANIFEST_NAME, README_NAME, CSV_NAME, TRAIN_VAL_LIST, TEST_LIST))))

README_TEXT = """SYNTHETIC DEMO DATA - NOT NIH ChestX-ray14, NOT MEDICAL IMAGES
==============================================================

Written by fedxray.make_demo_dataset (fedxray {version}, generator {generator}) with
{params}.

The files copy the layout of the Kaggle "NIH Chest X-rays" dataset (Data_Entry_2017.csv,
train_val_list.txt, test_list.txt, images_0NN/images/*.png) so that fedxray runs end to end without
the real data. Every image is a drawing: a chest-like background with one simple shape or texture
per finding (e.g. a wider heart for Cardiomegaly, a bright meniscus at a lung base for Effusion).
Patients, ages, views and labels are random draws; label combinations follow the NIH frequencies
with rare findings boosted. A model's score on these images says nothing about real X-rays.

Delete this folder at will; make_demo_dataset writes it again.
"""


# --------------------------------------------------------------------------- label statistics

def derive_label_stats(csv_path: str | os.PathLike) -> pd.DataFrame:
    """Finding-combination counts of an NIH Data_Entry_2017*.csv.

    One row per distinct 'Finding Labels' string (as written, e.g. "Effusion|Infiltration"), with
    columns finding_labels, count, n_pa, n_ap (images per view), sorted by count then name. This
    is what ships as ``fedxray/nih_label_stats.csv``; regenerate it with
    ``derive_label_stats(".../Data_Entry_2017.csv").to_csv(path, index=False)``.
    """
    raw = pd.read_csv(csv_path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    cols = {str(c).strip().lower(): c for c in raw.columns}
    if "finding labels" not in cols or "view position" not in cols:
        raise DataError(f"{csv_path}: needs 'Finding Labels' and 'View Position' columns; "
                        f"is this the NIH Data_Entry_2017 CSV?")
    frame = pd.DataFrame({"finding_labels": raw[cols["finding labels"]].str.strip(),
                          "view": raw[cols["view position"]].str.strip().str.upper()})
    table = (frame.groupby("finding_labels")["view"]
             .agg(count="size", n_pa=lambda s: int((s == "PA").sum()),
                  n_ap=lambda s: int((s == "AP").sum()))
             .reset_index())
    table = table.sort_values(["count", "finding_labels"], ascending=[False, True], kind="stable")
    return table.reset_index(drop=True).astype(
        {"count": np.int64, "n_pa": np.int64, "n_ap": np.int64})


def load_label_stats() -> pd.DataFrame:
    """The shipped NIH finding-combination table (see :func:`derive_label_stats`)."""
    with resources.files("fedxray").joinpath(STATS_FILE).open("r", encoding="utf-8") as f:
        return pd.read_csv(f, dtype={"finding_labels": str, "count": np.int64, "n_pa": np.int64,
                                     "n_ap": np.int64}, keep_default_na=False)


def combination_weights(stats: pd.DataFrame, min_prevalence: float = 0.08,
                        max_boost: float = MAX_BOOST) -> tuple[np.ndarray, np.ndarray]:
    """(label matrix [k, 14], probabilities [k]) of the finding combinations in stats.

    Each combination's NIH count is multiplied by the largest boost among its findings, where a
    finding with NIH prevalence p gets boost clip(min_prevalence / p, 1, max_boost); then all are
    renormalised. min_prevalence=0 keeps the NIH frequencies. With the defaults every finding
    ends on 5.3% of images or more (Hernia: 0.2% in NIH, boost x40 -> 5.3%; Pneumonia: 1.2%,
    x6.6 -> 5.4%), "No Finding" drops from 54% to 36%, and common findings keep roughly their
    NIH prevalence (Infiltration 17.7% -> 19.9%, Effusion 11.9% -> 14.3%).
    """
    labels = parse_finding_labels(stats["finding_labels"], source=STATS_FILE).astype(np.float64)
    counts = stats["count"].to_numpy(np.float64)
    prevalence = (labels * counts[:, None]).sum(0) / counts.sum()
    boost = np.ones(len(LABELS))
    if min_prevalence > 0:
        boost = np.clip(min_prevalence / np.maximum(prevalence, 1e-12), 1.0, max_boost)
    w = counts * np.where(labels.any(1), (labels * boost).max(1), 1.0)
    return labels.astype(np.uint8), w / w.sum()


# --------------------------------------------------------------------------- drawing

def _sig(x: np.ndarray) -> np.ndarray:
    """Logistic function: a soft edge. float32 in, float32 out."""
    return 0.5 * (np.tanh(0.5 * x) + 1.0)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Unit-variance noise with features of about size/cells pixels (bicubic upsampling)."""
    from PIL import Image
    small = rng.standard_normal((cells, cells)).astype(np.float32)
    big = np.asarray(Image.fromarray(small).resize((size, size), Image.BICUBIC))
    return (big - big.mean()) / (big.std() + 1e-6)


@dataclass
class _Anatomy:
    """One patient's body: every length in units of the image width, (0, 0) the chest centre."""
    cx: float
    cy: float
    scale: float
    rot: float
    lung_gap: float        # distance of each lung's centre from the midline
    lung_w: float
    lung_h: float
    dome: float            # height of the diaphragm domes
    right_dome_up: float   # the right hemidiaphragm (image left) sits higher (liver)
    lung_dark: float
    vessels: float
    heart_u: float
    heart_w: float
    heart_h: float
    rib_period: float
    rib_phase: float
    contrast: float
    brightness: float
    gamma: float

    @classmethod
    def draw(cls, rng: np.random.Generator) -> "_Anatomy":
        return cls(cx=0.5 + rng.normal(0, 0.015), cy=0.5 + rng.normal(0, 0.015),
                   scale=rng.uniform(0.92, 1.05), rot=rng.normal(0, 0.03),
                   lung_gap=rng.uniform(0.185, 0.205), lung_w=rng.uniform(0.15, 0.17),
                   lung_h=rng.uniform(0.30, 0.34), dome=rng.uniform(0.06, 0.09),
                   right_dome_up=rng.uniform(0.01, 0.04), lung_dark=rng.uniform(0.28, 0.32),
                   vessels=rng.uniform(0.03, 0.05), heart_u=rng.uniform(0.03, 0.06),
                   heart_w=rng.uniform(0.13, 0.145), heart_h=rng.uniform(0.11, 0.125),
                   rib_period=rng.uniform(0.075, 0.09), rib_phase=rng.uniform(0, 1),
                   contrast=rng.uniform(0.9, 1.1), brightness=rng.uniform(-0.04, 0.04),
                   gamma=rng.uniform(0.85, 1.15))


@dataclass
class _Canvas:
    """What the finding painters see and change: coordinates, lung geometry, density layers."""
    u: np.ndarray
    v: np.ndarray
    a: _Anatomy
    lung: list = field(default_factory=list)      # soft mask per side, 0 = image left
    radius: list = field(default_factory=list)    # normalised elliptic radius per side
    centre: list = field(default_factory=list)    # (u, v) of each lung's ellipse
    add: np.ndarray | None = None                 # density added on top of the anatomy
    texture: np.ndarray | None = None             # lung texture multiplier (pneumothorax: 0)

    def lungs(self) -> np.ndarray:
        return self.lung[0] + self.lung[1]

    def point_in_lung(self, rf: np.random.Generator, side: int, rmax: float,
                      v_range: tuple[float, float] = (-0.7, 0.7),
                      lateral: bool = False) -> tuple[float, float]:
        """A random point of lung `side` at normalised radius < rmax, v within v_range (of rv);
        lateral=True keeps to the outer half, away from the heart."""
        cu, cv = self.centre[side]
        for _ in range(100):
            x, y = rf.uniform(-1, 1), rf.uniform(*v_range)
            if x * x + y * y < rmax * rmax:
                break
        if lateral:
            x = abs(x) * (1 if side else -1)
        return cu + x * self.a.lung_w, cv + y * self.a.lung_h


def _disc(c: _Canvas, u0: float, v0: float, r: float, edge: float) -> np.ndarray:
    return _sig((r - np.sqrt((c.u - u0) ** 2 + (c.v - v0) ** 2)) / edge)


def _gauss(c: _Canvas, u0: float, v0: float, su: float, sv: float) -> np.ndarray:
    return np.exp(-0.5 * (((c.u - u0) / su) ** 2 + ((c.v - v0) / sv) ** 2))


# Each painter draws one finding's signature. rf is the patient's own stream for that finding
# (the same placement at every follow-up: a finding persists where it was); ri is the image's
# stream (small jitter). Densities are in the units of the anatomy: lung ~0.15, soft tissue 0.45.

def _atelectasis(c: _Canvas, rf, ri) -> None:
    # Plate-like atelectasis: a thin dense band, near horizontal, in a mid/lower lung zone.
    side = int(rf.integers(2))
    cu, cv = c.centre[side]
    v0 = cv + rf.uniform(0.02, 0.16) + ri.normal(0, 0.006)
    ang = rf.choice([-1, 1]) * rf.uniform(0.15, 0.4)   # tilted, unlike the ribs
    half = rf.uniform(0.018, 0.023)
    length = c.a.lung_w * rf.uniform(0.7, 0.9)
    du, dv = c.u - cu, c.v - v0
    across = np.abs(dv * math.cos(ang) - du * math.sin(ang))
    along = np.abs(du * math.cos(ang) + dv * math.sin(ang))
    c.add += 0.7 * _sig((half - across) / 0.004) * _sig((length - along) / 0.01) * c.lung[side]


def _effusion(c: _Canvas, rf, ri) -> None:
    # Fluid fills the base: bright, homogeneous, with a meniscus rising towards the lateral wall.
    sides = [int(rf.integers(2))] if rf.random() < 0.65 else [0, 1]
    for side in sides:
        cu, cv = c.centre[side]
        level = cv + c.a.lung_h * rf.uniform(0.15, 0.4) + ri.normal(0, 0.006)
        lateral = np.clip((c.u - cu) * (1 if side else -1) / c.a.lung_w, 0, 1.2)
        surface = level - 0.09 * lateral ** 2
        fluid = _sig((c.v - surface) / 0.008) * c.lung[side]
        c.add += (c.a.lung_dark + 0.08) * fluid
        c.texture -= 0.8 * fluid


def _infiltration(c: _Canvas, rf, ri) -> None:
    # Several ill-defined faint patches scattered over both lungs.
    for _ in range(int(rf.integers(7, 11))):
        side = int(rf.integers(2))
        u0, v0 = c.point_in_lung(rf, side, 0.8)
        s = rf.uniform(0.025, 0.04)
        c.add += rf.uniform(0.3, 0.36) * _gauss(c, u0 + ri.normal(0, 0.005), v0, s, s) * c.lung[side]


def _mass(c: _Canvas, rf, ri) -> None:
    # One large, well-defined round opacity.
    side = int(rf.integers(2))
    u0, v0 = c.point_in_lung(rf, side, 0.55)
    r = rf.uniform(0.055, 0.075) * (1 + ri.normal(0, 0.03))
    c.add += 0.6 * _disc(c, u0, v0, r, 0.005)


def _nodule(c: _Canvas, rf, ri) -> None:
    # A few small, sharp, bright round spots.
    for _ in range(int(rf.integers(3, 7))):
        side = int(rf.integers(2))
        u0, v0 = c.point_in_lung(rf, side, 0.8)
        c.add += 0.65 * _disc(c, u0, v0, rf.uniform(0.026, 0.034), 0.004) * c.lung[side]


def _pneumonia(c: _Canvas, rf, ri) -> None:
    # A patchy, mottled (blotchy, heterogeneous) opacity with fuzzy borders in one lower zone;
    # Consolidation is homogeneous with a sharp straight edge instead.
    side = int(rf.integers(2))
    u0, v0 = c.point_in_lung(rf, side, 0.6, (0.0, 0.6), lateral=True)
    s = rf.uniform(0.07, 0.09)
    mottle = _sig((_smooth_noise(ri, c.u.shape[0], max(8, c.u.shape[0] // 5)) + 0.2) / 0.3)
    c.add += 0.6 * _gauss(c, u0, v0, s, s * 1.2) * mottle * c.lung[side]


def _pneumothorax(c: _Canvas, rf, ri) -> None:
    # Apical-lateral air: no lung markings, darker, bounded by a thin bright visceral pleural line.
    side = int(rf.integers(2))
    cu, cv = c.centre[side]
    rc = 1 - rf.uniform(0.25, 0.38)
    upper = _sig((cv + rf.uniform(0.0, 0.12) * c.a.lung_h - c.v) / 0.03)
    r = c.radius[side]
    air = _sig((r - rc) / 0.015) * upper * c.lung[side]
    c.texture -= air
    c.add -= 0.18 * air
    c.add += 0.25 * np.exp(-0.5 * ((r - rc) / 0.012) ** 2) * upper * c.lung[side]


def _consolidation(c: _Canvas, rf, ri) -> None:
    # A dense, homogeneous lobar patch with one sharp straight border (a fissure).
    side = int(rf.integers(2))
    cu, cv = c.centre[side]
    lower = rf.random() < 0.6
    v0 = cv + rf.uniform(-0.05, 0.08) + ri.normal(0, 0.005)
    ang = rf.uniform(-0.35, 0.35)
    d = (c.v - v0) * math.cos(ang) - (c.u - cu) * math.sin(ang)
    lobe = _sig((d if lower else -d) / 0.006)
    extent = _gauss(c, cu, v0 + (0.1 if lower else -0.1), 0.11, 0.12)
    c.add += 0.4 * lobe * _sig((extent - 0.3) / 0.08) * c.lung[side]
    c.texture -= 0.6 * lobe * c.lung[side]


def _edema(c: _Canvas, rf, ri) -> None:
    # Symmetric bilateral perihilar ("bat wing") haze.
    su, sv = rf.uniform(0.08, 0.1), rf.uniform(0.12, 0.15)
    for side in (0, 1):
        hu = c.centre[side][0] * 0.6
        c.add += 0.24 * _gauss(c, hu, c.centre[side][1] + 0.03, su, sv) * c.lung[side]


def _fibrosis(c: _Canvas, rf, ri) -> None:
    # Reticular net of streaks, peripheral and basal, in both lungs.
    p = rf.uniform(0.07, 0.085)
    net = 0.0
    for _ in range(2):
        t = rf.uniform(0, math.pi)
        warp = 1.5 * _smooth_noise(ri, c.u.shape[0], 8)   # irregular, not a grid
        wave = np.cos(2 * math.pi * (c.u * math.cos(t) + c.v * math.sin(t)) / p + warp)
        net = np.maximum(net, _sig((wave - 0.4) / 0.1))
    zone = sum(_sig((c.radius[s] - 0.35) / 0.1) * _sig((c.v - c.centre[s][1] + 0.08) / 0.05)
               * c.lung[s] for s in (0, 1))
    c.add += 0.45 * net * zone * (0.6 + 0.4 * _sig(_smooth_noise(ri, c.u.shape[0], 6) / 0.5))


def _pleural_thickening(c: _Canvas, rf, ri) -> None:
    # A bright band along the lateral chest wall, upper and middle zones.
    sides = [int(rf.integers(2))] if rf.random() < 0.7 else [0, 1]
    for side in sides:
        cu, cv = c.centre[side]
        t = rf.uniform(0.13, 0.19)
        lateral = _sig(((c.u - cu) * (1 if side else -1) / c.a.lung_w - 0.25) / 0.1)
        upper = _sig((cv + 0.15 - c.v) / 0.04)
        band = _sig((c.radius[side] - (1 - t)) / 0.02) * _sig((1.04 - c.radius[side]) / 0.015)
        c.add += 0.45 * band * lateral * upper


def _hernia(c: _Canvas, rf, ri) -> None:
    # Hiatal hernia: a rounded opacity low in the centre, behind the heart, with an air bubble
    # above a flat air-fluid level.
    u0 = rf.uniform(-0.02, 0.03)
    v0 = _HEART_V + c.a.heart_h * rf.uniform(0.8, 1.0)
    ru, rv = rf.uniform(0.08, 0.1), rf.uniform(0.06, 0.075)
    r = np.sqrt(((c.u - u0) / ru) ** 2 + ((c.v - v0) / rv) ** 2)
    c.add += 0.3 * _sig((1 - r) / 0.06)
    c.add -= 0.5 * _sig((0.8 - r) / 0.06) * _sig((v0 - 0.1 * rv - c.v) / 0.006)


_PAINTERS: dict[str, Callable] = {
    "Atelectasis": _atelectasis, "Effusion": _effusion, "Infiltration": _infiltration,
    "Mass": _mass, "Nodule": _nodule, "Pneumonia": _pneumonia, "Pneumothorax": _pneumothorax,
    "Consolidation": _consolidation, "Edema": _edema, "Fibrosis": _fibrosis,
    "Pleural_Thickening": _pleural_thickening, "Hernia": _hernia,
}
# Cardiomegaly and Emphysema change the anatomy itself (heart size; lung darkness and shape).
_ANATOMY_FINDINGS = ("Cardiomegaly", "Emphysema")
assert set(_PAINTERS) | set(_ANATOMY_FINDINGS) == set(LABELS)


_HEART_V = 0.12   # height of the heart's centre, below the chest centre


def _stream(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _render_image(labels: np.ndarray, view: str, anatomy: _Anatomy, seed: int, patient: int,
                 follow_up: int, size: int) -> np.ndarray:
    """Draw one uint8 [size, size] image of a patient with the given findings (LABELS order)."""
    ri = _stream(seed, 3, patient, follow_up)
    a = anatomy
    has = dict(zip(LABELS, np.asarray(labels).astype(bool)))
    ap = view == "AP"

    # Pixel grid -> body coordinates (patient position, size and tilt; a small per-image shift).
    g = (np.arange(size, dtype=np.float32) + 0.5) / size
    x, y = np.meshgrid(g, g)
    cx, cy = a.cx + ri.normal(0, 0.006), a.cy + ri.normal(0, 0.006)
    cos, sin = math.cos(a.rot), math.sin(a.rot)
    u = ((x - cx) * cos + (y - cy) * sin) / a.scale
    v = (-(x - cx) * sin + (y - cy) * cos) / a.scale
    c = _Canvas(u=u, v=v, a=a)

    lung_h, dome, dark, vessels = a.lung_h, a.dome, a.lung_dark, a.vessels
    if has["Emphysema"]:
        # Hyperinflated, hyperlucent lungs with flat domes and sparse markings.
        lung_h, dome, dark, vessels = lung_h * 1.1, dome * 0.3, dark + 0.14, vessels * 0.4
    heart_w, heart_h = a.heart_w, a.heart_h
    if ap:
        heart_w, heart_h = heart_w * 1.08, heart_h * 1.04   # AP projection magnifies the heart
    if has["Cardiomegaly"]:
        k = _stream(seed, 4, patient, LABELS.index("Cardiomegaly")).uniform(1.5, 1.7)
        heart_w, heart_h = heart_w * k, heart_h * 1.15

    # Torso (a rounded box), spine, and the upper mediastinum (great vessels).
    body = _sig((1 - (np.abs(u / 0.46) ** 3 + np.abs((v - 0.08) / 0.64) ** 3)) / 0.06)
    dens = 0.06 + 0.40 * body + 0.12 * _sig((0.04 - np.abs(u)) / 0.01) * body
    dens += 0.08 * _sig((0.07 - np.abs(u)) / 0.015) * _sig((0.05 - v) / 0.03) * body
    for side, sgn in ((0, -1), (1, 1)):
        cu, cv = sgn * a.lung_gap, 0.0
        r = np.sqrt(((u - cu) / a.lung_w) ** 2 + ((v - cv) / lung_h) ** 2)
        base = cv + 0.8 * lung_h - (a.right_dome_up if side == 0 else 0.0)
        bottom = base - dome * (1 - np.clip((u - cu) / a.lung_w, -1, 1) ** 2)
        lung = _sig((1 - r) / 0.04) * _sig((bottom - v) / 0.012)
        c.lung.append(lung)
        c.radius.append(r)
        c.centre.append((cu, cv))
    # The heart is soft tissue in front of the lungs: it hides the lower medial lung fields.
    heart_r = np.sqrt(((u - a.heart_u) / heart_w) ** 2 + ((v - _HEART_V) / heart_h) ** 2)
    heart = _sig((1 - heart_r) / 0.05)
    c.lung = [lung * (1 - heart) for lung in c.lung]
    dens += 0.1 * heart
    lungs = c.lungs()
    c.add = np.zeros_like(u)
    c.texture = np.ones_like(u)
    for name in LABELS:
        if has[name] and name in _PAINTERS:
            _PAINTERS[name](c, _stream(seed, 4, patient, LABELS.index(name)), ri)

    # Lung markings: vessels fanning out of the hila, plus fine texture.
    hila = sum(np.exp(-np.sqrt((u - cu * 0.55) ** 2 + (v - 0.03) ** 2) / 0.09) for cu, _ in c.centre)
    marks = vessels * (_smooth_noise(ri, size, max(8, size // 8)) + 3.0 * hila)
    dens = dens + lungs * (-dark + np.clip(c.texture, 0, 1) * marks)
    # Posterior ribs: arcs, flat near the spine, curving down laterally.
    rib_t = (v - 0.15 * np.abs(u) - 1.2 * np.maximum(np.abs(u) - 0.12, 0) ** 2) / a.rib_period
    dens += 0.05 * _sig((np.cos(2 * math.pi * (rib_t + a.rib_phase)) - 0.3) / 0.15) * lungs
    for sgn in (-1, 1):   # clavicles: higher and flatter on AP
        v0 = (-0.40 if ap else -0.36) + (0.08 if ap else 0.14) * (np.abs(u) - 0.05)
        along = _sig((0.14 - np.abs(u - sgn * 0.19)) / 0.02) * (u * sgn > 0.04)
        dens += 0.14 * _sig((0.016 - np.abs(v - v0)) / 0.005) * along
    dens += c.add

    contrast = a.contrast * (0.93 if ap else 1.0) * ri.uniform(0.96, 1.04)
    gray = np.clip(0.06 + a.brightness + ri.normal(0, 0.01) + contrast * dens, 0, 1) ** a.gamma
    gray = gray + ri.normal(0, 0.012, size=gray.shape).astype(np.float32)   # quantum noise
    return np.clip(np.rint(gray * 255), 0, 255).astype(np.uint8)


def finding_examples(image_size: int = 128, seed: int = 0, view: str = "PA") -> dict[str, np.ndarray]:
    """One image per finding (and "No Finding") on the same synthetic patient: what each looks like."""
    anatomy = _Anatomy.draw(_stream(seed, 2, 1, 0))
    out = {}
    for j, name in enumerate((NO_FINDING,) + LABELS):
        labels = np.zeros(len(LABELS), np.uint8)
        if j:
            labels[j - 1] = 1
        out[name] = _render_image(labels, view, anatomy, seed, 1, 0, image_size)
    return out


# --------------------------------------------------------------------------- the dataset

@dataclass(frozen=True)
class DemoParams:
    """Everything that decides the demo data's content (saved in its manifest)."""
    seed: int = 0
    num_patients: int = 400       # ~2.9 images each: ~1,100-1,250 images, ~230 in test
    image_size: int = 128         # stored PNG size; train at 64 so that resizing is exercised
    max_follow_ups: int = 8       # images per patient: 1..max_follow_ups, P(k) ~ 1/k
    test_fraction: float = 0.2    # share of patients in test_list.txt
    min_prevalence: float = 0.08  # findings rarer than this are boosted (see combination_weights)
    persistence: float = 0.5      # chance a follow-up repeats the previous finding combination

    def __post_init__(self):
        for name, low in (("seed", 0), ("num_patients", 2), ("image_size", 32), ("max_follow_ups", 1)):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {val!r}")
            object.__setattr__(self, name, int(val))
        for name, high in (("test_fraction", 1.0), ("persistence", 1.0), ("min_prevalence", 0.5)):
            val = getattr(self, name)
            if not 0.0 <= val < high or (name == "test_fraction" and val == 0.0):
                raise ValueError(f"{name} must be in {'(' if name == 'test_fraction' else '['}0, "
                                 f"{high:g}), got {val!r}")
            object.__setattr__(self, name, float(val))


def _write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image
    Image.fromarray(image).save(path, format="PNG")


def _sample_patients(params: dict) -> pd.DataFrame:
    """The metadata table of the demo data (one row per image), test flag included."""
    seed, n = params["seed"], params["num_patients"]
    rng = _stream(seed, 1, 0, 0)
    stats = load_label_stats()
    combos, probs = combination_weights(stats, params["min_prevalence"])
    names = stats["finding_labels"].to_numpy()
    # P(AP | combination), shrunk towards NIH's 40% AP for rare combinations.
    p_ap = ((stats["n_ap"] + 2 * 0.4) / (stats["count"] + 2)).to_numpy()
    # Follow-ups per patient: P(k) ~ 1/k on 1..max, skewed like NIH (many 1s, a few long series).
    ks = np.arange(1, params["max_follow_ups"] + 1)
    n_images = rng.choice(ks, size=n, p=(1 / ks) / (1 / ks).sum())
    geometry = np.array([g[3] for g in _ORIGINAL_GEOMETRY], float)
    # At least one test patient (an empty test_list.txt is refused when read) and one train_val one.
    n_test = min(n - 1, max(1, int(round(params["test_fraction"] * n))))
    test = set((rng.permutation(n)[:n_test] + 1).tolist())
    rows = []
    for pid in range(1, n + 1):
        age = int(np.clip(np.rint(rng.normal(47, 17)), 2, 90))
        sex = "M" if rng.random() < 0.565 else "F"
        combo = -1
        for fu in range(int(n_images[pid - 1])):
            # Findings persist: a follow-up repeats the previous combination with probability
            # `persistence`, else draws afresh (the marginal distribution stays `probs`).
            if combo < 0 or rng.random() >= params["persistence"]:
                combo = int(rng.choice(len(probs), p=probs))
            if fu:
                age += int(rng.random() < 0.3)
            gw, gh, gs, _ = _ORIGINAL_GEOMETRY[rng.choice(len(geometry), p=geometry / geometry.sum())]
            rows.append({"image": f"{pid:08d}_{fu:03d}.png", "finding_labels": names[combo],
                         "combo": combo, "follow_up": fu, "patient_id": pid, "age": min(age, 95),
                         "sex": sex, "view": "AP" if rng.random() < p_ap[combo] else "PA",
                         "width": gw, "height": gh, "spacing": gs, "test": pid in test})
    frame = pd.DataFrame(rows)
    frame.attrs["combos"] = combos
    return frame


def _generate(root: Path, params: dict, version: str, progress: bool) -> dict:
    """Write the whole dataset into root (an empty folder). Returns the manifest."""
    from .progress import bar as progress_bar
    meta = _sample_patients(params)
    combos = meta.attrs["combos"]
    seed, size = params["seed"], params["image_size"]
    n = len(meta)
    n_folders = max(2, math.ceil(n / IMAGES_PER_FOLDER))
    per_folder = math.ceil(n / n_folders)
    anatomy, anatomy_of = None, None
    bar = progress_bar(total=n, desc="synthetic demo images", unit="img", enabled=progress, leave=False)
    try:
        for i, row in enumerate(meta.itertuples(index=False)):
            folder = root / f"images_{i // per_folder + 1:03d}" / "images"
            if i % per_folder == 0:
                folder.mkdir(parents=True)
            if anatomy_of != row.patient_id:   # rows come patient by patient
                anatomy, anatomy_of = _Anatomy.draw(_stream(seed, 2, row.patient_id, 0)), row.patient_id
            img = _render_image(combos[row.combo], row.view, anatomy, seed, row.patient_id,
                               row.follow_up, size)
            _write_png(folder / row.image, img)
            bar.update()
    finally:
        bar.close()

    lines = [CSV_HEADER] + [
        f"{r.image},{r.finding_labels},{r.follow_up},{r.patient_id},{r.age},{r.sex},{r.view},"
        f"{r.width},{r.height},{r.spacing},{r.spacing}" for r in meta.itertuples(index=False)]
    (root / CSV_NAME).write_bytes(("\n".join(lines) + "\n").encode("ascii"))
    # Like NIH's lists: one name per line, no newline after the last.
    (root / TRAIN_VAL_LIST).write_bytes("\n".join(meta["image"][~meta["test"]]).encode("ascii"))
    (root / TEST_LIST).write_bytes("\n".join(meta["image"][meta["test"]]).encode("ascii"))
    described = ", ".join(f"{k}={v}" for k, v in params.items())
    (root / README_NAME).write_bytes(README_TEXT.format(
        version=version, generator=GENERATOR_VERSION, params=described).encode("ascii"))
    labels = combos[meta["combo"].to_numpy()]
    manifest = {
        "dataset": "SYNTHETIC fedxray demo data: drawn chest-like images, not NIH ChestX-ray14 "
                   "and not medical images",
        "synthetic": True,
        "generator": "fedxray.demo.make_demo_dataset",
        "generator_version": GENERATOR_VERSION,
        "fedxray_version": version,
        "params": params,
        "num_patients": int(meta["patient_id"].nunique()),
        "num_images": n,
        "num_test_images": int(meta["test"].sum()),
        "image_folders": n_folders,
        "positives": dict(zip(LABELS, labels.sum(0).astype(int).tolist())),
        "label_source": f"{STATS_FILE}: NIH finding-combination counts; findings rarer than "
                        f"min_prevalence boosted up to x{MAX_BOOST:g}",
        "files": _file_digests(root),
    }
    # The manifest is written last: a folder holding it is complete.
    (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="ascii")
    return manifest


def _read_manifest(folder: Path) -> dict | None:
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _file_digests(root: Path) -> dict[str, str]:
    """SHA-256 of every file of a dataset folder but the manifest, by relative path (about 20 ms
    for the default demo's 1,100 small PNGs)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST_NAME}


def _is_complete(folder: Path, params: dict, version: str) -> bool:
    """True when folder holds a finished dataset made by this generator with these parameters,
    every file as it was written (a damaged, edited, added or missing file: regenerate it)."""
    m = _read_manifest(folder)
    if m is None or m.get("params") != params or m.get("fedxray_version") != version \
            or m.get("generator_version") != GENERATOR_VERSION:
        return False
    if _file_digests(folder) != m.get("files"):
        log.warning("the synthetic demo data at %s differs from its manifest (a file was changed, added "
                    "or removed): it is generated again", folder)
        return False
    return True


def _check_replaceable(folder: Path) -> None:
    """Raise unless folder is empty or an older demo dataset holding nothing else."""
    if not folder.is_dir():
        raise DataError(f"{folder} exists and is not a folder: give make_demo_dataset a new or "
                        f"empty folder")
    entries = sorted(e.name for e in folder.iterdir())
    if not entries:
        return
    foreign = [e for e in entries if not _OWN_ENTRY.match(e)]
    if foreign or not (_read_manifest(folder) or {}).get("synthetic"):
        shown = ", ".join((foreign or entries)[:5])
        raise DataError(
            f"{folder} exists and holds files that are not a fedxray demo dataset ({shown}"
            f"{', ...' if len(foreign or entries) > 5 else ''}); make_demo_dataset will not "
            f"overwrite them. Pass a new or empty folder as out_dir, or delete this one.")


def make_demo_dataset(out_dir: str | os.PathLike, seed: int = 0, *,
                      num_patients: int = DemoParams.num_patients,
                      image_size: int = DemoParams.image_size,
                      max_follow_ups: int = DemoParams.max_follow_ups,
                      test_fraction: float = DemoParams.test_fraction,
                      min_prevalence: float = DemoParams.min_prevalence,
                      persistence: float = DemoParams.persistence,
                      progress: bool = True) -> Path:
    """Write a SYNTHETIC NIH-like dataset to out_dir (Kaggle layout) and return out_dir.

    ``fedxray.load_nih(out_dir)`` and ``fedxray.split_by_patient`` work on it unchanged. The
    defaults give ~1,100-1,250 images of 400 patients (1-8 follow-ups each, P(k) ~ 1/k), 20% of
    the patients in test_list.txt, 128x128 8-bit PNGs in images_001..images_003, in 5-15 s on
    2 cores. Parameters: see :class:`DemoParams`.

    Labels: each image's finding combination is drawn from the NIH combination frequencies
    (see :func:`combination_weights`); findings rarer than min_prevalence are boosted (up to
    x40), so per-finding prevalence is NOT NIH's: every finding is on ~5.3% of images or more,
    "No Finding" on ~36% instead of 54%. A follow-up repeats the patient's previous combination
    with probability persistence. Views: P(AP | combination) as in NIH (~40% AP overall).

    The same arguments give byte-identical files. If out_dir already holds a complete dataset
    made with the same arguments and fedxray version, it is returned untouched. The data is
    written to a temporary sibling folder and renamed into place when complete, so an
    interrupted run leaves no half dataset at out_dir. An existing out_dir holding anything but
    an older demo dataset raises DataError: nothing of the user's is overwritten.
    """
    from . import __version__
    params = asdict(DemoParams(seed=seed, num_patients=num_patients, image_size=image_size,
                               max_follow_ups=max_follow_ups, test_fraction=test_fraction,
                               min_prevalence=min_prevalence, persistence=persistence))

    out = Path(out_dir).expanduser().absolute()
    if out.exists():
        if _is_complete(out, params, __version__):
            log.info("synthetic demo data already at %s (same parameters): kept", out)
            return out
        _check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        manifest = _generate(tmp, params, __version__, progress)
        _move_into_place(tmp, out, params, __version__)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote SYNTHETIC demo data to %s: %d images of %d patients (%d test images)", out,
             manifest["num_images"], manifest["num_patients"], manifest["num_test_images"])
    return out


def _move_into_place(tmp: Path, out: Path, params: dict, version: str) -> None:
    """Rename the finished tmp folder to out, replacing an empty folder or an older demo dataset."""
    if not out.exists():
        try:
            os.rename(tmp, out)
            return
        except OSError:
            if not out.exists():
                raise
    # Another process may have finished the same dataset meanwhile: keep theirs.
    if _is_complete(out, params, version):
        shutil.rmtree(tmp, ignore_errors=True)
        return
    _check_replaceable(out)
    if not any(out.iterdir()):
        out.rmdir()
        os.rename(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, old / "data")
    os.rename(tmp, out)
    log.warning("replaced the synthetic demo data at %s (made with other parameters)", out)
    shutil.rmtree(old, ignore_errors=True)


def is_demo_dataset(data_dir: str | os.PathLike | None) -> bool:
    """True when data_dir (or the folder of a CSV path) holds a synthetic demo dataset's manifest.

    The notebook uses it to mark figures "(synthetic demo data)".
    """
    if data_dir is None:
        return False
    d = Path(data_dir)
    if d.is_file():
        d = d.parent
    manifest = _read_manifest(d)
    return bool(manifest and manifest.get("synthetic") is True)
