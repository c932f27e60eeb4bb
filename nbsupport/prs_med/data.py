"""PRS-Med / MMRS (PosMed) data as released: the layout adapter, the manifest and the Dataset.

Layout under a data root (the official ``data_v2`` tree)::

    <task>/{train,val,test}_images/<name>.png      the images (RGB or grey PNG/JPG)
    <task>/{train,val,test}_masks/<name>.png       binary masks, same file name (a .jpg image has a .png mask)
    annotations/<task>.csv                          one row per question/answer pair

CSV columns: ``image_path`` or ``image_name``, ``question``, ``answer``, ``position``, ``split``; optional
``mask_path`` and ``task``. The official generator (``data_processing/mask_position.py``) wrote the *mask* path
into ``image_path`` and a sentence into ``position`` ("... in the top left ..."); both forms are accepted: a path
into a ``*_masks`` folder is mapped to its image, and ``position`` is parsed with
:func:`nbsupport.metrics.parse_position`.

:func:`position_of` derives the label from a mask exactly as that generator does; :func:`build_manifest` reads
every annotation file, checks every image and mask (all problems at once), reports rows whose CSV position
disagrees with their mask, and returns the manifest (``PRSMED_SCHEMA``); :class:`PositionQADataset` feeds it to
the network. The synthetic dataset in the same layout is written by :mod:`nbsupport.prs_med.demo_data`.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from nbsupport.manifest import SPLITS, Column, ManifestError, ManifestProblem, ManifestSchema
from nbsupport.metrics import POSITIONS, parse_position
from nbsupport.paths import resolve_path
from nbsupport.progress import progress

# The seven task folders of the release; the official evaluation uses the six without dental_xray.
TASKS = ("brain_tumors_ct_scan", "breast_tumors_ct_scan", "dental_xray", "lung_CT", "lung_Xray", "polyp_endoscopy",
         "skin_rgbimage")
# Modality classes of the official auxiliary classifier (Linear(256 -> 6) on the image embedding).
MODALITY_CLASS = {"brain_tumors_ct_scan": 0, "breast_tumors_ct_scan": 1, "lung_CT": 2, "lung_Xray": 3,
                  "dental_xray": 3, "skin_rgbimage": 4, "polyp_endoscopy": 5}
N_MODALITY_CLASSES = 6
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
LAYOUT = "<root>/<task>/{split}_images/*.png, <task>/{split}_masks/*.png, <root>/annotations/<task>.csv"


# ---------------------------------------------------------------------------------------------- position
class MaskPosition(NamedTuple):
    """What the official generator derives from a mask."""

    position: str  # one of POSITIONS
    near_center: bool  # picks the "near" answer templates (position.txt) over the "far" ones


def check_binary_mask(mask: np.ndarray, where: str = "mask") -> np.ndarray:
    """``mask`` as bool (H, W), or a ValueError saying what is wrong.

    Binary means two values at most, 0 and one foreground value (1 or 255 in practice); a colour or
    anti-aliased/JPEG mask has more and is refused rather than silently thresholded.
    """
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[2] in (3, 4) and (mask[..., :3] == mask[..., :1]).all():
        mask = mask[..., 0]  # a grey mask saved as RGB(A)
    if mask.ndim != 2:
        raise ValueError(f"{where}: expected a single-channel (H, W) mask, got shape {mask.shape}")
    values = np.unique(mask)
    if values.size > 2 or (values.size == 2 and values[0] != 0):
        shown = ", ".join(str(v) for v in values[:6]) + (", ..." if values.size > 6 else "")
        raise ValueError(f"{where}: not a binary mask: {values.size} distinct values ({shown}); expected 0 for "
                         "background and one foreground value (1 or 255)")
    return mask > 0


def position_of(mask: Any) -> MaskPosition:
    """The position label of a binary mask, exactly as PRS-Med's ``get_mask_position``.

    The image centre is ``(w // 2, h // 2)``; if the mask's bounding box (inclusive pixel bounds) contains it the
    label is ``"center"``, otherwise the quadrant of the box centre ``((min + max) // 2)``: left/top when strictly
    smaller than the image centre, right/bottom otherwise. ``near_center``: box centre closer than ``0.2 * w``
    pixels to the image centre (always True for center).

    Args:
        mask: (H, W) binary array (bool, 0/1 or 0/255).

    Raises:
        ValueError: an empty mask (the generator skips those), or a mask that is not binary.
    """
    m = check_binary_mask(mask)
    h, w = m.shape
    center_x, center_y = w // 2, h // 2
    coords = np.argwhere(m)
    if coords.size == 0:
        raise ValueError("empty mask: no foreground pixel, so no position (the official generator skips such "
                         "images)")
    min_y, min_x = coords.min(axis=0)
    max_y, max_x = coords.max(axis=0)
    if min_x <= center_x <= max_x and min_y <= center_y <= max_y:
        return MaskPosition("center", True)
    box_x, box_y = (min_x + max_x) // 2, (min_y + max_y) // 2
    near = bool(np.sqrt((box_x - center_x) ** 2 + (box_y - center_y) ** 2) < 0.2 * w)
    vertical = "top" if box_y < center_y else "bottom"
    horizontal = "left" if box_x < center_x else "right"
    return MaskPosition(f"{vertical} {horizontal}", near)


# ---------------------------------------------------------------------------------------------- files
def read_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as uint8 RGB (H, W, 3); grey images are repeated over the channels."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError(f"{path}: not a readable image")
    if image.dtype != np.uint8:
        image = cv2.normalize(image, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    if image.ndim == 2:
        return np.repeat(image[..., None], 3, axis=2)
    if image.shape[2] == 4:
        image = image[..., :3]
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_mask(path: str | os.PathLike, image_shape: tuple[int, int] | None = None) -> np.ndarray:
    """A mask file as bool (H, W).

    Args:
        path: the mask PNG.
        image_shape: (H, W) of its image; a mask of another size is an error.

    Raises:
        FileNotFoundError: the mask is missing. ValueError: unreadable, another size than its image, not binary.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: mask is missing")
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise ValueError(f"{path}: not a readable image")
    mask = check_binary_mask(raw, str(path))
    if image_shape is not None and mask.shape != tuple(image_shape[:2]):
        raise ValueError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image is "
                         f"{image_shape[1]}x{image_shape[0]}; expected the same size")
    return mask


def _read_image_for_schema(path: Path) -> None:
    if cv2.imread(str(path), cv2.IMREAD_UNCHANGED) is None:
        raise ValueError("not a readable image")


def _position_value(value: Any) -> str | None:
    return None if value in POSITIONS else f"expected one of {list(POSITIONS)}"


PRSMED_SCHEMA = ManifestSchema(
    dataset="prs_med",
    columns=(
        Column("id", help="<task>:<CSV line> of the question/answer pair"),
        Column("task", allowed=TASKS, help="task folder"),
        Column("split", "split"),
        Column("image", "path", help="image file, relative to the data root"),
        Column("mask", "path", help="binary mask, same size as the image"),
        Column("question", help="the question about the finding's position"),
        Column("answer", help="the reference answer naming the position"),
        Column("position", _position_value, help="position label derived from the mask (position_of)"),
        Column("csv_position", nullable=True, help="the position the annotation CSV gave, parsed; '' if none"),
        Column("near_center", "bool", help="mask box centre within 0.2*width of the image centre"),
        Column("width", "int"),
        Column("height", "int"),
        Column("modality_class", "int", help="class of the official auxiliary modality classifier (0-5)"),
    ),
    key="id",
    readers={"image": _read_image_for_schema, "mask": _read_image_for_schema},
)


# ---------------------------------------------------------------------------------------------- manifest
def _resolve_image(row: pd.Series, task: str, split: str, root: Path, has_path: bool) -> Path:
    """The image file of an annotation row (see the module docstring for the accepted forms)."""
    if has_path and str(row.get("image_path", "")).strip():
        rel = PurePosixPath(str(row["image_path"]).strip().replace("\\", "/"))
        parts = list(rel.parts)
        # The official generator stores "<task>/<split>_masks/<name>": point at the image instead.
        if len(parts) >= 2 and parts[-2].endswith("_masks"):
            parts[-2] = parts[-2][: -len("_masks")] + "_images"
        candidates = [root.joinpath(*parts), root / task / Path(*parts)]
        if rel.is_absolute():
            candidates = [Path(*parts)]
        for c in candidates:
            if c.is_file():
                return c
        stem_matches = [c.with_suffix(s) for c in candidates for s in IMAGE_SUFFIXES if c.with_suffix(s).is_file()]
        return stem_matches[0] if stem_matches else candidates[0]
    name = str(row.get("image_name", "")).strip()
    base = root / task / f"{split}_images" / name
    if not base.is_file():
        for s in IMAGE_SUFFIXES:
            if base.with_suffix(s).is_file():
                return base.with_suffix(s)
    return base


def _resolve_mask(row: pd.Series, image: Path, task: str, split: str, root: Path) -> Path:
    given = str(row.get("mask_path", "") or "").strip()
    if given:
        p = Path(given)
        return p if p.is_absolute() else (root / p if (root / p).exists() else root / task / p)
    return root / task / f"{split}_masks" / (image.stem + ".png")


def build_manifest(root: str | os.PathLike, tasks: Sequence[str] | None = None,
                   check_masks: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One manifest row per question/answer pair of ``<root>/annotations/<task>.csv``.

    Args:
        root: data root in the released layout.
        tasks: task names to read (default: every ``annotations/<task>.csv`` whose task is one of :data:`TASKS`).
        check_masks: open every image and mask (size, binary, non-empty); False only trusts the file names.

    Returns:
        (manifest, disagreements): ``disagreements`` lists the rows whose CSV position differs from the one the
        mask gives (the manifest keeps the mask's, which is what the model learns and is scored against).

    Raises:
        ManifestError: every problem at once: missing columns, unknown splits, images or masks that are missing,
            unreadable, of another size than their image, not binary, or empty.
    """
    root = resolve_path(root)
    reader = _AnnotationReader(root, check_masks)
    rows = [row for csv_path in _annotation_files(root, tasks) for row in reader.read(csv_path)]
    if reader.problems:
        raise ManifestError(reader.problems, str(root), hint=f"Expected the PRS-Med layout: {LAYOUT}")
    manifest = pd.DataFrame(rows, columns=PRSMED_SCHEMA.names)
    for name in ("image", "mask"):
        manifest[name] = [str(Path(p).resolve().relative_to(root.resolve()).as_posix()) for p in manifest[name]]
    return manifest, pd.DataFrame(reader.disagreements, columns=["id", "file", "line", "csv_position",
                                                                 "mask_position", "mask"])


def _annotation_files(root: Path, tasks: Sequence[str] | None) -> list[Path]:
    """``annotations/<task>.csv`` of ``tasks`` (default: of every known task there is one for)."""
    ann_dir = root / "annotations"
    if not ann_dir.is_dir():
        raise ManifestError([ManifestProblem(None, None, f"no annotations folder {ann_dir}")], str(root),
                            hint=f"Expected the PRS-Med layout: {LAYOUT}")
    if tasks is None:
        files = sorted(p for p in ann_dir.glob("*.csv") if p.stem in TASKS)
    else:
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; the release has {list(TASKS)}")
        files = [ann_dir / f"{t}.csv" for t in tasks]
    if not files:
        raise ManifestError([ManifestProblem(None, None, f"no <task>.csv for any of {list(TASKS)} in {ann_dir}")],
                            str(root), hint=f"Expected the PRS-Med layout: {LAYOUT}")
    return files


class _AnnotationReader:
    """Reads annotation files into manifest rows for :func:`build_manifest`, collecting every problem (file, line,
    column) and every CSV position that disagrees with its mask; each image and mask is opened once."""

    def __init__(self, root: Path, check_masks: bool):
        self.root, self.check_masks = root, check_masks
        self.problems: list[ManifestProblem] = []
        self.disagreements: list[dict[str, Any]] = []
        self._shapes: dict[Path, tuple[int, int]] = {}
        self._positions: dict[Path, MaskPosition] = {}

    def read(self, csv_path: Path) -> list[dict[str, Any]]:
        """The manifest rows of one annotation file (its problems are added to :attr:`problems`)."""
        root = self.root
        where = str(csv_path.relative_to(root)) if csv_path.is_relative_to(root) else str(csv_path)
        if not csv_path.is_file():
            self.problems.append(ManifestProblem(None, None, "annotation file is missing", where))
            return []
        df = pd.read_csv(csv_path, dtype=str, keep_default_na=False, na_filter=False)
        missing = [c for c in ("question", "answer", "split") if c not in df.columns]
        has_path = "image_path" in df.columns
        if not has_path and "image_name" not in df.columns:
            missing.append("image_path or image_name")
        if missing:
            self.problems.append(ManifestProblem(1, None, f"missing columns {missing}; has {list(df.columns)}",
                                                 where))
            return []
        rows = []
        for i, row in progress(df.iterrows(), desc=f"check {csv_path.stem}", total=len(df)):
            task = str(row.get("task", "") or csv_path.stem).strip()
            found = self._row(row, int(i) + 2, task, where, has_path, "position" in df.columns)
            if found is not None:
                rows.append(found)
        return rows

    def _row(self, row: pd.Series, line: int, task: str, where: str, has_path: bool,
             has_position: bool) -> dict[str, Any] | None:
        """One manifest row, or None after recording what is wrong with the annotation row at ``line``."""
        def problem(column: str, message: str) -> None:
            self.problems.append(ManifestProblem(line, column, message, where))

        if task not in TASKS:
            return problem("task", f"expected one of {list(TASKS)}, got {task!r}")
        split = str(row["split"]).strip()
        if split not in SPLITS:
            return problem("split", f"expected one of {list(SPLITS)}, got {split!r}")
        image = _resolve_image(row, task, split, self.root, has_path)
        mask = _resolve_mask(row, image, task, split, self.root)
        column = "image_path" if has_path else "image_name"
        if not image.is_file():
            return problem(column, f"image {image} does not exist")
        if not mask.is_file():
            return problem("mask_path", f"mask is missing: expected {mask} (same file name as the image, in "
                                        "<task>/<split>_masks/)")
        empty = [c for c in ("question", "answer") if not str(row[c]).strip()]
        for c in empty:
            problem(c, f"empty; expected the {c} text of this image")
        if empty:
            return None
        (height, width), found = (0, 0), None
        if self.check_masks:
            try:
                if image not in self._shapes:
                    self._shapes[image] = read_image(image).shape[:2]
            except ValueError as err:
                return problem(column, f"{err} (expected a PNG or JPEG image)")
            try:
                height, width = self._shapes[image]
                if mask not in self._positions:
                    self._positions[mask] = position_of(read_mask(mask, self._shapes[image]))
                found = self._positions[mask]
            except (ValueError, FileNotFoundError) as err:
                return problem("mask_path", str(err))
        csv_position = parse_position(row.get("position", "")) if has_position else None
        if found and csv_position and csv_position != found.position:
            self.disagreements.append({"id": f"{task}:{line}", "file": where, "line": line,
                                       "csv_position": csv_position, "mask_position": found.position,
                                       "mask": str(mask.relative_to(self.root))})
        return {"id": f"{task}:{line}", "task": task, "split": split, "image": str(image), "mask": str(mask),
                "question": str(row["question"]).strip(), "answer": str(row["answer"]).strip(),
                "position": found.position if found else (csv_position or ""), "csv_position": csv_position or "",
                "near_center": bool(found.near_center) if found else False,
                "width": int(width), "height": int(height), "modality_class": MODALITY_CLASS[task]}


def summarise_manifest(manifest: pd.DataFrame) -> pd.DataFrame:
    """Per task: rows per split and per position."""
    splits = pd.crosstab(manifest["task"], manifest["split"]).reindex(columns=["train", "val", "test"], fill_value=0)
    positions = pd.crosstab(manifest["task"], manifest["position"]).reindex(columns=list(POSITIONS), fill_value=0)
    return pd.concat([splits, positions], axis=1)


# ---------------------------------------------------------------------------------------------- dataset
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def image_to_tensor(image: np.ndarray, size: int) -> torch.Tensor:
    """uint8 RGB (H, W, 3) -> ImageNet-normalised float (3, size, size), as the official SAM/TinySAM input."""
    resized = cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255.0
    return torch.from_numpy(((resized - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1).copy())


def mask_to_tensor(mask: np.ndarray, size: int) -> torch.Tensor:
    """bool (H, W) -> float (1, size, size) in {0, 1} (nearest-neighbour resize)."""
    resized = cv2.resize(mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST)
    return torch.from_numpy(resized.astype(np.float32))[None]


class PositionQADataset(Dataset):
    """Manifest rows as ``{"image", "mask", "question", "answer", "position", "modality", "index"}``.

    ``image`` (3, S, S) ImageNet-normalised; ``mask`` (1, S, S) in {0, 1}; text stays text (the model's tokenizer
    builds the prompt). Images are decoded once and cached: demo datasets are small.
    """

    def __init__(self, manifest: pd.DataFrame, root: str | os.PathLike, image_size: int):
        self.manifest = manifest.reset_index(drop=True)
        self.root = Path(root)
        self.image_size = int(image_size)
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.manifest)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.manifest.iloc[index]
        if index not in self._cache:
            image = read_image(self.root / row["image"])
            mask = read_mask(self.root / row["mask"], image.shape[:2])
            self._cache[index] = (image_to_tensor(image, self.image_size), mask_to_tensor(mask, self.image_size))
        image_t, mask_t = self._cache[index]
        return {"image": image_t, "mask": mask_t, "question": row["question"], "answer": row["answer"],
                "position": row["position"], "modality": int(row["modality_class"]), "index": index}


def collate_qa(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors, keep text as lists."""
    return {"image": torch.stack([i["image"] for i in items]), "mask": torch.stack([i["mask"] for i in items]),
            "modality": torch.tensor([i["modality"] for i in items]), "index": torch.tensor([i["index"] for i in items]),
            "question": [i["question"] for i in items], "answer": [i["answer"] for i in items],
            "position": [i["position"] for i in items]}
