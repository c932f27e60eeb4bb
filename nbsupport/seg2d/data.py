"""UW-Madison GI Tract (Kaggle 2022) exactly as Kaggle ships it, and a synthetic dataset in the same format.

Layout under a data root::

    train.csv                                   id,class,segmentation; 3 rows per slice (CLASSES order)
    train/case{N}/case{N}_day{D}/scans/slice_{SSSS}_{W}_{H}_{pxW}_{pxH}.png    16-bit grayscale

``W``/``H`` are the image width/height in pixels (the array is ``(H, W)``), ``pxW``/``pxH`` the pixel spacing in
mm. ``segmentation`` is a run-length encoding: space-separated ``start length`` pairs, 1-indexed starts, over the
mask flattened in row-major (C) order of shape ``(H, W)`` -- the convention of the public notebooks (awsaf49
"UWMGI: Mask Data"); an empty cell means the organ is absent from the slice. Classes overlap (stomach and bowel
share pixels in some slices), so masks are multi-label ``(3, H, W)``, never a single label map.

:func:`build_manifest` turns a data root into one row per slice (see ``SEG2D_SCHEMA``); :class:`SliceDataset`
serves it to a model; :func:`write_demo_dataset` writes a synthetic abdominal MRI dataset in the Kaggle format
so the same code path runs without the real data.
"""
from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
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
from nbsupport.paths import resolve_path
from nbsupport.progress import progress
from nbsupport.runs import atomic_path, atomic_write_json, read_json

CLASSES = ("large_bowel", "small_bowel", "stomach")
RLE_COLUMNS = tuple(f"rle_{c}" for c in CLASSES)
TRAIN_CSV_COLUMNS = ("id", "class", "segmentation")
MANIFEST_COLUMNS = (
    "id", "case", "day", "slice", "image", "width", "height", "pixel_spacing_w", "pixel_spacing_h",
    *RLE_COLUMNS, "has_labels", "split",
)
NORMALIZATION_PERCENTILE = 99.5
KAGGLE_LAYOUT = "train.csv + train/case{N}/case{N}_day{D}/scans/slice_{SSSS}_{W}_{H}_{pxW}_{pxH}.png"
# Kaggle's hidden test set has the same tree under test/ and no labels.
SCAN_FOLDERS = ("train", "test")

_SLICE_ID = re.compile(r"^case(\d+)_day(\d+)_slice_(\d+)$")
_SLICE_STEM = re.compile(r"^slice_(\d+)$")
_CASE_DAY_DIR = re.compile(r"^case(\d+)_day(\d+)$")
_CASE_DIR = re.compile(r"^case(\d+)$")


# ---------------------------------------------------------------------------------------------- RLE
def _is_empty_rle(rle: Any) -> bool:
    if rle is None or rle is pd.NA:
        return True
    if isinstance(rle, float):
        return bool(np.isnan(rle))
    return isinstance(rle, str) and not rle.strip()


def _rle_runs(rle: str) -> tuple[np.ndarray, np.ndarray]:
    """(0-based starts, lengths) of a non-empty RLE, checked for structure but not against an image size."""
    tokens = str(rle).split()
    try:
        values = np.array(tokens, dtype=np.int64)
    except (ValueError, OverflowError):
        bad = next(t for t in tokens if not re.fullmatch(r"[+-]?\d{1,18}", t))
        raise ValueError(f"RLE has a non-integer value {bad!r}; expected space-separated 'start length' "
                         "integers") from None
    if values.size % 2:
        raise ValueError(f"RLE has an odd number of values ({values.size}); expected 'start length' pairs")
    starts, lengths = values[0::2], values[1::2]
    bad = np.flatnonzero(starts < 1)
    if bad.size:
        raise ValueError(f"RLE run {bad[0] + 1} has start {starts[bad[0]]}; expected 1-indexed starts >= 1")
    bad = np.flatnonzero(lengths < 1)
    if bad.size:
        raise ValueError(f"RLE run {bad[0] + 1} has length {lengths[bad[0]]}; expected lengths >= 1")
    ends = starts - 1 + lengths  # 0-based, exclusive
    bad = np.flatnonzero(starts[1:] - 1 < ends[:-1])
    if bad.size:
        i = bad[0] + 1
        raise ValueError(f"RLE run {i + 1} (start {starts[i]}) begins before run {i} ends (last pixel {ends[i - 1]}); "
                         "expected runs sorted by start and not overlapping")
    return starts - 1, lengths


def _rle_last_pixel(rle: str) -> int:
    """1-indexed last pixel covered by a valid non-empty RLE (runs are sorted, so the last run ends last)."""
    starts, lengths = _rle_runs(rle)
    return int(starts[-1] + lengths[-1])


def rle_decode(rle: str, height: int, width: int) -> np.ndarray:
    """Decode a Kaggle RLE into a mask.

    Args:
        rle: ``"start length start length ..."``, 1-indexed starts over the row-major (C order) flattened mask;
            ``""`` / ``None`` / NaN means an empty mask.
        height, width: mask size in pixels (``H`` and ``W`` of the slice's filename).

    Returns:
        bool array (height, width).

    Raises:
        ValueError: non-integers, an odd number of values, starts or lengths < 1, unsorted or overlapping runs,
            or a run past the last pixel (height * width).
    """
    n = int(height) * int(width)
    if _is_empty_rle(rle):
        return np.zeros((height, width), dtype=bool)
    starts, lengths = _rle_runs(rle)
    ends = starts + lengths
    if ends[-1] > n:
        raise ValueError(f"RLE run ends at pixel {ends[-1]} but a {height}x{width} (HxW) mask has only {n} pixels")
    # +1 where a run starts, -1 after it ends; the running sum is 1 inside runs. Starts are unique and so are ends
    # (runs are sorted and disjoint), so plain fancy-index updates are exact.
    delta = np.zeros(n + 1, dtype=np.int32)
    delta[starts] += 1
    delta[ends] -= 1
    return (np.cumsum(delta[:n]) > 0).reshape(height, width)


def rle_encode(mask: np.ndarray) -> str:
    """Kaggle RLE of a 2-D mask (row-major, 1-indexed starts); ``""`` for an empty mask.

    Args:
        mask: (H, W) array; non-zero pixels are in the mask.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"rle_encode expects a 2-D (H, W) mask, got shape {mask.shape}")
    pixels = np.concatenate([[False], mask.ravel(order="C").astype(bool), [False]])
    changes = np.flatnonzero(pixels[1:] != pixels[:-1]) + 1  # 1-indexed positions where runs start / stop
    changes[1::2] -= changes[0::2]
    return " ".join(map(str, changes.tolist()))


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
                _rle_runs(rle)
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
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"expected 0 <= val_fraction, test_fraction and their sum < 1, "
                         f"got {val_fraction}, {test_fraction}")
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
    problems: list[ManifestProblem] = []
    rows: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    scan_folder = next((f for f in SCAN_FOLDERS if (root / f).is_dir()), SCAN_FOLDERS[0])
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
        slice_id = f"{day_dir}_{image.name.rsplit('_', 4)[0]}"
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

    csv_path = root / "train.csv"
    has_labels = csv_path.is_file()
    demo = read_json(root / DEMO_MARKER)
    if demo is not None and not demo.get("complete"):
        # without this an interrupted demo (train.csv is written last) would pass for unlabelled images
        problems.append(ManifestProblem(None, None, f"{DEMO_MARKER} says the demo dataset was not written to the end; "
                                        "run write_demo_dataset (nbsupport demo-data) again"))
    labels: dict[str, list[str]] = {}
    label_lines: dict[str, list[int]] = {}
    if has_labels:
        table, csv_problems = _load_train_csv(csv_path)
        problems += csv_problems
        if all(c in table.columns for c in TRAIN_CSV_COLUMNS):
            bad_lines = {p.line for p in csv_problems}
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
                if rle and _rle_last_pixel(rle) > n_pixels:
                    problems.append(ManifestProblem(
                        label_lines[row["id"]][k], "segmentation",
                        f"{CLASSES[k]} RLE runs to pixel {_rle_last_pixel(rle)} but the image is {row['width']}x"
                        f"{row['height']} (WxH, {n_pixels} pixels) according to {Path(row['image']).name}",
                        file="train.csv"))
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
    _rle_runs(value)
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
        if row[name] and n_pixels > 0 and _rle_last_pixel(row[name]) > n_pixels:
            yield name, (f"RLE runs to pixel {_rle_last_pixel(row[name])}; expected <= width*height = {n_pixels}")
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
        augment: random horizontal flips and a +-10% intensity scale per item. Off by default: a flip moves the
            stomach to the other side, which a model may otherwise rely on.
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
        n = len(self.manifest)
        self.images = np.zeros((n, size, size), dtype=np.float16)
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
        if self.augment:
            # torch's generator (not numpy's) so DataLoader workers draw different flips.
            if torch.rand(()) < 0.5:
                image, masks = image.flip(-1), masks.flip(-1)
            image = image * (0.9 + 0.2 * torch.rand(()))
        return {"image": image, "masks": masks, "index": index}


# ---------------------------------------------------------------------------------------------- demo data
# (width, height, pixel spacing in mm) of the Kaggle scans; demo case k uses entry k % 4.
DEMO_SCAN_SIZES = ((266, 266, 1.50), (360, 310, 1.50), (234, 234, 1.50), (276, 276, 1.63))
# write_demo_dataset arguments per ``nbsupport demo-data --size``: smoke has enough cases for train/val/test splits.
DEMO_SIZES = {
    "smoke": {"n_cases": 6, "days_per_case": 1, "slices_per_day": 16},
    "demo": {"n_cases": 16, "days_per_case": 2, "slices_per_day": 24},
}
DEMO_MARKER = "nbsupport_demo.json"

# Relative intensities (scaled by a per-scan gain into ~0..15000): bright things that are not organs (fat,
# spinal fluid) exist so a threshold alone cannot segment.
_FAT, _MUSCLE, _VISCERA, _LIVER, _KIDNEY = 7600.0, 2600.0, 4300.0, 3300.0, 5600.0
_MARROW, _CORTEX, _CSF = 4800.0, 1200.0, 10500.0
_STOMACH_FLUID, _STOMACH_AIR, _STOMACH_WALL = 11000.0, 700.0, 5200.0
_COLON_WALL, _COLON_CONTENT = 8800.0, 2600.0
_SMALL_BOWEL_LUMEN, _SMALL_BOWEL_WALL = 9200.0, 6200.0


def _window(t: float, start: float, stop: float) -> float:
    """Size factor in [0, 1] of a structure that exists for t in (start, stop): 0 at the ends, 1 in the middle."""
    if not start < t < stop:
        return 0.0
    return float(np.sqrt(np.sin(np.pi * (t - start) / (stop - start))))


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-ish float32 texture (H, W) with about ``cells`` blobs across the image."""
    longest = max(height, width)
    coarse = rng.standard_normal((max(2, cells * height // longest), max(2, cells * width // longest)))
    return cv2.resize(coarse.astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC)


def _demo_anatomy(seed: int, case: int, day: int) -> dict[str, Any]:
    """Per case-day geometry in mm (body semi-axes, organ placements); days of a case differ by a few mm."""
    case_rng = np.random.default_rng([seed, case])
    day_rng = np.random.default_rng([seed, case, day])
    a, b = case_rng.uniform(135, 165), case_rng.uniform(100, 120)
    loops = []
    for _ in range(int(case_rng.integers(10, 16))):
        radius, angle = 0.45 * np.sqrt(case_rng.uniform()), case_rng.uniform(-np.pi, np.pi)
        start = case_rng.uniform(0.28, 0.55)
        loops.append({
            "u": 0.08 + radius * np.cos(angle), "v": 0.12 + 0.8 * radius * np.sin(angle),  # central, below the stomach
            "r": case_rng.uniform(9.0, 15.0), "start": start, "stop": min(0.93, start + case_rng.uniform(0.3, 0.5)),
            "phase": case_rng.uniform(0, 2 * np.pi), "freq": case_rng.uniform(0.5, 1.5),
            "lumen": case_rng.uniform(0.55, 1.05),  # collapsed loops are darker than fluid-filled ones
        })
    return {
        "a": a, "b": b,
        "shift": day_rng.normal(0, 4.0, size=2),  # mm; breathing / positioning between days
        "gain": day_rng.uniform(0.85, 1.1),
        "fat": case_rng.uniform(10, 20), "muscle": case_rng.uniform(6, 10),
        "stomach": {"u": -0.38 + day_rng.normal(0, 0.02), "v": -0.30 + day_rng.normal(0, 0.02),
                    "sa": case_rng.uniform(0.33, 0.40), "sb": case_rng.uniform(0.32, 0.40),
                    "angle": case_rng.uniform(-0.5, 0.5), "phase": case_rng.uniform(0, 2 * np.pi),
                    "start": case_rng.uniform(0.06, 0.12), "stop": case_rng.uniform(0.52, 0.6)},
        "colon": {"scale": case_rng.uniform(0.72, 0.78), "radius": case_rng.uniform(10, 13),
                  "phase": case_rng.uniform(0, 2 * np.pi), "haustra": float(case_rng.integers(6, 10))},
        "loops": loops,
        "bias": day_rng.normal(0, 0.12, size=4),
        "bias_drift": day_rng.normal(0, 0.08, size=4),
    }


def _render_demo_slice(anatomy: Mapping[str, Any], t: float, width: int, height: int, spacing: float,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic axial abdominal MRI slice at position t in [0, 1] (top to bottom of the scan).

    Returns uint16 (H, W) image and bool (3, H, W) masks (``CLASSES`` order). Image left is the patient's left
    here (stomach upper left). Everything is computed in mm so organs keep their size across pixel spacings.
    """
    x = ((np.arange(width, dtype=np.float32) - (width - 1) / 2) * spacing - anatomy["shift"][0])[None, :]
    y = ((np.arange(height, dtype=np.float32) - (height - 1) / 2) * spacing - anatomy["shift"][1])[:, None]
    taper = 0.9 + 0.1 * np.sin(np.pi * t)
    a, b = anatomy["a"] * taper, anatomy["b"] * taper
    u, v = x / a, y / b
    r = np.sqrt(u * u + v * v)
    # approximate distance to the body surface in mm: (1 - r) / |grad r|
    depth = (1 - r) * r / np.maximum(np.sqrt((u / a) ** 2 + (v / b) ** 2), 1e-6)
    body = r < 1
    cavity = depth > anatomy["fat"] + anatomy["muscle"]

    img = np.zeros((height, width), dtype=np.float32)
    img[body] = _FAT
    img[body & (depth > anatomy["fat"])] = _MUSCLE
    viscera = _VISCERA * (1 + 0.15 * _smooth_noise(rng, height, width, 12))
    img = np.where(cavity, viscera, img)

    liver = _window(t, -0.2, 0.55)
    if liver:
        inside = ((u - 0.42) / (0.42 * liver)) ** 2 + ((v + 0.15) / (0.55 * liver)) ** 2 < 1
        img[inside & cavity] = _LIVER
    kidneys = _window(t, 0.3, 0.8)
    if kidneys:
        for side in (-1, 1):
            inside = ((u - side * 0.36) / (0.13 * kidneys)) ** 2 + ((v - 0.42) / (0.2 * kidneys)) ** 2 < 1
            img[inside & cavity] = _KIDNEY
    # spine: paraspinal muscles, vertebral body (cortex + marrow), spinal canal with bright fluid
    spine_y = 0.5 * b
    for side in (-1, 1):
        img[((x - side * 30) / 22) ** 2 + ((y - spine_y - 28) / 15) ** 2 < 1] = _MUSCLE
    vertebra = np.sqrt(x * x + (y - spine_y) ** 2)
    img[vertebra < 17] = _CORTEX
    img[vertebra < 14] = _MARROW
    img[np.sqrt(x * x + (y - spine_y - 25) ** 2) < 6.5] = _CSF

    masks = np.zeros((3, height, width), dtype=bool)
    # large bowel: a tube around the periphery of the cavity (both sides always, transverse part only in upper
    # slices), bright wall, dark mottled content, haustral bulges
    colon = anatomy["colon"]
    presence = _window(t, 0.18, 0.97)
    if presence:
        ca, cb = a * colon["scale"], b * colon["scale"]
        uc, vc = x / ca, y / cb
        rc = np.sqrt(uc * uc + vc * vc)
        distance = np.abs(rc - 1) * rc / np.maximum(np.sqrt((uc / ca) ** 2 + (vc / cb) ** 2), 1e-6)
        phi = np.abs(np.arctan2(x, y))  # 0 = posterior (towards the spine), pi = anterior
        tube = colon["radius"] * (0.6 + 0.4 * presence) * (1 + 0.25 * np.sin(colon["haustra"] * phi + colon["phase"]))
        low = np.deg2rad(55 + 15 * np.sin(2 * np.pi * t + colon["phase"]))
        high = np.pi if _window(t, 0.22, 0.62) > 0.3 else np.deg2rad(140)
        large_bowel = (distance < tube) & (phi > low) & (phi < high) & body
        content = _COLON_CONTENT * (1 + 0.45 * _smooth_noise(rng, height, width, 40))
        img = np.where(large_bowel, np.where(distance > tube - 3.0, _COLON_WALL, content), img)
        masks[0] = large_bowel
    # small bowel: a cluster of small fluid-filled loops in the centre, each drifting and appearing on its own
    for loop in anatomy["loops"]:
        window = _window(t, loop["start"], loop["stop"])
        if window < 0.2:
            continue
        # a loop is a tube crossing the slice plane: it appears at (most of) its calibre, not as a growing speck
        size = 0.6 + 0.4 * window
        drift = 0.06 * np.sin(2 * np.pi * loop["freq"] * t + loop["phase"])
        cx, cy, radius = (loop["u"] + drift) * a, (loop["v"] - drift) * b, loop["r"] * size
        distance = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
        small_bowel = (distance < radius) & cavity
        lumen = _SMALL_BOWEL_LUMEN * loop["lumen"]
        img = np.where(small_bowel, np.where(distance > radius - 2.5, _SMALL_BOWEL_WALL, lumen), img)
        masks[1] |= small_bowel
    # stomach: large lobulated fluid-bright region at the upper left, with an air cap anteriorly; drawn last, so
    # where it overlaps the large bowel both masks keep the pixels (as in the Kaggle labels)
    stomach = anatomy["stomach"]
    size = _window(t, stomach["start"], stomach["stop"])
    if size > 0.2:
        cos, sin = np.cos(stomach["angle"]), np.sin(stomach["angle"])
        dx, dy = x - stomach["u"] * a, y - stomach["v"] * b
        su = (cos * dx + sin * dy) / (stomach["sa"] * a * size)
        sv = (-sin * dx + cos * dy) / (stomach["sb"] * b * size)
        lobes = 1 + 0.12 * np.sin(3 * np.arctan2(sv, su) + stomach["phase"] + 2 * t)
        rs = np.sqrt(su * su + sv * sv) / lobes
        inside = (rs < 1) & body
        wall_depth = 4.0 / (stomach["sb"] * b * size)
        fluid = np.where(sv < -0.6, _STOMACH_AIR, _STOMACH_FLUID * (1 + 0.06 * _smooth_noise(rng, height, width, 20)))
        img = np.where(inside, np.where(rs > 1 - wall_depth, _STOMACH_WALL, fluid), img)
        masks[2] = inside

    # MRI look: slight partial-volume blur, smooth coil bias field, Rician noise
    img = cv2.GaussianBlur(img, (0, 0), 0.7)
    c = np.asarray(anatomy["bias"]) + np.asarray(anatomy["bias_drift"]) * t
    xn, yn = x / (width * spacing / 2), y / (height * spacing / 2)
    bias = 1 + c[0] * xn + c[1] * yn + c[2] * xn * yn - 0.15 * (xn * xn + yn * yn) + 0.1 * c[3]
    img *= anatomy["gain"] * np.clip(bias, 0.6, 1.4)
    sigma = 220.0
    noise = rng.standard_normal((2, height, width), dtype=np.float32) * sigma
    img = np.sqrt((img + noise[0]) ** 2 + noise[1] ** 2)
    return np.clip(img, 0, 65535).astype(np.uint16), masks


def write_demo_dataset(
    root: str | os.PathLike,
    n_cases: int = 16,
    days_per_case: int = 2,
    slices_per_day: int = 24,
    seed: int = 0,
) -> Path:
    """Write a synthetic UW-Madison-style dataset (Kaggle layout and formats) under ``root``; returns ``root``.

    Cases cycle through the Kaggle sizes ``DEMO_SCAN_SIZES`` (including the non-square 360x310), so two or more cases
    give non-square slices. Slices show an abdomen (fat rim, muscle, liver, kidneys, spine) with the three organs
    visible and changing smoothly along the slice axis; first and last slices of a scan have no organs; stomach
    and large bowel overlap in mid slices. Deterministic given ``seed``.

    ``train.csv`` is written last (atomically), so a root without it is an interrupted run. A complete demo with
    the same arguments is reused as is; a demo written with other arguments (recognised by ``nbsupport_demo.json``)
    is replaced; a non-empty folder that is not a demo is an error.

    Defaults (16 cases x 2 days x 24 slices = 768 slices) suit the ``demo`` profile.
    """
    if min(n_cases, days_per_case, slices_per_day) < 1:
        raise ValueError(f"n_cases, days_per_case and slices_per_day must be >= 1, got {n_cases}, {days_per_case}, "
                         f"{slices_per_day}")
    root = resolve_path(root)
    params = {"n_cases": n_cases, "days_per_case": days_per_case, "slices_per_day": slices_per_day, "seed": seed,
              "generator": "nbsupport.seg2d.data.write_demo_dataset", "format_version": 1}
    marker = root / DEMO_MARKER
    if root.is_dir() and any(root.iterdir()):
        previous = read_json(marker)
        if previous is None:
            raise FileExistsError(f"{root} is not empty and holds no {DEMO_MARKER}; write the demo into an empty "
                                  "folder (a demo folder is replaced when regenerated)")
        if previous.get("params") == params and previous.get("complete") and (root / "train.csv").is_file():
            return root
        for stale in (root / "train.csv", root / "train"):
            if stale.is_dir():
                shutil.rmtree(stale)
            elif stale.exists():
                stale.unlink()
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, {"params": params, "complete": False})

    case_rng = np.random.default_rng([seed, 7919])
    cases = sorted(case_rng.choice(np.arange(1, max(157, n_cases + 1)), size=n_cases, replace=False).tolist())
    scans = []
    for k, case in enumerate(cases):
        days = sorted(np.random.default_rng([seed, case, 104729]).choice(np.arange(0, 40), size=days_per_case,
                                                                          replace=False).tolist())
        scans += [(k, case, day) for day in days]
    rows: list[tuple[str, str, str]] = []
    total = len(scans) * slices_per_day
    bar = progress(range(total), desc="writing demo slices", total=total)
    for k, case, day in scans:
        width, height, spacing = DEMO_SCAN_SIZES[k % len(DEMO_SCAN_SIZES)]
        anatomy = _demo_anatomy(seed, case, day)
        folder = root / "train" / f"case{case}" / f"case{case}_day{day}" / "scans"
        folder.mkdir(parents=True, exist_ok=True)
        for s in range(1, slices_per_day + 1):
            t = (s - 1) / max(slices_per_day - 1, 1)
            image, masks = _render_demo_slice(anatomy, t, width, height, spacing,
                                              np.random.default_rng([seed, case, day, s]))
            name = f"slice_{s:04d}_{width}_{height}_{spacing:.2f}_{spacing:.2f}.png"
            ok, encoded = cv2.imencode(".png", image)
            if not ok:
                raise OSError(f"could not encode {folder / name}")
            encoded.tofile(folder / name)
            slice_id = f"case{case}_day{day}_slice_{s:04d}"
            rows += [(slice_id, organ, rle_encode(mask)) for organ, mask in zip(CLASSES, masks)]
            bar.update(1)
    bar.close()
    with atomic_path(root / "train.csv") as tmp:
        pd.DataFrame(rows, columns=list(TRAIN_CSV_COLUMNS)).to_csv(tmp, index=False, lineterminator="\n")
    atomic_write_json(marker, {"params": params, "complete": True, "n_slices": total, "cases": cases})
    return root
