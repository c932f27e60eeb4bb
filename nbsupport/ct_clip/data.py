"""CT-RATE exactly as released, the preprocessed manifest and its Dataset, and real CT DICOM slices.

Layout under a data root (the folder called ``dataset/`` in the Hugging Face release)::

    train_fixed/train_{P}/train_{P}_{s}/train_{P}_{s}_{r}.nii.gz      volumes; P patient, s scan (a, b, ..), r recon
    valid_fixed/valid_{P}/valid_{P}_{s}/valid_{P}_{s}_{r}.nii.gz
    radiology_text_reports/{train_reports,validation_reports}.csv    VolumeName, ClinicalInformation_EN,
                                                                      Technique_EN, Findings_EN, Impressions_EN
    metadata/{train_metadata,validation_metadata}.csv                 VolumeName, ..., XYSpacing "[0.7, 0.7]",
                                                                      RescaleIntercept, RescaleSlope, ZSpacing, ...
    multi_abnormality_labels/{train,valid}_predicted_labels.csv       VolumeName + the 18 ``LABELS`` (0/1)

``HU = RescaleSlope * stored + RescaleIntercept`` with the slope/intercept of the metadata CSV (CT-CLIP does the
same); spacing comes from the metadata too, orientation from the NIfTI affine. :func:`scan_dataset` joins the
CSVs with the volumes on disk and reports every problem at once. :mod:`nbsupport.ct_clip.demo_data` writes a
synthetic dataset in this layout; :func:`dicom_to_ct` reads a real CT from DICOM slices (01's real-CT check).
"""
from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from nbsupport.ct_clip.preprocessing import CTVolume, load_ct
from nbsupport.manifest import SPLITS, Column, ManifestError, ManifestProblem, ManifestSchema
from nbsupport.paths import resolve_path

LABELS = (
    "Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
    "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema", "Atelectasis",
    "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion", "Mosaic attenuation pattern",
    "Peribronchial thickening", "Consolidation", "Bronchiectasis", "Interlobular septal thickening",
)
REPORT_COLUMNS = ("VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN")
METADATA_COLUMNS = (
    "VolumeName", "Manufacturer", "SeriesDescription", "ManufacturerModelName", "PatientSex", "PatientAge",
    "ReconstructionDiameter", "DistanceSourceToDetector", "DistanceSourceToPatient", "GantryDetectorTilt",
    "TableHeight", "RotationDirection", "ExposureTime", "XRayTubeCurrent", "Exposure", "FilterType",
    "GeneratorPower", "FocalSpots", "ConvolutionKernel", "PatientPosition", "RevolutionTime",
    "SingleCollimationWidth", "TotalCollimationWidth", "TableSpeed", "TableFeedPerRotation", "SpiralPitchFactor",
    "DataCollectionCenterPatient", "ReconstructionTargetCenterPatient", "ExposureModulationType", "CTDIvol",
    "ImagePositionPatient", "ImageOrientationPatient", "SliceLocation", "SamplesPerPixel",
    "PhotometricInterpretation", "Rows", "Columns", "XYSpacing", "RescaleIntercept", "RescaleSlope", "RescaleType",
    "NumberofSlices", "ZSpacing", "StudyDate",
)
VOLUME_FOLDERS = {"train": "train_fixed", "valid": "valid_fixed"}
REPORT_FILES = {"train": "radiology_text_reports/train_reports.csv",
                "valid": "radiology_text_reports/validation_reports.csv"}
METADATA_FILES = {"train": "metadata/train_metadata.csv", "valid": "metadata/validation_metadata.csv"}
LABEL_FILES = {"train": "multi_abnormality_labels/train_predicted_labels.csv",
               "valid": "multi_abnormality_labels/valid_predicted_labels.csv"}
CT_RATE_LAYOUT = ("train_fixed/train_P/train_P_s/train_P_s_r.nii.gz (and valid_fixed/...), "
                  "radiology_text_reports/*.csv, metadata/*.csv, multi_abnormality_labels/*.csv")
_VOLUME_NAME = re.compile(r"^(train|valid)_(\d+)_([a-z]+)_(\d+)$")
PREPROCESSED_FOLDER = "preprocessed"


# ---------------------------------------------------------------------------------------------- names and values
def parse_volume_name(name: str) -> dict[str, Any]:
    """``valid_53_a_1(.nii.gz)`` -> ``{"source_split": "valid", "patient": "valid_53", "scan": "valid_53_a",
    "volume": "valid_53_a_1"}``; ValueError for anything else."""
    stem = name.removesuffix(".nii.gz").removesuffix(".nii")
    m = _VOLUME_NAME.match(stem)
    if not m:
        raise ValueError(f"volume name {name!r} is not split_patient_scan_recon (e.g. 'valid_53_a_1.nii.gz')")
    split, patient, scan, _ = m.groups()
    return {"source_split": split, "patient": f"{split}_{patient}", "scan": f"{split}_{patient}_{scan}",
            "volume": stem}


def volume_relative_path(volume: str) -> str:
    """Where CT-RATE keeps a volume: ``valid_fixed/valid_53/valid_53_a/valid_53_a_1.nii.gz``."""
    info = parse_volume_name(volume)
    return f"{VOLUME_FOLDERS[info['source_split']]}/{info['patient']}/{info['scan']}/{info['volume']}.nii.gz"


def parse_xy_spacing(value: Any) -> tuple[float, float]:
    """CT-RATE's ``XYSpacing`` string ``"[0.341796875, 0.341796875]"`` -> (row, column) spacing in mm."""
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return float(value[0]), float(value[1])
    text = str(value).strip()
    m = re.fullmatch(r"\[\s*([-+0-9.eE]+)\s*,\s*([-+0-9.eE]+)\s*\]", text)
    if not m:
        raise ValueError(f"expected a string like '[0.7, 0.7]' (mm), got {value!r}")
    out = float(m.group(1)), float(m.group(2))
    if not (np.isfinite(out).all() and min(out) > 0):
        raise ValueError(f"spacing must be finite and positive, got {value!r}")
    return out


def report_text(findings: str, impressions: str = "", fields: str = "findings") -> str:
    """The text a model reads: ``findings`` (CT-Data's caption key), ``impressions`` or ``findings+impressions``."""
    parts = {"findings": [findings], "impressions": [impressions], "findings+impressions": [findings, impressions]}
    if fields not in parts:
        raise ValueError(f"report fields must be one of {list(parts)}, got {fields!r}")
    return " ".join(p.strip() for p in parts[fields] if p and p.strip() and p.strip() != "Not given.")


# ---------------------------------------------------------------------------------------------- reading CT-RATE
def _read_csv(path: Path, required: Sequence[str], problems: list[ManifestProblem]) -> pd.DataFrame | None:
    if not path.is_file():
        problems.append(ManifestProblem(None, None, "file is missing", file=str(path)))
        return None
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in required if c not in df.columns]
    if missing:
        problems.append(ManifestProblem(None, ", ".join(missing),
                                        f"required columns are missing; has {list(df.columns)}", file=str(path)))
        return None
    dup = df["VolumeName"].duplicated(keep="first")
    for i in np.flatnonzero(dup.to_numpy()):
        problems.append(ManifestProblem(int(i) + 2, "VolumeName", f"{df.VolumeName.iloc[i]!r} appears twice",
                                        file=str(path)))
    df = df[~dup].copy()
    df["_line"] = np.arange(len(dup))[~dup.to_numpy()] + 2
    df["VolumeName"] = df["VolumeName"].str.strip().str.removesuffix(".nii.gz")
    return df.set_index("VolumeName")


def scan_dataset(root: str | os.PathLike, splits: Sequence[str] = ("train", "valid")) -> pd.DataFrame:
    """One row per volume of a CT-RATE data root: the NIfTI path, report, labels, spacing and rescale values.

    Every volume named in a reports CSV must have its ``.nii.gz``, a metadata row (spacing, slope, intercept) and a
    labels row with 0/1 values; volumes on disk without a report are left out (they cannot be trained on).

    Returns:
        columns ``volume, patient, scan, source_split, nifti, findings, impressions, xy_spacing_row,
        xy_spacing_col, z_spacing, rescale_slope, rescale_intercept`` and the 18 ``LABELS``.

    Raises:
        ManifestError: listing every missing file, missing column, bad value (file, line, column, expectation).
    """
    root = resolve_path(root)
    problems: list[ManifestProblem] = []
    rows = []
    for split in splits:
        reports = _read_csv(root / REPORT_FILES[split], REPORT_COLUMNS, problems)
        meta = _read_csv(root / METADATA_FILES[split], ("VolumeName", "XYSpacing", "ZSpacing", "RescaleSlope",
                                                          "RescaleIntercept"), problems)
        labels = _read_csv(root / LABEL_FILES[split], ("VolumeName", *LABELS), problems)
        if reports is None or meta is None or labels is None:
            continue
        for volume, rep in reports.iterrows():
            where = str(root / REPORT_FILES[split])
            try:
                info = parse_volume_name(volume)
            except ValueError as err:
                problems.append(ManifestProblem(int(rep["_line"]), "VolumeName", str(err), file=where))
                continue
            nifti = volume_relative_path(volume)
            if not (root / nifti).is_file():
                problems.append(ManifestProblem(int(rep["_line"]), "VolumeName",
                                                f"volume file {nifti} does not exist under {root}", file=where))
                continue
            if not report_text(rep["Findings_EN"], rep["Impressions_EN"], "findings+impressions"):
                problems.append(ManifestProblem(int(rep["_line"]), "Findings_EN", "empty report (Findings_EN and "
                                                "Impressions_EN empty or 'Not given.'); expected the report text",
                                                file=where))
                continue
            row: dict[str, Any] = {**info, "nifti": nifti, "findings": rep["Findings_EN"],
                                   "impressions": rep["Impressions_EN"]}
            if volume not in meta.index:
                problems.append(ManifestProblem(None, "VolumeName", f"no metadata row for {volume}",
                                                file=str(root / METADATA_FILES[split])))
                continue
            m = meta.loc[volume]
            mfile, mline = str(root / METADATA_FILES[split]), int(m["_line"])
            try:
                row["xy_spacing_row"], row["xy_spacing_col"] = parse_xy_spacing(m["XYSpacing"])
            except ValueError as err:
                problems.append(ManifestProblem(mline, "XYSpacing", str(err), file=mfile))
            for column, key in (("ZSpacing", "z_spacing"), ("RescaleSlope", "rescale_slope"),
                                ("RescaleIntercept", "rescale_intercept")):
                try:
                    row[key] = float(m[column])
                    if not np.isfinite(row[key]) or (key != "rescale_intercept" and not row[key] > 0):
                        raise ValueError
                except ValueError:
                    kind = "a finite positive number" if key != "rescale_intercept" else "a finite number"
                    problems.append(ManifestProblem(mline, column, f"expected {kind}, got {m[column]!r}", file=mfile))
            if volume not in labels.index:
                problems.append(ManifestProblem(None, "VolumeName", f"no labels row for {volume}",
                                                file=str(root / LABEL_FILES[split])))
                continue
            lab = labels.loc[volume]
            for name in LABELS:
                if str(lab[name]).strip() not in ("0", "1"):
                    problems.append(ManifestProblem(int(lab["_line"]), name, f"expected 0 or 1, got {lab[name]!r}",
                                                    file=str(root / LABEL_FILES[split])))
                else:
                    row[name] = int(str(lab[name]).strip())
            rows.append(row)
    if problems:
        raise ManifestError(problems, str(root), hint=f"Expected the CT-RATE layout: {CT_RATE_LAYOUT}")
    return pd.DataFrame(rows)


def assign_splits(volumes: pd.DataFrame, val_fraction: float, seed: int) -> pd.Series:
    """CT-RATE ``valid`` -> test; ``train`` patients -> train / val (``val_fraction`` of patients), so no patient
    is in two splits. Without any ``valid`` volume, ``val_fraction`` of the train patients go to test as well."""
    rng = np.random.default_rng(seed)
    split = pd.Series("train", index=volumes.index, dtype=object)
    split[volumes.source_split == "valid"] = "test"
    train_patients = np.array(sorted(volumes.loc[volumes.source_split == "train", "patient"].unique()))
    rng.shuffle(train_patients)
    n_val = int(round(val_fraction * len(train_patients)))
    val = set(train_patients[:n_val])
    split[volumes.patient.isin(val)] = "val"
    if not (split == "test").any():
        test = set(train_patients[n_val:2 * n_val])
        split[volumes.patient.isin(test)] = "test"
    return split


# ---------------------------------------------------------------------------------------------- manifest
def read_preprocessed(path: str | os.PathLike) -> np.ndarray:
    """The float16 ``(1, X, Y, Z)`` volume (RAS axes, 0..1 for -1000..1500 HU) of a preprocessed ``.npz``."""
    with np.load(path) as npz:
        if "image" not in npz:
            raise ValueError(f"{path} has no 'image' array (keys: {list(npz.keys())})")
        image = npz["image"]
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(f"{path}: expected an image of shape (1, X, Y, Z), got {image.shape}")
    return image


def _check_label(value: Any) -> str | None:
    return None if str(value).strip() in ("0", "1") else f"expected 0 or 1, got {value!r}"


CT_CLIP_SCHEMA = ManifestSchema(
    dataset="ct-rate",
    key="volume",
    columns=(
        Column("volume", help="CT-RATE VolumeName without .nii.gz, e.g. valid_53_a_1"),
        Column("patient", help="patient id (train_P / valid_P); splits never share a patient"),
        Column("image", "path", help="preprocessed float16 npz (key 'image', (1, X, Y, Z) RAS), relative to the root"),
        Column("nifti", "str", nullable=True, help="source .nii.gz relative to the data root"),
        Column("report", help="the text the model reads (Findings_EN by default)"),
        Column("findings", nullable=True, help="Findings_EN"),
        Column("impressions", nullable=True, help="Impressions_EN"),
        Column("spacing_x", "float", help="output voxel size along R (mm)"),
        Column("spacing_y", "float", help="output voxel size along A (mm)"),
        Column("spacing_z", "float", help="output voxel size along S (mm)"),
        *(Column(name, _check_label, help="0/1 label (CT-RATE multi_abnormality_labels)") for name in LABELS),
        Column("split", "split", allowed=SPLITS, help="train / val / test (CT-RATE valid = test), by patient"),
    ),
    readers={},  # reading every npz would double the preprocessing time; 02_train opens them anyway
    row_check=lambda row: ((name, f"expected a voxel size > 0 mm, got {row[name]!r}")
                           for name in ("spacing_x", "spacing_y", "spacing_z") if not row[name] > 0),
)


def label_matrix(manifest: pd.DataFrame, labels: Sequence[str] = LABELS) -> np.ndarray:
    """[N, L] int8 labels of manifest rows."""
    return manifest[list(labels)].astype(int).to_numpy(dtype=np.int8)


def labels_present(manifest: pd.DataFrame) -> list[str]:
    """The labels with at least one positive and one negative row (AUROC is defined for them only)."""
    y = label_matrix(manifest)
    return [name for name, col in zip(LABELS, y.T) if 0 < col.sum() < len(col)]


# ---------------------------------------------------------------------------------------------- dataset
def resize_volume(image: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Trilinear resize of ``(C, X, Y, Z)`` to ``(C, *size)`` (align_corners=False: an area-like downsample)."""
    if tuple(image.shape[1:]) == tuple(size):
        return image
    return F.interpolate(image[None].float(), size=tuple(size), mode="trilinear", align_corners=False,
                         antialias=False)[0]


class CTVolumeDataset(Dataset):
    """Preprocessed volumes resized to the model input, with their report and labels.

    Items: ``{"image": float32 (1, X, Y, Z) in 0..1, "report_index": int, "labels": float32 (18,), "index": int}``.
    The resized volumes are kept in memory as float16 (64x64x48 is 0.4 MB), so every epoch after the first reads
    no file. ``augment`` adds CT-Data's intensity shift (±0.08) and Gaussian noise (σ 0.015), clamped to 0..1;
    no flips, since reports name the side.
    """

    def __init__(self, manifest: pd.DataFrame, root: str | os.PathLike, input_size: Sequence[int],
                 augment: bool = False, cache: bool = True):
        self.manifest = manifest.reset_index(drop=True)
        self.root = Path(root)
        self.input_size = tuple(int(s) for s in input_size)
        self.augment = augment
        self.labels = torch.from_numpy(label_matrix(self.manifest).astype(np.float32))
        self._cache: dict[int, torch.Tensor] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.manifest)

    def volume(self, index: int) -> torch.Tensor:
        """float32 (1, *input_size) of row ``index``."""
        if self._cache is not None and index in self._cache:
            return self._cache[index].float()
        path = self.root / self.manifest.at[index, "image"]
        image = resize_volume(torch.from_numpy(read_preprocessed(path).astype(np.float32)), self.input_size)
        if self._cache is not None:
            self._cache[index] = image.half()
        return image

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = self.volume(index)
        if self.augment:
            image = (image + (torch.rand(()) * 0.16 - 0.08) + torch.randn_like(image) * 0.015).clamp(0, 1)
        return {"image": image, "report_index": index, "labels": self.labels[index], "index": index}


# ---------------------------------------------------------------------------------------------- real CT (DICOM)
def packaged_real_ct() -> list[Path]:
    """Real CT DICOM slices that installed packages ship: pydicom's CT_small.dcm (a GE CT slice, 128 x 128)."""
    from pydicom.data import get_testdata_file

    return [Path(get_testdata_file("CT_small.dcm"))]


def dicom_to_ct(source: str | os.PathLike | Sequence[str | os.PathLike]) -> CTVolume:
    """A CT DICOM series (a folder of one series' files, one file, or a list of files) as a :class:`CTVolume` in
    HU, stored as (column, row, slice) like a NIfTI converted from it, its orientation from the series' affine.

    :func:`nbsupport.dicom.read_dicom_series` does the reading: slices ordered along the slice normal, each plane's
    rescale applied, a series with missing slices, mixed orientations or uneven spacing refused naming the files,
    and no patient identifier kept or printed.
    """
    import nibabel as nib

    from nbsupport.dicom import read_dicom_series

    volume, affine = read_dicom_series(source)  # (slice, row, column), voxel (d, h, w) -> RAS mm
    affine = affine[:, [2, 1, 0, 3]]  # voxel (w, h, d) -> RAS, for the transposed array
    ornt = nib.orientations.io_orientation(affine)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    return CTVolume(stored=volume.transpose(2, 1, 0), slope=1.0, intercept=0.0,
                    spacing=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
                    ras_axis=tuple(int(a) for a in ornt[:, 0]),  # type: ignore[arg-type]
                    flipped=tuple(bool(f < 0) for f in ornt[:, 1]))  # type: ignore[arg-type]


def read_ct(path: str | os.PathLike) -> CTVolume:
    """A CT file or series as a :class:`CTVolume`: a ``.nii(.gz)`` (HU from the header's scaling), a DICOM series
    folder or one DICOM file."""
    path = Path(path)
    if path.is_dir() or not path.name.lower().endswith((".nii", ".nii.gz")):
        return dicom_to_ct(path)
    return load_ct(path)


def read_real_ct(source: str) -> tuple[CTVolume, str]:
    """A real CT and its display name: ``''`` = pydicom's packaged slice, else :func:`read_ct` of the path (a
    ``.nii(.gz)``, a DICOM series folder or one DICOM file)."""
    if not source:
        return dicom_to_ct(packaged_real_ct()), "pydicom CT_small.dcm"
    path = resolve_path(source)
    return read_ct(path), path.name
