"""SYNTHETIC demo data in the Kaggle NIH layout: chest-like drawings with one drawn signature per
finding, so that fedxray runs end to end on a machine without the NIH data or internet.

The images are drawn shapes, not chest X-rays, and results on them say nothing about medicine.
Labels follow the NIH finding-combination frequencies (``nih_label_stats.csv``, derived from the
real Data_Entry_2017.csv by :func:`derive_label_stats`), with rare findings boosted, and carry a
little label noise, as NIH's text-mined labels do. The data is made so that methods can be told
apart on it: the patients' backgrounds vary far more than any finding's mean brightness, and each
finding is local structure placed anywhere in a wide region, so that a linear model on the pixels
(:func:`linear_probe`) scores far below a convolutional network, and no single pixel reads a
finding (:func:`single_pixel_auroc`).
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

from .data import BOX_FILE, LABELS, NO_FINDING, TEST_LIST, TRAIN_VAL_LIST, DataError, parse_finding_labels

log = logging.getLogger(__name__)

MANIFEST_NAME = "demo_manifest.json"
README_NAME = "README.txt"
CSV_NAME = "Data_Entry_2017.csv"
BOX_NAME = BOX_FILE
STATS_FILE = "nih_label_stats.csv"
# Bump when the drawing, the sampling or the files written change, so that an old dataset on disk is
# regenerated (3: BBox_List_2017.csv added; images and Data_Entry_2017.csv as in 2).
GENERATOR_VERSION = 3
IMAGES_PER_FOLDER = 500   # NIH has ~10,000 per images_0NN folder; smaller here so there are >= 2
MAX_BOOST = 40.0          # largest upweighting of any finding combination (Hernia's, by default)
CSV_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
              "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
# The six commonest (width, height, pixel spacing) of the NIH table, with their counts: the
# "original image" columns describe the scanner's image, never the stored PNG.
_ORIGINAL_GEOMETRY = ((2500, 2048, "0.168", 29986), (2992, 2991, "0.143", 21961),
                      (3056, 2544, "0.139", 15340), (2500, 2048, "0.171", 7141),
                      (2048, 2500, "0.168", 5817), (2021, 2021, "0.194311", 4264))
_OWN_ENTRY = re.compile(r"^(images_\d{3}|%s|%s|%s|%s|%s|%s)$" % tuple(
    map(re.escape, (MANIFEST_NAME, README_NAME, CSV_NAME, TRAIN_VAL_LIST, TEST_LIST, BOX_NAME))))

README_TEXT = """SYNTHETIC DEMO DATA - NOT NIH ChestX-ray14, NOT MEDICAL IMAGES
==============================================================

Written by fedxray.make_demo_dataset (fedxray {version}, generator {generator}) with
{params}.

The files copy the layout of the Kaggle "NIH Chest X-rays" dataset (Data_Entry_2017.csv,
train_val_list.txt, test_list.txt, images_0NN/images/*.png) so that fedxray runs end to end without
the real data. Every image is a drawing: a chest-like background (exposure, contrast, gamma,
gradients, body position and size differ between patients) with one small shape, line, edge or
texture per finding, placed anywhere in its region (e.g. a line with dark flanks for Atelectasis, a
sharp meniscus at a lung base for Effusion, a round opacity in a dark ring for Mass). Patients, ages,
views and labels are random draws; label combinations follow the NIH frequencies with rare findings
boosted; a patient's follow-ups share the patient's background and findings (one may appear or
resolve). Label noise, as in NIH's text-mined labels: each drawn finding is left out of
Data_Entry_2017.csv with probability missed_labels (3% by default), and each image gets a finding
that is not drawn with probability spurious_labels per finding (0.1%); the CSV's labels are the
ones models are trained and scored on. BBox_List_2017.csv, in NIH's format, boxes where each of
NIH's eight boxed findings was drawn on the test images (pixels of these images, one box per
connected part of a finding; what was drawn, whatever the CSV says). A model's score on these images
says nothing about real X-rays.

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
#
# What makes the demo a test that tells methods apart: a patient's background varies far more than
# any finding's mean brightness (exposure, contrast, gamma, a smooth gradient across the film; the
# body's position, size and tilt; lung darkness, heart size), and each finding is drawn as LOCAL
# STRUCTURE of small net density (a bright core in a dark ring, a line with dark flanks, a texture
# of random phase, a sharp edge) at a place drawn anywhere in a wide region. A linear model on the
# pixels (linear_probe) then reads little of it, while convolutions + ReLU + pooling read it.

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
    """One patient's body and film: every length in units of the image width, (0, 0) the chest
    centre. Drawn once per patient, so that all the patient's images share it."""
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
    grad_u: float          # a linear exposure gradient across the film (heel effect, positioning)
    grad_v: float
    blotch: float          # amplitude of a smooth low-frequency exposure variation

    @classmethod
    def draw(cls, rng: np.random.Generator) -> "_Anatomy":
        return cls(cx=0.5 + rng.normal(0, 0.02), cy=0.5 + rng.normal(0, 0.02),
                   scale=rng.uniform(0.88, 1.07), rot=rng.normal(0, 0.04),
                   lung_gap=rng.uniform(0.18, 0.21), lung_w=rng.uniform(0.14, 0.18),
                   lung_h=rng.uniform(0.28, 0.35), dome=rng.uniform(0.04, 0.1),
                   right_dome_up=rng.uniform(0.0, 0.05), lung_dark=rng.uniform(0.2, 0.36),
                   vessels=rng.uniform(0.025, 0.05), heart_u=rng.uniform(0.0, 0.08),
                   heart_w=rng.uniform(0.11, 0.17), heart_h=rng.uniform(0.095, 0.135),
                   rib_period=rng.uniform(0.07, 0.095), rib_phase=rng.uniform(0, 1),
                   contrast=rng.uniform(0.85, 1.15), brightness=rng.uniform(-0.06, 0.06),
                   gamma=math.exp(rng.uniform(math.log(0.8), math.log(1.25))),
                   grad_u=rng.uniform(-0.08, 0.08), grad_v=rng.uniform(-0.08, 0.08),
                   blotch=rng.uniform(0.0, 0.03))


@dataclass
class _Canvas:
    """What the finding painters see and change: coordinates, lung geometry, density layers."""
    u: np.ndarray
    v: np.ndarray
    a: _Anatomy
    lung: list = field(default_factory=list)      # soft mask per side, 0 = image left
    radius: list = field(default_factory=list)    # normalised elliptic radius per side
    centre: list = field(default_factory=list)    # (u, v) of each lung's ellipse
    lung_h: float = 0.0                           # the lungs' half-height in this image
    add: np.ndarray | None = None                 # density added on top of the anatomy
    texture: np.ndarray | None = None             # lung texture multiplier (pneumothorax: 0)

    @property
    def size(self) -> int:
        return self.u.shape[0]

    def lungs(self) -> np.ndarray:
        return self.lung[0] + self.lung[1]

    def point_in_lung(self, rf: np.random.Generator, side: int, rmax: float,
                      v_range: tuple[float, float] = (-0.8, 0.8),
                      lateral: bool = False) -> tuple[float, float]:
        """A random point of lung `side` at normalised radius < rmax, v within v_range (of the
        lung's half-height); lateral=True keeps to the outer half, away from the heart."""
        cu, cv = self.centre[side]
        for _ in range(100):
            x, y = rf.uniform(-1, 1), rf.uniform(*v_range)
            if x * x + y * y < rmax * rmax:
                break
        if lateral:
            x = abs(x) * (1 if side else -1)
        return cu + x * self.a.lung_w, cv + y * self.lung_h


def _disc(c: _Canvas, u0: float, v0: float, r: float, edge: float) -> np.ndarray:
    return _sig((r - np.sqrt((c.u - u0) ** 2 + (c.v - v0) ** 2)) / edge)


def _gauss(c: _Canvas, u0: float, v0: float, su: float, sv: float) -> np.ndarray:
    return np.exp(-0.5 * (((c.u - u0) / su) ** 2 + ((c.v - v0) / sv) ** 2))


def _ringed(c: _Canvas, u0: float, v0: float, r: float, edge: float, aspect: float = 1.0,
            angle: float = 0.0) -> np.ndarray:
    """A bright (elliptic) disc of radius r in a dark ring out to 1.5 r of equal area: a sharp
    round shape whose net density is zero."""
    du, dv = c.u - u0, c.v - v0
    ca, sa = math.cos(angle), math.sin(angle)
    d = np.sqrt(((du * ca + dv * sa) * aspect) ** 2 + ((dv * ca - du * sa) / aspect) ** 2)
    core = _sig((r - d) / edge)
    return core - (_sig((1.5 * r - d) / edge) - core) / 1.25


def _line(c: _Canvas, u0: float, v0: float, ang: float, half: float, length: float,
          edge: float) -> np.ndarray:
    """A bright straight segment (half-width half, half-length length) with dark flanks of equal
    area on both sides: a sharp line of zero net density."""
    du, dv = c.u - u0, c.v - v0
    across = np.abs(dv * math.cos(ang) - du * math.sin(ang))
    along = np.abs(du * math.cos(ang) + dv * math.sin(ang))
    core = _sig((half - across) / edge)
    return (core - 0.5 * (_sig((3 * half - across) / edge) - core)) * _sig((length - along) / 0.006)


def _amp(rf: np.random.Generator) -> float:
    """How conspicuous this patient's finding is: contrast varies between patients."""
    return rf.uniform(0.7, 1.3)


# Each painter draws one finding's signature. rf is the patient's own stream for that finding
# (the same placement at every follow-up: a finding persists where it was); ri is the image's
# stream (small jitter, fine texture). Densities are in the units of the anatomy: lung ~0.25,
# soft tissue 0.45; every signature's net density is small next to the patients' differences.

def _atelectasis(c: _Canvas, rf, ri) -> None:
    # Plate-like atelectasis: a thin dense line, tilted unlike the ribs, with the lung around it
    # slightly darker (compensatory overinflation), anywhere in a mid/lower zone.
    side = int(rf.integers(2))
    u0, v0 = c.point_in_lung(rf, side, 0.7, (-0.2, 0.6))
    ang = rf.choice([-1, 1]) * rf.uniform(0.15, 0.6)
    half, length = rf.uniform(0.011, 0.016), c.a.lung_w * rf.uniform(0.4, 0.8)
    c.add += 0.9 * _amp(rf) * _line(c, u0 + ri.normal(0, 0.004), v0 + ri.normal(0, 0.004),
                                    ang + ri.normal(0, 0.03), half, length, 0.003) * c.lung[side]


def _effusion(c: _Canvas, rf, ri) -> None:
    # Fluid at the base: a sharp meniscus, concave upwards and rising towards the lateral wall,
    # over a faint fluid layer that hides the lung markings; its height varies widely.
    sides = [int(rf.integers(2))] if rf.random() < 0.65 else [0, 1]
    amp = _amp(rf)
    for side in sides:
        cu, cv = c.centre[side]
        level = cv + c.lung_h * rf.uniform(0.35, 0.65) + ri.normal(0, 0.005)
        rise = rf.uniform(0.05, 0.12)
        lateral = np.clip((c.u - cu) * (1 if side else -1) / c.a.lung_w, -0.3, 1.2)
        surface = level - rise * np.maximum(lateral, 0) ** 2
        fluid = _sig((c.v - surface) / 0.004) * c.lung[side]
        d = c.v - surface   # the meniscus: a bright line in a darker margin, of zero net density
        meniscus = (np.exp(-0.5 * (d / 0.009) ** 2) - 0.5 * np.exp(-0.5 * (d / 0.018) ** 2)) * c.lung[side]
        c.add += amp * (0.1 * fluid + 1.3 * meniscus)
        c.texture -= 0.9 * fluid


def _infiltration(c: _Canvas, rf, ri) -> None:
    # Ill-defined interstitial patches in both lungs: a fine mottled texture of random phase.
    patches = 0.0
    for _ in range(int(rf.integers(3, 6))):
        side = int(rf.integers(2))
        u0, v0 = c.point_in_lung(rf, side, 0.85)
        s = rf.uniform(0.04, 0.07)
        patches = patches + _gauss(c, u0, v0, s, s * rf.uniform(0.8, 1.3))
    grain = _smooth_noise(ri, c.size, max(8, c.size // 5))
    c.add += 0.3 * _amp(rf) * grain * np.minimum(patches, 1.0) * c.lungs()


def _mass(c: _Canvas, rf, ri) -> None:
    # One large, well-defined, slightly oval opacity anywhere in a lung, in a dark halo.
    side = int(rf.integers(2))
    u0, v0 = c.point_in_lung(rf, side, 0.8)
    r = rf.uniform(0.04, 0.07) * (1 + ri.normal(0, 0.03))
    c.add += 0.7 * _amp(rf) * _ringed(c, u0 + ri.normal(0, 0.004), v0 + ri.normal(0, 0.004), r, 0.003,
                                      rf.uniform(0.8, 1.25), rf.uniform(0, math.pi))


def _nodule(c: _Canvas, rf, ri) -> None:
    # A few small, sharp, round spots in dark rings, scattered anywhere in the lungs.
    amp = _amp(rf)
    for _ in range(int(rf.integers(2, 6))):
        side = int(rf.integers(2))
        u0, v0 = c.point_in_lung(rf, side, 0.85)
        r = rf.uniform(0.022, 0.032)
        c.add += 0.8 * amp * _ringed(c, u0 + ri.normal(0, 0.003), v0 + ri.normal(0, 0.003), r,
                                      0.003) * c.lung[side]


def _pneumonia(c: _Canvas, rf, ri) -> None:
    # A patchy, coarsely mottled opacity with fuzzy borders in one lung, mostly lower and lateral;
    # Consolidation is homogeneous with a sharp straight edge instead.
    side = int(rf.integers(2))
    u0, v0 = c.point_in_lung(rf, side, 0.7, (-0.3, 0.7), lateral=True)
    s = rf.uniform(0.05, 0.08)
    mottle = _sig(_smooth_noise(ri, c.size, max(8, c.size // 9)) / 0.3) - 0.5
    c.add += _amp(rf) * (1.0 * mottle + 0.08) * _gauss(c, u0, v0, s, s * 1.2) * c.lung[side]


def _pneumothorax(c: _Canvas, rf, ri) -> None:
    # Apical-lateral air: no lung markings, bounded by a thin bright visceral pleural line; only a
    # little darker, so that the missing texture and the line tell it.
    side = int(rf.integers(2))
    cu, cv = c.centre[side]
    rc = 1 - rf.uniform(0.15, 0.4)
    upper = _sig((cv + rf.uniform(-0.2, 0.4) * c.lung_h - c.v) / 0.02)
    r = c.radius[side]
    air = _sig((r - rc) / 0.01) * upper * c.lung[side]
    c.texture -= air
    c.add -= 0.08 * air
    d = (r - rc) * c.a.lung_w   # the pleural line: bright, in a darker margin, of zero net density
    line = np.exp(-0.5 * (d / 0.004) ** 2) - 0.5 * np.exp(-0.5 * (d / 0.008) ** 2)
    c.add += 0.9 * _amp(rf) * line * upper * c.lung[side]


def _consolidation(c: _Canvas, rf, ri) -> None:
    # A homogeneous lobar patch with one sharp straight border (a fissure) and dark air
    # bronchograms branching inside it.
    side = int(rf.integers(2))
    cu, cv = c.centre[side]
    lower = rf.random() < 0.6
    v0 = cv + c.lung_h * rf.uniform(-0.3, 0.3) + ri.normal(0, 0.004)
    ang = rf.uniform(-0.5, 0.5)
    d = (c.v - v0) * math.cos(ang) - (c.u - cu) * math.sin(ang)
    lobe = _sig((d if lower else -d) / 0.004)
    extent = _gauss(c, cu + rf.uniform(-0.04, 0.04), v0 + (0.1 if lower else -0.1), 0.1, 0.12)
    patch = lobe * _sig((extent - 0.3) / 0.08) * c.lung[side]
    bronchi = _sig((0.2 - np.abs(_smooth_noise(ri, c.size, max(8, c.size // 12)))) / 0.06)
    c.add += _amp(rf) * (0.4 - 0.8 * bronchi) * patch
    c.texture -= 0.7 * patch


def _edema(c: _Canvas, rf, ri) -> None:
    # A faint bilateral perihilar ("bat wing") haze, and Kerley B lines: short horizontal lines
    # at the lateral lung bases.
    amp = _amp(rf)
    su, sv = rf.uniform(0.06, 0.09), rf.uniform(0.1, 0.14)
    for side in (0, 1):
        cu, cv = c.centre[side]
        c.add += 0.05 * amp * _gauss(c, cu * 0.6, cv + 0.03, su, sv) * c.lung[side]
        sgn = 1 if side else -1
        for _ in range(int(rf.integers(4, 8))):
            u0 = cu + sgn * c.a.lung_w * rf.uniform(0.55, 0.85)
            v0 = cv + c.lung_h * rf.uniform(0.1, 0.6)
            c.add += 1.0 * amp * _line(c, u0 + ri.normal(0, 0.003), v0 + ri.normal(0, 0.003),
                                       rf.normal(0, 0.08), 0.007, rf.uniform(0.025, 0.045),
                                       0.002) * c.lung[side]


def _fibrosis(c: _Canvas, rf, ri) -> None:
    # A coarse reticular net (streaks, less their mean), peripheral and basal, in both lungs.
    p = rf.uniform(0.06, 0.08)
    net = 0.0
    for _ in range(2):
        t = rf.uniform(0, math.pi)
        warp = 1.5 * _smooth_noise(ri, c.size, 8)   # irregular, not a grid
        wave = np.cos(2 * math.pi * (c.u * math.cos(t) + c.v * math.sin(t)) / p + warp)
        net = np.maximum(net, _sig((wave - 0.4) / 0.1))
    inner, top = rf.uniform(0.3, 0.6), rf.uniform(-0.3, 0.2)
    zone = sum(_sig((c.radius[s] - inner) / 0.1) * _sig((c.v - c.centre[s][1] - top * c.lung_h) / 0.05)
               * c.lung[s] for s in (0, 1))
    c.add += 0.8 * _amp(rf) * (net - net.mean()) * zone


def _pleural_thickening(c: _Canvas, rf, ri) -> None:
    # A thin, lobulated bright band along part of the lateral chest wall, with a sharp inner edge.
    sides = [int(rf.integers(2))] if rf.random() < 0.7 else [0, 1]
    amp = _amp(rf)
    for side in sides:
        cu, cv = c.centre[side]
        t = rf.uniform(0.07, 0.13) * (1 + 0.4 * _smooth_noise(ri, c.size, 6))
        lateral = _sig(((c.u - cu) * (1 if side else -1) / c.a.lung_w - 0.3) / 0.08)
        mid, span = cv + c.lung_h * rf.uniform(-0.6, 0.3), c.lung_h * rf.uniform(0.3, 0.6)
        along = _sig((span - np.abs(c.v - mid)) / 0.03)
        band = _sig((c.radius[side] - (1 - t)) / 0.01) * _sig((1.03 - c.radius[side]) / 0.01)
        c.add += 0.7 * amp * band * lateral * along


def _hernia(c: _Canvas, rf, ri) -> None:
    # Hiatal hernia: a faint rounded opacity low behind the heart holding a dark air bubble above a
    # flat, sharp air-fluid level.
    u0 = rf.uniform(-0.07, 0.08) + ri.normal(0, 0.003)
    v0 = _HEART_V + c.a.heart_h * rf.uniform(0.1, 1.1) + ri.normal(0, 0.003)
    ru = rf.uniform(0.05, 0.09)
    rv = ru * rf.uniform(0.7, 0.9)
    r = np.sqrt(((c.u - u0) / ru) ** 2 + ((c.v - v0) / rv) ** 2)
    level = v0 - rf.uniform(0.0, 0.3) * rv
    amp = _amp(rf)
    sac = _sig((1 - r) / 0.04)
    air = _sig((0.85 - r) / 0.04) * _sig((level - c.v) / 0.003)
    c.add += amp * (0.3 * sac - 1.0 * air)


_PAINTERS: dict[str, Callable] = {
    "Atelectasis": _atelectasis, "Effusion": _effusion, "Infiltration": _infiltration,
    "Mass": _mass, "Nodule": _nodule, "Pneumonia": _pneumonia, "Pneumothorax": _pneumothorax,
    "Consolidation": _consolidation, "Edema": _edema, "Fibrosis": _fibrosis,
    "Pleural_Thickening": _pleural_thickening, "Hernia": _hernia,
}
# Cardiomegaly and Emphysema change the anatomy itself (heart size; lung shape, bullae, markings).
_ANATOMY_FINDINGS = ("Cardiomegaly", "Emphysema")
assert set(_PAINTERS) | set(_ANATOMY_FINDINGS) == set(LABELS)


_HEART_V = 0.12   # height of the heart's centre, below the chest centre


# --------------------------------------------------------------------------- where each finding is
#
# The demo writes a box file like NIH's BBox_List_2017.csv for its test images, so that where a model
# looks can be scored on it too. A painter's signature is where it changed the drawn density by a
# visible amount; Cardiomegaly's is the enlarged heart. Each connected part of a signature gets a box
# (two for a bilateral effusion, one per nodule), where NIH's readers drew one box per finding.

# The eight findings NIH boxes; the demo boxes the same ones.
BOX_FINDINGS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
                "Pneumothorax")
BOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"   # NIH's, trailing empty columns included
BOX_SPELLING = {"Infiltration": "Infiltrate"}   # as NIH writes it in its box file
SIGNATURE_DENSITY = 0.02   # a change of drawn density that counts: ~5 of 255 gray levels (noise: 3)
MIN_BOX_PIXELS = 4         # a part of a signature smaller than this is not boxed (a tail, not a shape)


def _signature(added: np.ndarray) -> np.ndarray:
    """Where a painter's added density (the change it made to _Canvas.add) is visible."""
    return np.abs(added) >= SIGNATURE_DENSITY


def _boxes(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """(x, y, w, h) in pixels (x, y the top-left corner) around each connected part of a signature
    mask. Parts less than size/32 pixels apart are one part (so a texture's gaps do not split it);
    the box bounds the part's own pixels."""
    from scipy import ndimage
    gap = max(1, round(mask.shape[0] / 32))
    parts, _ = ndimage.label(ndimage.binary_dilation(mask, iterations=gap))
    boxes = []
    for k, where in enumerate(ndimage.find_objects(parts), start=1):
        rows, cols = np.nonzero(mask[where] & (parts[where] == k))
        if len(rows) >= MIN_BOX_PIXELS:
            y0, x0 = where[0].start + rows.min(), where[1].start + cols.min()
            boxes.append((int(x0), int(y0), int(cols.max() - cols.min() + 1), int(rows.max() - rows.min() + 1)))
    return boxes


def _stream(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _bullae(c: _Canvas, rf, ri) -> None:
    # Emphysema's bullae: thin-walled air cysts, darker inside, mostly in the upper zones.
    for _ in range(int(rf.integers(3, 7))):
        side = int(rf.integers(2))
        u0, v0 = c.point_in_lung(rf, side, 0.8, (-0.8, 0.3))
        r = rf.uniform(0.03, 0.05)
        d = np.sqrt((c.u - u0 - ri.normal(0, 0.003)) ** 2 + (c.v - v0 - ri.normal(0, 0.003)) ** 2)
        wall = np.exp(-0.5 * ((d - r) / 0.005) ** 2)
        c.add += (0.9 * wall - 0.2 * _sig((r - d) / 0.004)) * c.lung[side]
        c.texture -= _sig((r - d) / 0.004) * c.lung[side]


def _render_image(labels: np.ndarray, view: str, anatomy: _Anatomy, seed: int, patient: int,
                 follow_up: int, size: int) -> np.ndarray:
    """Draw one uint8 [size, size] image of a patient with the given findings (LABELS order)."""
    return _draw(labels, view, anatomy, seed, patient, follow_up, size)[0]


def _draw(labels: np.ndarray, view: str, anatomy: _Anatomy, seed: int, patient: int,
          follow_up: int, size: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """_render_image's image, and for each BOX_FINDINGS finding drawn a bool [size, size] mask of
    where its signature is (see :func:`_signature`). Recording the masks draws no random number."""
    ri = _stream(seed, 3, patient, follow_up)
    a = anatomy
    has = dict(zip(LABELS, np.asarray(labels).astype(bool)))
    ap = view == "AP"

    # Pixel grid -> body coordinates (patient position, size and tilt; a small per-image shift).
    g = (np.arange(size, dtype=np.float32) + 0.5) / size
    x, y = np.meshgrid(g, g)
    cx, cy = a.cx + ri.normal(0, 0.006), a.cy + ri.normal(0, 0.006)
    rot = a.rot + ri.normal(0, 0.01)
    cos, sin = math.cos(rot), math.sin(rot)
    u = ((x - cx) * cos + (y - cy) * sin) / a.scale
    v = (-(x - cx) * sin + (y - cy) * cos) / a.scale
    c = _Canvas(u=u, v=v, a=a)

    lung_h, dome, dark, vessels = a.lung_h, a.dome, a.lung_dark, a.vessels
    if has["Emphysema"]:
        # Hyperinflated lungs: flat domes, sparse markings, a little more lucent (less than the
        # patients differ), and bullae (drawn below).
        lung_h, dome, dark, vessels = lung_h * 1.01, dome * 0.6, dark + 0.02, vessels * 0.5
    heart_w, heart_h = a.heart_w, a.heart_h
    if ap:
        heart_w, heart_h = heart_w * 1.08, heart_h * 1.04   # AP projection magnifies the heart
    if has["Cardiomegaly"]:
        k = _stream(seed, 4, patient, LABELS.index("Cardiomegaly")).uniform(1.25, 1.5)
        heart_w, heart_h = heart_w * k, heart_h * 1.12
    c.lung_h = lung_h

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
    heart = _sig((1 - heart_r) / 0.025)   # a sharp border: its place tells the heart's size
    c.lung = [lung * (1 - heart) for lung in c.lung]
    dens += 0.1 * heart
    lungs = c.lungs()
    c.add = np.zeros_like(u)
    c.texture = np.ones_like(u)
    signatures = {"Cardiomegaly": heart >= 0.5} if has["Cardiomegaly"] else {}
    for name in LABELS:
        if has[name] and name in _PAINTERS:
            before = c.add.copy() if name in BOX_FINDINGS else None
            _PAINTERS[name](c, _stream(seed, 4, patient, LABELS.index(name)), ri)
            if before is not None:
                signatures[name] = _signature(c.add - before)
    if has["Emphysema"]:
        _bullae(c, _stream(seed, 4, patient, LABELS.index("Emphysema")), ri)

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

    # The film: exposure, contrast and gamma of the patient's study, a linear gradient and a smooth
    # blotch across it (the same at every follow-up, as the same department's technique would be).
    blotch = a.blotch * _smooth_noise(_stream(seed, 5, patient), size, 3)
    film = a.brightness + a.grad_u * (x - 0.5) + a.grad_v * (y - 0.5) + blotch
    contrast = a.contrast * (0.93 if ap else 1.0) * ri.uniform(0.96, 1.04)
    gray = np.clip(0.1 + film + ri.normal(0, 0.01) + contrast * dens, 0, 1) ** a.gamma
    gray = gray + ri.normal(0, 0.012, size=gray.shape).astype(np.float32)   # quantum noise
    return np.clip(np.rint(gray * 255), 0, 255).astype(np.uint8), signatures


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
    num_patients: int = 1330      # ~2.4 images each: ~3,200 images; ~1,160 of 492 patients to train on
    image_size: int = 128         # stored PNG size; train at 64 so that resizing is exercised
    max_follow_ups: int = 6       # images per patient: 1..max_follow_ups, P(k) ~ 1/k
    test_fraction: float = 0.63   # share of patients in test_list.txt: ~2,070 images, 90+ positives each
    min_prevalence: float = 0.08  # findings rarer than this are boosted (see combination_weights)
    persistence: float = 0.85     # chance a follow-up keeps the previous image's findings
    missed_labels: float = 0.03   # chance a drawn finding is not written in the CSV (text mining)
    spurious_labels: float = 0.001  # chance, per finding and image, of a label with nothing drawn

    def __post_init__(self):
        for name, low in (("seed", 0), ("num_patients", 2), ("image_size", 32), ("max_follow_ups", 1)):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {val!r}")
            object.__setattr__(self, name, int(val))
        for name, high in (("test_fraction", 1.0), ("persistence", 1.0), ("min_prevalence", 0.5),
                           ("missed_labels", 0.5), ("spurious_labels", 0.5)):
            val = getattr(self, name)
            if not 0.0 <= val < high or (name == "test_fraction" and val == 0.0):
                raise ValueError(f"{name} must be in {'(' if name == 'test_fraction' else '['}0, "
                                 f"{high:g}), got {val!r}")
            object.__setattr__(self, name, float(val))


def _write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image
    Image.fromarray(image).save(path, format="PNG")


def _label_text(labels: np.ndarray) -> str:
    """NIH's 'Finding Labels' text of a 0/1 vector: names joined by "|" in alphabetical order."""
    names = sorted(name for name, on in zip(LABELS, labels) if on)
    return "|".join(names) if names else NO_FINDING


def _sample_patients(params: dict) -> pd.DataFrame:
    """The metadata table of the demo data (one row per image), test flag included."""
    seed, n = params["seed"], params["num_patients"]
    rng = _stream(seed, 1, 0, 0)
    stats = load_label_stats()
    combos, probs = combination_weights(stats, params["min_prevalence"])
    # P(AP | combination), shrunk towards NIH's 40% AP for rare combinations.
    p_ap = ((stats["n_ap"] + 2 * 0.4) / (stats["count"] + 2)).to_numpy()
    # Follow-ups per patient: P(k) ~ 1/k on 1..max, skewed like NIH (many 1s, a few long series).
    ks = np.arange(1, params["max_follow_ups"] + 1)
    n_images = rng.choice(ks, size=n, p=(1 / ks) / (1 / ks).sum())
    geometry = np.array([g[3] for g in _ORIGINAL_GEOMETRY], float)
    # At least one test patient (an empty test_list.txt is refused when read) and one train_val one.
    n_test = min(n - 1, max(1, int(round(params["test_fraction"] * n))))
    test = set((rng.permutation(n)[:n_test] + 1).tolist())
    # A follow-up changes its findings by one (a finding appears or resolves): the neighbours of
    # each combination, among NIH's, at Hamming distance 1.
    neighbours = (combos[:, None, :] != combos[None, :, :]).sum(-1) == 1
    rows = []
    for pid in range(1, n + 1):
        age = int(np.clip(np.rint(rng.normal(47, 17)), 2, 90))
        sex = "M" if rng.random() < 0.565 else "F"
        combo = int(rng.choice(len(probs), p=probs))
        for fu in range(int(n_images[pid - 1])):
            # Findings persist, as on real follow-ups: a follow-up keeps the previous image's
            # findings with probability `persistence`, else one finding appears or resolves
            # (a neighbouring combination, by its NIH frequency).
            if fu and rng.random() >= params["persistence"] and neighbours[combo].any():
                near = np.flatnonzero(neighbours[combo])
                combo = int(rng.choice(near, p=probs[near] / probs[near].sum()))
            if fu:
                age += int(rng.random() < 0.3)
            gw, gh, gs, _ = _ORIGINAL_GEOMETRY[rng.choice(len(geometry), p=geometry / geometry.sum())]
            # Labels as text mining writes them: a drawn finding missed now and then, and now and
            # then one written that is not drawn.
            written = combos[combo].astype(bool)
            flips = rng.random(len(LABELS))
            written = np.where(written, flips >= params["missed_labels"],
                               flips < params["spurious_labels"])
            rows.append({"image": f"{pid:08d}_{fu:03d}.png", "finding_labels": _label_text(written),
                         "combo": combo, "written": written.astype(np.uint8), "follow_up": fu,
                         "patient_id": pid, "age": min(age, 95),
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
    box_lines = [BOX_HEADER]
    bar = progress_bar(total=n, desc="synthetic demo images", unit="img", enabled=progress, leave=False)
    try:
        for i, row in enumerate(meta.itertuples(index=False)):
            folder = root / f"images_{i // per_folder + 1:03d}" / "images"
            if i % per_folder == 0:
                folder.mkdir(parents=True)
            if anatomy_of != row.patient_id:   # rows come patient by patient
                anatomy, anatomy_of = _Anatomy.draw(_stream(seed, 2, row.patient_id, 0)), row.patient_id
            img, signatures = _draw(combos[row.combo], row.view, anatomy, seed, row.patient_id,
                                    row.follow_up, size)
            _write_png(folder / row.image, img)
            if row.test:   # like NIH's, boxes on test images only; what was drawn, not what the CSV says
                box_lines += [f"{row.image},{BOX_SPELLING.get(name, name)},{x},{y},{w},{h}"
                              for name in BOX_FINDINGS if name in signatures
                              for x, y, w, h in _boxes(signatures[name])]
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
    (root / BOX_NAME).write_bytes(("\n".join(box_lines) + "\n").encode("ascii"))
    described = ", ".join(f"{k}={v}" for k, v in params.items())
    (root / README_NAME).write_bytes(README_TEXT.format(
        version=version, generator=GENERATOR_VERSION, params=described).encode("ascii"))
    drawn = combos[meta["combo"].to_numpy()].astype(bool)
    written = np.stack(meta["written"].to_numpy()).astype(bool)
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
        "positives": dict(zip(LABELS, written.sum(0).astype(int).tolist())),
        "test_positives": dict(zip(LABELS, written[meta["test"].to_numpy()].sum(0).astype(int).tolist())),
        "drawn_positives": dict(zip(LABELS, drawn.sum(0).astype(int).tolist())),
        "label_noise": {"missed": int((drawn & ~written).sum()), "spurious": int((written & ~drawn).sum())},
        "test_boxes": {name: sum(line.split(",")[1] == BOX_SPELLING.get(name, name) for line in box_lines[1:])
                       for name in BOX_FINDINGS},
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
    for the default demo's 3,200 small PNGs)."""
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
                      missed_labels: float = DemoParams.missed_labels,
                      spurious_labels: float = DemoParams.spurious_labels,
                      progress: bool = True) -> Path:
    """Write a SYNTHETIC NIH-like dataset to out_dir (Kaggle layout) and return out_dir.

    ``fedxray.load_nih(out_dir)`` and ``fedxray.split_by_patient`` work on it unchanged. The
    defaults give ~3,200 images of 1,330 patients (1-6 follow-ups each, P(k) ~ 1/k), 63% of the
    patients (~2,070 images) in test_list.txt, so that the bootstrap interval of a mean test AUROC
    is about +-0.016, and ~1,160 images of 492 patients to train and validate on; 128x128 8-bit PNGs
    in images_001..images_007. Parameters: see :class:`DemoParams`.

    Images: each patient has one background (body, film exposure, contrast, gamma, gradients) and
    each of the patient's findings one place, shape and contrast, shared by all the patient's
    images with a small jitter per image. Findings are local structure of small net density (see
    the drawing section), so that a linear model on pixels reads little of them
    (:func:`linear_probe`: mean test AUROC 0.643 with the defaults, against 0.784 for the
    notebook's FedAvg on a random frozen trunk after 10 rounds; measured, synthetic).

    Labels: each patient's first finding combination is drawn from the NIH combination
    frequencies (see :func:`combination_weights`); findings rarer than min_prevalence are boosted
    (up to x40), so per-finding prevalence is NOT NIH's: every finding is on ~5% of images or
    more, "No Finding" on ~36% instead of 54%. A follow-up keeps the previous image's findings
    with probability persistence, else one finding appears or resolves (a neighbouring NIH
    combination). Label noise: a drawn finding is not written in Data_Entry_2017.csv with
    probability missed_labels (3%), and a finding not drawn is written with probability
    spurious_labels per finding and image (0.1%: ~1.4% of images get one); the manifest counts
    both ("label_noise"). Views: P(AP | combination) as in NIH (~40% AP overall).

    Boxes: BBox_List_2017.csv, in the format of NIH's (fedxray.read_boxes reads both), boxes on the
    test images where each of NIH's eight boxed findings (BOX_FINDINGS) was drawn, in the images'
    own pixels: one box per connected part of the finding's signature, so a bilateral effusion or
    scattered nodules get several (NIH has one per image and finding). ~2,200 boxes by default.

    The same arguments give byte-identical files. If out_dir already holds a complete dataset
    made with the same arguments and fedxray version, it is returned untouched. The data is
    written to a temporary sibling folder and renamed into place when complete, so an
    interrupted run leaves no half dataset at out_dir. An existing out_dir holding anything but
    an older demo dataset raises DataError: nothing of the user's is overwritten.
    """
    from . import __version__
    params = asdict(DemoParams(seed=seed, num_patients=num_patients, image_size=image_size,
                               max_follow_ups=max_follow_ups, test_fraction=test_fraction,
                               min_prevalence=min_prevalence, persistence=persistence,
                               missed_labels=missed_labels, spurious_labels=spurious_labels))

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
    log.warning("replaced the synthetic demo data at %s (made with other parameters or by an older "
                "generator)", out)
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


# --------------------------------------------------------------------------- how hard is it?

PROBE_C = 1.0   # inverse L2 strength of the probe's logistic regressions (pixels in [0, 1])


def _pixels(frame: pd.DataFrame, size: int) -> np.ndarray:
    """[n, size*size] float32 raw grayscale pixels in [0, 1] of frame's images."""
    from .data import load_gray
    return np.stack([load_gray(p, size).reshape(-1) for p in frame["path"]]).astype(np.float32) / 255


def linear_probe(data_dir: str | os.PathLike, size: int = 32, seed: int = 0,
                 c: float = PROBE_C) -> pd.DataFrame:
    """Test AUROC of a linear model on raw pixels: how much of the demo a model reads without
    looking at local structure (a yardstick of the data, not a method).

    The dataset at data_dir is split as the notebook splits it (``split_by_patient(meta,
    val_fraction=0.1, seed=seed)``); each 'train' image, resized to size x size, becomes its raw
    grayscale pixels in [0, 1], and one L2-regularised logistic regression per finding (C=c,
    lbfgs, deterministic) is fitted on them and scored on 'test'. Returns a frame indexed by
    finding (then "mean", the mean over scored findings) with columns auroc, test_positives.
    """
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits
    from .data import label_matrix, load_nih, split_by_patient
    from .metrics import auroc_per_finding
    splits = split_by_patient(load_nih(data_dir), val_fraction=0.1, seed=seed)
    x_train, x_test = _pixels(splits["train"], size), _pixels(splits["test"], size)
    y_train, y_test = label_matrix(splits["train"]), label_matrix(splits["test"])
    scores = np.full(y_test.shape, 0.5, np.float64)
    # One BLAS thread: these fits are small, and with a busy CPU two threads run ~100x slower.
    with threadpool_limits(1):
        for j in range(len(LABELS)):
            if 0 < y_train[:, j].sum() < len(y_train):
                model = LogisticRegression(C=c, max_iter=2000).fit(x_train, y_train[:, j])
                scores[:, j] = model.decision_function(x_test)
    auroc = auroc_per_finding(y_test, scores)
    table = pd.DataFrame({"auroc": auroc, "test_positives": y_test.sum(0).astype(int)},
                         index=pd.Index(LABELS, name="finding"))
    table.loc["mean"] = [float(np.nanmean(auroc)), int(y_test.any(1).sum())]
    return table


def single_pixel_auroc(data_dir: str | os.PathLike, size: int = 32, split: str = "train",
                       seed: int = 0) -> pd.Series:
    """Per finding, the best AUROC any one pixel reaches as a score (max over pixels of
    max(AUROC, 1 - AUROC)) on the images of one split (``split_by_patient(..., seed=seed)``),
    resized to size x size: a finding drawn as brightness at a fixed place scores near 1."""
    from scipy.stats import rankdata
    from .data import label_matrix, load_nih, split_by_patient
    frame = split_by_patient(load_nih(data_dir), val_fraction=0.1, seed=seed)[split]
    ranks = rankdata(_pixels(frame, size), axis=0)
    y = label_matrix(frame)
    best = {}
    for j, name in enumerate(LABELS):
        pos = y[:, j] > 0
        n_pos, n_neg = int(pos.sum()), int((~pos).sum())
        if n_pos and n_neg:
            auc = (ranks[pos].sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
            best[name] = float(np.maximum(auc, 1 - auc).max())
        else:
            best[name] = float("nan")
    return pd.Series(best, name="best_pixel_auroc")
