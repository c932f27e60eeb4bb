"""Chest X-ray report data: CheXpert Plus as shipped, the seed's CSV, DICOM images; the manifest and the Datasets.

Accepted layouts under a data root:

* **CheXpert Plus**: ``df_chexpert_plus_240401.csv`` (27 columns, ``CHEXPERT_PLUS_COLUMNS``) with
  ``path_to_image`` (e.g. ``train/patient42142/study5/view1_frontal.jpg``, relative to the root; the PNG release
  unpacks the same path with ``.png`` under ``PNG/``, in some unpackings ``PNG/PNG/``, where it is looked for
  when the file itself is absent), ``section_findings``, ``section_impression``, ``deid_patient_id`` and ``split``
  (train / valid); plus the CheXbert labels ``chexbert_labels/findings_fixed.json`` and ``impression_fixed.json``,
  JSON lines keyed by ``path_to_image`` with the 14 labels valued 1.0 / 0.0 / -1.0 / null. The manifest's
  ``label_source`` says whose labels a row carries (``chexbert``, or ``rule`` for an image the files do not list).
* **seed CSV** (charangajjala/MedGen_AI ``final_dataset_latest.csv``): ``image_path, diagnostic_prompt,
  target_report``. It has no labels; they are read from the report by the rule labeler.
* any image may be a DICOM file (``.dcm``): modality LUT, then VOI LUT / window, MONOCHROME1 inverted.

:func:`build_manifest` turns either into one row per image (``CXR_SCHEMA``), split by patient;
:func:`write_resized_images` writes the 224x224 RGB copies the model reads; :class:`ReportImageDataset` serves
them normalised for the ImageNet-style encoder. The synthetic demo dataset is written by :mod:`.demo_data`.
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from nbsupport.cxr_report.labeler import LABELS, label_report
from nbsupport.dicom import read_dicom_image
from nbsupport.manifest import Column, ManifestError, ManifestProblem, ManifestSchema
from nbsupport.progress import progress
from nbsupport.runs import atomic_path

CHEXPERT_PLUS_CSV = "df_chexpert_plus_240401.csv"
CHEXPERT_PLUS_COLUMNS = (
    "path_to_image", "path_to_dcm", "frontal_lateral", "ap_pa", "deid_patient_id", "patient_report_date_order",
    "report", "section_narrative", "section_clinical_history", "section_history", "section_comparison",
    "section_technique", "section_procedure_comments", "section_findings", "section_impression",
    "section_end_of_impression", "section_summary", "section_accession_number", "age", "sex", "race", "ethnicity",
    "interpreter_needed", "insurance_type", "recent_bmi", "deceased", "split",
)
CHEXBERT_FILES = {"findings": "chexbert_labels/findings_fixed.json",
                  "impression": "chexbert_labels/impression_fixed.json"}
SEED_CSV_COLUMNS = ("image_path", "diagnostic_prompt", "target_report")
REAL_CXR_DICOM = "RG1_UNCR.dcm"  # the one real chest radiograph pydicom-data ships
REAL_CXR_TITLE = "real PA chest radiograph (pydicom-data RG1_UNCR)"
DEFAULT_PROMPT = "Describe the findings of this chest X-ray."
LABEL_COLUMNS = tuple("label_" + re.sub(r"\W+", "_", name.lower()) for name in LABELS)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CHEXBERT, RULE = "chexbert", "rule"  # values of the manifest's label_source column
SOURCE_LINE = "_source_line"  # (CSV file name, line, column) of a row, for problems found after reading the CSV
_PATIENT = re.compile(r"(patient\d+)")
_STUDY = re.compile(r"(study\d+)")


def _label_value(value: Any) -> str | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return f"expected 1, 0, -1 or empty, got {value!r}"
    return None if number in (1.0, 0.0, -1.0) else f"expected 1, 0, -1 or empty, got {value!r}"


def _read_image_check(path: Path) -> Any:
    return read_xray(path)


CXR_SCHEMA = ManifestSchema(
    dataset="cxr_report",
    columns=(
        Column("id", "str", help="unique image id (path_to_image without extension)"),
        Column("patient", "str", help="patient id; splits never share a patient"),
        Column("image", "path", help="model input: 8-bit RGB PNG at the preprocessing size"),
        Column("source_image", "path", help="the image as shipped (JPEG / PNG / DICOM)"),
        Column("view", "str", nullable=True, help="frontal_lateral / ap_pa as shipped"),
        Column("prompt", "str", help="diagnostic prompt given to the LM before the report"),
        Column("report", "str", help="target report text (findings and/or impression)"),
        *(Column(c, "float", nullable=True, allowed=(1.0, 0.0, -1.0), help=f"CheXbert label {n}: 1/0/-1/empty")
          for c, n in zip(LABEL_COLUMNS, LABELS)),
        Column("label_source", "str", required=False, allowed=(CHEXBERT, RULE),
               help="who labelled the row: 'chexbert' (the dataset's own CheXbert labels) or 'rule' (our rule "
                    "labeler on the report; the seed CSV ships no labels)"),
        Column("split", "split", help="train / val / test, by patient"),
    ),
    key="id",
    readers={"image": _read_image_check},
)


# ---------------------------------------------------------------------------------------------- images
def read_dicom(path: str | Path) -> np.ndarray:
    """A DICOM radiograph as float32 (H, W) in [0, 1] for display, bright = dense (bone white).

    Pixels come from :func:`nbsupport.dicom.read_dicom_image` (modality LUT, the file's VOI LUT or window,
    MONOCHROME1 inverted, identifiers never carried forward), then stretched to the full [0, 1] range.
    """
    values, _ = read_dicom_image(path)
    low, high = float(values.min()), float(values.max())
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def read_xray(path: str | Path) -> np.ndarray:
    """An X-ray as uint8 (H, W) grayscale from JPEG / PNG (8 or 16 bit) / DICOM.

    Raises:
        FileNotFoundError / ValueError: naming the file, when it is missing or cannot be decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image does not exist")
    if path.suffix.lower() in (".dcm", ".dicom"):
        return np.round(read_dicom(path) * 255).astype(np.uint8)
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError(f"{path}: not a readable image (expected JPEG, PNG or DICOM)")
    if path.suffix.lower() in (".jpg", ".jpeg"):  # OpenCV decodes a cut-off JPEG (grey rows below) with a warning
        with open(path, "rb") as fh:
            fh.seek(max(path.stat().st_size - 64, 0))
            tail = fh.read().rstrip(b"\x00\r\n ")
        if not tail.endswith(b"\xff\xd9"):
            raise ValueError(f"{path}: truncated JPEG (no end-of-image marker); expected a complete JPEG file")
    if image.ndim == 3:
        image = cv2.cvtColor(image[..., :3], cv2.COLOR_BGR2GRAY)
    if image.dtype != np.uint8:
        image = image.astype(np.float32)
        image = np.round(255 * (image - image.min()) / max(float(image.max() - image.min()), 1.0)).astype(np.uint8)
    return image


def resize_rgb(gray: np.ndarray, size: int) -> np.ndarray:
    """(H, W) uint8 -> (size, size, 3) uint8: area-resized and replicated to RGB, as the seed's 224x224 inputs."""
    resized = cv2.resize(gray, (size, size), interpolation=cv2.INTER_AREA)
    return np.repeat(resized[..., None], 3, axis=2)


def normalise_for_encoder(rgb: np.ndarray) -> torch.Tensor:
    """(S, S, 3) uint8 -> (3, S, S) float32 with ImageNet mean/std (what DenseNet-121's weights expect)."""
    x = torch.from_numpy(rgb).float().permute(2, 0, 1) / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def load_encoder_input(path: str | Path, size: int) -> torch.Tensor:
    """Any X-ray file -> the (3, size, size) normalised tensor the image encoder takes."""
    gray = read_xray(path)
    if gray.shape != (size, size):
        return normalise_for_encoder(resize_rgb(gray, size))
    return normalise_for_encoder(np.repeat(gray[..., None], 3, axis=2))


def real_cxr_path() -> Path:
    """RG1_UNCR.dcm from pydicom-data (found offline through pydicom's external data sources)."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(REAL_CXR_DICOM)
    if path is None:
        raise FileNotFoundError(f"{REAL_CXR_DICOM} not found: `pip install pydicom-data` ships it")
    return Path(path)


# ---------------------------------------------------------------------------------------------- dataset formats
def detect_format(root: Path) -> str:
    """``"chexpert_plus"`` or ``"seed_csv"``, from the files in ``root``."""
    if (root / CHEXPERT_PLUS_CSV).is_file():
        return "chexpert_plus"
    if list(root.glob("*.csv")):
        return "seed_csv"
    raise FileNotFoundError(f"{root}: expected {CHEXPERT_PLUS_CSV} (CheXpert Plus) or a CSV with columns "
                            f"{', '.join(SEED_CSV_COLUMNS)} (seed format)")


IMAGE_TREES = ("", "PNG", "PNG/PNG")  # where an image path of the CSV may sit under the data root
IMAGE_SUFFIXES = (".jpg", ".png", ".dcm")  # the CSV's own suffix first, then these


def _locate_image(root: Path, relative: str) -> Path:
    """The file of a CSV image path under ``root``: the path itself, else the same path with ``.png`` / ``.jpg`` /
    ``.dcm``, directly under ``root`` or in the ``PNG/`` (some unpackings: ``PNG/PNG/``) tree of CheXpert Plus'
    PNG release, whose CSV still names ``train/patientN/studyM/view1_frontal.jpg``. The path tried first when
    none exists (for the error message)."""
    first = root / relative
    for tree in IMAGE_TREES:
        path = root / tree / relative
        for candidate in (path, *(path.with_suffix(s) for s in IMAGE_SUFFIXES)):
            if candidate.is_file():
                return candidate
    return first


def _tried(relative: str) -> str:
    """The places :func:`_locate_image` looks, for an error message."""
    trees = ", ".join(f"{t}/" for t in IMAGE_TREES if t)
    return f"tried {', '.join(IMAGE_SUFFIXES)} directly and under {trees}"


def read_chexbert_labels(path: Path) -> dict[str, dict[str, float | None]]:
    """JSON lines keyed by ``path_to_image`` -> {path_to_image: {label: 1.0/0.0/-1.0/None}}.

    Raises:
        ManifestError: every malformed line at once (line number, field, what was expected).
    """
    out: dict[str, dict[str, float | None]] = {}
    problems: list[ManifestProblem] = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                problems.append(ManifestProblem(number, None, f"not JSON ({err.msg})", file=path.name))
                continue
            key = record.get("path_to_image")
            if not isinstance(key, str):
                problems.append(ManifestProblem(number, "path_to_image", "expected the image path string",
                                                file=path.name))
                continue
            unknown = sorted(set(record) - {"path_to_image", *LABELS})
            for name in unknown:
                problems.append(ManifestProblem(number, name, f"unknown label name {name!r}; expected one of the 14 "
                                                f"CheXbert labels {list(LABELS)}", file=path.name))
            labels = {}
            for name in LABELS:
                value = record.get(name)
                if value is not None and (isinstance(value, bool) or value not in (1, 0, -1)):
                    problems.append(ManifestProblem(number, name, f"expected 1.0, 0.0, -1.0 or null, got {value!r}",
                                                    file=path.name))
                    continue
                labels[name] = None if value is None else float(value)
            out[key] = labels
    if problems:
        raise ManifestError(problems, path)
    return out


def report_text(findings: str, impression: str, section: str) -> str:
    """The target report from CheXpert Plus sections: ``findings``, ``impression`` or ``findings+impression``
    (findings, else impression, when one of them is empty)."""
    findings, impression = (findings or "").strip(), (impression or "").strip()
    if section == "findings":
        return findings
    if section == "impression":
        return impression
    return " ".join(t for t in (findings, impression) if t)


def read_chexpert_plus(root: Path, report_section: str = "findings", prompt: str = DEFAULT_PROMPT,
                       frontal_only: bool = True) -> pd.DataFrame:
    """Rows of CheXpert Plus with a non-empty report: id, patient, source_image, view, prompt, report, labels,
    and the shipped split (``train`` / ``valid``) as ``source_split``.

    Raises:
        ManifestError: missing columns, or a row without ``path_to_image`` / patient (all problems at once).
    """
    csv = root / CHEXPERT_PLUS_CSV
    df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    needed = ("path_to_image", "deid_patient_id", "frontal_lateral", "ap_pa", "section_findings",
              "section_impression", "split")
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise ManifestError([ManifestProblem(1, c, "column missing from the header (CheXpert Plus has 27 columns: "
                                             + ", ".join(CHEXPERT_PLUS_COLUMNS) + ")", file=csv.name)
                             for c in missing], csv)
    label_file = root / CHEXBERT_FILES["impression" if report_section == "impression" else "findings"]
    rows, problems = [], []
    try:
        labels = read_chexbert_labels(label_file) if label_file.is_file() else {}
    except ManifestError as err:  # reported together with the CSV's problems below
        labels, problems = {}, list(err.problems)
    first_line: dict[str, int] = {}
    for number, r in enumerate(df.itertuples(index=False), start=2):
        if r.path_to_image and r.path_to_image in first_line:
            problems.append(ManifestProblem(number, "path_to_image", f"duplicate image {r.path_to_image!r}, first on "
                                            f"line {first_line[r.path_to_image]}; expected one row per image",
                                            file=csv.name))
            continue
        first_line.setdefault(r.path_to_image, number)
        if frontal_only and r.frontal_lateral and r.frontal_lateral.lower() != "frontal":
            continue
        report = report_text(r.section_findings, r.section_impression, report_section)
        if not report:
            continue
        if not r.path_to_image:
            problems.append(ManifestProblem(number, "path_to_image", "empty; expected the image path", file=csv.name))
            continue
        patient = r.deid_patient_id or (_PATIENT.search(r.path_to_image) or [None])[0]
        if not patient:
            problems.append(ManifestProblem(number, "deid_patient_id", "empty and no patientN in path_to_image; "
                                            "expected a patient id", file=csv.name))
            continue
        source = _locate_image(root, r.path_to_image)
        if not source.is_file():
            problems.append(ManifestProblem(number, "path_to_image", f"image {r.path_to_image} does not exist under "
                                            f"{root} ({_tried(r.path_to_image)}); expected the image file",
                                            file=csv.name))
            continue
        shipped = labels.get(r.path_to_image)
        values = shipped or label_report(report)
        row = {"id": str(Path(r.path_to_image).with_suffix("")), "patient": patient,
               "source_image": source, "view": f"{r.frontal_lateral} {r.ap_pa}".strip(),
               "prompt": prompt, "report": report, "source_split": r.split,
               "label_source": CHEXBERT if shipped else RULE, SOURCE_LINE: (csv.name, number, "path_to_image")}
        row.update({c: values.get(n) for c, n in zip(LABEL_COLUMNS, LABELS)})
        rows.append(row)
    if problems:
        raise ManifestError(problems + undecodable_images(rows), csv)
    return pd.DataFrame(rows)


def read_seed_csv(csv: Path) -> pd.DataFrame:
    """Rows of the seed's CSV (``image_path, diagnostic_prompt, target_report``); labels from the rule labeler,
    patient from a ``patientN`` path component (else each image is its own patient)."""
    df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    missing = [c for c in SEED_CSV_COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError([ManifestProblem(1, c, f"column missing; expected columns {', '.join(SEED_CSV_COLUMNS)}",
                                             file=csv.name) for c in missing], csv)
    rows, problems = [], []
    for number, r in enumerate(df.itertuples(index=False), start=2):
        for column in SEED_CSV_COLUMNS:
            if not str(getattr(r, column)).strip():
                problems.append(ManifestProblem(number, column, "empty; expected text", file=csv.name))
        if not str(r.image_path).strip() or not str(r.target_report).strip():
            continue
        path = Path(r.image_path)
        source = path if path.is_absolute() else _locate_image(csv.parent, r.image_path)
        if not source.is_file():
            problems.append(ManifestProblem(number, "image_path", f"image {r.image_path} does not exist "
                                            f"({_tried(r.image_path)}); expected the image file", file=csv.name))
            continue
        patient = (_PATIENT.search(r.image_path) or [None])[0] or f"image{number - 1:06d}"
        study = (_STUDY.search(r.image_path) or [""])[0]
        labels = label_report(r.target_report)
        row = {"id": "/".join(t for t in (patient, study, path.stem) if t), "patient": patient,
               "source_image": source, "view": "", "prompt": r.diagnostic_prompt.strip() or DEFAULT_PROMPT,
               "report": r.target_report.strip(), "source_split": "", "label_source": RULE,
               SOURCE_LINE: (csv.name, number, "image_path")}
        row.update({c: labels.get(n) for c, n in zip(LABEL_COLUMNS, LABELS)})
        rows.append(row)
    if problems:
        raise ManifestError(problems + undecodable_images(rows), csv)
    return pd.DataFrame(rows)


def split_by_patient(patients: Sequence[str], source_split: Sequence[str], val_fraction: float,
                     test_fraction: float, seed: int) -> list[str]:
    """train / val / test per row, whole patients at a time.

    CheXpert Plus' own ``valid`` patients become the test split (never trained on or used for selection); the
    validation split is drawn from the remaining patients. Without a shipped split, test patients are drawn too.
    """
    patients = list(patients)
    shipped_valid = {p for p, s in zip(patients, source_split) if s == "valid"}
    pool = sorted(set(patients) - shipped_valid)
    rng = np.random.default_rng(seed)
    rng.shuffle(pool)
    n_test = 0 if shipped_valid else int(round(test_fraction * len(pool)))
    n_val = int(round(val_fraction * len(pool)))
    test = shipped_valid | set(pool[:n_test])
    val = set(pool[n_test:n_test + n_val])
    return ["test" if p in test else "val" if p in val else "train" for p in patients]


def build_manifest(root: Path, report_section: str = "findings", prompt: str = DEFAULT_PROMPT,
                   val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0,
                   frontal_only: bool = True) -> pd.DataFrame:
    """One row per image (before resizing: ``image`` is filled by :func:`write_resized_images`)."""
    fmt = detect_format(root)
    if fmt == "chexpert_plus":
        df = read_chexpert_plus(root, report_section, prompt, frontal_only)
    else:
        csvs = [p for p in sorted(root.glob("*.csv")) if set(SEED_CSV_COLUMNS) <= set(pd.read_csv(p, nrows=0).columns)]
        if not csvs:
            raise FileNotFoundError(f"{root}: no CSV with columns {', '.join(SEED_CSV_COLUMNS)}")
        df = pd.concat([read_seed_csv(p) for p in csvs], ignore_index=True)
    if df.empty:
        raise ValueError(f"{root}: no image with a non-empty {report_section} report")
    df["split"] = split_by_patient(df["patient"], df["source_split"], val_fraction, test_fraction, seed)
    return df.drop(columns=["source_split"])


_DECODE_ERRORS = (OSError, ValueError, cv2.error)  # DicomError is a ValueError; each is one bad file


def _decode_problem(record: dict[str, Any], err: Exception) -> ManifestProblem:
    csv_name, line, column = record.get(SOURCE_LINE) or (None, None, "source_image")
    return ManifestProblem(line, column, f"cannot decode {Path(record['source_image']).name} "
                           f"({type(err).__name__}: {err}); expected a JPEG, PNG or DICOM image", file=csv_name)


def undecodable_images(records: Sequence[dict[str, Any]]) -> list[ManifestProblem]:
    """A problem for each record whose ``source_image`` cannot be decoded. The readers call it only when they
    already refuse the table, so that one error lists every problem; a clean table is decoded once, while resizing."""
    problems = []
    for r in records:
        try:
            read_xray(r["source_image"])
        except _DECODE_ERRORS as err:
            problems.append(_decode_problem(r, err))
    return problems


def write_resized_images(manifest: pd.DataFrame, root: Path, size: int, folder: str) -> pd.DataFrame:
    """Write each ``source_image`` as a (size, size, 3) 8-bit PNG under ``root/folder`` (skipped when present);
    returns the manifest with ``image`` set to it (relative to ``root``).

    Raises:
        ManifestError: every source image that cannot be decoded (corrupt or truncated JPEG / PNG / DICOM), each
            named by its CSV file, line and column; the images of the other rows are still written (a cache).
    """
    out = manifest.copy()
    images, problems = [], []
    for r in progress(list(out.to_dict("records")), desc=f"resize to {size}x{size}"):
        target = root / folder / f"{r['id']}.png"
        if not target.is_file():
            try:
                rgb = resize_rgb(read_xray(r["source_image"]), size)
            except _DECODE_ERRORS as err:
                problems.append(_decode_problem(r, err))
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            ok, encoded = cv2.imencode(".png", rgb[..., ::-1])
            if not ok:
                raise OSError(f"could not encode {target}")
            with atomic_path(target) as tmp:
                tmp.write_bytes(encoded.tobytes())
        images.append(target)
    if problems:
        raise ManifestError(problems, root, hint="fix or remove these images, then run 01 again")
    out["image"] = images
    return out.drop(columns=[SOURCE_LINE], errors="ignore")


def label_matrix(manifest: pd.DataFrame) -> np.ndarray:
    """(N, 14) float array of the manifest's labels (NaN where not mentioned)."""
    return manifest[list(LABEL_COLUMNS)].astype(float).to_numpy()


class ReportImageDataset(Dataset):
    """Manifest rows as ``{"image": (3, S, S) normalised, "labels": (14,) 1/0, "label_mask": (14,), "index"}``.

    ``label_mask`` is 0 where a label is uncertain (-1) so the auxiliary classifier ignores it (CheXpert's
    U-Ignore); a label that is not mentioned counts as negative.
    """

    def __init__(self, manifest: pd.DataFrame, root: Path, image_size: int):
        self.manifest = manifest.reset_index(drop=True)
        self.root = Path(root)
        self.image_size = image_size
        labels = label_matrix(self.manifest) if set(LABEL_COLUMNS) <= set(self.manifest.columns) else \
            np.full((len(self.manifest), len(LABELS)), np.nan)
        self.labels = torch.from_numpy(np.nan_to_num(labels, nan=0.0) == 1).float()
        self.label_mask = torch.from_numpy(labels != -1).float()

    def __len__(self) -> int:
        return len(self.manifest)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.root / self.manifest.at[index, "image"]
        return {"image": load_encoder_input(path, self.image_size), "labels": self.labels[index],
                "label_mask": self.label_mask[index], "index": index}


class CachedReportImageDataset(ReportImageDataset):
    """:class:`ReportImageDataset` that decodes each image once (the resized images are small; the vision stage
    reads every one of them in every epoch)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._cache: dict[int, torch.Tensor] = {}

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index not in self._cache:
            self._cache[index] = super().__getitem__(index)["image"]
        return {"image": self._cache[index], "labels": self.labels[index], "label_mask": self.label_mask[index],
                "index": index}


def summarise_manifest(manifest: pd.DataFrame) -> pd.DataFrame:
    """Per split: images, patients and the fraction of images positive for each label."""
    rows = {}
    for split in ("train", "val", "test"):
        part = manifest[manifest.split == split]
        row: dict[str, Any] = {"images": len(part), "patients": part["patient"].nunique()}
        for column, name in zip(LABEL_COLUMNS, LABELS):
            row[name] = round(float((part[column] == 1).mean()), 3) if len(part) else 0.0
        rows[split] = row
    return pd.DataFrame.from_dict(rows, orient="index")


def rule_labeler_agreement(manifest: pd.DataFrame) -> pd.DataFrame:
    """How the rule labeler, reading each report, agrees with the dataset's own CheXbert labels, per finding over
    the rows that carry them (``label_source == "chexbert"``): ``n``, ``agreement`` (the same value of the four:
    positive, negative, uncertain, not mentioned) and ``precision`` / ``recall`` / ``f1`` of its positive calls
    against CheXbert's, with a last row ``all findings (micro)``. Empty when no row carries CheXbert labels (the
    seed CSV), where the rule labeler is all there is."""
    from nbsupport.metrics import clinical_efficacy

    if "label_source" not in manifest.columns:
        return pd.DataFrame()
    part = manifest[manifest["label_source"] == CHEXBERT]
    if part.empty:
        return pd.DataFrame()
    shipped = label_matrix(part)
    rule = np.array([[np.nan if v is None else float(v) for v in (label_report(r)[n] for n in LABELS)]
                     for r in part["report"]])
    same = (shipped == rule) | (np.isnan(shipped) & np.isnan(rule))
    positives = clinical_efficacy(rule == 1, shipped == 1, LABELS)
    rows = {name: {"n": len(part), "agreement": float(same[:, k].mean()), "chexbert_positive": int(support["support"]),
                   **{m: support[m] for m in ("precision", "recall", "f1")}}
            for k, (name, support) in enumerate(positives["per_label"].items())}
    rows["all findings (micro)"] = {"n": len(part), "agreement": float(same.mean()),
                                    "chexbert_positive": int((shipped == 1).sum()),
                                    **{m: positives[f"micro_{m}"] for m in ("precision", "recall", "f1")}}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("finding")
