"""CT-RATE exactly as released (either release), the preprocessed manifest and its Dataset, and real CT DICOM.

Layout of the Hugging Face repository ``ibrahimhamamci/CT-RATE``; ``data_root`` may be the repository root or its
``dataset/`` folder (:func:`dataset_folder`)::

    dataset/train_fixed/train_{P}/train_{P}_{s}/train_{P}_{s}_{r}.nii.gz  re-release ("v2"); P patient, s scan, r recon
    dataset/valid_fixed/valid_{P}/valid_{P}_{s}/valid_{P}_{s}_{r}.nii.gz
    dataset/train/..., dataset/valid/...                                  first release, same names
    dataset/radiology_text_reports/{train_reports,validation_reports}.csv VolumeName, ClinicalInformation_EN,
                                                                          Technique_EN, Findings_EN, Impressions_EN
    dataset/metadata/{train_metadata,validation_metadata}.csv             VolumeName, ..., ImageOrientationPatient,
                                                                          XYSpacing "[0.7, 0.7]", RescaleIntercept,
                                                                          RescaleSlope, ZSpacing, ...
    dataset/multi_abnormality_labels/{train,valid}_predicted_labels.csv   VolumeName + the 18 ``LABELS`` (0/1)

The two releases store different things (CT-RATE discussion #58 "blank nifti header", the fix script of PR #59,
as adapted in TorchIO's ``datasets/ct_rate.py`` ``CtRate._fix_image``; CT-CLIP issues #28 and #50):

* first release (``train/``, ``valid/``): the raw stored DICOM values (float32), an identity affine and no spacing;
  ``HU = RescaleSlope * value + RescaleIntercept`` from the metadata CSV, spacing from ``XYSpacing`` (square
  pixels throughout CT-RATE) and ``ZSpacing``, stored axes along ``ImageOrientationPatient``'s row and column
  cosines and their cross product (DICOM LPS), as the fix script sets them.
* re-release (``*_fixed``): what the fix script made of those: HU already (int16, header ``scl_slope`` 1 /
  ``scl_inter`` 0), the real spacing and an L,P,S affine. The CSV's slope and intercept must not be applied again
  (CT-CLIP's ``scripts/data.py`` lines 98-111 still do, which puts water at -1024 HU on the re-release).

The folder decides the convention (:func:`volume_tree`; with both present ``*_fixed`` is read and the choice
printed), and every volume is checked against it: air must lie at -1000 +/- 500 HU
(:func:`nbsupport.ct_clip.preprocessing.check_air`), so a volume in the wrong folder is an error naming it.
:func:`scan_dataset` joins the CSVs with the volumes on disk and reports every problem at once;
:func:`read_volume` decodes one volume. :mod:`nbsupport.ct_clip.demo_data` writes a synthetic dataset in either
layout; :func:`dicom_to_ct` reads a real CT from DICOM slices (01's real-CT check).
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from nbsupport.ct_clip.preprocessing import (HEADER_READING, CTVolume, VolumeJob, check_air, decode_job,
                                             load_ct)
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
RELEASES = ("fixed", "first")  # the re-release ("v2", HU stored) and the first release (raw values + metadata)
VOLUME_FOLDERS = {"fixed": {"train": "train_fixed", "valid": "valid_fixed"},
                  "first": {"train": "train", "valid": "valid"}}
DATASET_FOLDER = "dataset"  # the CT-RATE repository keeps everything under dataset/
REPORT_FILES = {"train": "radiology_text_reports/train_reports.csv",
                "valid": "radiology_text_reports/validation_reports.csv"}
METADATA_FILES = {"train": "metadata/train_metadata.csv", "valid": "metadata/validation_metadata.csv"}
LABEL_FILES = {"train": "multi_abnormality_labels/train_predicted_labels.csv",
               "valid": "multi_abnormality_labels/valid_predicted_labels.csv"}
CT_RATE_LAYOUT = ("[dataset/]train_fixed/train_P/train_P_s/train_P_s_r.nii.gz and valid_fixed/... (or the first "
                  "release's train/ and valid/), radiology_text_reports/*.csv, metadata/*.csv, "
                  "multi_abnormality_labels/*.csv")
_METADATA_REQUIRED = ("VolumeName", "XYSpacing", "ZSpacing", "RescaleSlope", "RescaleIntercept")
_FIRST_RELEASE_READING = "the metadata CSV's RescaleSlope / RescaleIntercept (first release: raw values stored)"
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


def volume_relative_path(volume: str, release: str = "fixed") -> str:
    """Where a CT-RATE release keeps a volume, relative to ``dataset/``:
    ``valid_fixed/valid_53/valid_53_a/valid_53_a_1.nii.gz`` (``release="first"``: ``valid/...``)."""
    info = parse_volume_name(volume)
    folder = VOLUME_FOLDERS[release][info["source_split"]]
    return f"{folder}/{info['patient']}/{info['scan']}/{info['volume']}.nii.gz"


def dataset_folder(root: str | os.PathLike) -> Path:
    """The folder holding CT-RATE's tables and volume trees: ``root/dataset`` when ``root`` is the repository root
    (it has a ``dataset/`` folder and none of the tables' folders itself), else ``root``."""
    root = Path(root)
    inner = root / DATASET_FOLDER
    own = ("radiology_text_reports", "metadata", *VOLUME_FOLDERS["fixed"].values(), *VOLUME_FOLDERS["first"].values())
    return inner if inner.is_dir() and not any((root / name).is_dir() for name in own) else root


def volume_tree(folder: Path, split: str) -> str | None:
    """The release whose volume folder ``folder`` (a :func:`dataset_folder`) holds for ``split`` (``train`` /
    ``valid``): ``"fixed"`` where ``<split>_fixed/`` exists (also when ``<split>/`` exists beside it: the
    re-release is the corrected one, and the choice is printed), else ``"first"`` where ``<split>/`` exists, else
    None."""
    fixed, first = (folder / VOLUME_FOLDERS[r][split] for r in RELEASES)
    if fixed.is_dir():
        if first.is_dir():
            print(f"CT-RATE: both {first.name}/ (first release) and {fixed.name}/ (re-release) are in {folder}; "
                  f"reading {fixed.name}/ (HU stored, header spacing and orientation)")
        return "fixed"
    return "first" if first.is_dir() else None


def parse_orientation(value: Any) -> tuple[tuple[float, float, float], ...]:
    """DICOM ``ImageOrientationPatient`` (row and column cosines, LPS; CT-RATE writes ``"[1, 0, 0, 0, 1, 0]"``)
    -> 3 x 3 RAS directions of stored axes 0, 1, 2 as columns: row, column and their cross product (the slice
    direction CT-RATE's fix script gives the volume), with x and y negated from DICOM's LPS to RAS."""
    numbers = re.findall(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?", str(value))
    cosines = np.array([float(v) for v in numbers])
    if cosines.size != 6 or not np.isfinite(cosines).all():
        raise ValueError(f"expected 6 direction cosines like '[1, 0, 0, 0, 1, 0]', got {value!r}")
    row, column = cosines[:3], cosines[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-2 or abs(np.linalg.norm(column) - 1) > 1e-2 or abs(row @ column) > 1e-2:
        raise ValueError(f"the row and column cosines must be orthogonal unit vectors, got {value!r}")
    lps = np.stack([row, column, np.cross(row, column)], axis=1)
    ras = np.diag([-1.0, -1.0, 1.0]) @ lps
    return tuple(tuple(float(v) for v in line) for line in ras)  # type: ignore[return-value]


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
    """One row per volume of CT-RATE as downloaded: the NIfTI path, its release, report, labels and metadata.

    ``root`` is the repository root or its ``dataset/`` folder; each split is read from the volume tree
    :func:`volume_tree` picks. Every volume named in a reports CSV must have its ``.nii.gz``, a metadata row
    (spacing, slope, intercept; for the first release also ``ImageOrientationPatient``) and a labels row with 0/1
    values; volumes on disk without a report are left out (they cannot be trained on).

    Returns:
        columns ``volume, patient, scan, source_split, release ("fixed" / "first"), nifti`` (relative to
        ``root``), ``findings, impressions, xy_spacing_row, xy_spacing_col, z_spacing, rescale_slope,
        rescale_intercept, directions`` (RAS directions of the stored axes, first release only; None for
        ``fixed``, whose header has them) and the 18 ``LABELS``.

    Raises:
        ManifestError: listing every missing file, missing column, bad value (file, line, column, expectation).
    """
    root = resolve_path(root)
    folder = dataset_folder(root)
    prefix = folder.relative_to(root).as_posix() + "/" if folder != root else ""
    problems: list[ManifestProblem] = []
    rows = []
    for split in splits:
        release = volume_tree(folder, split)
        if release is None:
            problems.append(ManifestProblem(None, None, f"no volume folder for {split}: expected "
                                            f"{VOLUME_FOLDERS['fixed'][split]}/ (re-release) or "
                                            f"{VOLUME_FOLDERS['first'][split]}/ (first release)", file=str(folder)))
        reports = _read_csv(folder / REPORT_FILES[split], REPORT_COLUMNS, problems)
        meta = _read_csv(folder / METADATA_FILES[split], _METADATA_REQUIRED
                         + (("ImageOrientationPatient",) if release == "first" else ()), problems)
        labels = _read_csv(folder / LABEL_FILES[split], ("VolumeName", *LABELS), problems)
        if release is None or reports is None or meta is None or labels is None:
            continue
        for volume, rep in reports.iterrows():
            where = str(folder / REPORT_FILES[split])
            try:
                info = parse_volume_name(volume)
            except ValueError as err:
                problems.append(ManifestProblem(int(rep["_line"]), "VolumeName", str(err), file=where))
                continue
            nifti = volume_relative_path(volume, release)
            if not (folder / nifti).is_file():
                problems.append(ManifestProblem(int(rep["_line"]), "VolumeName",
                                                f"volume file {nifti} does not exist under {folder}", file=where))
                continue
            if not report_text(rep["Findings_EN"], rep["Impressions_EN"], "findings+impressions"):
                problems.append(ManifestProblem(int(rep["_line"]), "Findings_EN", "empty report (Findings_EN and "
                                                "Impressions_EN empty or 'Not given.'); expected the report text",
                                                file=where))
                continue
            row: dict[str, Any] = {**info, "release": release, "nifti": prefix + nifti,
                                   "findings": rep["Findings_EN"], "impressions": rep["Impressions_EN"]}
            if volume not in meta.index:
                problems.append(ManifestProblem(None, "VolumeName", f"no metadata row for {volume}",
                                                file=str(folder / METADATA_FILES[split])))
                continue
            row.update(_metadata_fields(meta.loc[volume], release, str(folder / METADATA_FILES[split]), problems))
            if volume not in labels.index:
                problems.append(ManifestProblem(None, "VolumeName", f"no labels row for {volume}",
                                                file=str(folder / LABEL_FILES[split])))
                continue
            lab = labels.loc[volume]
            for name in LABELS:
                if str(lab[name]).strip() not in ("0", "1"):
                    problems.append(ManifestProblem(int(lab["_line"]), name, f"expected 0 or 1, got {lab[name]!r}",
                                                    file=str(folder / LABEL_FILES[split])))
                else:
                    row[name] = int(str(lab[name]).strip())
            rows.append(row)
    if problems:
        raise ManifestError(problems, str(root), hint=f"Expected the CT-RATE layout: {CT_RATE_LAYOUT}")
    return pd.DataFrame(rows)


def _metadata_fields(m: pd.Series, release: str, file: str, problems: list[ManifestProblem]) -> dict[str, Any]:
    """Spacing, rescale and (first release) stored-axis directions of one metadata row; bad values go to
    ``problems`` with the file, line and column."""
    line = int(m["_line"])
    out: dict[str, Any] = {"directions": None}
    try:
        out["xy_spacing_row"], out["xy_spacing_col"] = parse_xy_spacing(m["XYSpacing"])
    except ValueError as err:
        problems.append(ManifestProblem(line, "XYSpacing", str(err), file=file))
    for column, key in (("ZSpacing", "z_spacing"), ("RescaleSlope", "rescale_slope"),
                        ("RescaleIntercept", "rescale_intercept")):
        try:
            out[key] = float(m[column])
            if not np.isfinite(out[key]) or (key != "rescale_intercept" and not out[key] > 0):
                raise ValueError
        except ValueError:
            kind = "a finite positive number" if key != "rescale_intercept" else "a finite number"
            problems.append(ManifestProblem(line, column, f"expected {kind}, got {m[column]!r}", file=file))
    if release == "first":
        try:
            out["directions"] = parse_orientation(m["ImageOrientationPatient"])
        except ValueError as err:
            problems.append(ManifestProblem(line, "ImageOrientationPatient", str(err), file=file))
    return out


def volume_job(root: str | os.PathLike, row: Mapping[str, Any], output: str = "") -> VolumeJob:
    """How to decode one :func:`scan_dataset` row as its release stores it: the header for ``fixed`` (HU, spacing
    and affine in the file); the metadata's rescale, spacing and orientation for ``first``."""
    nifti = str(Path(root) / row["nifti"])
    if row["release"] == "fixed":
        return VolumeJob(row["volume"], nifti, output)
    return VolumeJob(row["volume"], nifti, output, slope=row["rescale_slope"], intercept=row["rescale_intercept"],
                     xy_spacing=(row["xy_spacing_row"], row["xy_spacing_col"]), z_spacing=row["z_spacing"],
                     directions=row["directions"], reading=_FIRST_RELEASE_READING)


def read_volume(root: str | os.PathLike, volume: str) -> CTVolume:
    """One CT-RATE volume (``VolumeName``) decoded as its release stores it and checked against air, for views and
    single-volume uses (the preprocessing runner does the same for the :func:`scan_dataset` rows)."""
    root = resolve_path(root)
    folder = dataset_folder(root)
    info = parse_volume_name(volume)
    split = info["source_split"]
    release = volume_tree(folder, split)
    if release is None:
        raise FileNotFoundError(f"{folder} has neither {VOLUME_FOLDERS['fixed'][split]}/ nor "
                                f"{VOLUME_FOLDERS['first'][split]}/; expected the CT-RATE layout: {CT_RATE_LAYOUT}")
    row: dict[str, Any] = {"volume": info["volume"], "release": release,
                           "nifti": (folder / volume_relative_path(volume, release)).relative_to(root)}
    if release == "first":
        problems: list[ManifestProblem] = []
        file = folder / METADATA_FILES[split]
        meta = _read_csv(file, (*_METADATA_REQUIRED, "ImageOrientationPatient"), problems)
        if meta is not None and info["volume"] not in meta.index:
            problems.append(ManifestProblem(None, "VolumeName", f"no metadata row for {info['volume']}",
                                            file=str(file)))
        elif meta is not None:
            row.update(_metadata_fields(meta.loc[info["volume"]], release, str(file), problems))
        if problems:
            raise ManifestError(problems, str(root), hint=f"Expected the CT-RATE layout: {CT_RATE_LAYOUT}")
    return decode_job(volume_job(root, row))


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
    """A user's CT file or series as a :class:`CTVolume`, checked against air
    (:func:`nbsupport.ct_clip.preprocessing.check_air`): a ``.nii(.gz)`` holds HU through its header's scaling (as
    CT-RATE's ``*_fixed`` volumes and NIfTI converted from DICOM by dcm2niix, SimpleITK or nibabel do), a DICOM
    series folder or one DICOM file through each slice's RescaleSlope / RescaleIntercept."""
    path = Path(path)
    if path.is_dir() or not path.name.lower().endswith((".nii", ".nii.gz")):
        ct = dicom_to_ct(path)
        check_air(ct, path, "the DICOM RescaleSlope / RescaleIntercept")
    else:
        ct = load_ct(path)
        check_air(ct, path, HEADER_READING)
    return ct


def read_real_ct(source: str) -> tuple[CTVolume, str]:
    """A real CT and its display name: ``''`` = pydicom's packaged slice, else :func:`read_ct` of the path (a
    ``.nii(.gz)``, a DICOM series folder or one DICOM file)."""
    if not source:
        return dicom_to_ct(packaged_real_ct()), "pydicom CT_small.dcm"
    path = resolve_path(source)
    return read_ct(path), path.name
