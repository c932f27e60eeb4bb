"""The UW-Madison GI Tract Image Segmentation (Kaggle 2022) competition score.

``score = 0.4 * mean Dice + 0.6 * (1 - mean normalised 3D Hausdorff)``, as graded by OpenAI mle-bench
(``mlebench/competitions/uw-madison-gi-tract-image-segmentation/grade.py``) and described on Kaggle:

* Dice per (slice id, class) in 2D; both masks empty -> NaN, skipped by the mean (Kaggle discussion 324934).
* Hausdorff per (case-day, class) in 3D: the case-day's slices stacked in slice order (depth 1 voxel per slice),
  voxel coordinates divided by the volume shape (unit cube), symmetric Hausdorff (scipy ``directed_hausdorff``
  both ways), divided by the unit-cube diagonal sqrt(3). One mask empty and the other not -> 1; both empty ->
  NaN, skipped like Dice.

mle-bench itself differs in two details, reproduced by ``mode="mlebench"``: it ORs the three classes of a slice
into one mask before the 3D Hausdorff (one distance per case-day, not per class), and scores 1 without computing
when the predicted volume has more than 10x the true volume's voxels.

Masks here are row-major (H, W) booleans per slice and class; RLE decoding belongs to ``seg2d.data``.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from scipy.ndimage import binary_erosion
from scipy.spatial.distance import directed_hausdorff

from nbsupport.seg2d.data import CLASSES as UWMGI_CLASSES
from nbsupport.seg2d.data import parse_slice_id

DICE_WEIGHT = 0.4
HAUSDORFF_WEIGHT = 0.6
UNIT_CUBE_DIAGONAL = math.sqrt(3.0)

# ---------------------------------------------------------------------------------------------- per-mask scores
def dice_2d(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice of two boolean masks of equal shape; NaN when both are empty."""
    p, t = np.asarray(pred, dtype=bool), np.asarray(target, dtype=bool)
    total = int(p.sum()) + int(t.sum())
    if total == 0:
        return float("nan")
    return 2.0 * int(np.logical_and(p, t).sum()) / total


def _directed_to_surface(mask_from: np.ndarray, mask_to: np.ndarray, scale: np.ndarray) -> float:
    """Directed Hausdorff from ``mask_from`` to ``mask_to`` in normalised coordinates.

    Exact, but on far fewer points than all voxels: voxels of ``mask_from`` inside ``mask_to`` contribute 0, and
    the voxel of ``mask_to`` nearest to any outside point has a face neighbour outside ``mask_to``, so only
    ``mask_to``'s surface is searched. This keeps full-size case-days (144 x 266 x 266) to milliseconds.
    """
    outside = mask_from & ~mask_to
    if not outside.any():
        return 0.0
    surface = mask_to & ~binary_erosion(mask_to, border_value=1)
    return float(directed_hausdorff(np.argwhere(outside) * scale, np.argwhere(surface) * scale)[0])


def hausdorff_3d(pred: np.ndarray, target: np.ndarray) -> float:
    """Normalised symmetric Hausdorff distance of two boolean volumes (D, H, W), in [0, 1].

    Coordinates are divided by the volume shape and the distance by sqrt(3). Both empty -> NaN; exactly one
    empty -> 1.
    """
    p, t = np.asarray(pred, dtype=bool), np.asarray(target, dtype=bool)
    if p.shape != t.shape:
        raise ValueError(f"prediction volume {p.shape} and target volume {t.shape} differ in shape")
    p_any, t_any = bool(p.any()), bool(t.any())
    if not p_any and not t_any:
        return float("nan")
    if p_any != t_any:
        return 1.0
    scale = 1.0 / np.asarray(t.shape, dtype=float)
    d = max(_directed_to_surface(p, t, scale), _directed_to_surface(t, p, scale))
    return d / UNIT_CUBE_DIAGONAL


# ---------------------------------------------------------------------------------------------- competition score
def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _slices(masks: Any, n: int, n_classes: int, name: str, ids: Sequence[str]) -> list[np.ndarray]:
    """Per-slice (C, H, W) bool arrays from an (N, C, H, W) array or a list of (C, H_i, W_i) arrays."""
    if not isinstance(masks, (list, tuple)):
        masks = _as_numpy(masks)
    if len(masks) != n:
        raise ValueError(f"{name} has {len(masks)} slices but {n} ids were given")
    out = []
    for i, m in enumerate(masks):
        m = _as_numpy(m).astype(bool, copy=False)
        if m.ndim != 3 or m.shape[0] != n_classes:
            raise ValueError(f"{name}[{i}] (id {ids[i]}) has shape {m.shape}, expected ({n_classes}, H, W)")
        out.append(m)
    return out


def _nanmean(values: Sequence[float]) -> float:
    arr = np.asarray(values, dtype=float)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else float("nan")


def _none_if_nan(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def _score_parts(ids: Sequence[str], pred: Any, target: Any, n_classes: int, mode: str
                 ) -> tuple[np.ndarray, dict[tuple[int, int], list[float]]]:
    """Dice per (slice, class), (N, C) in the order of ``ids``, and the 3D Hausdorff row of each case-day, keyed
    by ``(case, day)`` (per class, or one value in ``"mlebench"`` mode), after checking ids and shapes."""
    n = len(ids)
    parsed = [parse_slice_id(i) for i in ids]
    seen: dict[str, int] = {}
    for i, sid in enumerate(ids):
        if sid in seen:
            raise ValueError(f"slice id {sid} appears twice (positions {seen[sid]} and {i})")
        seen[sid] = i
    pred_slices = _slices(pred, n, n_classes, "pred", ids)
    target_slices = _slices(target, n, n_classes, "target", ids)
    for i, (p, t) in enumerate(zip(pred_slices, target_slices)):
        if p.shape != t.shape:
            raise ValueError(f"slice {ids[i]}: pred shape {p.shape} != target shape {t.shape}")

    # Dice per (slice, class); both-empty -> NaN -> skipped
    dice = np.array([[dice_2d(p[c], t[c]) for c in range(n_classes)]
                     for p, t in zip(pred_slices, target_slices)]).reshape(n, n_classes)

    # 3D Hausdorff per case-day (x class), slices in slice order
    by_case_day: dict[tuple[int, int], list[int]] = {}
    for i in sorted(range(n), key=lambda k: parsed[k]):
        by_case_day.setdefault((parsed[i].case, parsed[i].day), []).append(i)
    hd_rows: dict[tuple[int, int], list[float]] = {}
    for case_day, idx in by_case_day.items():
        shapes = {target_slices[i].shape[1:] for i in idx}
        if len(shapes) > 1:
            raise ValueError(f"{parsed[idx[0]].case_day}: slices differ in (H, W) {sorted(shapes)}; cannot stack them into a volume")
        pv = np.stack([pred_slices[i] for i in idx], axis=1)  # (C, D, H, W)
        tv = np.stack([target_slices[i] for i in idx], axis=1)
        if mode == "mlebench":
            pu, tu = pv.any(axis=0), tv.any(axis=0)
            hd_rows[case_day] = [1.0 if tu.any() and pu.sum() > 10 * tu.sum() else hausdorff_3d(pu, tu)]
        else:
            hd_rows[case_day] = [hausdorff_3d(pv[c], tv[c]) for c in range(n_classes)]
    return dice, hd_rows


def competition_score(ids: Sequence[str], pred: Any, target: Any, class_names: Sequence[str] = UWMGI_CLASSES,
                      mode: Literal["per_class", "mlebench"] = "per_class") -> dict[str, Any]:
    """Score predicted masks against ground truth as the UW-Madison GI tract competition does.

    Args:
        ids: N slice ids ``case<N>_day<D>_slice_<SSSS>``, in any order, each once.
        pred: predicted masks, bool (N, C, H, W) array/tensor or a list of N (C, H_i, W_i) arrays; slices of one
            case-day must share H, W (they do in the dataset).
        target: ground-truth masks, same layout and shapes as ``pred``.
        class_names: the C class names (default ``large_bowel, small_bowel, stomach``).
        mode: ``"per_class"`` (default) computes the 3D Hausdorff per (case-day, class); ``"mlebench"`` reproduces
            mle-bench's grade.py (classes ORed per slice, one Hausdorff per case-day, >10x-volume shortcut).

    Returns:
        ``{"score", "dice", "hausdorff", "dice_per_class": {name: ..}, "hausdorff_per_class": {name: ..},
        "n_slices", "n_case_days"}``; Hausdorff values are normalised (0 best, 1 worst). A mean over no scorable
        entries (everything empty) is ``None``, as is a score that needs it; ``hausdorff_per_class`` is ``{}``
        in ``"mlebench"`` mode.
    """
    if mode not in ("per_class", "mlebench"):
        raise ValueError(f"mode must be 'per_class' or 'mlebench', got {mode!r}")
    ids = [str(i) for i in ids]
    names = [str(c) for c in class_names]
    n, n_classes = len(ids), len(names)
    dice, hd_rows = _score_parts(ids, pred, target, n_classes, mode)
    hd = np.array(list(hd_rows.values()), dtype=float).reshape(len(hd_rows), -1)

    mean_dice = _nanmean(dice.ravel())
    mean_hd = _nanmean(hd.ravel())
    score = DICE_WEIGHT * mean_dice + HAUSDORFF_WEIGHT * (1.0 - mean_hd)
    return {
        "score": _none_if_nan(score),
        "dice": _none_if_nan(mean_dice),
        "hausdorff": _none_if_nan(mean_hd),
        "dice_per_class": {name: _none_if_nan(_nanmean(dice[:, c])) for c, name in enumerate(names)},
        "hausdorff_per_class": ({name: _none_if_nan(_nanmean(hd[:, c])) for c, name in enumerate(names)}
                                if mode == "per_class" else {}),
        "n_slices": n,
        "n_case_days": len(hd_rows),
    }


# ---------------------------------------------------------------------------------------------- per-case parts
@dataclasses.dataclass(frozen=True)
class CaseParts:
    """One patient case's share of the competition score, the unit a bootstrap over cases draws.

    Slices of one case (all its days) are correlated, and splits assign whole cases, so the case rather than the
    slice or the case-day is the independent unit.
    """

    case: int
    dice: np.ndarray  # (slices, C): Dice per slice and class; NaN where both masks are empty
    hausdorff: np.ndarray  # (case-days, C): normalised 3D Hausdorff per case-day and class; NaN where both empty


def case_parts(ids: Sequence[str], pred: Any, target: Any,
               class_names: Sequence[str] = UWMGI_CLASSES) -> list[CaseParts]:
    """The per-slice Dice and per-case-day Hausdorff of :func:`competition_score` (``"per_class"`` mode), grouped
    by case in ascending case number; :func:`pooled_score` of all of them is the competition score."""
    ids = [str(i) for i in ids]
    dice, hd_rows = _score_parts(ids, pred, target, len(class_names), "per_class")
    cases = [parse_slice_id(i).case for i in ids]
    parts = []
    for case in sorted(set(cases)):
        rows = [i for i, c in enumerate(cases) if c == case]
        days = [hd for (hd_case, _), hd in hd_rows.items() if hd_case == case]
        parts.append(CaseParts(case, dice[rows], np.array(days, dtype=float).reshape(len(days), -1)))
    return parts


def pooled_score(parts: Sequence[CaseParts], class_names: Sequence[str] = UWMGI_CLASSES) -> dict[str, float | None]:
    """``score``, ``dice``, ``hausdorff`` and ``dice_<class>`` of a set of cases (repeats allowed, as in a bootstrap
    resample): every slice's Dice and every case-day's Hausdorff pooled, as :func:`competition_score` does."""
    dice = np.concatenate([p.dice for p in parts])
    hd = np.concatenate([p.hausdorff for p in parts])
    mean_dice, mean_hd = _nanmean(dice.ravel()), _nanmean(hd.ravel())
    out = {"dice": _none_if_nan(mean_dice), "hausdorff": _none_if_nan(mean_hd),
           "score": _none_if_nan(DICE_WEIGHT * mean_dice + HAUSDORFF_WEIGHT * (1.0 - mean_hd))}
    out.update({f"dice_{name}": _none_if_nan(_nanmean(dice[:, c])) for c, name in enumerate(class_names)})
    return out
