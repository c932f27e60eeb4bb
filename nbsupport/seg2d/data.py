"""UW-Madison GI Tract (Kaggle 2022) exactly as Kaggle ships it: format adapter, slice manifest, Dataset.

Layout under a data root::

    train.csv                                   id,class,segmentation; 3 rows per slice (CLASSES order)
    train/case{N}/case{N}_day{D}/scans/slice_{SSSS}_{W}_{H}_{pxW}_{pxH}.png    16-bit grayscale

``W``/``H`` are the image width/height in pixels (the array is ``(H, W)``), ``pxW``/``pxH`` the pixel spacing in
mm. ``segmentation`` is a run-length encoding: space-separated ``start length`` pairs, 1-indexed starts, over the
mask flattened in row-major (C) order of shape ``(H, W)`` -- the convention of the public notebooks (awsaf49
"UWMGI: Mask Data"); an empty cell means the organ is absent from the slice. Classes overlap (stomach and bowel
share pixels in some slices), so masks are multi-label ``(3, H, W)``, never a single label map.

:func:`build_manifest` turns a data root into one row per slice (see ``SEG2D_SCHEMA``); :class:`SliceDataset`
serves it to a model. :mod:`nbsupport.seg2d.demo_data` writes a synthetic dataset in this format.
"""
from __future__ import annotations

import concurrent.futures
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from nbsupport.manifest import (
    SPLITS,
    Column,
    ManifestError,
    ManifestProblem,
    ManifestSchema,
    absolute_data_path,
)
from nbsupport.demo import DEMO_MARKER, read_demo_marker
from nbsupport.paths import resolve_path
from nbsupport.progress import progress
from nbsupport.seg2d.rle import rle_decode, rle_last_pixel, rle_runs
from nbsupport.stages import check_split_fractions

CLASSES = ("large_bowel", "small_bowel", "stomach")
RLE_COLUMNS = tuple(f"rle_{c}" for c in CLASSES)
TRAIN_CSV_COLUMNS = ("id", "class", "segmentation")
MANIFEST_COLUMNS = (
    "id", "case", "day", "slice", "image", "width", "height", "pixel_spacing_w", "pixel_spacing_h",
    *RLE_COLUMNS, "has_labels", "split",
)
NORMALIZATION_PERCENTILE = 99.5
# Model inputs are held at this precision (SliceDataset keeps a whole split in memory); prediction on single files
# rounds through it too, so that it sees exactly what training and evaluation saw.
MODEL_INPUT_DTYPE = np.float16
KAGGLE_LAYOUT = "train.csv + train/case{N}/case{N}_day{D}/scans/slice_{SSSS}_{W}_{H}_{pxW}_{pxH}.png"
# Kaggle's hidden test set has the same tree under test/ and no labels.
SCAN_FOLDERS = ("train", "test")

_SLICE_ID = re.compile(r"^case(\d+)_day(\d+)_slice_(\d+)$")
_SLICE_STEM = re.compile(r"^slice_(\d+)$")
_CASE_DAY_DIR = re.compile(r"^case(\d+)_day(\d+)$")
_CASE_DIR = re.compile(r"^case(\d+)$")


# ---------------------------------------------------------------------------------------------- names
class SliceId(NamedTuple):
    """A parsed ``case123_day20_slice_0001``."""

    case: int
    day: int
    slice: int

    @property
    def case_day(self) -> str:
        return f"case{self.case}_day{self.day}"


def parse_slice_id(slice_id: str) -> SliceId:
    """``"case123_day20_slice_0001"`` -> ``SliceId(case=123, day=20, slice=1)`` (compares equal to a plain tuple)."""
    m = _SLICE_ID.match(str(slice_id))
    if not m:
        raise ValueError(f"slice id {slice_id!r} does not match 'case{{N}}_day{{D}}_slice_{{SSSS}}' "
                         "(e.g. 'case123_day20_slice_0001')")
    return SliceId(int(m.group(1)), int(m.group(2)), int(m.group(3)))


class SliceFile(NamedTuple):
    """What a Kaggle slice filename says: slice number, size in pixels, pixel spacing in mm."""

    slice: int
    width: int
    height: int
    pixel_spacing_w: float
    pixel_spacing_h: float


def kaggle_slice_id(path: str | os.PathLike) -> str | None:
    """``case123_day20_slice_0001`` for an image at ``.../case123/case123_day20/scans/slice_0001_*.png`` (the Kaggle
    layout, train/ or test/), else None."""
    path = Path(path)
    day_dir, case_dir = path.parent.parent.name, path.parent.parent.parent.name
    m_day, m_case = _CASE_DAY_DIR.match(day_dir), _CASE_DIR.match(case_dir)
    if path.parent.name != "scans" or not m_day or not m_case or m_day.group(1) != m_case.group(1):
        return None
    try:
        parse_slice_filename(path)
    except ValueError:
        return None
    return f"{day_dir}_{path.name.rsplit('_', 4)[0]}"


def parse_slice_filename(path: str | os.PathLike) -> SliceFile:
    """Parse ``slice_{SSSS}_{W}_{H}_{pxW}_{pxH}.png`` (e.g. ``slice_0001_360_310_1.50_1.50.png``: W=360, H=310)."""
    name = Path(path).name
    expected = "expected 'slice_{SSSS}_{W}_{H}_{pxW}_{pxH}.png' (e.g. 'slice_0001_266_266_1.50_1.50.png')"
    if not name.lower().endswith(".png"):
        raise ValueError(f"{path}: not a .png slice file; {expected}")
    parts = name[:-4].rsplit("_", 4)
    m = _SLICE_STEM.match(parts[0]) if len(parts) == 5 else None
    if not m:
        raise ValueError(f"{path}: filename does not match; {expected}")
    try:
        info = SliceFile(int(m.group(1)), int(parts[1]), int(parts[2]), float(parts[3]), float(parts[4]))
    except ValueError:
        raise ValueError(f"{path}: width/height must be integers and pixel spacings numbers; {expected}") from None
    if info.width < 1 or info.height < 1 or not (info.pixel_spacing_w > 0 and info.pixel_spacing_h > 0):
        raise ValueError(f"{path}: expected a positive size and pixel spacing, got {info}")
    return info


def read_slice(path: str | os.PathLike) -> np.ndarray:
    """Read a slice PNG as stored: uint16 (H, W), raw scanner intensities.

    Raises:
        FileNotFoundError: no file.
        ValueError: an empty, corrupt or truncated PNG, an 8-bit or multi-channel image, or a shape that
            disagrees with the W and H in the filename.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such slice image")
    data = np.fromfile(path, dtype=np.uint8)  # imdecode (not imread) also copes with non-ASCII paths
    if data.size == 0:
        raise ValueError(f"{path}: empty file; expected a 16-bit grayscale PNG")
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError(f"{path}: cannot decode the image (corrupt or truncated PNG?); "
                         "expected a 16-bit grayscale PNG")
    wrong = []
    if image.ndim == 3:
        wrong.append(f"has {image.shape[2]} channels, expected 1 (grayscale)")
    if image.dtype != np.uint16:
        bits = image.dtype.itemsize * 8
        wrong.append(f"is {bits}-bit ({image.dtype}), expected 16-bit (uint16) as in the Kaggle dataset")
    if wrong:
        raise ValueError(f"{path}: image " + " and ".join(wrong))
    try:
        info = parse_slice_filename(path)
    except ValueError:
        info = None  # images named otherwise (e.g. new PNGs for inference) carry no size to check against
    if info is not None and image.shape != (info.height, info.width):
        raise ValueError(f"{path}: image is {image.shape[1]}x{image.shape[0]} (WxH) but its filename says "
                         f"{info.width}x{info.height}")
    return image


# ---------------------------------------------------------------------------------------------- train.csv
def _load_train_csv(path: Path) -> tuple[pd.DataFrame, list[ManifestProblem]]:
    """train.csv as strings ("" for empty cells) and every problem in it."""
    name = path.name
    df = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    missing = [c for c in TRAIN_CSV_COLUMNS if c not in df.columns]
    if missing:
        found = ",".join(map(str, df.columns))
        return df, [ManifestProblem(1, c, f"missing column; expected header 'id,class,segmentation', found {found!r}",
                                    file=name) for c in missing]
    problems: list[ManifestProblem] = []
    for position, (slice_id, organ, rle) in enumerate(zip(df["id"], df["class"], df["segmentation"])):
        line = position + 2
        try:
            parse_slice_id(slice_id)
        except ValueError as err:
            problems.append(ManifestProblem(line, "id", str(err), file=name))
        if organ not in CLASSES:
            problems.append(ManifestProblem(line, "class", f"unknown class {organ!r}; expected one of {list(CLASSES)}",
                                            file=name))
        if rle.strip():
            try:
                rle_runs(rle)
            except ValueError as err:
                problems.append(ManifestProblem(line, "segmentation", str(err), file=name))
    duplicated = df.duplicated(["id", "class"], keep="first").to_numpy()
    if duplicated.any():
        first = {}
        for position, key in enumerate(zip(df["id"], df["class"])):
            if duplicated[position]:
                problems.append(ManifestProblem(position + 2, "class", f"duplicate row for ({key[0]}, {key[1]}); first "
                                                f"on line {first[key]}", file=name))
            else:
                first.setdefault(key, position + 2)
    problems.sort(key=lambda p: p.line or 0)
    return df, problems


def read_train_csv(path: str | os.PathLike) -> pd.DataFrame:
    """Read and validate Kaggle's ``train.csv``: columns id, class, segmentation ("" = no mask), all strings.

    Raises:
        ManifestError: every problem at once (line number and field): missing columns, bad ids, unknown classes,
            malformed RLE, duplicate (id, class) rows.
    """
    path = resolve_path(path)
    df, problems = _load_train_csv(path)
    if problems:
        raise ManifestError(problems, path)
    return df


# ---------------------------------------------------------------------------------------------- manifest
def split_cases(cases: Iterable[int], val_fraction: float, test_fraction: float, seed: int) -> dict[int, str]:
    """Assign whole cases to "train"/"val"/"test" (deterministic given ``seed``; the order of ``cases`` is ignored).

    A non-zero fraction gets at least one case while at least one case is left for training.
    """
    check_split_fractions(val_fraction=val_fraction, test_fraction=test_fraction)
    cases = sorted(set(int(c) for c in cases))
    n = len(cases)
    order = [cases[i] for i in np.random.default_rng(seed).permutation(n)]

    def count(fraction: float) -> int:
        return max(1, round(fraction * n)) if fraction > 0 else 0

    n_test = min(count(test_fraction), max(n - 1, 0))
    n_val = min(count(val_fraction), max(n - 1 - n_test, 0))
    return {case: "test" if i < n_test else "val" if i < n_test + n_val else "train" for i, case in enumerate(order)}


def build_manifest(
    data_root: str | os.PathLike,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per slice of a Kaggle-format data root (columns ``MANIFEST_COLUMNS``, see ``SEG2D_SCHEMA``).

    Walks ``train/case*/case*_day*/scans/*.png`` (``test/...`` when there is no ``train/``, as in Kaggle's hidden
    test set) and joins ``train.csv``. Splits are by case (no case in two splits). Without a ``train.csv`` (new
    images for inference) every mask is empty, ``has_labels`` is False and every row is in split "test".

    Raises:
        ManifestError: every problem at once: badly named folders or files, train.csv problems, slices in
            train.csv without an image and images without train.csv rows, RLE runs past the image size.
    """
    root = resolve_path(data_root)
    if not root.is_dir():
        raise FileNotFoundError(f"data root {root} does not exist; expected {KAGGLE_LAYOUT}")
    scan_folder = next((f for f in SCAN_FOLDERS if (root / f).is_dir()), SCAN_FOLDERS[0])
    rows, problems = _scan_slices(root, scan_folder)
    demo = read_demo_marker(root)
    if demo is not None and not demo.get("complete"):
        # without this an interrupted demo (train.csv is written last) would pass for unlabelled images
        problems.append(ManifestProblem(None, None, f"{DEMO_MARKER} says the demo dataset was not written to the end; "
                                        "run write_demo_dataset (nbsupport demo-data) again"))
    has_labels = (root / "train.csv").is_file()
    labels: dict[str, list[str]] = {}
    if has_labels:
        labels, label_problems = _join_labels(root / "train.csv", rows, scan_folder)
        problems += label_problems
    if problems:
        # Report the unreadable images in the same error, so that one pass fixes everything. (Without other
        # problems the images are read once, by write_manifest's validation, instead of twice.)
        problems += _image_problems(root, rows)
        raise ManifestError(problems, root, hint=f"Expected the Kaggle layout: {KAGGLE_LAYOUT}")

    splits = split_cases((r["case"] for r in rows), val_fraction, test_fraction, seed) if has_labels else {}
    for row in rows:
        masks = labels.get(row["id"], ["", "", ""])
        for name, rle in zip(RLE_COLUMNS, masks):
            row[name] = rle
        row["has_labels"] = has_labels
        row["split"] = splits.get(row["case"], "test")
    df = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))
    df = df.sort_values(["case", "day", "slice"], kind="stable").reset_index(drop=True)
    for name in ("id", "image", *RLE_COLUMNS, "split"):
        df[name] = df[name].astype(object)
    return df


def _scan_slices(root: Path, scan_folder: str) -> tuple[list[dict[str, Any]], list[ManifestProblem]]:
    """A row (id, case, day, slice, image, size, spacing) per slice PNG under ``root/scan_folder``, and a problem
    for every badly named folder or file and every second image of a slice."""
    problems: list[ManifestProblem] = []
    rows: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    for image in sorted((root / scan_folder).glob("*/*/scans/*.png")):
        relative = image.relative_to(root).as_posix()
        day_dir, case_dir = image.parent.parent.name, image.parent.parent.parent.name
        m_day, m_case = _CASE_DAY_DIR.match(day_dir), _CASE_DIR.match(case_dir)
        if not m_day or not m_case or m_day.group(1) != m_case.group(1):
            problems.append(ManifestProblem(None, "image", f"folders {case_dir}/{day_dir} do not match "
                                            "'case{N}/case{N}_day{D}'", file=relative))
            continue
        try:
            info = parse_slice_filename(image)
        except ValueError as err:
            problems.append(ManifestProblem(None, "image", str(err).replace(str(image), relative), file=None))
            continue
        slice_id = kaggle_slice_id(image)  # not None: folders and filename were checked above
        if slice_id in seen:
            problems.append(ManifestProblem(None, "image", f"second image for slice {slice_id} "
                                            f"(first: {seen[slice_id]})", file=relative))
            continue
        seen[slice_id] = relative
        rows.append({
            "id": slice_id, "case": int(m_day.group(1)), "day": int(m_day.group(2)), "slice": info.slice,
            "image": relative, "width": info.width, "height": info.height,
            "pixel_spacing_w": info.pixel_spacing_w, "pixel_spacing_h": info.pixel_spacing_h,
        })
    if not rows and not problems:
        problems.append(ManifestProblem(None, None, f"no slice images found; expected {KAGGLE_LAYOUT}"))
    return rows, problems


def _join_labels(csv_path: Path, rows: list[dict[str, Any]],
                 scan_folder: str) -> tuple[dict[str, list[str]], list[ManifestProblem]]:
    """Slice id -> its three RLEs (``CLASSES`` order; "" where a row is bad or missing) from ``train.csv``, and the
    problems: train.csv's own, slices with rows but no image, images without rows, RLE runs past the image."""
    table, problems = _load_train_csv(csv_path)
    labels: dict[str, list[str]] = {}
    label_lines: dict[str, list[int]] = {}
    seen = {row["id"] for row in rows}
    if all(c in table.columns for c in TRAIN_CSV_COLUMNS):
        bad_lines = {p.line for p in problems}
        for position, (slice_id, organ, rle) in enumerate(zip(table["id"], table["class"], table["segmentation"])):
            line = position + 2
            if organ not in CLASSES or not _SLICE_ID.match(slice_id):
                continue
            k = CLASSES.index(organ)
            labels.setdefault(slice_id, ["", "", ""])[k] = "" if line in bad_lines else rle.strip()
            label_lines.setdefault(slice_id, [0, 0, 0])[k] = line
        for slice_id, lines in label_lines.items():
            if slice_id not in seen:
                first_line = min(n for n in lines if n)
                problems.append(ManifestProblem(first_line, "id", f"slice {slice_id} has rows but no image file "
                                                f"under {scan_folder}/ ({KAGGLE_LAYOUT})", file="train.csv"))
    for row in rows:
        if row["id"] not in labels:
            problems.append(ManifestProblem(None, "image", f"no rows in train.csv for slice {row['id']}",
                                            file=row["image"]))
            continue
        n_pixels = row["width"] * row["height"]
        for k, rle in enumerate(labels[row["id"]]):
            if rle and rle_last_pixel(rle) > n_pixels:
                problems.append(ManifestProblem(
                    label_lines[row["id"]][k], "segmentation",
                    f"{CLASSES[k]} RLE runs to pixel {rle_last_pixel(rle)} but the image is {row['width']}x"
                    f"{row['height']} (WxH, {n_pixels} pixels) according to {Path(row['image']).name}",
                    file="train.csv"))
    return labels, problems


def _image_problems(root: Path, rows: list[dict[str, Any]]) -> list[ManifestProblem]:
    """A problem for every slice image of ``rows`` that :func:`read_slice` refuses (corrupt, 8-bit, RGB...)."""
    def check(row: dict[str, Any]) -> ManifestProblem | None:
        try:
            read_slice(root / row["image"])
        except (OSError, ValueError) as err:
            return ManifestProblem(None, "image", str(err).replace(str(root / row["image"]), row["image"]),
                                   file=row["image"])
        return None

    workers = max(1, min(8, os.cpu_count() or 1))  # decoding releases the GIL
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        found = list(progress(pool.map(check, rows), desc="checking slice images", total=len(rows)))
    return [p for p in found if p is not None]


def _check_slice_id(value: Any) -> str | None:
    parse_slice_id(value)
    return None


def _check_rle(value: Any) -> str | None:
    rle_runs(value)
    return None


def _seg2d_row_check(row: Mapping[str, Any]) -> Iterable[tuple[str, str]]:
    """Cross-column checks of a manifest row: id vs case/day/slice, filename vs size, RLE vs size, labels."""
    if parse_slice_id(row["id"]) != (row["case"], row["day"], row["slice"]):
        yield "id", f"id {row['id']} disagrees with case={row['case']}, day={row['day']}, slice={row['slice']}"
    try:
        info = parse_slice_filename(row["image"])
    except ValueError as err:
        yield "image", str(err)
    else:
        if (info.width, info.height) != (row["width"], row["height"]):
            yield "image", (f"filename says {info.width}x{info.height} (WxH) but the row says "
                            f"{row['width']}x{row['height']}")
    for name in ("pixel_spacing_w", "pixel_spacing_h"):
        if not row[name] > 0:  # distances in mm (Hausdorff) would be silently zero or negative
            yield name, f"expected a pixel spacing > 0 mm, got {row[name]!r}"
    for name in ("width", "height"):
        if row[name] < 1:
            yield name, f"expected a size >= 1 pixel, got {row[name]!r}"
    n_pixels = row["width"] * row["height"]
    for name in RLE_COLUMNS:
        if row[name] and n_pixels > 0 and rle_last_pixel(row[name]) > n_pixels:
            yield name, (f"RLE runs to pixel {rle_last_pixel(row[name])}; expected <= width*height = {n_pixels}")
    if row["has_labels"] is False and row["split"] != "test":
        yield "split", f"rows without labels can only be in split 'test', got {row['split']!r}"


SEG2D_SCHEMA = ManifestSchema(
    dataset="uw-madison-gi-tract",
    key="id",
    columns=(
        Column("id", _check_slice_id, help="slice id case{N}_day{D}_slice_{SSSS}"),
        Column("case", "int", help="case number N"),
        Column("day", "int", help="scan day D"),
        Column("slice", "int", help="slice number SSSS along the scan axis"),
        Column("image", "path", help="16-bit PNG, relative to the data root"),
        Column("width", "int", help="image width W in pixels"),
        Column("height", "int", help="image height H in pixels"),
        Column("pixel_spacing_w", "float", help="pixel width in mm"),
        Column("pixel_spacing_h", "float", help="pixel height in mm"),
        *(Column(name, _check_rle, nullable=True, help=f"RLE of the {organ} mask (row-major, 1-indexed); empty = none")
          for name, organ in zip(RLE_COLUMNS, CLASSES)),
        Column("has_labels", "bool", help="False for images without train.csv rows (inference only)"),
        Column("split", "split", allowed=SPLITS, help="train / val / test, assigned by case"),
    ),
    readers={"image": read_slice},
    row_check=_seg2d_row_check,
)


def masks_for_row(row: Mapping[str, Any] | tuple) -> np.ndarray:
    """bool (3, H, W) masks of one manifest row, channels in ``CLASSES`` order.

    ``row`` is a mapping (dict, ``df.iloc[i]``) or a named tuple from ``df.itertuples()``.
    """
    def field(name: str) -> Any:
        return getattr(row, name) if hasattr(row, "_fields") else row[name]

    height, width = int(field("height")), int(field("width"))
    return np.stack([rle_decode(field(name), height, width) for name in RLE_COLUMNS])


# ---------------------------------------------------------------------------------------------- model input
def normalize_intensity(image: np.ndarray) -> np.ndarray:
    """Raw slice (H, W) -> float32 (H, W) in [0, 1]: divided by its own 99.5th percentile, then clipped.

    MRI intensities have no absolute unit (unlike CT's HU): gain differs between scanners, sessions and slices,
    so each slice is scaled on its own. The percentile rather than the maximum keeps a few very bright pixels
    (fluid, vessels, artefacts) from squashing the rest of the slice into a narrow range; not subtracting a
    minimum keeps air at 0.
    """
    image = image.astype(np.float32, copy=False)
    top = float(np.percentile(image, NORMALIZATION_PERCENTILE))
    if top <= 0:
        return np.zeros(image.shape, dtype=np.float32)
    return np.clip(image / top, 0.0, 1.0)


def slice_to_model_input(image: np.ndarray, image_size: int) -> np.ndarray:
    """Raw slice (H, W) -> float32 (S, S) in [0, 1]: :func:`normalize_intensity`, then area-resized to S x S.

    The aspect ratio is not kept (360x310 slices are stretched to a square); :func:`restore_slice_size` undoes it.
    """
    return cv2.resize(normalize_intensity(image), (image_size, image_size), interpolation=cv2.INTER_AREA)


def restore_slice_size(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """Model-resolution maps (C, S, S) (probabilities or logits) -> (C, height, width), bilinear.

    Threshold after restoring, then :func:`rle_encode` each channel for the original slice.
    """
    maps = np.asarray(maps, dtype=np.float32)
    resized = cv2.resize(np.ascontiguousarray(maps.transpose(1, 2, 0)), (int(width), int(height)),
                         interpolation=cv2.INTER_LINEAR)
    return resized.reshape(int(height), int(width), -1).transpose(2, 0, 1)


class SliceDataset(Dataset):
    """All slices of a manifest, loaded once into memory at model resolution.

    Each item is ``dict(image=float32 (1, S, S) in [0, 1], masks=float32 (3, S, S) in {0, 1}, index=int)`` with
    ``S = image_size`` and mask channels in ``CLASSES`` order. ``index`` is the row of ``.manifest`` (reset to
    0..n-1), which keeps the id and the original ``height``/``width`` for :func:`restore_slice_size`.

    Images are stored as float16 and masks bit-packed: about ``n * S * S * 2.4`` bytes (38,496 Kaggle slices at
    S=224: 4.6 GB).

    Args:
        manifest: rows of ``build_manifest`` / ``read_manifest`` (e.g. one split).
        data_root: the folder the manifest's ``image`` paths are relative to.
        image_size: side S of the square model input in pixels.
        augment: the seed's training augmentations per item (:func:`nbsupport.seg2d.augment.seed_augmentation`:
            flips, shift/scale/rotate, brightness/contrast, coarse dropout), drawn from torch's RNG. Off by
            default: a flip moves the stomach to the other side, which a model may otherwise rely on.
    """

    def __init__(self, manifest: pd.DataFrame, data_root: str | os.PathLike, image_size: int, augment: bool = False,
                 desc: str = "loading slices"):
        if int(image_size) < 8:
            raise ValueError(f"image_size must be at least 8 pixels, got {image_size}")
        missing = [c for c in ("id", "image", "width", "height", *RLE_COLUMNS) if c not in manifest.columns]
        if missing:
            raise ValueError(f"manifest lacks columns {missing}; build it with seg2d.data.build_manifest")
        self.manifest = manifest.reset_index(drop=True)
        self.data_root = resolve_path(data_root)
        self.image_size = size = int(image_size)
        self.augment = augment
        self._augmentation = None
        if augment:  # imported here: `import monai` costs ~4 s in every notebook otherwise
            from nbsupport.seg2d.augment import seed_augmentation

            self._augmentation = seed_augmentation(size)
        n = len(self.manifest)
        self.images = np.zeros((n, size, size), dtype=MODEL_INPUT_DTYPE)
        self._mask_bits = 3 * size * size
        self.packed_masks = np.zeros((n, (self._mask_bits + 7) // 8), dtype=np.uint8)
        records = self.manifest.to_dict("records")

        def load(i: int) -> tuple[int, np.ndarray, np.ndarray]:
            row = records[i]
            image = slice_to_model_input(read_slice(absolute_data_path(row["image"], self.data_root)), size)
            masks = masks_for_row(row).transpose(1, 2, 0).astype(np.uint8)  # (H, W, 3) for cv2
            masks = cv2.resize(masks, (size, size), interpolation=cv2.INTER_NEAREST)
            return i, image, np.packbits(masks.transpose(2, 0, 1).ravel())

        # PNG decoding and resizing release the GIL, so threads overlap file reads with decoding.
        workers = max(1, min(8, os.cpu_count() or 1))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            for i, image, packed in progress(pool.map(load, range(n)), desc=desc, total=n):
                self.images[i] = image
                self.packed_masks[i] = packed

    def __len__(self) -> int:
        return len(self.images)

    @property
    def ids(self) -> list[str]:
        return self.manifest["id"].tolist()

    @property
    def nbytes(self) -> int:
        return int(self.images.nbytes + self.packed_masks.nbytes)

    def masks(self, index: int) -> np.ndarray:
        """bool (3, S, S) masks at model resolution."""
        bits = np.unpackbits(self.packed_masks[index], count=self._mask_bits)
        return bits.reshape(3, self.image_size, self.image_size).astype(bool)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        image = torch.from_numpy(self.images[index].astype(np.float32))[None]
        masks = torch.from_numpy(self.masks(index).astype(np.float32))
        if self._augmentation is not None:
            # One seed per item from torch's generator, which the trainer seeds and restores on resume and which
            # differs between DataLoader workers (MONAI's own default is the OS's entropy: runs would not repeat).
            self._augmentation.set_random_state(seed=int(torch.randint(2**31 - 1, ()).item()))
            out = self._augmentation({"image": image, "masks": masks})
            image, masks = out["image"], out["masks"]
        return {"image": image, "masks": masks, "index": index}
