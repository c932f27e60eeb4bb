"""LLMSeg data: the on-disk layouts, the clinical report table, report -> prompt, and a synthetic thorax CT generator.

Layouts read by the same adapter (one case per folder under the data root):

* the seed's: ``<root>/<case>/data.npz`` + ``label.npz``, arrays ``(D, H, W)`` in the canonical orientation below,
  with an optional ``spacing`` array (mm, ``(D, H, W)`` order) in ``data.npz``;
* the public code's: ``<root>/<case>/data.nii.gz`` + ``label.nii.gz``, any orientation, spacing from the affine.

The report table is ``<root>/*_report.xlsx`` (or ``.csv``) with the columns of the public code's sample file
(``REPORT_COLUMNS``); ``Unit No`` is the case folder's name.

Canonical orientation: every volume is brought to ``IPL`` (axis 0 towards Inferior, axis 1 towards Posterior,
axis 2 towards the patient's Left), so ``volume[k]`` is an axial slice in radiological display (anterior up,
patient's left on the right of the image) and ``volume[:, j]`` a coronal slice with the head up. The seed's
``roi (64, 352, 352)`` is read in this ``(D, H, W)`` order.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nbsupport.manifest import Column, ManifestError, ManifestProblem, ManifestSchema
from nbsupport.paths import resolve_path
from nbsupport.progress import progress
from nbsupport.runs import atomic_path, atomic_write_json, read_json

REPORT_COLUMNS = ("Number", "Unit No", "Subsite 1", "Pathology", "icT", "icN", "icM", "pT", "pN", "pM", "Stage",
                  "Chemotherapy", "RT aim", "Remark")
PROMPT_COLUMNS = ("Unit No", "Subsite 1", "icT", "icN", "Remark")  # what report_to_prompt reads
CANONICAL_AXCODES = "IPL"
ORIENTATION_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # nibabel's RAS+ convention, stated explicitly
LAYOUTS = {"npz": ("data.npz", "label.npz"), "nifti": ("data.nii.gz", "label.nii.gz")}
SURGERY_PHRASES = {"bcs": "breast conserving surgery", "mastectomy": "total mastectomy surgery",
                   "unknown": "unknown type surgery"}


class ReportError(ValueError):
    """A report row cannot be turned into a prompt (e.g. the side cannot be determined)."""


# ============================================================================================ report -> prompt
def laterality(subsite: Any) -> str | None:
    """``"left"``/``"right"`` from a ``Subsite 1`` cell (``"Breast, Lt."``, ``"Rt"``, ``"left"``...); None when the
    side cannot be determined (bilateral ``"Both"``, empty, or unrecognised)."""
    text = "" if _is_empty(subsite) else str(subsite).lower()
    if re.search(r"\bboth\b|bilat", text):
        return None
    left = bool(re.search(r"\blt\b|\bleft\b|\bl\b", text))
    right = bool(re.search(r"\brt\b|\bright\b|\br\b", text))
    if left == right:
        return None
    return "left" if left else "right"


def surgery_type(remark: Any) -> str:
    """``"bcs"``, ``"mastectomy"`` or ``"unknown"`` from the ``Remark`` (or ``RT aim``) cell."""
    text = "" if _is_empty(remark) else str(remark).lower()
    if "bcs" in text or "conserv" in text or "lumpectomy" in text:
        return "bcs"
    if "mastectomy" in text or re.search(r"\b(tm|mrm)\b", text):
        return "mastectomy"
    return "unknown"


def _stage_value(value: Any, prefixes: Sequence[str]) -> str:
    """``"T2"``/``"cT2"``/``2``/``"2.0"`` -> ``"2"``; ``"N1a"`` -> ``"1a"``; empty -> ``"x"``."""
    if _is_empty(value):
        return "x"
    text = str(value).strip()
    if re.fullmatch(r"\d+\.0", text):
        text = text[:-2]
    for p in sorted(prefixes, key=len, reverse=True):
        if text.lower().startswith(p.lower()):
            return text[len(p):].strip() or "x"
    return text


def report_to_prompt(row: Mapping[str, Any]) -> str:
    """The prompt of one report row, as the public code builds it: ``"N{icN}, cT{icT}, {surgery}, {side} side"``.

    Surgery: "breast conserving surgery" / "total mastectomy surgery" / "unknown type surgery" from ``Remark``
    (falling back to ``RT aim``). The causal-LM text encoder appends its ``<SEG>`` token itself.

    Raises:
        ReportError: the side cannot be determined from ``Subsite 1`` (bilateral or missing); the message names
            the case (``Unit No``), the field and the value.
    """
    side = laterality(row.get("Subsite 1"))
    if side is None:
        raise ReportError(f"case {row.get('Unit No')!r}: field 'Subsite 1' = {row.get('Subsite 1')!r} does not name "
                          "one side (expected e.g. 'Breast, Lt.' or 'Breast, Rt.'; bilateral cases are excluded)")
    surgery = surgery_type(row.get("Remark"))
    if surgery == "unknown":
        surgery = surgery_type(row.get("RT aim"))
    n = _stage_value(row.get("icN"), ("cN", "N"))
    t = _stage_value(row.get("icT"), ("cT", "T"))
    return f"N{n}, cT{t}, {SURGERY_PHRASES[surgery]}, {side} side"


def flip_side(prompt: str) -> str:
    """The same prompt with left and right swapped (the text ablation)."""
    return re.sub(r"\b(left|right)\b", lambda m: "right" if m.group(1) == "left" else "left", prompt)


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or str(value).strip() == ""


def read_report_table(path: str | os.PathLike) -> pd.DataFrame:
    """The report table (.xlsx via openpyxl, or .csv), all cells as strings, ``Unit No`` as the case id.

    Raises:
        ManifestError: columns that ``report_to_prompt`` needs are missing, or ``Unit No`` is empty/duplicated;
            every problem is listed with its row.
    """
    path = Path(path)
    if path.suffix.lower() in (".xlsx", ".xlsm"):
        table = pd.read_excel(path, dtype=str, engine="openpyxl")
    elif path.suffix.lower() == ".csv":
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    else:
        raise ValueError(f"{path}: report table must be .xlsx or .csv")
    table.columns = [str(c).strip() for c in table.columns]
    problems = [ManifestProblem(1, c, f"column missing (expected the columns {list(REPORT_COLUMNS)})", file=path.name)
                for c in PROMPT_COLUMNS if c not in table.columns]
    if problems:
        raise ManifestError(problems, path)
    table = table.fillna("")
    table["Unit No"] = table["Unit No"].map(lambda v: str(v).strip().removesuffix(".0"))
    for i, unit in enumerate(table["Unit No"]):
        if not unit:
            problems.append(ManifestProblem(i + 2, "Unit No", "empty; expected a case id (the case folder's name)",
                                            file=path.name))
    dup = table["Unit No"][table["Unit No"].duplicated(keep=False) & (table["Unit No"] != "")]
    problems += [ManifestProblem(i + 2, "Unit No", f"expected a unique case id; {v!r} appears more than once",
                                 file=path.name) for i, v in dup.items()]
    if problems:
        raise ManifestError(problems, path)
    return table


def find_report_table(root: Path) -> Path:
    """``<root>/*_report.xlsx`` (preferred) or ``*_report.csv``; the public code's naming."""
    for pattern in ("*_report.xlsx", "*_report.csv", "*.xlsx", "*report*.csv"):
        found = sorted(root.glob(pattern))
        if found:
            return found[0]
    raise FileNotFoundError(f"{root}: no report table (<site>_report.xlsx or <site>_report.csv) found")


# ============================================================================================ volumes
def npz_affine(spacing: Sequence[float]) -> np.ndarray:
    """Voxel -> RAS+ mm affine of an npz volume stored ``(D, H, W)`` in the canonical IPL orientation."""
    sd, sh, sw = (float(s) for s in spacing)
    return np.array([[0, 0, -sw, 0], [0, -sh, 0, 0], [-sd, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)


def _npz_array(path: Path, preferred: str) -> tuple[np.ndarray, np.ndarray | None]:
    with np.load(path) as z:
        keys = [k for k in z.files if k != "spacing"]
        if not keys:
            raise ValueError(f"{path}: holds no array")
        key = preferred if preferred in keys else keys[0]
        return np.asarray(z[key]), (np.asarray(z["spacing"], dtype=float) if "spacing" in z.files else None)


def read_volume(path: str | os.PathLike, kind: str = "data") -> tuple[np.ndarray, np.ndarray]:
    """(array as stored, voxel->RAS affine) of ``data``/``label`` in either layout.

    npz arrays are ``(D, H, W)`` in IPL; their affine is built from ``spacing`` (default 1 mm).
    """
    path = Path(path)
    if path.name.endswith(".npz"):
        array, spacing = _npz_array(path, kind)
        if array.ndim != 3:
            raise ValueError(f"{path}: expected a 3-D (D, H, W) array, got shape {array.shape}")
        if spacing is None and kind == "data":
            spacing = np.ones(3)
        return array, npz_affine(spacing if spacing is not None else np.ones(3))
    import gzip

    import nibabel as nib

    if path.name.endswith(".gz"):  # the whole stream is read: its CRC catches corrupt bytes that still inflate
        img = nib.Nifti1Image.from_bytes(gzip.decompress(path.read_bytes()))
    else:
        img = nib.load(str(path))
    array = np.asanyarray(img.dataobj)
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise ValueError(f"{path}: expected a 3-D volume, got shape {array.shape}")
    return array, np.asarray(img.affine, dtype=np.float64)


def to_canonical(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """``array`` reoriented to IPL ``(D, H, W)`` (axis permutations and flips only)."""
    import nibabel as nib

    start = nib.orientations.io_orientation(affine)
    target = nib.orientations.axcodes2ornt(CANONICAL_AXCODES, ORIENTATION_LABELS)
    return np.ascontiguousarray(nib.orientations.apply_orientation(array, nib.orientations.ornt_transform(start,
                                                                                                          target)))


def from_canonical(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_canonical`: an IPL array back in the voxel order of a volume with ``affine``."""
    import nibabel as nib

    source = nib.orientations.axcodes2ornt(CANONICAL_AXCODES, ORIENTATION_LABELS)
    target = nib.orientations.io_orientation(affine)
    return np.ascontiguousarray(nib.orientations.apply_orientation(array, nib.orientations.ornt_transform(source,
                                                                                                          target)))


def canonical_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along the canonical (D, H, W) axes."""
    import nibabel as nib

    sizes = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0))  # per stored axis
    ornt = nib.orientations.io_orientation(affine)  # stored axis i -> world axis ornt[i, 0]
    world = {int(ornt[i, 0]): float(sizes[i]) for i in range(3)}
    # IPL: D along world z (2), H along world y (1), W along world x (0)
    return (world[2], world[1], world[0])


def load_case(image_path: str | os.PathLike, label_path: str | os.PathLike | None = None
              ) -> dict[str, Any]:
    """One case in canonical orientation: ``image`` (D, H, W) float32 HU, ``label`` (D, H, W) uint8 or None,
    ``affine`` of the stored image, ``spacing`` (mm, D/H/W)."""
    image, affine = read_volume(image_path, "data")
    out: dict[str, Any] = {"image": to_canonical(image.astype(np.float32), affine), "affine": affine,
                           "spacing": canonical_spacing(affine), "label": None}
    if label_path is not None:
        label, _ = read_volume(label_path, "label")
        if label.shape != image.shape:
            raise ValueError(f"{label_path}: label shape {label.shape} differs from image shape {image.shape} "
                             f"of {image_path}")
        out["label"] = (to_canonical(label, affine) > 0).astype(np.uint8)
    return out


# ============================================================================================ manifest
def _valid_prompt(value: Any) -> str | None:
    return None if str(value).strip() else "a non-empty prompt"


TEXTSEG3D_SCHEMA = ManifestSchema(
    dataset="textseg3d",
    columns=(
        Column("case", help="case id (folder name, report 'Unit No')"),
        Column("image", kind="path", help="data.npz or data.nii.gz, relative to the data root"),
        Column("label", kind="path", nullable=True, help="label.npz or label.nii.gz; empty for an unlabelled case"),
        Column("layout", allowed=("npz", "nifti"), help="on-disk layout"),
        Column("prompt", kind=_valid_prompt, help="report_to_prompt text the model reads"),
        Column("side", allowed=("left", "right"), help="treated side named by the report"),
        Column("shape", help="D x H x W in canonical (IPL) orientation"),
        Column("spacing_d", kind="float", help="mm between axial slices"),
        Column("spacing_h", kind="float", help="mm, anterior-posterior"),
        Column("spacing_w", kind="float", help="mm, right-left"),
        Column("split", kind="split"),
    ),
    key="case",
    readers={"image": lambda path: read_volume(path, "data")},
    row_check=lambda row: ((name, f"expected a voxel spacing > 0 mm, got {row[name]!r}")
                           for name in ("spacing_d", "spacing_h", "spacing_w") if not row[name] > 0),
)


@dataclasses.dataclass
class CaseTable:
    """What ``build_manifest`` found: the usable cases and the excluded ones with the reason."""

    manifest: pd.DataFrame
    excluded: pd.DataFrame  # columns: case, field, value, reason
    report_path: Path


def case_folders(root: Path) -> dict[str, tuple[str, Path, Path | None]]:
    """case id -> (layout, image path, label path or None) for every ``<root>/<case>/data.*`` folder."""
    cases: dict[str, tuple[str, Path, Path | None]] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for layout, (data_name, label_name) in LAYOUTS.items():
            if (folder / data_name).is_file():
                label = folder / label_name
                cases[folder.name] = (layout, folder / data_name, label if label.is_file() else None)
                break
    return cases


def labels_without_image(root: Path) -> list[Path]:
    """``<root>/<case>/label.*`` files whose folder holds no ``data.*`` of the same layout (a missing image)."""
    return [folder / label_name for folder in sorted(p for p in root.iterdir() if p.is_dir())
            for data_name, label_name in LAYOUTS.values()
            if (folder / label_name).is_file() and not (folder / data_name).is_file()]


def _is_empty_report(report: Mapping[str, Any]) -> bool:
    """Every column of the report row but its number and case id is empty."""
    return all(_is_empty(v) for k, v in report.items() if k not in ("Number", "Unit No", "_line"))


def volume_problems(case: str, image: Path, label: Path | None, root: Path) -> tuple[list[ManifestProblem],
                                                                                  tuple[np.ndarray, np.ndarray] | None]:
    """Read one case's image (and label) and check what the model would otherwise silently get wrong: files that do
    not decode, non-finite voxels, a label of another shape or another affine (voxel grid) than its image, and
    voxel spacings that are not finite and positive. Returns (problems, (image array, affine) or None)."""
    import zipfile

    from nibabel.filebasedimages import ImageFileError

    unreadable = (OSError, ValueError, EOFError, zipfile.BadZipFile, ImageFileError)
    expected = ".npz (np.savez of a (D, H, W) array)" if image.name.endswith(".npz") else "a gzipped NIfTI-1 volume"
    problems = []
    try:
        if image.name.endswith(".npz"):  # checked before the affine is built from it: a negative one flips the case
            with np.load(image) as z:
                raw = np.asarray(z["spacing"], dtype=float).ravel() if "spacing" in z.files else np.ones(3)
            if raw.size != 3 or not (np.isfinite(raw).all() and (raw > 0).all()):
                return [ManifestProblem(None, "spacing", f"case {case!r}: spacing {raw.tolist()}; expected three "
                                        "finite values > 0 (mm, D/H/W)", file=_relative(image, root))], None
        image_arr, affine = read_volume(image, "data")
    except unreadable as err:
        message = f"case {case!r}: cannot read {image.name} ({type(err).__name__}: {err}); expected {expected}"
        return [ManifestProblem(None, "image", message, file=_relative(image, root))], None
    if np.issubdtype(image_arr.dtype, np.floating) and not np.isfinite(image_arr).all():
        bad = int((~np.isfinite(image_arr)).sum())
        problems.append(ManifestProblem(None, "image", f"case {case!r}: {bad} NaN/inf voxels; expected finite values "
                                        "(HU)", file=_relative(image, root)))
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
    what = "spacing array" if image.name.endswith(".npz") else "affine"
    if image.name.endswith((".nii", ".nii.gz")):  # nibabel reads a zero pixdim as 1 mm (and only logs it)
        import nibabel as nib

        with nib.openers.ImageOpener(image) as f:
            header = nib.Nifti1Header.from_fileobj(f, check=False)
        if int(header["qform_code"]) == 0 and int(header["sform_code"]) == 0:
            spacing, what = np.asarray(header["pixdim"][1:4], dtype=float), "header's pixdim (no qform/sform)"
    if not (np.isfinite(affine).all() and (spacing > 0).all()) or abs(np.linalg.det(affine[:3, :3])) == 0:
        problems.append(ManifestProblem(None, "spacing", f"case {case!r}: voxel spacing {spacing.round(4).tolist()} "
                                        f"mm from its {what}; expected three finite values > 0",
                                        file=_relative(image, root)))
    if label is None:  # every case is split into train, val or test, so every case is trained on or scored
        missing = LAYOUTS["npz" if image.name.endswith(".npz") else "nifti"][1]
        problems.append(ManifestProblem(None, "label", f"case {case!r} has no {missing}; expected the target mask "
                                        f"next to {image.name}", file=_relative(image.parent / missing, root)))
    else:
        try:
            label_arr, label_affine = read_volume(label, "label")
        except unreadable as err:
            problems.append(ManifestProblem(None, "label", f"case {case!r}: cannot read {label.name} "
                                            f"({type(err).__name__}: {err}); expected {expected}",
                                            file=_relative(label, root)))
            return problems, None
        if label_arr.shape != image_arr.shape:
            problems.append(ManifestProblem(None, "label", f"case {case!r}: label shape {label_arr.shape}; expected "
                                            f"the image shape {image_arr.shape} ({image.name})",
                                            file=_relative(label, root)))
        elif label.name.endswith(".nii.gz") and not np.allclose(label_affine, affine, atol=1e-3):
            label_spacing = np.sqrt((label_affine[:3, :3] ** 2).sum(0)).round(3).tolist()
            problems.append(ManifestProblem(None, "label", f"case {case!r}: label affine differs from the image's "
                                            f"(voxel sizes {label_spacing} vs {spacing.round(3).tolist()} mm, origin "
                                            f"{label_affine[:3, 3].round(2).tolist()} vs "
                                            f"{affine[:3, 3].round(2).tolist()}); expected the same voxel grid",
                                            file=_relative(label, root)))
        elif label.name.endswith(".npz"):
            with np.load(label) as z:
                label_spacing = np.asarray(z["spacing"], float).ravel() if "spacing" in z.files else None
            if label_spacing is not None and (label_spacing.shape != spacing.shape
                                              or not np.allclose(label_spacing, spacing, atol=1e-3)):
                problems.append(ManifestProblem(None, "label", f"case {case!r}: label spacing {label_spacing.tolist()}"
                                                f" mm differs from the image's {spacing.tolist()}; expected the same "
                                                "voxel grid", file=_relative(label, root)))
    return problems, (None if problems else (image_arr, affine))


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def build_manifest(root: str | os.PathLike, report_table: str | os.PathLike | None = None,
                   val_fraction: float = 0.1, test_fraction: float = 0.2) -> CaseTable:
    """Read every case folder and its report row; split per side group in case order (public code: first 70 %
    train, then val, last 20 % test).

    Raises:
        ManifestError: listing every problem at once: volumes that cannot be read or hold NaN/inf voxels, a label
            of another shape or affine than its image, non-positive spacing, a label without its image, a case
            without a report row, a report row without its case folder, an empty report row (cases without a
            determinable side are excluded and listed, not errors).
    """
    root = resolve_path(root)
    report_path = resolve_path(report_table) if report_table else find_report_table(root)
    table = read_report_table(report_path)
    table["_line"] = np.arange(len(table)) + 2  # header = line 1 (also the first row of an .xlsx sheet)
    reports = table.set_index("Unit No", drop=False)
    folders = case_folders(root)
    if not folders:
        raise FileNotFoundError(f"{root}: no case folders with data.npz or data.nii.gz")
    problems: list[ManifestProblem] = []
    report_file = _relative(report_path, root)
    orphan_labels = labels_without_image(root)
    for label in orphan_labels:
        problems.append(ManifestProblem(None, "image", f"case {label.parent.name!r} has {label.name} but no "
                                        f"{LAYOUTS['npz' if label.name.endswith('.npz') else 'nifti'][0]}; expected "
                                        "the image next to its label", file=_relative(label, root)))
    for case, line in zip(reports["Unit No"], reports["_line"]):
        if case not in folders and case not in {label.parent.name for label in orphan_labels}:
            problems.append(ManifestProblem(int(line), "Unit No", f"report row for case {case!r}, but there is no "
                                            f"case folder {case}/ with data.npz or data.nii.gz; expected one folder "
                                            "per report row (remove the row or add the case)", file=report_file))
    rows, excluded = [], []
    for case, (layout, image, label) in progress(folders.items(), desc="reading cases", total=len(folders)):
        if case not in reports.index:
            problems.append(ManifestProblem(None, "Unit No", f"a report row for case {case!r} ({image})",
                                            file=report_file))
            continue
        report = reports.loc[case].to_dict()
        if _is_empty_report(report):
            problems.append(ManifestProblem(int(report["_line"]), "Subsite 1", f"case {case!r}: empty report row; "
                                            f"expected the report's fields {list(PROMPT_COLUMNS[1:])}",
                                            file=report_file))
            continue
        try:
            prompt = report_to_prompt(report)
        except ReportError as err:
            excluded.append({"case": case, "field": "Subsite 1", "value": report.get("Subsite 1"),
                             "reason": str(err)})
            continue
        found, volume = volume_problems(case, image, label, root)
        problems += found
        if volume is None:
            continue
        image_arr, affine = volume
        spacing = canonical_spacing(affine)
        shape = to_canonical(np.zeros(image_arr.shape, dtype=np.uint8), affine).shape
        rows.append({"case": case, "image": image.relative_to(root).as_posix(),
                     "label": label.relative_to(root).as_posix() if label is not None else "", "layout": layout,
                     "prompt": prompt, "side": laterality(report.get("Subsite 1")),
                     "shape": "x".join(str(s) for s in shape), "spacing_d": spacing[0], "spacing_h": spacing[1],
                     "spacing_w": spacing[2]})
    if problems:
        raise ManifestError(problems, root, hint="fix the case folders or the report table, then run 01 again")
    manifest = pd.DataFrame(rows)
    manifest["split"] = split_by_side(manifest, val_fraction, test_fraction)
    return CaseTable(manifest, pd.DataFrame(excluded, columns=["case", "field", "value", "reason"]), report_path)


def split_by_side(manifest: pd.DataFrame, val_fraction: float, test_fraction: float) -> list[str]:
    """train/val/test per side group in case order: first ``1 - val - test`` train, then val, last test."""
    splits = pd.Series("train", index=manifest.index, dtype=object)
    for _, part in manifest.groupby("side"):
        order = part.sort_values("case").index
        n = len(order)
        n_test = int(round(n * test_fraction))
        n_val = int(round(n * val_fraction))
        if n >= 3:
            n_test, n_val = max(n_test, 1 if test_fraction > 0 else 0), max(n_val, 1 if val_fraction > 0 else 0)
        n_train = max(n - n_test - n_val, 0)
        splits[order[n_train:n_train + n_val]] = "val"
        splits[order[n_train + n_val:]] = "test"
    return splits.tolist()


# ============================================================================================ demo data
DEMO_SIZES = {
    "smoke": {"n_cases": 8, "shape": (32, 32, 64), "spacing": (8.0, 12.0, 6.0)},
    "demo": {"n_cases": 44, "shape": (32, 32, 64), "spacing": (8.0, 12.0, 6.0)},
}
DEMO_MARKER = "nbsupport_demo.json"
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
              "seed": seed, "generator": "nbsupport.textseg3d.data.write_demo_dataset", "format_version": 1}
    marker = root / DEMO_MARKER
    report_path = root / f"demo_report.{table}"
    if root.is_dir() and any(root.iterdir()):
        previous = read_json(marker)
        if previous is None:
            raise FileExistsError(f"{root} is not empty and holds no {DEMO_MARKER}; write the demo into an empty "
                                  "folder (a demo folder is replaced when regenerated)")
        if previous.get("params") == params and previous.get("complete") and report_path.is_file():
            return root
        for stale in root.iterdir():
            if stale.name != DEMO_MARKER:
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, {"params": params, "complete": False})
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
    atomic_write_json(marker, {"params": params, "complete": True, "cases": [c.case for c in cases]})
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
