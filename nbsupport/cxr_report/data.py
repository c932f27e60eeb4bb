"""Chest X-ray report data: CheXpert Plus as shipped, the seed's CSV, DICOM images, and a synthetic demo dataset.

Accepted layouts under a data root:

* **CheXpert Plus**: ``df_chexpert_plus_240401.csv`` (27 columns, ``CHEXPERT_PLUS_COLUMNS``) with
  ``path_to_image`` (e.g. ``train/patient42142/study5/view1_frontal.jpg``, relative to the root; the PNG release
  stores the same path with ``.png``, which is tried when the ``.jpg`` is absent), ``section_findings``,
  ``section_impression``, ``deid_patient_id`` and ``split`` (train / valid); plus the CheXbert labels
  ``chexbert_labels/findings_fixed.json`` and ``impression_fixed.json``, JSON lines keyed by ``path_to_image``
  with the 14 labels valued 1.0 / 0.0 / -1.0 / null.
* **seed CSV** (charangajjala/MedGen_AI ``final_dataset_latest.csv``): ``image_path, diagnostic_prompt,
  target_report``. It has no labels; they are read from the report by the rule labeler.
* any image may be a DICOM file (``.dcm``): modality LUT, then VOI LUT / window, MONOCHROME1 inverted.

:func:`build_manifest` turns either into one row per image (``CXR_SCHEMA``), split by patient;
:func:`write_resized_images` writes the 224x224 RGB copies the model reads; :class:`ReportImageDataset` serves
them normalised for the ImageNet-style encoder. :func:`write_demo_dataset` draws synthetic frontal radiographs
with visible findings and writes them in the CheXpert Plus layout with reports and labels.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
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
from nbsupport.runs import atomic_path, atomic_write_text

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
DEFAULT_PROMPT = "Describe the findings of this chest X-ray."
LABEL_COLUMNS = tuple("label_" + re.sub(r"\W+", "_", name.lower()) for name in LABELS)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
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


# ---------------------------------------------------------------------------------------------- dataset formats
def detect_format(root: Path) -> str:
    """``"chexpert_plus"`` or ``"seed_csv"``, from the files in ``root``."""
    if (root / CHEXPERT_PLUS_CSV).is_file():
        return "chexpert_plus"
    if list(root.glob("*.csv")):
        return "seed_csv"
    raise FileNotFoundError(f"{root}: expected {CHEXPERT_PLUS_CSV} (CheXpert Plus) or a CSV with columns "
                            f"{', '.join(SEED_CSV_COLUMNS)} (seed format)")


def _locate_image(root: Path, relative: str) -> Path:
    path = root / relative
    if path.exists():
        return path
    for suffix in (".png", ".jpg", ".dcm"):
        alt = path.with_suffix(suffix)
        if alt.exists():
            return alt
    return path


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
                                            f"{root} (tried .jpg, .png, .dcm); expected the image file", file=csv.name))
            continue
        values = labels.get(r.path_to_image) or label_report(report)
        row = {"id": str(Path(r.path_to_image).with_suffix("")), "patient": patient,
               "source_image": source, "view": f"{r.frontal_lateral} {r.ap_pa}".strip(),
               "prompt": prompt, "report": report, "source_split": r.split,
               SOURCE_LINE: (csv.name, number, "path_to_image")}
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
            problems.append(ManifestProblem(number, "image_path", f"image {r.image_path} does not exist (tried .jpg, "
                                            ".png, .dcm); expected the image file", file=csv.name))
            continue
        patient = (_PATIENT.search(r.image_path) or [None])[0] or f"image{number - 1:06d}"
        study = (_STUDY.search(r.image_path) or [""])[0]
        labels = label_report(r.target_report)
        row = {"id": "/".join(t for t in (patient, study, path.stem) if t), "patient": patient,
               "source_image": source, "view": "", "prompt": r.diagnostic_prompt.strip() or DEFAULT_PROMPT,
               "report": r.target_report.strip(), "source_split": "", SOURCE_LINE: (csv.name, number, "image_path")}
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


# ============================================================================================== demo data
DEMO_SIZES = {"smoke": {"n_patients": 36, "image_size": 128, "seed": 0},
              "demo": {"n_patients": 420, "image_size": 256, "seed": 0}}
FINDINGS = ("devices", "cardiomegaly", "mediastinum", "effusion_left", "effusion_right", "edema", "atelectasis",
            "consolidation", "pneumothorax", "nodules", "pleural_thickening")
_FINDING_LABEL = {"cardiomegaly": "Cardiomegaly", "effusion_left": "Pleural Effusion",
                  "effusion_right": "Pleural Effusion", "pneumothorax": "Pneumothorax",
                  "consolidation": "Consolidation", "nodules": "Lung Lesion", "devices": "Support Devices",
                  "edema": "Edema", "atelectasis": "Atelectasis", "mediastinum": "Enlarged Cardiomediastinum",
                  "pleural_thickening": "Pleural Other"}
# Each finding is drawn independently, so images carry several at once (about 2.4 labels per image, 12 % with no
# pathology: CheXpert has about 10 %) as real radiographs do. The order follows CheXpert's (support devices and effusions commonest,
# pneumothorax and nodules rarer); the rare ones are raised so a few hundred demo images show each many times.
FINDING_PREVALENCE = {"devices": 0.4, "cardiomegaly": 0.28, "mediastinum": 0.14, "effusion_left": 0.22,
                      "effusion_right": 0.25, "edema": 0.2, "atelectasis": 0.2, "consolidation": 0.16,
                      "pneumothorax": 0.12, "nodules": 0.14, "pleural_thickening": 0.14}


def sample_findings(rng: np.random.Generator) -> dict[str, Any]:
    """Findings of one synthetic study: a set of FINDINGS (each present with its ``FINDING_PREVALENCE``,
    independently) plus the side/zone/size details the image and the report share."""
    findings = [name for name in FINDINGS if rng.random() < FINDING_PREVALENCE[name]]
    side = lambda: str(rng.choice(["left", "right"]))
    return {"findings": sorted(findings), "ptx_side": side(), "cons_side": side(),
            "cons_zone": str(rng.choice(["upper", "lower"])), "atel_side": side(), "pleural_side": side(),
            "effusion_size": str(rng.choice(["small", "moderate"])), "n_nodules": int(rng.integers(1, 4)),
            "device": str(rng.choice(["pacemaker", "ett", "line"]))}


def _image_x(side: str, size: int, offset: float) -> float:
    """Column of a point ``offset`` (fraction of the width) lateral to the midline on the patient's ``side``:
    a PA radiograph shows the patient's left on the image's right."""
    return size * (0.5 + offset if side == "left" else 0.5 - offset)


def draw_radiograph(study: Mapping[str, Any], size: int, rng: np.random.Generator) -> np.ndarray:
    """A synthetic frontal (PA) chest radiograph (size, size) uint8 showing ``study``'s findings."""
    s = size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    # exposure and noise are drawn first, so the same random stream gives the same film whatever the findings
    gain, offset, noise = rng.uniform(0.85, 1.15), rng.uniform(-10, 10), np.random.default_rng(rng.integers(2**31))
    img = np.full((s, s), 18.0, np.float32)
    # body soft tissue, then the two lung fields (dark), the mediastinum and spine (bright)
    img += 70 * (((xx - s / 2) / (0.46 * s)) ** 2 + ((yy - 0.55 * s) / (0.55 * s)) ** 2 < 1)
    lung = {}
    for side in ("right", "left"):
        cx = _image_x(side, s, 0.19 + rng.normal(0, 0.01))
        field = ((xx - cx) / (0.15 * s)) ** 2 + ((yy - 0.5 * s) / (0.3 * s)) ** 2 < 1
        lung[side] = field
        img[field] = 40
    # lung markings: faint vessels branching from the hila
    vessels = np.zeros((s, s), np.float32)
    for side in ("right", "left"):
        hx, hy = _image_x(side, s, 0.08), 0.48 * s
        for _ in range(9):
            angle = rng.uniform(-2.6, -0.5) if side == "left" else rng.uniform(-2.6, -0.5) + 0.0
            dx = np.cos(angle) * (1 if side == "left" else -1)
            length = rng.uniform(0.12, 0.26) * s
            end = (int(hx + dx * length), int(hy + np.sin(angle) * length * rng.choice([-1, 1])))
            cv2.line(vessels, (int(hx), int(hy)), end, 14.0, max(1, s // 200))
    img += cv2.GaussianBlur(vessels, (0, 0), s / 250) * (lung["left"] | lung["right"])
    # ribs: bright arcs across both fields
    ribs = np.zeros((s, s), np.float32)
    for k in range(7):
        y0 = 0.24 * s + k * 0.075 * s
        for side, sign in (("right", -1), ("left", 1)):
            cx = _image_x(side, s, 0.06)
            cv2.ellipse(ribs, (int(cx), int(y0)), (int(0.2 * s), int(0.05 * s)), 0, 0 if sign > 0 else 90,
                        90 if sign > 0 else 180, 22.0, max(1, s // 90))
    img += ribs * (lung["left"] | lung["right"])
    cardio = "cardiomegaly" in study["findings"]
    heart_w = (0.34 if cardio else 0.22) * s * rng.uniform(0.95, 1.05)
    heart_h = (0.17 if cardio else 0.14) * s
    heart = ((xx - 0.53 * s) / (heart_w / 2)) ** 2 + ((yy - 0.66 * s) / heart_h) ** 2 < 1
    img[heart] = 150
    mediastinum = (np.abs(xx - s / 2) < 0.06 * s) & (yy < 0.62 * s) & (yy > 0.1 * s)
    if "mediastinum" in study["findings"]:  # widened superior mediastinum
        mediastinum |= (np.abs(xx - s / 2) < 0.1 * s * rng.uniform(0.95, 1.05)) & (yy < 0.5 * s) & (yy > 0.14 * s)
    img[mediastinum] = np.maximum(img[mediastinum], 140)
    img[(np.abs(xx - s / 2) < 0.025 * s) & (yy > 0.05 * s)] += 40  # spine
    trachea = (np.abs(xx - s / 2) < 0.012 * s) & (yy < 0.36 * s) & (yy > 0.08 * s)
    img[trachea] = 60
    # diaphragm / abdomen under the lungs
    img[(yy > 0.8 * s) & (np.abs(xx - s / 2) < 0.42 * s)] = 130
    findings = study["findings"]
    for side in ("left", "right"):
        if f"effusion_{side}" in findings:
            cx = _image_x(side, s, 0.19)
            level = (0.64 if study.get("effusion_size", "small") == "small" else 0.57) * s
            level += rng.uniform(-0.02, 0.02) * s
            meniscus = level - 0.06 * s * np.abs((xx - cx) / (0.15 * s))  # fluid climbs laterally
            fluid = lung[side] & (yy > meniscus) | ((yy > meniscus) & (np.abs(xx - cx) < 0.16 * s) & (yy < 0.82 * s))
            img[fluid] = np.maximum(img[fluid], 135)
    if "edema" in findings:
        # perihilar ("bat-wing") haze in both lungs, and Kerley B lines: short horizontal septal lines at the
        # lateral bases
        septa = np.zeros((s, s), np.float32)
        for side in ("left", "right"):
            hx, sign = _image_x(side, s, 0.1), (1 if side == "left" else -1)
            haze = np.exp(-(((xx - hx) / (0.13 * s)) ** 2 + ((yy - 0.5 * s) / (0.2 * s)) ** 2))
            img += 55 * haze * lung[side]
            for k in range(4):
                y = int((0.56 + 0.03 * k) * s)
                x_edge = _image_x(side, s, 0.31)
                cv2.line(septa, (int(x_edge), y), (int(x_edge - sign * 0.06 * s), y), 1.0, max(1, s // 128))
        img += 35 * septa * (lung["left"] | lung["right"])
    if "atelectasis" in findings:
        # plate-like (discoid) atelectasis: a thin, slightly oblique band in the mid-lower zone of one lung
        side = study.get("atel_side", "left")
        cx, y = _image_x(side, s, 0.19), (0.52 + rng.uniform(-0.03, 0.03)) * s
        tilt = rng.uniform(-0.03, 0.03) * s
        band = np.zeros((s, s), np.float32)
        cv2.line(band, (int(cx - 0.1 * s), int(y + tilt)), (int(cx + 0.1 * s), int(y - tilt)), 1.0, max(2, s // 64))
        img += 65 * cv2.GaussianBlur(band, (0, 0), s / 256) * lung[side]
    if "pleural_thickening" in findings:
        # an apical pleural cap: a bright crescent along the top of one lung
        side = study.get("pleural_side", "left")
        cx = _image_x(side, s, 0.19)
        radius = ((xx - cx) / (0.15 * s)) ** 2 + ((yy - 0.5 * s) / (0.3 * s)) ** 2
        cap = lung[side] & (radius > rng.uniform(0.72, 0.8)) & (yy < 0.34 * s)
        img[cap] = np.maximum(img[cap], 115)
    if "pneumothorax" in findings:
        side = study["ptx_side"]
        cx = _image_x(side, s, 0.19)
        sign = 1 if side == "left" else -1
        rim = lung[side] & (sign * (xx - cx) > 0.04 * s) & (yy < 0.62 * s)
        img[rim] = 12  # no lung markings beyond the visceral pleural line
        edge = rim & ~cv2.erode(rim.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        img[edge & (sign * (xx - cx) < 0.08 * s)] = 110
    if "consolidation" in findings:
        side, zone = study["cons_side"], study["cons_zone"]
        cx = _image_x(side, s, 0.2)
        cy = (0.38 if zone == "upper" else 0.6) * s
        blob = np.zeros((s, s), np.float32)
        for _ in range(6):
            cv2.circle(blob, (int(cx + rng.normal(0, 0.04 * s)), int(cy + rng.normal(0, 0.03 * s))),
                       int(0.05 * s), 1.0, -1)
        blob = cv2.GaussianBlur(blob, (0, 0), s / 60) * lung[side]
        img += 75 * np.clip(blob, 0, 1)
    if "nodules" in findings:
        for _ in range(study["n_nodules"]):
            side = str(rng.choice(["left", "right"]))
            cx, cy = _image_x(side, s, rng.uniform(0.1, 0.27)), rng.uniform(0.28, 0.62) * s
            cv2.circle(img, (int(cx), int(cy)), max(2, int(rng.uniform(0.02, 0.03) * s)), 130.0, -1)
    if "devices" in findings:
        kind = study["device"]
        width = max(1, s // 110)
        if kind == "ett":
            cv2.line(img, (int(s / 2), 0), (int(s / 2), int(0.3 * s)), 235.0, width + 1)
        elif kind == "pacemaker":
            px, py = int(_image_x("left", s, 0.22)), int(0.2 * s)
            cv2.rectangle(img, (px - s // 30, py - s // 45), (px + s // 30, py + s // 45), 245.0, -1)
            cv2.polylines(img, [np.array([[px, py], [int(0.56 * s), int(0.4 * s)], [int(0.5 * s), int(0.64 * s)]],
                                         np.int32)], False, 235.0, width)
        else:
            cv2.polylines(img, [np.array([[int(_image_x("right", s, 0.3)), int(0.12 * s)],
                                          [int(0.47 * s), int(0.3 * s)], [int(0.49 * s), int(0.5 * s)]], np.int32)],
                          False, 235.0, width)
    img = cv2.GaussianBlur(img, (0, 0), s / 300)
    img = img * gain + offset + noise.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


_SENTENCES: dict[str, tuple[str, ...]] = {
    "cardiomegaly": ("The heart is enlarged.", "There is cardiomegaly.", "Cardiomegaly is present.",
                     "The cardiac silhouette is enlarged.", "Moderate cardiomegaly."),
    "mediastinum": ("Widened mediastinum.", "There is mediastinal widening.", "The mediastinal contour is widened.",
                    "Enlarged cardiomediastinal silhouette."),
    "pleural_thickening": ("{Side} apical pleural thickening.", "There is {side} apical pleural thickening.",
                           "Mild {side} pleural thickening."),
    "effusion": ("There is a {size} {side} pleural effusion.", "{Size} {side} pleural effusion.",
                 "A {size} {side} pleural effusion is present.", "{Side} pleural effusion, {size}."),
    "effusion_both": ("There are bilateral pleural effusions.", "Bilateral pleural effusions are present.",
                      "{Size} bilateral pleural effusions."),
    "pneumothorax": ("There is a {side} pneumothorax.", "A {side} apical pneumothorax is present.",
                     "Small {side} pneumothorax.", "{Side} pneumothorax is seen."),
    "consolidation": ("There is consolidation in the {side} {zone} lobe.", "Focal {side} {zone} lobe consolidation.",
                      "{Side} {zone} lobe consolidation is present."),
    "edema": ("There is mild pulmonary edema.", "Mild interstitial pulmonary edema.",
              "Pulmonary vascular congestion with interstitial edema.", "Perihilar edema is present."),
    "atelectasis": ("{Side} basilar atelectasis.", "There is {side} lower lobe atelectasis.",
                    "Plate-like atelectasis at the {side} base.", "Linear atelectasis in the {side} lower lung."),
    "nodules": ("A pulmonary nodule is seen.", "There is a small pulmonary nodule.",
                "Multiple pulmonary nodules are present.", "There are several pulmonary nodules."),
    "pacemaker": ("A left chest wall pacemaker is present.", "Pacemaker in place with leads in the heart."),
    "ett": ("An endotracheal tube is in place.", "Endotracheal tube in standard position."),
    "line": ("A right central venous catheter is in place.", "Right internal jugular line with tip in the SVC."),
}
_NEGATIONS: dict[str, tuple[str, ...]] = {
    "cardiomegaly": ("Heart size is normal.", "The heart is not enlarged.", "No cardiomegaly."),
    "mediastinum": ("Normal mediastinal contours.", "The mediastinal contours are normal."),
    "effusion": ("No pleural effusion.", "There is no pleural effusion.", "No effusion is seen."),
    "pneumothorax": ("No pneumothorax.", "There is no pneumothorax.", "Pneumothorax is not seen."),
    "consolidation": ("No focal consolidation.", "There is no consolidation.", "No consolidation is seen."),
    "edema": ("No pulmonary edema.", "There is no edema.", "No evidence of pulmonary edema."),
}
# pleura: the commonest negation in real reports names both at once
_NEGATION_PLEURA = ("No pneumothorax or pleural effusion.", "No pleural effusion or pneumothorax.",
                    "There is no pleural effusion or pneumothorax.")
_NORMAL = ("No acute cardiopulmonary abnormality.", "The lungs are clear.", "Normal chest radiograph.")
_NEG_LABEL = {"cardiomegaly": "Cardiomegaly", "effusion": "Pleural Effusion", "pneumothorax": "Pneumothorax",
              "consolidation": "Consolidation", "edema": "Edema", "mediastinum": "Enlarged Cardiomediastinum"}
_NEGATION_RATE = 0.45  # each absent finding is stated as absent with this probability


def write_report(study: Mapping[str, Any], rng: np.random.Generator) -> tuple[str, str, dict[str, float | None]]:
    """(findings section, impression section, CheXbert-style labels) of a synthetic study in varied phrasing,
    with negations of some absent findings; the labels say what the findings text states.

    Sentences follow a radiologist's order: support devices, lungs, pleura, heart, then what is absent.
    """
    f = set(study["findings"])
    pick = lambda options: str(options[int(rng.integers(len(options)))])

    def say(key: str, side: str = "", **extra: str) -> str:
        return pick(_SENTENCES[key]).format(side=side, Side=side.capitalize(), **extra)

    size = str(study.get("effusion_size", "small"))
    sentences = []
    if "devices" in f:
        sentences.append(pick(_SENTENCES[study["device"]]))
    if "consolidation" in f:
        sentences.append(say("consolidation", study["cons_side"], zone=study["cons_zone"]))
    if "atelectasis" in f:
        sentences.append(say("atelectasis", str(study.get("atel_side", "left"))))
    if "edema" in f:
        sentences.append(say("edema"))
    if "nodules" in f:
        sentences.append(pick(_SENTENCES["nodules"][2:] if study["n_nodules"] > 1 else _SENTENCES["nodules"][:2]))
    if "pneumothorax" in f:
        sentences.append(say("pneumothorax", study["ptx_side"]))
    if "pleural_thickening" in f:
        sentences.append(say("pleural_thickening", str(study.get("pleural_side", "left"))))
    if {"effusion_left", "effusion_right"} <= f:
        sentences.append(say("effusion_both", size=size, Size=size.capitalize()))
    elif "effusion_left" in f or "effusion_right" in f:
        side = "left" if "effusion_left" in f else "right"
        sentences.append(say("effusion", side, size=size, Size=size.capitalize()))
    if "cardiomegaly" in f:
        sentences.append(say("cardiomegaly"))
    if "mediastinum" in f:
        sentences.append(say("mediastinum"))
    present = {"effusion" if k.startswith("effusion") else k for k in f}
    labels: dict[str, float | None] = {name: None for name in LABELS}
    for k in f:
        labels[_FINDING_LABEL[k]] = 1.0
    negated = [k for k in _NEGATIONS if k not in present and rng.random() < _NEGATION_RATE]
    for k in negated:
        labels[_NEG_LABEL[k]] = 0.0
    if {"pneumothorax", "effusion"} <= set(negated) and rng.random() < 0.7:
        negated = [k for k in negated if k not in ("pneumothorax", "effusion")]
        sentences.append(pick(_NEGATION_PLEURA))
    sentences.extend(pick(_NEGATIONS[k]) for k in negated)
    pathology = present - {"devices"}
    if not pathology:
        sentences.insert(1 if "devices" in f else 0, pick(_NORMAL))
        labels["No Finding"] = 1.0
    findings = " ".join(sentences)
    names = sorted({_FINDING_LABEL[k].lower() for k in f if k != "devices"})
    listed = names[0] if len(names) == 1 else (", ".join(names[:-1]) + " and " + names[-1]) if names else ""
    impression = ("No acute cardiopulmonary process." if not pathology
                  else ("Findings consistent with " + listed + ".").capitalize())
    return findings, impression, labels


def write_demo_dataset(root: str | Path, n_patients: int = 420, image_size: int = 256, seed: int = 0,
                       valid_fraction: float = 0.15) -> Path:
    """Write a synthetic CheXpert Plus dataset: ``df_chexpert_plus_240401.csv`` (27 columns), JPEG radiographs
    under ``train/patientN/studyM/view1_frontal.jpg`` and ``chexbert_labels/{findings,impression}_fixed.json``.

    One or two frontal studies per patient; ``valid_fraction`` of the patients form the shipped ``valid`` split.
    Returns the dataset root. Existing files are overwritten.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    rows, finding_labels, impression_labels = [], [], []
    for p in progress(range(n_patients), desc="demo radiographs"):
        patient = f"patient{p + 1:05d}"
        split = "valid" if rng.random() < valid_fraction else "train"
        for study_no in range(1, int(rng.choice([1, 1, 2])) + 1):
            study = sample_findings(rng)
            relative = f"{split}/{patient}/study{study_no}/view1_frontal.jpg"
            target = root / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            image = draw_radiograph(study, image_size, rng)
            ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])
            if not ok:
                raise OSError(f"could not encode {target}")
            with atomic_path(target) as tmp:
                tmp.write_bytes(encoded.tobytes())
            findings, impression, labels = write_report(study, rng)
            row = {c: "" for c in CHEXPERT_PLUS_COLUMNS}
            row.update({"path_to_image": relative, "frontal_lateral": "Frontal", "ap_pa": "PA",
                        "deid_patient_id": patient, "patient_report_date_order": str(study_no),
                        "report": f"FINDINGS: {findings}\nIMPRESSION: {impression}",
                        "section_findings": findings, "section_impression": impression,
                        "age": str(int(rng.integers(20, 90))), "sex": str(rng.choice(["Male", "Female"])),
                        "split": split})
            rows.append(row)
            finding_labels.append({"path_to_image": relative, **labels})
            impression_labels.append({"path_to_image": relative, **label_report(impression)})
    atomic_write_text(root / CHEXPERT_PLUS_CSV, pd.DataFrame(rows, columns=list(CHEXPERT_PLUS_COLUMNS))
                      .to_csv(index=False, lineterminator="\n"))
    for name, records in (("findings", finding_labels), ("impression", impression_labels)):
        lines = [json.dumps({k: (None if v is None else float(v)) if k != "path_to_image" else v
                             for k, v in rec.items()}) for rec in records]
        (root / CHEXBERT_FILES[name]).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(root / CHEXBERT_FILES[name], "\n".join(lines) + "\n")
    return root
