"""A synthetic PRS-Med dataset in the released layout (see :mod:`nbsupport.prs_med.data`), for the demo and tests.

Five tasks with distinct looks (CT, ultrasound, X-ray, endoscopy, skin); each image has one finding placed so that
:func:`nbsupport.prs_med.data.position_of` gives a chosen position, and question / answer pairs are drawn from a
few templates per task. ``nbsupport demo-data prs_med`` calls :func:`write_demo_dataset` with :data:`DEMO_SIZES`.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from nbsupport.demo import finish_demo_folder, start_demo_folder
from nbsupport.metrics import POSITIONS
from nbsupport.progress import progress
from nbsupport.prs_med.data import TASKS, position_of
from nbsupport.runs import atomic_path, atomic_write_text

DEMO_TASKS = ("brain_tumors_ct_scan", "breast_tumors_ct_scan", "lung_Xray", "polyp_endoscopy", "skin_rgbimage")
# Per task: what the finding is called, how the modality is named in questions.
_DEMO_WORDING = {
    "brain_tumors_ct_scan": ("tumour", "brain CT scan"),
    "breast_tumors_ct_scan": ("tumour", "breast ultrasound"),
    "dental_xray": ("lesion", "dental X-ray"),
    "lung_CT": ("nodule", "lung CT slice"),
    "lung_Xray": ("opacity", "chest X-ray"),
    "polyp_endoscopy": ("polyp", "endoscopy image"),
    "skin_rgbimage": ("lesion", "dermoscopy image"),
}
QUESTION_TEMPLATES = (
    "Where is the {finding} located in this {modality}?",
    "Can you identify the location of the {finding} in this {modality}?",
    "Which part of the image contains the {finding}?",
    "Describe the position of the {finding} in the {modality}.",
)
ANSWER_TEMPLATES = (
    "The {finding} is in the {position} of the image.",
    "It is located in the {position} region.",
    "The {finding} appears at the {position} of the {modality}.",
)
POSITION_WORDS = {"center": "center", "top left": "top left", "top right": "top right",
                  "bottom left": "bottom left", "bottom right": "bottom right"}
DEMO_SIZES = {
    "smoke": {"n_train": 4, "n_val": 2, "n_test": 2, "image_size": 64, "tasks": DEMO_TASKS},
    "demo": {"n_train": 100, "n_val": 10, "n_test": 20, "image_size": 128, "tasks": DEMO_TASKS},
}


def _smooth_noise(rng: np.random.Generator, size: int, scale: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: random values on a coarse grid, upsampled bicubically."""
    coarse = rng.random((max(2, size // scale), max(2, size // scale))).astype(np.float32)
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC).clip(0, 1)


def _lesion_mask(rng: np.random.Generator, size: int, position: str) -> np.ndarray:
    """An irregular blob whose ``position_of`` is ``position`` (resampled until it is)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for _ in range(100):
        r = size * rng.uniform(0.09, 0.16)
        if position == "center":
            cy, cx = size / 2 + rng.uniform(-0.06, 0.06, 2) * size
        else:
            vertical, horizontal = position.split()
            off = rng.uniform(0.2, 0.3, 2) * size
            cy = size / 2 + (-off[0] if vertical == "top" else off[0])
            cx = size / 2 + (-off[1] if horizontal == "left" else off[1])
        angle = np.arctan2(yy - cy, xx - cx)
        wobble = 1 + sum(rng.uniform(0, 0.15) * np.cos(k * angle + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
        aspect = rng.uniform(0.7, 1.3)
        dist = np.sqrt(((yy - cy) * aspect) ** 2 + ((xx - cx) / aspect) ** 2)
        mask = dist < r * wobble
        if mask.any() and position_of(mask).position == position:
            return mask
    raise RuntimeError(f"could not place a lesion at {position!r} in a {size} px image")


def _render(task: str, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A synthetic image of ``task``'s modality with the finding at ``mask``: uint8 (H, W) grey or (H, W, 3) RGB."""
    size = mask.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    soft = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), max(0.6, size / 128))
    noise = rng.normal(0, 1, (size, size)).astype(np.float32)
    tex = _smooth_noise(rng, size, 8)
    if task in ("brain_tumors_ct_scan", "lung_CT"):  # CT-like grey: a bright skull/rib ring around soft tissue
        r = np.sqrt((yy - 0.5) ** 2 + (xx - 0.5) ** 2)
        body = (r < 0.46).astype(np.float32)
        ring = ((r > 0.42) & (r < 0.46)).astype(np.float32)
        base = 0.05 + body * (0.38 + 0.08 * tex) + ring * 0.45
        if task == "lung_CT":
            lungs = ((((xx - 0.32) / 0.14) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1)
                     | (((xx - 0.68) / 0.14) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1)).astype(np.float32)
            base = base - 0.28 * lungs
        img = base + 0.32 * soft + 0.03 * noise
    elif task in ("lung_Xray", "dental_xray"):  # X-ray-like: dark lung fields in a bright body, soft opacity
        lungs = ((((xx - 0.3) / 0.17) ** 2 + ((yy - 0.5) / 0.36) ** 2 < 1)
                 | (((xx - 0.7) / 0.17) ** 2 + ((yy - 0.5) / 0.36) ** 2 < 1)).astype(np.float32)
        lungs = cv2.GaussianBlur(lungs, (0, 0), size / 40)
        ribs = 0.06 * (np.sin(yy * 40 + xx * 6) > 0.6)
        img = 0.75 - 0.5 * lungs + ribs + 0.06 * tex + 0.35 * soft + 0.02 * noise
    elif task == "breast_tumors_ct_scan":  # ultrasound: speckle in a fan, dark (hypoechoic) lesion with a rim
        speckle = rng.rayleigh(0.25, (size, size)).astype(np.float32)
        speckle = cv2.GaussianBlur(speckle, (0, 0), 0.7)
        fan = (np.abs(xx - 0.5) < 0.15 + 0.4 * yy).astype(np.float32)
        depth = 1.0 - 0.5 * yy
        rim = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), size / 40) - soft
        img = fan * depth * (0.25 + speckle * (1 - 0.8 * soft)) + 0.25 * rim.clip(0, 1)
    else:  # RGB photographs: endoscopy (pink mucosa, vignetting) and skin (skin tone, brown lesion)
        vignette = 1 - 0.7 * ((yy - 0.5) ** 2 + (xx - 0.5) ** 2) * 2
        if task == "polyp_endoscopy":
            tissue = np.stack([0.85 + 0.1 * tex, 0.45 + 0.1 * tex, 0.4 + 0.05 * tex], -1)
            lesion = np.array([0.95, 0.75, 0.55], dtype=np.float32)
            shade = 0.15 * (1 - cv2.GaussianBlur(mask.astype(np.float32), (0, 0), size / 20))
        else:
            tissue = np.stack([0.88 + 0.06 * tex, 0.7 + 0.06 * tex, 0.58 + 0.05 * tex], -1)
            lesion = np.array([0.4, 0.25, 0.15], dtype=np.float32) * (0.8 + 0.4 * tex[..., None])
            shade = 0.0
        rgb = tissue * (1 - soft[..., None]) + lesion * soft[..., None]
        rgb = rgb * (vignette[..., None] - shade if np.ndim(shade) == 0 else vignette[..., None] - shade[..., None])
        rgb = rgb + 0.02 * rng.normal(0, 1, rgb.shape).astype(np.float32)
        return (rgb.clip(0, 1) * 255).astype(np.uint8)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def write_demo_dataset(root: str | os.PathLike, n_train: int = 100, n_val: int = 10, n_test: int = 20,
                       image_size: int = 128, tasks: Sequence[str] = DEMO_TASKS, seed: int = 0) -> Path:
    """Write a synthetic PRS-Med dataset in the released layout (images, masks, ``annotations/<task>.csv``).

    Each image has one finding placed so that :func:`position_of` gives a chosen position; positions cycle
    through all five in every split, questions and answers are drawn from several templates per task. The CSV
    uses the re-implementation's columns (``image_name, question, answer, position, split, task``).

    A complete demo written with the same arguments is reused; one with other arguments (or an interrupted one) is
    replaced; a non-empty folder that is not a demo is an error (:func:`nbsupport.demo.start_demo_folder`).

    Args:
        root: folder to write (created).
        n_train, n_val, n_test: images per task and split.
        image_size: square image side in pixels.
        tasks: task names (default: five with distinct looks: CT, ultrasound, X-ray, endoscopy, skin).

    Returns:
        ``root``.
    """
    root = Path(root)
    unknown = [task for task in tasks if task not in TASKS]
    if unknown:
        raise ValueError(f"unknown task {unknown[0]!r}; expected one of {list(TASKS)}")
    params = {"n_train": n_train, "n_val": n_val, "n_test": n_test, "image_size": image_size, "tasks": list(tasks),
              "seed": seed, "generator": "nbsupport.prs_med.demo_data.write_demo_dataset", "format_version": 1}
    annotations = [f"annotations/{task}.csv" for task in tasks]  # each written after its task's images
    if start_demo_folder(root, params, required=annotations):
        return root
    rng = np.random.default_rng(seed)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for task in tasks:
        _write_task(root, task, {"train": n_train, "val": n_val, "test": n_test}, image_size, rng)
    finish_demo_folder(root, params)
    return root


def _write_task(root: Path, task: str, counts: dict[str, int], image_size: int, rng: np.random.Generator) -> None:
    """One task's images and masks per split, then its ``annotations/<task>.csv``."""
    finding, modality = _DEMO_WORDING[task]
    records = []
    for split, n in counts.items():
        for folder in ("images", "masks"):
            (root / task / f"{split}_{folder}").mkdir(parents=True, exist_ok=True)
        order = rng.permutation([POSITIONS[i % len(POSITIONS)] for i in range(n)])
        for k, position in enumerate(progress(order, desc=f"demo {task} {split}")):
            name = f"{task}_{split}_{k:04d}.png"
            mask = _lesion_mask(rng, image_size, str(position))
            image = _render(task, mask, rng)
            _write_png(root / task / f"{split}_images" / name,
                       image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            _write_png(root / task / f"{split}_masks" / name, mask.astype(np.uint8) * 255)
            words = {"finding": finding, "modality": modality, "position": POSITION_WORDS[str(position)]}
            records.append({
                "image_name": name,
                "question": QUESTION_TEMPLATES[rng.integers(len(QUESTION_TEMPLATES))].format(**words),
                "answer": ANSWER_TEMPLATES[rng.integers(len(ANSWER_TEMPLATES))].format(**words),
                "position": str(position), "split": split, "task": task,
            })
    atomic_write_text(root / "annotations" / f"{task}.csv", pd.DataFrame(records).to_csv(index=False))


def _write_png(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        ok, buf = cv2.imencode(".png", array)
        if not ok:
            raise ValueError(f"could not encode {path}")
        Path(tmp).write_bytes(buf.tobytes())
