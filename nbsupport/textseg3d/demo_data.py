"""The synthetic breast-RT dataset of the textseg3d demo: thorax CTs whose target only the report can tell.

``write_demo_dataset(root, ...)`` writes case folders in either layout :mod:`nbsupport.textseg3d.data` reads (the
seed's npz or the public code's NIfTI) and a report table in the public sample's vocabulary. Every case shows both
breasts; the report names the treated side, the surgery (whole breast vs chest wall) and the nodal stage (axilla or
not), so an image-only network cannot know which target to draw. ``nbsupport demo-data textseg3d`` calls it with
``DEMO_SIZES[size]``.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from nbsupport.demo import finish_demo_folder, start_demo_folder
from nbsupport.paths import resolve_path
from nbsupport.progress import progress
from nbsupport.runs import atomic_path
from nbsupport.textseg3d.data import LAYOUTS, REPORT_COLUMNS, from_canonical

# The name recorded in the demo folder's marker since the first release: kept, so existing demo folders are reused.
GENERATOR = "nbsupport.textseg3d.data.write_demo_dataset"
DEMO_SIZES = {
    "smoke": {"n_cases": 8, "shape": (32, 32, 64), "spacing": (8.0, 12.0, 6.0)},
    "demo": {"n_cases": 44, "shape": (32, 32, 64), "spacing": (8.0, 12.0, 6.0)},
}
_HU = {"air": -1000.0, "lung": -850.0, "fat": -100.0, "muscle": 45.0, "gland": 20.0, "heart": 40.0, "bone": 500.0,
       "node": 35.0}


@dataclasses.dataclass(frozen=True)
class DemoCase:
    """One synthetic patient's report facts (the image never shows the side, N stage or surgery)."""

    case: str
    side: str  # "left" / "right" / "both" (bilateral, excluded by the reader)
    n_stage: int  # 0: N0; >0: axillary nodes are part of the target
    t_stage: int
    surgery: str  # "bcs" or "mastectomy"


def demo_cases(n_cases: int, seed: int = 0) -> list[DemoCase]:
    """Balanced sides, N0/N+ and surgery types; one bilateral case (reported as excluded) when n_cases >= 6."""
    rng = np.random.default_rng([seed, 31])
    cases = []
    for i in range(n_cases):
        side = ("left", "right")[i % 2]
        cases.append(DemoCase(f"BC{i + 1:03d}", side, int(rng.integers(1, 3)) if (i // 2) % 2 else 0,
                              int(rng.integers(1, 4)), ("bcs", "mastectomy")[(i // 4) % 2]))
    if n_cases >= 6:
        cases.append(DemoCase(f"BC{n_cases + 1:03d}", "both", 0, 2, "bcs"))
    return cases


def _ellipsoid(grid: tuple[np.ndarray, ...], centre: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


def render_demo_case(case: DemoCase, shape: Sequence[int], spacing: Sequence[float], seed: int = 0
                     ) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic thorax CT (HU, int16) and its target mask (uint8), both (D, H, W) in IPL orientation.

    Anatomy in mm: body ellipse, two lungs, the heart shifted to the patient's left, spine, both breasts (always
    both, so the image cannot tell the treated side), pectoral muscle bands beneath them and axillary fat with
    small nodes. Target, from the report only: breast conserving surgery -> the whole breast of the named side;
    total mastectomy (the mound is still shown, as after an immediate reconstruction) -> the chest-wall band
    beneath it; N+ adds the axillary region of that side.
    """
    rng = np.random.default_rng([seed, int(case.case.lstrip("BC") or 0), 17])
    d, h, w = shape
    sd, sh, sw = spacing
    zz, yy, xx = np.meshgrid((np.arange(d) - (d - 1) / 2) * sd, (np.arange(h) - (h - 1) / 2) * sh,
                             (np.arange(w) - (w - 1) / 2) * sw, indexing="ij")
    # z grows towards the feet (I), y towards the back (P), x towards the patient's left (L)
    jitter = lambda s: float(rng.normal(1.0, s))
    fov_w, fov_h = w * sw, h * sh
    body_a, body_b = 0.36 * fov_w * jitter(0.04), 0.24 * fov_h * jitter(0.04)
    y_shift = 0.04 * fov_h
    image = np.full(shape, _HU["air"], dtype=np.float32)
    body = ((xx / body_a) ** 2 + ((yy - y_shift) / body_b) ** 2) <= 1.0
    chest_front = y_shift - body_b  # anterior chest wall (y of the body's front at x = 0)
    breasts, walls, axillae = {}, {}, {}
    for side, sign in (("right", -1.0), ("left", 1.0)):
        bx = sign * 0.45 * body_a * jitter(0.05)
        bz = 0.1 * d * sd * float(rng.normal(0, 0.3))
        radii = (0.22 * d * sd * jitter(0.05), 0.55 * body_b * jitter(0.06), 0.38 * body_a * jitter(0.05))
        front = chest_front + body_b * (1 - np.sqrt(max(0.0, 1 - (bx / body_a) ** 2)))
        # mound centred on the chest wall, kept anterior to it (y grows towards the back)
        breasts[side] = _ellipsoid((zz, yy, xx), (bz, front, bx), radii) & (yy < front + 0.1 * radii[1])
        wall_depth = 0.22 * body_b
        walls[side] = (_ellipsoid((zz, yy, xx), (bz, front + 0.1 * radii[1] + wall_depth / 2, bx),
                                  (radii[0] * 1.05, wall_depth / 2, radii[2] * 1.1)) & body & ~breasts[side])
        ax_centre = (bz - 0.55 * radii[0], front + 0.6 * body_b, sign * 0.88 * body_a)
        axillae[side] = _ellipsoid((zz, yy, xx), ax_centre, (0.2 * d * sd, 0.3 * body_b, 0.16 * body_a))
    body = body | breasts["left"] | breasts["right"] | axillae["left"] | axillae["right"]
    image[body] = _HU["fat"]
    inner = ((xx / (body_a * 0.82)) ** 2 + ((yy - y_shift) / (body_b * 0.8)) ** 2) <= 1.0
    image[inner] = _HU["muscle"]
    for side, sign in (("right", -1.0), ("left", 1.0)):
        lung = _ellipsoid((zz, yy, xx), (-0.05 * d * sd, y_shift + 0.05 * body_b, sign * 0.4 * body_a),
                          (0.6 * d * sd, 0.62 * body_b, 0.3 * body_a))
        image[lung & inner] = _HU["lung"]
        image[walls[side]] = _HU["muscle"]
        gland = breasts[side] & (rng.random(shape) < 0.35)
        image[breasts[side]] = _HU["fat"]
        image[gland] = _HU["gland"]
        nodes = axillae[side] & (rng.random(shape) < 0.08)
        image[nodes] = _HU["node"]
    heart = _ellipsoid((zz, yy, xx), (0.15 * d * sd, y_shift - 0.2 * body_b, 0.12 * body_a),
                       (0.3 * d * sd, 0.38 * body_b, 0.26 * body_a))
    image[heart] = _HU["heart"]
    spine = ((xx / (0.07 * body_a)) ** 2 + ((yy - y_shift - 0.7 * body_b) / (0.18 * body_b)) ** 2) <= 1.0
    image[spine] = _HU["bone"]
    image += rng.normal(0.0, 25.0, size=shape).astype(np.float32)
    image[~body] = _HU["air"] + rng.normal(0.0, 5.0, size=int((~body).sum())).astype(np.float32)
    target = np.zeros(shape, dtype=bool)
    if case.side in ("left", "right"):
        target |= breasts[case.side] if case.surgery == "bcs" else walls[case.side]
        if case.n_stage > 0:
            target |= axillae[case.side]
    return np.clip(image, -1024, 3071).astype(np.int16), target.astype(np.uint8)


def demo_report_row(number: int, case: DemoCase) -> dict[str, str]:
    """A report-table row in the public sample's vocabulary."""
    subsite = {"left": "Breast, Lt.", "right": "Breast, Rt.", "both": "Breast, Both"}[case.side]
    remark = "BCS" if case.surgery == "bcs" else "Total mastectomy"
    return {"Number": str(number), "Unit No": case.case, "Subsite 1": subsite, "Pathology": "IDC",
            "icT": f"T{case.t_stage}", "icN": f"N{case.n_stage}", "icM": "M0", "pT": f"T{case.t_stage}",
            "pN": f"N{case.n_stage}", "pM": "M0", "Stage": "II" if case.n_stage else "I",
            "Chemotherapy": "Yes" if case.n_stage else "No",
            "RT aim": f"Adjuvant RT ({'BCS' if case.surgery == 'bcs' else 'PMRT'})", "Remark": remark}


def write_demo_dataset(root: str | os.PathLike, n_cases: int = 44, shape: Sequence[int] = (32, 64, 64),
                       spacing: Sequence[float] = (8.0, 6.0, 6.0), layout: str = "npz", table: str = "xlsx",
                       seed: int = 0) -> Path:
    """Write a synthetic breast-RT dataset under ``root``: case folders in ``layout`` (``npz``: IPL arrays with
    ``spacing``; ``nifti``: RAS-ordered arrays with a diagonal affine) and ``demo_report.<table>``.

    A complete demo with the same arguments is reused; one with other arguments is replaced; a non-empty folder
    that is not a demo is an error. The report table is written last, so a root without it is incomplete.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
    if table not in ("xlsx", "csv"):
        raise ValueError(f"table must be 'xlsx' or 'csv', got {table!r}")
    shape, spacing = tuple(int(s) for s in shape), tuple(float(s) for s in spacing)
    root = resolve_path(root)
    params = {"n_cases": n_cases, "shape": list(shape), "spacing": list(spacing), "layout": layout, "table": table,
              "seed": seed, "generator": GENERATOR, "format_version": 1}
    report_path = root / f"demo_report.{table}"
    if start_demo_folder(root, params, required=[report_path.name]):
        return root
    cases = demo_cases(n_cases, seed)
    rows = []
    for number, case in enumerate(progress(cases, desc="writing demo volumes"), start=1):
        image, target = render_demo_case(case, shape, spacing, seed)
        write_case(root / case.case, image, target, spacing, layout)
        rows.append(demo_report_row(number, case))
    frame = pd.DataFrame(rows, columns=list(REPORT_COLUMNS))
    with atomic_path(report_path) as tmp:
        if table == "xlsx":
            frame.to_excel(tmp, index=False, engine="openpyxl")
        else:
            frame.to_csv(tmp, index=False, lineterminator="\n")
    finish_demo_folder(root, params, cases=[c.case for c in cases])
    return root


def write_case(folder: Path, image: np.ndarray, label: np.ndarray | None, spacing: Sequence[float],
               layout: str) -> None:
    """Write one case (IPL arrays) in ``layout``: npz with ``spacing``, or NIfTI in RAS order with its affine."""
    folder.mkdir(parents=True, exist_ok=True)
    data_name, label_name = LAYOUTS[layout]
    if layout == "npz":
        with atomic_path(folder / data_name) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, data=image, spacing=np.asarray(spacing, dtype=float))
        if label is not None:
            with atomic_path(folder / label_name) as tmp, open(tmp, "wb") as f:
                np.savez_compressed(f, label=label)
        return
    import nibabel as nib

    affine = np.diag([spacing[2], spacing[1], spacing[0], 1.0])  # RAS order: x (W), y (H), z (D)
    for name, arr in ((data_name, image), (label_name, label)):
        if arr is None:
            continue
        ras = from_canonical(arr, affine)
        with atomic_path(folder / name) as tmp:
            nib.save(nib.Nifti1Image(ras, affine), str(tmp) + ".nii.gz")
            os.replace(str(tmp) + ".nii.gz", tmp)
