"""A synthetic CheXpert Plus dataset: frontal radiographs with visible findings, reports in varied phrasing, and
CheXbert-style labels, written in the published layout so that 01_preprocess reads it as it reads the real data.

``nbsupport demo-data cxr_report`` calls :func:`write_demo_dataset` with ``DEMO_SIZES[size]``. The folder carries
the shared demo marker (:mod:`nbsupport.demo`): a complete demo written with the same arguments is reused, another
one replaced, and a folder of real data never touched.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from nbsupport.cxr_report.data import CHEXBERT_FILES, CHEXPERT_PLUS_COLUMNS, CHEXPERT_PLUS_CSV
from nbsupport.cxr_report.labeler import LABELS, label_report
from nbsupport.demo import finish_demo_folder, start_demo_folder
from nbsupport.progress import progress
from nbsupport.runs import atomic_path, atomic_write_text


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
# pathology: CheXpert has about 10 %) as real radiographs do. The order follows CheXpert's (support devices and
# effusions commonest, pneumothorax and nodules rarer); the rare ones are raised so a few hundred demo images show
# each many times.
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
    img, lung = _draw_chest(study, yy, xx, rng)
    _draw_lung_findings(img, study, lung, yy, xx, rng)
    _draw_devices(img, study, s)
    img = cv2.GaussianBlur(img, (0, 0), s / 300)
    img = img * gain + offset + noise.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _draw_chest(study: Mapping[str, Any], yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator
                ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The normal chest (float32 image) and the two lung fields (side -> mask); the heart is enlarged and the
    superior mediastinum widened when ``study`` has those findings."""
    s = yy.shape[0]
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
    return img, lung


def _draw_lung_findings(img: np.ndarray, study: Mapping[str, Any], lung: dict[str, np.ndarray], yy: np.ndarray,
                        xx: np.ndarray, rng: np.random.Generator) -> None:
    """Draw ``study``'s lung and pleural findings into ``img`` (in place), in a fixed order of random draws."""
    s = yy.shape[0]
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


def _draw_devices(img: np.ndarray, study: Mapping[str, Any], s: int) -> None:
    """Draw the support device of ``study`` (endotracheal tube, pacemaker with leads, or central line) in place."""
    if "devices" not in study["findings"]:
        return
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
    Returns the dataset root. A complete demo written with the same arguments is reused as it is; a demo written
    with others is replaced; a non-empty folder without the demo marker is refused (FileExistsError).
    """
    root = Path(root)
    params = {"n_patients": n_patients, "image_size": image_size, "seed": seed, "valid_fraction": valid_fraction,
              "generator": "nbsupport.cxr_report.demo_data.write_demo_dataset", "format_version": 1}
    if start_demo_folder(root, params, required=(CHEXPERT_PLUS_CSV, *CHEXBERT_FILES.values())):
        return root
    rng = np.random.default_rng(seed)
    rows, finding_labels, impression_labels = [], [], []
    for p in progress(range(n_patients), desc="demo radiographs"):
        patient = f"patient{p + 1:05d}"
        split = "valid" if rng.random() < valid_fraction else "train"
        for study_no in range(1, int(rng.choice([1, 1, 2])) + 1):
            study = sample_findings(rng)
            relative = f"{split}/{patient}/study{study_no}/view1_frontal.jpg"
            _write_jpeg(root / relative, draw_radiograph(study, image_size, rng))
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
    finish_demo_folder(root, params, n_images=len(rows))
    return root


def _write_jpeg(target: Path, image: np.ndarray) -> None:
    """``image`` as a quality-95 JPEG at ``target`` (parents created), atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])
    if not ok:
        raise OSError(f"could not encode {target}")
    with atomic_path(target) as tmp:
        tmp.write_bytes(encoded.tobytes())
