"""A synthetic chest-CT dataset in the CT-RATE layout, for the demo and the tests (``nbsupport demo-data ct_clip``).

:func:`write_demo_dataset` writes synthetic chest CTs (HU, varied spacings and sizes, half stored L,P,S and half
R,A,S) with 8 of the 18 abnormalities drawn in, reports written from them (with negations) and the label CSV, laid
out as either CT-RATE release (the ``*_fixed`` re-release by default, or the first release), as
:mod:`nbsupport.ct_clip.data` reads them.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nbsupport.ct_clip.data import (LABEL_FILES, LABELS, METADATA_COLUMNS, METADATA_FILES, RELEASES, REPORT_COLUMNS,
                                    REPORT_FILES, volume_relative_path)
from nbsupport.demo import finish_demo_folder, start_demo_folder
from nbsupport.paths import resolve_path
from nbsupport.progress import progress
from nbsupport.runs import atomic_path

DEMO_SIZES = {
    "smoke": {"n_train_patients": 10, "n_valid_patients": 4, "scale": 0.35},
    "demo": {"n_train_patients": 150, "n_valid_patients": 70, "scale": 0.35},
}
DEMO_LABELS = ("Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
               "Emphysema", "Lung nodule", "Pleural effusion", "Consolidation")
_DEMO_PREVALENCE = {"Medical material": 0.25, "Arterial wall calcification": 0.35, "Cardiomegaly": 0.3,
                    "Pericardial effusion": 0.2, "Emphysema": 0.3, "Lung nodule": 0.35, "Pleural effusion": 0.3,
                    "Consolidation": 0.3}
# Native grids of the demo scans: (in-plane voxels, in-plane mm, slices, slice mm) at scale 1; `scale` shrinks
# the voxel counts (and grows the voxel size) so the same anatomy is drawn in fewer voxels.
_DEMO_GRIDS = ((512, 0.70, 240, 1.5), (512, 0.78, 200, 2.0), (448, 0.82, 150, 2.5), (384, 0.95, 120, 3.0))


def gzip_nifti(raw: bytes) -> bytes:
    """A ``.nii.gz`` file's bytes: ISA-L's igzip at level 2 when installed (~20x faster than zlib's level 6, files
    ~2 % larger: the demo volumes' noise does not compress; benchmarks/RESULTS.md, ct_clip issue 23), else zlib's
    level 1. Either is a standard gzip stream."""
    try:
        from isal import igzip
    except ImportError:
        return gzip.compress(raw, compresslevel=1)
    return igzip.compress(raw, compresslevel=2)


def _nodule_in_lung(case: dict[str, Any], rng: np.random.Generator) -> tuple[float, float, float, float]:
    """(x, y, z, radius) mm of a nodule that is drawn in aerated lung: within 60% of a lung's cross-section at its
    height and clear of the (enlarged) heart with its pericardium, a pleural effusion and a consolidation of the
    same case, where a 35 HU nodule would be invisible and its label and report sentence wrong (format 3 placed
    16% of the nodules there)."""
    a, b = case["body"]
    p = case["present"]
    hs = case["heart_scale"]
    for _ in range(100):
        z, r = rng.uniform(-80, 60), rng.uniform(9, 14)
        taper = min(max(1.0 - max(z, 0.0) / 170.0, 0.25), 1.0) * np.sqrt(1 - (z / 140) ** 2)
        angle, radius = rng.uniform(0, 2 * np.pi), 0.6 * np.sqrt(rng.uniform(0, 1))
        side = str(rng.choice(["right", "left"]))
        x = (1 if side == "right" else -1) * 0.47 * a + radius * np.cos(angle) * 0.38 * a * taper
        y = -5 + radius * np.sin(angle) * 0.75 * b * taper
        # the heart ellipsoid grown by the pericardial ring (x1.8 in squared radius) and the nodule's radius
        grow = np.sqrt(1.8)
        heart = (((x + 0.12 * a) / (48 * hs * grow + r)) ** 2 + ((y - 0.25 * b) / (40 * hs * grow + r)) ** 2
                 + ((z + 40) / (50 * hs * grow + r)) ** 2)
        if heart <= 1:
            continue
        if p["Pleural effusion"] and case["effusion_side"] in (side, "bilateral"):
            depth = {"small": 0.45, "moderate": 0.15}[case["effusion_size"]] * b
            if y - r < -depth:
                continue
        if p["Consolidation"] and case["consolidation_side"] == side:
            cz = 55.0 if case["consolidation_lobe"] == "upper" else -55.0
            cx = (0.47 if side == "right" else -0.47) * a
            if np.sqrt((x - cx) ** 2 + (y - 5) ** 2 + (z - cz) ** 2) < 38 + r:
                continue
        return float(x), float(y), float(z), float(r)
    raise RuntimeError("no place for a visible nodule in 100 tries")


def _demo_case(rng: np.random.Generator) -> dict[str, Any]:
    """Findings of one synthetic scan and the geometry they are drawn with (mm, RAS: +x right, +y anterior)."""
    present = {name: bool(rng.random() < p) for name, p in _DEMO_PREVALENCE.items()}
    a, b = rng.uniform(140, 165), rng.uniform(100, 120)
    case: dict[str, Any] = {"present": present,
                            "body": (a, b),
                            "heart_scale": (rng.uniform(1.3, 1.45) if present["Cardiomegaly"]
                                            else rng.uniform(0.9, 1.05)),
                            "effusion_side": rng.choice(["right", "left", "bilateral"]),
                            "effusion_size": rng.choice(["small", "moderate"]),
                            "consolidation_side": rng.choice(["right", "left"]),
                            "consolidation_lobe": rng.choice(["upper", "lower"]),
                            "noise": rng.uniform(12, 25)}
    case["nodules"] = [_nodule_in_lung(case, rng) for _ in range(rng.integers(1, 4))]
    return case


def _render_demo_volume(case: dict[str, Any], shape: tuple[int, int, int], spacing: tuple[float, float, float],
                        rng: np.random.Generator) -> np.ndarray:
    """HU volume (X, Y, Z) in RAS index order (x: left->right, y: posterior->anterior, z: inferior->superior)."""
    nx, ny, nz = shape
    x = ((np.arange(nx) - (nx - 1) / 2) * spacing[0]).astype(np.float32)[:, None, None]
    y = ((np.arange(ny) - (ny - 1) / 2) * spacing[1]).astype(np.float32)[None, :, None]
    z = ((np.arange(nz) - (nz - 1) / 2) * spacing[2]).astype(np.float32)[None, None, :]
    p = case["present"]
    a, b = case["body"]
    vol = np.full(shape, -1000.0, dtype=np.float32)
    body = (x / a) ** 2 + (y / b) ** 2 <= 1
    vol[np.broadcast_to(body, shape)] = -90.0  # subcutaneous fat
    muscle = (x / (a - 12)) ** 2 + (y / (b - 12)) ** 2 <= 1
    vol[np.broadcast_to(muscle, shape)] = 45.0
    # Lungs: two ellipsoids, narrowing towards the apex.
    z_taper = np.clip(1.0 - np.maximum(z, 0) / 170.0, 0.25, 1.0)
    lung_base = -950.0 if p["Emphysema"] else -850.0
    lungs = {}
    for side, cx in (("right", 0.47 * a), ("left", -0.47 * a)):
        lung = ((x - cx) / (0.38 * a * z_taper)) ** 2 + ((y + 5) / (0.75 * b * z_taper)) ** 2 + (z / 140) ** 2 <= 1
        lungs[side] = lung
        vol[lung] = lung_base
    lung_any = lungs["right"] | lungs["left"]
    if p["Emphysema"]:
        # Low-attenuation holes: bullae of -990 HU scattered through both lungs.
        holes = (np.sin(x / 7.0 + 1.3) * np.sin(y / 6.0) * np.sin(z / 8.0 + 0.7)) > 0.15
        vol[lung_any & holes] = -1000.0
    # Heart (+ optional pericardial fluid ring) in the anterior mediastinum, slightly to the left.
    hs = case["heart_scale"]
    hx, hy, hz = -0.12 * a, 0.25 * b, -40.0
    r_heart = ((x - hx) / (48 * hs)) ** 2 + ((y - hy) / (40 * hs)) ** 2 + ((z - hz) / (50 * hs)) ** 2
    if p["Pericardial effusion"]:
        ring = (r_heart <= 1.8) & (r_heart > 1)
        vol[ring] = 5.0
    vol[r_heart <= 1] = 45.0
    # Descending aorta left of the spine, and the spine.
    ax_, ay_ = -0.18 * a, -0.45 * b
    r_aorta = np.sqrt((x - ax_) ** 2 + (y - ay_) ** 2)
    vol[np.broadcast_to(r_aorta <= 13, shape)] = 40.0
    if p["Arterial wall calcification"]:
        plaques = (r_aorta > 9) & (r_aorta <= 15) & (np.sin(z / 9.0 + x / 5.0) > 0.0)
        vol[np.broadcast_to(plaques, shape)] = 900.0
    spine = (x ** 2 + (y + 0.72 * b) ** 2) <= 20 ** 2
    vol[np.broadcast_to(spine, shape)] = 450.0
    if p["Pleural effusion"]:
        depth = {"small": 0.45, "moderate": 0.15}[case["effusion_size"]] * b
        sides = ["right", "left"] if case["effusion_side"] == "bilateral" else [case["effusion_side"]]
        for side in sides:
            vol[lungs[side] & np.broadcast_to(y < -depth, shape)] = 12.0  # dependent (posterior) fluid
    if p["Consolidation"]:
        cx = (0.47 if case["consolidation_side"] == "right" else -0.47) * a
        cz = 55.0 if case["consolidation_lobe"] == "upper" else -55.0
        blob = ((x - cx) ** 2 + (y - 5) ** 2 + (z - cz) ** 2) <= 38 ** 2
        vol[blob & lungs[case["consolidation_side"]]] = 25.0
    if p["Lung nodule"]:
        for nx_, ny_, nz_, r in case["nodules"]:
            vol[((x - nx_) ** 2 + (y - ny_) ** 2 + (z - nz_) ** 2) <= r ** 2] = 35.0
    if p["Medical material"]:
        # A pacemaker can in the left anterior chest wall and its lead towards the heart.
        can = ((x + 0.55 * a) / 22) ** 2 + ((y - 0.8 * b) / 8) ** 2 + ((z - 60) / 18) ** 2 <= 1
        vol[can] = 2500.0
        t = np.linspace(0, 1, 200)
        for px, py, pz in zip(-0.55 * a + t * (hx + 0.55 * a), 0.8 * b + t * (hy - 0.8 * b), 60 + t * (hz - 60)):
            i, j, k = (int(round(px / spacing[0] + (nx - 1) / 2)), int(round(py / spacing[1] + (ny - 1) / 2)),
                       int(round(pz / spacing[2] + (nz - 1) / 2)))
            vol[max(i - 1, 0):i + 2, max(j - 1, 0):j + 2, max(k, 0):k + 1] = 2500.0
    vol += rng.normal(0.0, case["noise"], size=shape).astype(np.float32)
    return vol


# How the demo reports state each finding. Like CT-RATE's reports, they name a finding by its canonical term in
# varied sentence forms ("Pleural effusion is present on the right.", "No pleural effusion was detected.") as well as
# descriptively ("The heart is enlarged."); every label has canonical forms both present and absent, so the term the
# zero-shot prompts use occurs in training reports of both kinds (format_version 4; version 3 had two forms, the
# absent one the exact prompt "X is not present.", and named Pleural effusion only descriptively when present).
_ABSENT = {
    "Medical material": ["No medical material is seen.", "No pacemaker or other medical material was detected.",
                         "Medical material is not observed."],
    "Arterial wall calcification": ["No calcification is seen in the aortic wall.",
                                    "No arterial wall calcification was detected.",
                                    "Arterial wall calcification is not observed."],
    "Cardiomegaly": ["Heart size is normal.", "No cardiomegaly was detected.", "Cardiomegaly is not observed."],
    "Pericardial effusion": ["No pericardial effusion.", "No pericardial effusion was detected.",
                             "Pericardial effusion is not observed."],
    "Emphysema": ["Lung parenchyma shows normal attenuation.", "No emphysema was detected.",
                  "Emphysema is not observed."],
    "Lung nodule": ["No nodule was detected in either lung.", "No lung nodule was detected.",
                    "Lung nodule is not observed."],
    "Pleural effusion": ["No pleural effusion.", "No pleural effusion was detected.",
                         "Pleural effusion is not observed."],
    "Consolidation": ["No consolidation is seen.", "No consolidation was detected.", "Consolidation is not observed."],
}


def _present_sentence(name: str, case: dict[str, Any], rng: np.random.Generator) -> str:
    """One of a descriptive and two canonical-term sentences for a present finding, with its location."""
    if name == "Medical material":
        options = ["A pacemaker is seen in the left chest wall with its lead in the heart.",
                   "Medical material is present: a cardiac pacemaker in the left chest wall.",
                   "Medical material is observed in the left anterior chest wall (pacemaker)."]
    elif name == "Arterial wall calcification":
        options = ["Atherosclerotic calcified plaques are seen in the aortic wall.",
                   "Arterial wall calcification is present in the descending aorta.",
                   "Arterial wall calcification is observed in the aorta."]
    elif name == "Cardiomegaly":
        options = ["The heart is enlarged.", "Cardiomegaly is present.", "Cardiomegaly is observed."]
    elif name == "Pericardial effusion":
        options = ["Fluid is seen in the pericardial space.", "Pericardial effusion is present.",
                   "Pericardial effusion is observed around the heart."]
    elif name == "Emphysema":
        options = ["Emphysematous changes are seen in both lungs.", "Emphysema is present in both lungs.",
                   "Emphysema is observed in both lungs."]
    elif name == "Lung nodule":
        nodules = case["nodules"]
        sides = {"right" if x > 0 else "left" for x, *_ in nodules}
        where = "both lungs" if len(sides) == 2 else f"the {sides.pop()} lung"
        size = f"{2 * max(r for *_, r in nodules):.0f} mm"
        count = "A nodule" if len(nodules) == 1 else f"{len(nodules)} nodules"
        verb = "is" if len(nodules) == 1 else "are"
        options = [f"{count} up to {size} {verb} seen in {where}.", f"Lung nodule is present in {where}, up to {size}.",
                   f"Lung nodule is observed in {where}."]
    elif name == "Pleural effusion":
        side, size = case["effusion_side"], case["effusion_size"]
        where = "bilateral" if side == "bilateral" else f"{side}-sided"
        on = "on both sides" if side == "bilateral" else f"on the {side}"
        options = [f"There is a {size} {where} pleural effusion.", f"Pleural effusion is present {on}.",
                   f"Pleural effusion is observed {on}, {size} in amount."]
    elif name == "Consolidation":
        lobe = f"the {case['consolidation_side']} {case['consolidation_lobe']} lobe"
        options = [f"There is an area of consolidation in {lobe}.", f"Consolidation is present in {lobe}.",
                   f"Consolidation is observed in {lobe}."]
    else:
        raise KeyError(name)
    return str(rng.choice(options))


def _demo_report(case: dict[str, Any], rng: np.random.Generator) -> tuple[str, str]:
    """(Findings_EN, Impressions_EN) written from the drawn findings, negations for the absent ones."""
    sentences = ["Trachea and both main bronchi are patent."]
    for name in DEMO_LABELS:
        sentences.append(_present_sentence(name, case, rng) if case["present"][name]
                         else str(rng.choice(_ABSENT[name])))
    sentences.append("Bone structures in the study area are natural.")
    positives = [n for n in DEMO_LABELS if case["present"][n]]
    impression = ("; ".join(positives) + ".") if positives else "No significant pathology."
    return " ".join(sentences), impression


def write_demo_dataset(root: str | os.PathLike, n_train_patients: int = 150, n_valid_patients: int = 70,
                       scale: float = 0.5, seed: int = 0, release: str = "fixed") -> Path:
    """Write synthetic chest CTs in the CT-RATE layout (NIfTI + the three CSV kinds) under ``root``.

    Each patient has one scan with one reconstruction on one of four native grids (0.70-0.95 mm in-plane,
    1.5-3.0 mm slices at ``scale`` 1; ``scale`` < 1 uses proportionally fewer, larger voxels). The metadata CSV
    holds what a scanner's DICOM says: ``RescaleIntercept`` -1024 or -1000, slope 1, ``XYSpacing``, ``ZSpacing``
    and ``ImageOrientationPatient``: half of the volumes are stored L,P,S (``[1, 0, 0, 0, 1, 0]``, as most of
    CT-RATE) and half R,A,S (``[-1, 0, 0, 0, -1, 0]``), so preprocessing must reorient.

    Args:
        release: ``"fixed"``: ``train_fixed/``, ``valid_fixed/`` as the re-release stores them: HU (int16, header
            scaling 1 / 0), the real spacing and orientation in the affine, the metadata's rescale not to be
            applied. ``"first"``: ``train/``, ``valid/`` as the first release: the raw values ``HU - intercept``
            (float32), an identity affine, HU, spacing and orientation only in the metadata CSV. The same volume
            gives the same HU either way.

    Deterministic given the arguments; an existing complete demo with the same arguments is reused.
    """
    if release not in RELEASES:
        raise ValueError(f"release must be one of {RELEASES}, got {release!r}")
    root = resolve_path(root)
    # The generator name is the one demo folders were first written with, so that they are reused. Format 5: the
    # _fixed volumes hold HU (format 4 stored HU - intercept there, as only the first release does).
    params = {"n_train_patients": n_train_patients, "n_valid_patients": n_valid_patients, "scale": scale,
              "seed": seed, "generator": "nbsupport.ct_clip.data.write_demo_dataset", "format_version": 5,
              **({} if release == "fixed" else {"release": release})}
    tables_written = [files[split] for files in (REPORT_FILES, METADATA_FILES, LABEL_FILES) for split in files]
    if start_demo_folder(root, params, required=tables_written):
        return root
    tables: dict[str, dict[str, list[dict[str, Any]]]] = {s: {"reports": [], "metadata": [], "labels": []}
                                                          for s in ("train", "valid")}
    patients = [("train", i + 1) for i in range(n_train_patients)] + [("valid", i + 1) for i in range(n_valid_patients)]
    for k, (split, number) in enumerate(progress(patients, desc="writing demo CT volumes")):
        rows = _write_demo_volume(root, f"{split}_{number}_a_1", k, seed, scale, release)
        for kind, row in rows.items():
            tables[split][kind].append(row)
    for split in ("train", "valid"):
        for kind, files, columns in (("reports", REPORT_FILES, REPORT_COLUMNS),
                                     ("metadata", METADATA_FILES, METADATA_COLUMNS),
                                     ("labels", LABEL_FILES, ("VolumeName", *LABELS))):
            path = root / files[split]
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                pd.DataFrame(tables[split][kind], columns=list(columns)).to_csv(tmp, index=False, lineterminator="\n")
    finish_demo_folder(root, params, n_volumes=len(patients))
    return root


def _write_demo_volume(root: Path, volume: str, k: int, seed: int, scale: float,
                       release: str) -> dict[str, dict[str, Any]]:
    """Draw and write the ``k``-th demo volume (its own random stream) as ``release`` stores it; its report,
    metadata and labels rows."""
    import nibabel as nib

    rng = np.random.default_rng([seed, k, 2654435761])
    case = _demo_case(rng)
    n_xy, s_xy, n_z, s_z = _DEMO_GRIDS[k % len(_DEMO_GRIDS)]
    n_xy, n_z = max(int(round(n_xy * scale)), 8), max(int(round(n_z * scale)), 4)
    s_xy, s_z = s_xy / scale, s_z / scale
    s_xy = round(s_xy * (1 + rng.uniform(-0.05, 0.05)), 4)
    hu = _render_demo_volume(case, (n_xy, n_xy, n_z), (s_xy, s_xy, s_z), rng)
    intercept = -1024.0 if k % 3 else -1000.0
    raw = np.clip(np.round(hu - intercept), -32768, 32767)  # what the scanner stores: DICOM HU = raw + intercept
    affine = np.diag([s_xy, s_xy, s_z, 1.0])
    affine[:3, 3] = [-(n_xy - 1) / 2 * s_xy, -(n_xy - 1) / 2 * s_xy, -(n_z - 1) / 2 * s_z]
    orientation = "[-1, 0, 0, 0, -1, 0]"  # rows run towards the patient's right, columns towards anterior: R,A,S
    if k % 2:  # stored in LPS order (as DICOM): x towards the left, y towards posterior
        raw = raw[::-1, ::-1]
        affine[0, 0], affine[1, 1] = -s_xy, -s_xy
        affine[:2, 3] = -affine[:2, 3]
        orientation = "[1, 0, 0, 0, 1, 0]"
    if release == "fixed":  # HU stored, geometry in the header (CT-RATE's fix script: int16, spacing, direction)
        image = nib.Nifti1Image(np.ascontiguousarray((raw + intercept).astype(np.int16)), affine)
        image.header.set_xyzt_units("mm")
    else:  # the raw DICOM values as float32 and no geometry (the first release's header is blank)
        image = nib.Nifti1Image(np.ascontiguousarray(raw.astype(np.float32)), np.eye(4))
    path = root / volume_relative_path(volume, release)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_bytes(gzip_nifti(image.to_bytes()))
    findings, impressions = _demo_report(case, rng)
    meta = {c: "" for c in METADATA_COLUMNS}
    origin_lps = (-affine[0, 3], -affine[1, 3], affine[2, 3])  # DICOM's patient coordinates are L,P,S
    meta.update({"VolumeName": f"{volume}.nii.gz", "Manufacturer": "SYNTHETIC", "PatientSex": "",
                 "PatientAge": "", "Rows": n_xy, "Columns": n_xy, "XYSpacing": f"[{s_xy}, {s_xy}]",
                 "RescaleIntercept": intercept, "RescaleSlope": 1, "RescaleType": "HU", "NumberofSlices": n_z,
                 "ZSpacing": s_z, "PhotometricInterpretation": "MONOCHROME2", "SamplesPerPixel": 1,
                 "ImageOrientationPatient": orientation,
                 "ImagePositionPatient": "[" + ", ".join(f"{v:.4f}" for v in origin_lps) + "]"})
    return {"reports": {"VolumeName": f"{volume}.nii.gz", "ClinicalInformation_EN": "Not given.",
                        "Technique_EN": "Non-contrast chest CT (synthetic demo).",
                        "Findings_EN": findings, "Impressions_EN": impressions},
            "metadata": meta,
            "labels": {"VolumeName": f"{volume}.nii.gz",
                       **{name: int(case["present"].get(name, False)) for name in LABELS}}}
