"""The Kaggle run-length encoding of UW-Madison GI Tract masks (``train.csv``'s ``segmentation``, the submission's
``predicted``): space-separated ``start length`` pairs, 1-indexed starts over the mask flattened in row-major (C)
order of shape ``(H, W)``, as the public notebooks read it (awsaf49 "UWMGI: Mask Data"); empty = organ absent."""
from __future__ import annotations

import re
from typing import Any

import numpy as np
import pandas as pd


def is_empty_rle(rle: Any) -> bool:
    if rle is None or rle is pd.NA:
        return True
    if isinstance(rle, float):
        return bool(np.isnan(rle))
    return isinstance(rle, str) and not rle.strip()


def rle_runs(rle: str) -> tuple[np.ndarray, np.ndarray]:
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


def rle_last_pixel(rle: str) -> int:
    """1-indexed last pixel covered by a valid non-empty RLE (runs are sorted, so the last run ends last)."""
    starts, lengths = rle_runs(rle)
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
    if is_empty_rle(rle):
        return np.zeros((height, width), dtype=bool)
    starts, lengths = rle_runs(rle)
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
