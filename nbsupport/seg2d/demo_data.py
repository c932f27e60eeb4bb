"""A synthetic UW-Madison GI tract dataset in the Kaggle layout, so the same code path runs without the real data.

:func:`write_demo_dataset` writes ``train.csv`` and ``train/case{N}/case{N}_day{D}/scans/*.png`` exactly as
:mod:`nbsupport.seg2d.data` reads them (see its layout notes): 16-bit axial abdominal MRI slices of several Kaggle
sizes, with the three organs as row-major RLE. ``nbsupport demo-data seg2d`` calls it with ``DEMO_SIZES``.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np
import pandas as pd

from nbsupport.demo import finish_demo_folder, start_demo_folder
from nbsupport.paths import resolve_path
from nbsupport.progress import progress
from nbsupport.runs import atomic_path
from nbsupport.seg2d.data import CLASSES, TRAIN_CSV_COLUMNS
from nbsupport.seg2d.rle import rle_encode

# (width, height, pixel spacing in mm) of the Kaggle scans; demo case k uses entry k % 4.
DEMO_SCAN_SIZES = ((266, 266, 1.50), (360, 310, 1.50), (234, 234, 1.50), (276, 276, 1.63))
# write_demo_dataset arguments per ``nbsupport demo-data --size``: smoke has enough cases for train/val/test splits.
DEMO_SIZES = {
    "smoke": {"n_cases": 6, "days_per_case": 1, "slices_per_day": 16},
    "demo": {"n_cases": 16, "days_per_case": 2, "slices_per_day": 24},
}
# The generator's name in the demo marker. It is the name from before the generator moved out of data.py, so that
# demo folders written since keep being reused rather than rewritten (the output is byte-identical).
GENERATOR = "nbsupport.seg2d.data.write_demo_dataset"

# Relative intensities (scaled by a per-scan gain into ~0..15000): bright things that are not organs (fat,
# spinal fluid) exist so a threshold alone cannot segment.
_FAT, _MUSCLE, _VISCERA, _LIVER, _KIDNEY = 7600.0, 2600.0, 4300.0, 3300.0, 5600.0
_MARROW, _CORTEX, _CSF = 4800.0, 1200.0, 10500.0
_STOMACH_FLUID, _STOMACH_AIR, _STOMACH_WALL = 11000.0, 700.0, 5200.0
_COLON_WALL, _COLON_CONTENT = 8800.0, 2600.0
_SMALL_BOWEL_LUMEN, _SMALL_BOWEL_WALL = 9200.0, 6200.0


def write_demo_dataset(
    root: str | os.PathLike,
    n_cases: int = 16,
    days_per_case: int = 2,
    slices_per_day: int = 24,
    seed: int = 0,
) -> Path:
    """Write a synthetic UW-Madison-style dataset (Kaggle layout and formats) under ``root``; returns ``root``.

    Cases cycle through the Kaggle sizes ``DEMO_SCAN_SIZES`` (including the non-square 360x310), so two or more cases
    give non-square slices. Slices show an abdomen (fat rim, muscle, liver, kidneys, spine) with the three organs
    visible and changing smoothly along the slice axis; first and last slices of a scan have no organs; stomach
    and large bowel overlap in mid slices. Deterministic given ``seed``.

    ``train.csv`` is written last (atomically), so a root without it is an interrupted run. A complete demo with
    the same arguments is reused as is; a demo written with other arguments (recognised by its marker, see
    :mod:`nbsupport.demo`) is replaced; a non-empty folder that is not a demo is an error.

    Defaults (16 cases x 2 days x 24 slices = 768 slices) suit the ``demo`` profile.
    """
    if min(n_cases, days_per_case, slices_per_day) < 1:
        raise ValueError(f"n_cases, days_per_case and slices_per_day must be >= 1, got {n_cases}, {days_per_case}, "
                         f"{slices_per_day}")
    root = resolve_path(root)
    params = {"n_cases": n_cases, "days_per_case": days_per_case, "slices_per_day": slices_per_day, "seed": seed,
              "generator": GENERATOR, "format_version": 1}
    if start_demo_folder(root, params, required=("train.csv",)):
        return root
    cases, scans = _demo_scans(n_cases, days_per_case, seed)
    rows: list[tuple[str, str, str]] = []
    total = len(scans) * slices_per_day
    bar = progress(range(total), desc="writing demo slices", total=total)
    for k, case, day in scans:
        rows += _write_demo_scan(root, k, case, day, slices_per_day, seed, bar)
    bar.close()
    with atomic_path(root / "train.csv") as tmp:
        pd.DataFrame(rows, columns=list(TRAIN_CSV_COLUMNS)).to_csv(tmp, index=False, lineterminator="\n")
    finish_demo_folder(root, params, n_slices=total, cases=cases)
    return root


def _demo_scans(n_cases: int, days_per_case: int, seed: int) -> tuple[list[int], list[tuple[int, int, int]]]:
    """The case numbers (sorted, from 1..156 like Kaggle's) and one (k, case, day) per scan, k the case's index."""
    case_rng = np.random.default_rng([seed, 7919])
    cases = sorted(case_rng.choice(np.arange(1, max(157, n_cases + 1)), size=n_cases, replace=False).tolist())
    scans = []
    for k, case in enumerate(cases):
        days = sorted(np.random.default_rng([seed, case, 104729]).choice(np.arange(0, 40), size=days_per_case,
                                                                          replace=False).tolist())
        scans += [(k, case, day) for day in days]
    return cases, scans


def _write_demo_scan(root: Path, k: int, case: int, day: int, slices_per_day: int, seed: int,
                     bar: Any) -> list[tuple[str, str, str]]:
    """Write one scan's slice PNGs; return its train.csv rows (id, class, RLE), three per slice."""
    width, height, spacing = DEMO_SCAN_SIZES[k % len(DEMO_SCAN_SIZES)]
    anatomy = _demo_anatomy(seed, case, day)
    folder = root / "train" / f"case{case}" / f"case{case}_day{day}" / "scans"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in range(1, slices_per_day + 1):
        t = (s - 1) / max(slices_per_day - 1, 1)
        image, masks = _render_demo_slice(anatomy, t, width, height, spacing,
                                          np.random.default_rng([seed, case, day, s]))
        name = f"slice_{s:04d}_{width}_{height}_{spacing:.2f}_{spacing:.2f}.png"
        ok, encoded = cv2.imencode(".png", image)
        if not ok:
            raise OSError(f"could not encode {folder / name}")
        encoded.tofile(folder / name)
        slice_id = f"case{case}_day{day}_slice_{s:04d}"
        rows += [(slice_id, organ, rle_encode(mask)) for organ, mask in zip(CLASSES, masks)]
        bar.update(1)
    return rows


# ---------------------------------------------------------------------------------------------- anatomy
def _window(t: float, start: float, stop: float) -> float:
    """Size factor in [0, 1] of a structure that exists for t in (start, stop): 0 at the ends, 1 in the middle."""
    if not start < t < stop:
        return 0.0
    return float(np.sqrt(np.sin(np.pi * (t - start) / (stop - start))))


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-ish float32 texture (H, W) with about ``cells`` blobs across the image."""
    longest = max(height, width)
    coarse = rng.standard_normal((max(2, cells * height // longest), max(2, cells * width // longest)))
    return cv2.resize(coarse.astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC)


def _demo_anatomy(seed: int, case: int, day: int) -> dict[str, Any]:
    """Per case-day geometry in mm (body semi-axes, organ placements); days of a case differ by a few mm."""
    case_rng = np.random.default_rng([seed, case])
    day_rng = np.random.default_rng([seed, case, day])
    a, b = case_rng.uniform(135, 165), case_rng.uniform(100, 120)
    loops = []
    for _ in range(int(case_rng.integers(10, 16))):
        radius, angle = 0.45 * np.sqrt(case_rng.uniform()), case_rng.uniform(-np.pi, np.pi)
        start = case_rng.uniform(0.28, 0.55)
        loops.append({
            "u": 0.08 + radius * np.cos(angle), "v": 0.12 + 0.8 * radius * np.sin(angle),  # central, below the stomach
            "r": case_rng.uniform(9.0, 15.0), "start": start, "stop": min(0.93, start + case_rng.uniform(0.3, 0.5)),
            "phase": case_rng.uniform(0, 2 * np.pi), "freq": case_rng.uniform(0.5, 1.5),
            "lumen": case_rng.uniform(0.55, 1.05),  # collapsed loops are darker than fluid-filled ones
        })
    return {
        "a": a, "b": b,
        "shift": day_rng.normal(0, 4.0, size=2),  # mm; breathing / positioning between days
        "gain": day_rng.uniform(0.85, 1.1),
        "fat": case_rng.uniform(10, 20), "muscle": case_rng.uniform(6, 10),
        "stomach": {"u": -0.38 + day_rng.normal(0, 0.02), "v": -0.30 + day_rng.normal(0, 0.02),
                    "sa": case_rng.uniform(0.33, 0.40), "sb": case_rng.uniform(0.32, 0.40),
                    "angle": case_rng.uniform(-0.5, 0.5), "phase": case_rng.uniform(0, 2 * np.pi),
                    "start": case_rng.uniform(0.06, 0.12), "stop": case_rng.uniform(0.52, 0.6)},
        "colon": {"scale": case_rng.uniform(0.72, 0.78), "radius": case_rng.uniform(10, 13),
                  "phase": case_rng.uniform(0, 2 * np.pi), "haustra": float(case_rng.integers(6, 10))},
        "loops": loops,
        "bias": day_rng.normal(0, 0.12, size=4),
        "bias_drift": day_rng.normal(0, 0.08, size=4),
    }


# ---------------------------------------------------------------------------------------------- one slice
class _Section(NamedTuple):
    """Where one slice cuts the body: pixel coordinates in mm, the (tapered) body semi-axes, the position t."""

    x: np.ndarray  # (1, W) mm, left to right
    y: np.ndarray  # (H, 1) mm, top to bottom
    a: float
    b: float
    t: float

    @property
    def shape(self) -> tuple[int, int]:
        return self.y.shape[0], self.x.shape[1]


def _render_demo_slice(anatomy: Mapping[str, Any], t: float, width: int, height: int, spacing: float,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic axial abdominal MRI slice at position t in [0, 1] (top to bottom of the scan).

    Returns uint16 (H, W) image and bool (3, H, W) masks (``CLASSES`` order). Image left is the patient's left
    here (stomach upper left). Everything is computed in mm so organs keep their size across pixel spacings.
    The steps below draw from ``rng`` in a fixed order (body texture, colon content, stomach fluid, noise).
    """
    x = ((np.arange(width, dtype=np.float32) - (width - 1) / 2) * spacing - anatomy["shift"][0])[None, :]
    y = ((np.arange(height, dtype=np.float32) - (height - 1) / 2) * spacing - anatomy["shift"][1])[:, None]
    taper = 0.9 + 0.1 * np.sin(np.pi * t)
    section = _Section(x, y, anatomy["a"] * taper, anatomy["b"] * taper, t)
    img, body, cavity = _draw_body(anatomy, section, rng)
    masks = np.zeros((3, height, width), dtype=bool)
    img = _draw_large_bowel(img, masks, anatomy["colon"], section, body, rng)
    img = _draw_small_bowel(img, masks, anatomy["loops"], section, cavity)
    img = _draw_stomach(img, masks, anatomy["stomach"], section, body, rng)
    return _mri_look(img, anatomy, section, spacing, rng), masks


def _draw_body(anatomy: Mapping[str, Any], s: _Section, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Fat rim, muscle, textured viscera, liver, kidneys and spine; returns the image, the body and the cavity."""
    x, y, a, b, t = s
    height, width = s.shape
    u, v = x / a, y / b
    r = np.sqrt(u * u + v * v)
    # approximate distance to the body surface in mm: (1 - r) / |grad r|
    depth = (1 - r) * r / np.maximum(np.sqrt((u / a) ** 2 + (v / b) ** 2), 1e-6)
    body = r < 1
    cavity = depth > anatomy["fat"] + anatomy["muscle"]

    img = np.zeros((height, width), dtype=np.float32)
    img[body] = _FAT
    img[body & (depth > anatomy["fat"])] = _MUSCLE
    viscera = _VISCERA * (1 + 0.15 * _smooth_noise(rng, height, width, 12))
    img = np.where(cavity, viscera, img)

    liver = _window(t, -0.2, 0.55)
    if liver:
        inside = ((u - 0.42) / (0.42 * liver)) ** 2 + ((v + 0.15) / (0.55 * liver)) ** 2 < 1
        img[inside & cavity] = _LIVER
    kidneys = _window(t, 0.3, 0.8)
    if kidneys:
        for side in (-1, 1):
            inside = ((u - side * 0.36) / (0.13 * kidneys)) ** 2 + ((v - 0.42) / (0.2 * kidneys)) ** 2 < 1
            img[inside & cavity] = _KIDNEY
    # spine: paraspinal muscles, vertebral body (cortex + marrow), spinal canal with bright fluid
    spine_y = 0.5 * b
    for side in (-1, 1):
        img[((x - side * 30) / 22) ** 2 + ((y - spine_y - 28) / 15) ** 2 < 1] = _MUSCLE
    vertebra = np.sqrt(x * x + (y - spine_y) ** 2)
    img[vertebra < 17] = _CORTEX
    img[vertebra < 14] = _MARROW
    img[np.sqrt(x * x + (y - spine_y - 25) ** 2) < 6.5] = _CSF
    return img, body, cavity


def _draw_large_bowel(img: np.ndarray, masks: np.ndarray, colon: Mapping[str, Any], s: _Section, body: np.ndarray,
                      rng: np.random.Generator) -> np.ndarray:
    """A tube around the periphery of the cavity (both sides always, transverse part only in upper slices), bright
    wall, dark mottled content, haustral bulges; sets ``masks[0]``."""
    x, y, a, b, t = s
    presence = _window(t, 0.18, 0.97)
    if not presence:
        return img
    ca, cb = a * colon["scale"], b * colon["scale"]
    uc, vc = x / ca, y / cb
    rc = np.sqrt(uc * uc + vc * vc)
    distance = np.abs(rc - 1) * rc / np.maximum(np.sqrt((uc / ca) ** 2 + (vc / cb) ** 2), 1e-6)
    phi = np.abs(np.arctan2(x, y))  # 0 = posterior (towards the spine), pi = anterior
    tube = colon["radius"] * (0.6 + 0.4 * presence) * (1 + 0.25 * np.sin(colon["haustra"] * phi + colon["phase"]))
    low = np.deg2rad(55 + 15 * np.sin(2 * np.pi * t + colon["phase"]))
    high = np.pi if _window(t, 0.22, 0.62) > 0.3 else np.deg2rad(140)
    large_bowel = (distance < tube) & (phi > low) & (phi < high) & body
    content = _COLON_CONTENT * (1 + 0.45 * _smooth_noise(rng, *s.shape, 40))
    masks[0] = large_bowel
    return np.where(large_bowel, np.where(distance > tube - 3.0, _COLON_WALL, content), img)


def _draw_small_bowel(img: np.ndarray, masks: np.ndarray, loops: list[Mapping[str, Any]], s: _Section,
                      cavity: np.ndarray) -> np.ndarray:
    """A cluster of small fluid-filled loops in the centre, each drifting and appearing on its own; sets
    ``masks[1]``."""
    x, y, a, b, t = s
    for loop in loops:
        window = _window(t, loop["start"], loop["stop"])
        if window < 0.2:
            continue
        # a loop is a tube crossing the slice plane: it appears at (most of) its calibre, not as a growing speck
        size = 0.6 + 0.4 * window
        drift = 0.06 * np.sin(2 * np.pi * loop["freq"] * t + loop["phase"])
        cx, cy, radius = (loop["u"] + drift) * a, (loop["v"] - drift) * b, loop["r"] * size
        distance = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
        small_bowel = (distance < radius) & cavity
        lumen = _SMALL_BOWEL_LUMEN * loop["lumen"]
        img = np.where(small_bowel, np.where(distance > radius - 2.5, _SMALL_BOWEL_WALL, lumen), img)
        masks[1] |= small_bowel
    return img


def _draw_stomach(img: np.ndarray, masks: np.ndarray, stomach: Mapping[str, Any], s: _Section, body: np.ndarray,
                  rng: np.random.Generator) -> np.ndarray:
    """A large lobulated fluid-bright region at the upper left, with an air cap anteriorly; drawn last, so where
    it overlaps the large bowel both masks keep the pixels (as in the Kaggle labels); sets ``masks[2]``."""
    x, y, a, b, t = s
    size = _window(t, stomach["start"], stomach["stop"])
    if size <= 0.2:
        return img
    cos, sin = np.cos(stomach["angle"]), np.sin(stomach["angle"])
    dx, dy = x - stomach["u"] * a, y - stomach["v"] * b
    su = (cos * dx + sin * dy) / (stomach["sa"] * a * size)
    sv = (-sin * dx + cos * dy) / (stomach["sb"] * b * size)
    lobes = 1 + 0.12 * np.sin(3 * np.arctan2(sv, su) + stomach["phase"] + 2 * t)
    rs = np.sqrt(su * su + sv * sv) / lobes
    inside = (rs < 1) & body
    wall_depth = 4.0 / (stomach["sb"] * b * size)
    fluid = np.where(sv < -0.6, _STOMACH_AIR, _STOMACH_FLUID * (1 + 0.06 * _smooth_noise(rng, *s.shape, 20)))
    masks[2] = inside
    return np.where(inside, np.where(rs > 1 - wall_depth, _STOMACH_WALL, fluid), img)


def _mri_look(img: np.ndarray, anatomy: Mapping[str, Any], s: _Section, spacing: float,
              rng: np.random.Generator) -> np.ndarray:
    """Slight partial-volume blur, a smooth coil bias field and Rician noise; uint16 (H, W)."""
    height, width = s.shape
    img = cv2.GaussianBlur(img, (0, 0), 0.7)
    c = np.asarray(anatomy["bias"]) + np.asarray(anatomy["bias_drift"]) * s.t
    xn, yn = s.x / (width * spacing / 2), s.y / (height * spacing / 2)
    bias = 1 + c[0] * xn + c[1] * yn + c[2] * xn * yn - 0.15 * (xn * xn + yn * yn) + 0.1 * c[3]
    img *= anatomy["gain"] * np.clip(bias, 0.6, 1.4)
    sigma = 220.0
    noise = rng.standard_normal((2, height, width), dtype=np.float32) * sigma
    img = np.sqrt((img + noise[0]) ** 2 + noise[1] ** 2)
    return np.clip(img, 0, 65535).astype(np.uint16)
