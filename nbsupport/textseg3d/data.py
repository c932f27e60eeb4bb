"""LLMSeg data: the on-disk layouts, the clinical report table, report -> prompt, the case manifest and the data
lists the MONAI transforms read (the synthetic demo generator is :mod:`nbsupport.textseg3d.demo_data`).

Layouts read by the same adapter (one case per folder under the data root):

* the seed's: ``<root>/<case>/data.npz`` + ``label.npz``, arrays ``(D, H, W)`` in the canonical orientation below,
  with an optional ``spacing`` array (mm, ``(D, H, W)`` order) in ``data.npz``;
* the public code's: ``<root>/<case>/data.nii.gz`` + ``label.nii.gz``, any orientation, spacing from the affine.

New images to segment (``predict_files``) may also be a DICOM series folder (:func:`nbsupport.dicom.read_dicom_series`).

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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nbsupport.manifest import Column, ManifestError, ManifestProblem, ManifestSchema
from nbsupport.paths import resolve_path
from nbsupport.progress import progress

REPORT_COLUMNS = ("Number", "Unit No", "Subsite 1", "Pathology", "icT", "icN", "icM", "pT", "pN", "pM", "Stage",
                  "Chemotherapy", "RT aim", "Remark")
PROMPT_COLUMNS = ("Unit No", "Subsite 1", "icT", "icN", "Remark")  # what report_to_prompt reads
CANONICAL_AXCODES = "IPL"
ORIENTATION_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # nibabel's RAS+ convention, stated explicitly
LAYOUTS = {"npz": ("data.npz", "label.npz"), "nifti": ("data.nii.gz", "label.nii.gz")}
REPORT_VARIANTS = ("true", "flipped", "empty")  # the text ablation: the report as written, side swapped, none
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".npz")  # image files a folder of new cases is searched for
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


def report_variant(prompt: str, variant: str) -> str:
    """The prompt for the ablation: ``true`` as written, ``flipped`` with left/right swapped, ``empty``."""
    if variant == "true":
        return prompt
    if variant == "flipped":
        return flip_side(prompt)
    if variant == "empty":
        return ""
    raise ValueError(f"report variant must be one of {REPORT_VARIANTS}, got {variant!r}")


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
    """(array as stored, voxel->RAS affine) of ``data``/``label`` in either layout, or of a DICOM series (a folder,
    or one ``.dcm`` multi-frame file: HU, slices along their normal, :func:`nbsupport.dicom.read_dicom_series`).

    npz arrays are ``(D, H, W)`` in IPL; their affine is built from ``spacing`` (default 1 mm).
    """
    path = Path(path)
    if path.is_dir() or path.name.lower().endswith(".dcm"):
        from nbsupport.dicom import read_dicom_series

        return read_dicom_series(path)
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


def volume_id(path: str | os.PathLike) -> str:
    """What a new image's outputs are named by: a DICOM series folder's name; a file's name without its suffix,
    except ``data.nii.gz`` / ``data.npz`` of the case layout, named by their case folder."""
    path = Path(path)
    if path.is_dir():
        return path.name
    stem = next((path.name[: -len(s)] for s in (*VOLUME_SUFFIXES, ".dcm") if path.name.lower().endswith(s)),
                path.stem)
    return path.parent.name if stem == "data" and path.parent.name else stem


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


def case_items(manifest: pd.DataFrame, root: Path, prompt_variant: str = "true") -> list[dict[str, Any]]:
    """MONAI data-list dicts (``image``, ``label``, ``prompt``, ``case``) for the manifest's rows, the input of
    :mod:`nbsupport.textseg3d.transforms`."""
    return [{"image": str(root / r.image), "label": str(root / r.label) if r.label else "",
             "prompt": report_variant(r.prompt, prompt_variant), "case": r.case} for r in manifest.itertuples()]
