"""Metrics shared by every system, computed with MONAI where MONAI has them.

Text generation (cxr_report): corpus BLEU-1..4 (sacrebleu), ROUGE-L, CIDEr-D and clinical-efficacy precision /
recall / F1 of finding labels; see the "text generation" section.

Segmentation: Dice, IoU and the 95th-percentile Hausdorff distance per sample and class, as a
long-format table a notebook can group, plot or write to ``metrics.json`` via :func:`summarise`.

Empty-mask convention (the same in every system, so numbers are comparable across runs):

* ground truth and prediction both empty -> dice, iou and hd95 are NaN: the case carries no information and is
  skipped by the NaN-means (as in the UW-Madison competition metric and MONAI's ``ignore_empty``);
* exactly one of them empty -> dice = iou = 0 (a missed or hallucinated structure is a total failure), and hd95
  is NaN because a distance to an empty set is undefined (MONAI would return inf); the ``gt_empty`` /
  ``pred_empty`` flags say which, so such rows can be counted or scored separately.
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

SEGMENTATION_METRICS = ("dice", "iou", "hd95")

# MONAI warns once per empty (sample, class) before returning inf/nan; our convention handles those cases.
_EMPTY_MASK_WARNING = re.compile(r".*is all 0, this may result in nan/inf distance.*")


# ---------------------------------------------------------------------------------------------- segmentation
def _as_bool_tensor(x: Any, name: str) -> torch.Tensor:
    t = x.detach().cpu() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.dtype != torch.bool:
        if t.is_floating_point() and not bool(((t == 0) | (t == 1)).all()):
            raise ValueError(f"{name} must be a binary mask (bool or 0/1), got values outside {{0, 1}}; "
                             "threshold probabilities before computing metrics")
        t = t != 0
    return t


def _per_sample_spacing(spacing: Any, n: int, ndim: int) -> list[list[float]] | None:
    """``spacing`` as one list of ``ndim`` floats per sample (MONAI's per-batch-item form)."""
    if spacing is None:
        return None
    arr = np.asarray(spacing, dtype=float)
    if arr.ndim == 1:
        if arr.shape[0] != ndim:
            raise ValueError(f"spacing {tuple(arr)} has {arr.shape[0]} values, expected one per spatial dim ({ndim})")
        arr = np.broadcast_to(arr, (n, ndim))
    elif arr.shape != (n, ndim):
        raise ValueError(f"per-sample spacing has shape {arr.shape}, expected (N, ndim) = ({n}, {ndim})")
    if (arr <= 0).any():
        raise ValueError(f"spacing must be positive (mm per pixel/voxel), got {arr.tolist()}")
    return arr.tolist()


def segmentation_metrics(pred: Any, target: Any, spacing: Sequence[float] | np.ndarray | None = None,
                         class_names: Sequence[str] | None = None, hd_percentile: float = 95.0) -> pd.DataFrame:
    """Dice, IoU and HD95 per sample and class (MONAI), with the empty-mask convention of this module.

    Args:
        pred: predicted masks, bool/0-1 array or tensor, shape (N, C, H, W) or (N, C, D, H, W).
        target: ground-truth masks, same shape as ``pred``.
        spacing: pixel/voxel size in mm, one value per spatial dim in array-axis order (e.g. ``(row_mm, col_mm)``
            or ``(slice_mm, row_mm, col_mm)``), or an (N, ndim) array of per-sample spacings. ``None``: hd95 is in
            pixels/voxels.
        class_names: C names for the ``class`` column (default ``"0"``, ``"1"``, ...).
        hd_percentile: percentile of the symmetric surface distances (95 -> HD95; 100 -> classic Hausdorff).
            The column is called ``hd95`` whatever the percentile, so tables stay joinable.

    Returns:
        Long-format DataFrame with N*C rows: ``sample`` (int), ``class`` (str), ``dice``, ``iou``, ``hd95`` (mm or
        px; NaN when either mask is empty), ``gt_empty``, ``pred_empty`` (bool).
    """
    p = _as_bool_tensor(pred, "pred")
    t = _as_bool_tensor(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred shape {tuple(p.shape)} != target shape {tuple(t.shape)}")
    if p.ndim not in (4, 5):
        raise ValueError(f"masks must be (N, C, H, W) or (N, C, D, H, W), got shape {tuple(p.shape)}")
    n, c = p.shape[:2]
    ndim = p.ndim - 2
    names = [str(i) for i in range(c)] if class_names is None else [str(x) for x in class_names]
    if len(names) != c:
        raise ValueError(f"class_names has {len(names)} names {names}, but the masks have C={c} channels")
    spacing_list = _per_sample_spacing(spacing, n, ndim)

    reduce_dims = tuple(range(2, p.ndim))
    gt_empty = ~t.any(dim=reduce_dims)  # (N, C)
    pred_empty = ~p.any(dim=reduce_dims)
    both_empty = gt_empty & pred_empty
    either_empty = gt_empty | pred_empty

    # imported here, not with the module: importing monai takes ~5 s, which every notebook kernel of a system that
    # scores no mask (cxr_report, ct_clip) would otherwise pay
    from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou

    pf, tf = p.float(), t.float()
    # ignore_empty=False: empty GT with non-empty prediction scores 0 (MONAI's default would make it NaN);
    # both-empty (MONAI: 1) is set to NaN below.
    dice = compute_dice(pf, tf, include_background=True, ignore_empty=False).reshape(n, c)
    iou = compute_iou(pf, tf, include_background=True, ignore_empty=False).reshape(n, c)
    dice[both_empty] = float("nan")
    iou[both_empty] = float("nan")

    hd = torch.full((n, c), float("nan"))
    if not bool(either_empty.all()):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_EMPTY_MASK_WARNING.pattern)
            # MONAI 1.6 passes its own deprecated argument internally; nothing for a user to act on
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
            hd = compute_hausdorff_distance(pf, tf, include_background=True, percentile=hd_percentile,
                                            spacing=spacing_list).reshape(n, c).float()
        hd[either_empty] = float("nan")

    rows = {
        "sample": np.repeat(np.arange(n), c),
        "class": np.tile(np.asarray(names, dtype=object), n),
        "dice": dice.double().numpy().ravel(),
        "iou": iou.double().numpy().ravel(),
        "hd95": hd.double().numpy().ravel(),
        "gt_empty": gt_empty.numpy().ravel(),
        "pred_empty": pred_empty.numpy().ravel(),
    }
    return pd.DataFrame(rows)


def _nanmean(values: Any) -> float | None:
    arr = np.asarray(values, dtype=float)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else None


def summarise(df: pd.DataFrame, metrics: Sequence[str] = SEGMENTATION_METRICS) -> dict[str, Any]:
    """Means of a :func:`segmentation_metrics` table, ready for ``RunFolder.write_metrics``.

    Overall means are NaN-means over all (sample, class) rows (MONAI's ``reduction="mean"``), so a class with more
    scorable rows weighs more; per-class means are NaN-means over samples. A mean over no scorable rows is ``None``
    (``null`` in metrics.json, which, unlike NaN, is valid JSON).

    Returns:
        ``{"dice": .., "iou": .., "hd95": .., "n_samples": N, "per_class": {name: {"dice": .., "iou": ..,
        "hd95": .., "n_scored": rows with a Dice, "n_gt_empty": ..}}}``
    """
    missing = [m for m in metrics if m not in df.columns]
    if missing:
        raise ValueError(f"metrics table lacks columns {missing}; expected the output of segmentation_metrics()")
    out: dict[str, Any] = {m: _nanmean(df[m]) for m in metrics}
    out["n_samples"] = int(df["sample"].nunique()) if "sample" in df.columns else len(df)
    per_class: dict[str, Any] = {}
    if "class" in df.columns:
        for name, group in df.groupby("class", sort=False):
            entry: dict[str, Any] = {m: _nanmean(group[m]) for m in metrics}
            if "dice" in group.columns:
                entry["n_scored"] = int(group["dice"].notna().sum())
            if "gt_empty" in group.columns:
                entry["n_gt_empty"] = int(group["gt_empty"].sum())
            per_class[str(name)] = entry
    out["per_class"] = per_class
    return out


# ---------------------------------------------------------------------------------------------- text generation
# Report-generation metrics: BLEU-1..4 (sacrebleu), ROUGE-L, CIDEr-D and clinical-efficacy precision/recall/F1.
# All text metrics see the same tokens: lower case, words and punctuation marks split (``tokenize_report``).
_TOKEN = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*|[^\sa-z0-9]")


def tokenize_report(text: str) -> list[str]:
    """Lower-cased word and punctuation tokens: ``"No effusion."`` -> ``["no", "effusion", "."]``."""
    return _TOKEN.findall(str(text).lower())


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references; expected one each")
    if not len(predictions):
        raise ValueError("no reports to score")


def bleu_scores(predictions: Sequence[str], references: Sequence[str], max_order: int = 4) -> dict[str, float]:
    """Corpus BLEU-1..``max_order`` in [0, 1] with sacrebleu (one reference per report), on ``tokenize_report``
    tokens; BLEU-n is the brevity-penalised geometric mean of the 1..n-gram precisions (uniform weights), as in
    the report-generation literature and nltk's ``corpus_bleu``."""
    from sacrebleu.metrics import BLEU

    _check_pairs(predictions, references)
    hyps = [" ".join(tokenize_report(p)) for p in predictions]
    refs = [[" ".join(tokenize_report(r)) for r in references]]
    return {f"bleu{n}": BLEU(max_ngram_order=n, tokenize="none").corpus_score(hyps, refs).score / 100.0
            for n in range(1, max_order + 1)}


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(predictions: Sequence[str], references: Sequence[str], beta: float = 1.2) -> float:
    """Mean sentence-level ROUGE-L F-measure in [0, 1]: LCS precision P and recall R combined as
    ``(1 + beta^2) P R / (R + beta^2 P)``; ``beta = 1.2`` as in pycocoevalcap (the R2Gen-family numbers)."""
    _check_pairs(predictions, references)
    scores = []
    for p, r in zip(predictions, references):
        hyp, ref = tokenize_report(p), tokenize_report(r)
        lcs = _lcs_length(hyp, ref)
        if not lcs:
            scores.append(0.0)
            continue
        precision, recall = lcs / len(hyp), lcs / len(ref)
        scores.append((1 + beta ** 2) * precision * recall / (recall + beta ** 2 * precision))
    return float(np.mean(scores))


def _ngram_counts(tokens: Sequence[str], n: int) -> dict[tuple[str, ...], int]:
    counts: dict[tuple[str, ...], int] = {}
    for i in range(len(tokens) - n + 1):
        key = tuple(tokens[i:i + n])
        counts[key] = counts.get(key, 0) + 1
    return counts


def cider_d(predictions: Sequence[str], references: Sequence[str], max_order: int = 4, sigma: float = 6.0) -> float:
    """Corpus CIDEr-D (Vedantam et al. 2015, the pycocoevalcap ``Cider`` computation), one reference per report.

    Per n-gram order n: TF-IDF vectors with ``idf = log(N) - log(df)`` (N reports, df = references containing the
    n-gram), similarity ``sum_g min(h_g, r_g) r_g / (|h| |r|)`` times the length penalty
    ``exp(-(len_h - len_r)^2 / (2 sigma^2))``; the score is 10 x the mean over orders and reports. An n-gram in
    every reference carries no weight, so a single-report corpus scores 0.
    """
    _check_pairs(predictions, references)
    hyps = [tokenize_report(p) for p in predictions]
    refs = [tokenize_report(r) for r in references]
    log_n = np.log(float(len(refs)))
    doc_freq: list[dict[tuple[str, ...], int]] = []
    for n in range(1, max_order + 1):
        df: dict[tuple[str, ...], int] = {}
        for ref in refs:
            for gram in _ngram_counts(ref, n):
                df[gram] = df.get(gram, 0) + 1
        doc_freq.append(df)

    def vector(tokens: Sequence[str], n: int) -> tuple[dict[tuple[str, ...], float], float]:
        df = doc_freq[n - 1]
        vec = {g: c * (log_n - np.log(max(1.0, float(df.get(g, 0.0))))) for g, c in _ngram_counts(tokens, n).items()}
        return vec, float(np.sqrt(sum(v * v for v in vec.values())))

    scores = []
    for hyp, ref in zip(hyps, refs):
        penalty = np.exp(-((len(hyp) - len(ref)) ** 2) / (2 * sigma ** 2))
        per_order = []
        for n in range(1, max_order + 1):
            (vh, nh), (vr, nr) = vector(hyp, n), vector(ref, n)
            dot = sum(min(v, vr.get(g, 0.0)) * vr.get(g, 0.0) for g, v in vh.items())
            per_order.append(dot / (nh * nr) * penalty if nh and nr else 0.0)
        scores.append(float(np.mean(per_order)))
    return 10.0 * float(np.mean(scores))


def clinical_efficacy(predicted: Any, reference: Any, label_names: Sequence[str]) -> dict[str, Any]:
    """Precision, recall and F1 of predicted vs reference binary findings (the CheXbert-F1 of report generation).

    Args:
        predicted, reference: (N, L) arrays of 0/1 (positive findings of N generated and N reference reports).
        label_names: the L label names.

    Returns:
        ``{"micro_precision", "micro_recall", "micro_f1", "macro_precision", "macro_recall", "macro_f1",
        "per_label": {name: {"precision", "recall", "f1", "support"}}}``. Micro pools the counts of all labels;
        macro averages over the labels positive in the reference or the prediction at least once (a label absent
        from both carries no information). An empty denominator gives 0.
    """
    pred = np.asarray(predicted).astype(bool)
    ref = np.asarray(reference).astype(bool)
    if pred.shape != ref.shape or pred.ndim != 2 or pred.shape[1] != len(label_names):
        raise ValueError(f"expected two (N, {len(label_names)}) arrays, got {pred.shape} and {ref.shape}")
    tp, fp, fn = (pred & ref).sum(0), (pred & ~ref).sum(0), (~pred & ref).sum(0)

    def prf(t: float, f_pos: float, f_neg: float) -> tuple[float, float, float]:
        precision = t / (t + f_pos) if t + f_pos else 0.0
        recall = t / (t + f_neg) if t + f_neg else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return float(precision), float(recall), float(f1)

    micro = prf(tp.sum(), fp.sum(), fn.sum())
    per_label = {}
    for i, name in enumerate(label_names):
        p, r, f = prf(tp[i], fp[i], fn[i])
        per_label[name] = {"precision": p, "recall": r, "f1": f, "support": int(ref[:, i].sum())}
    active = [i for i in range(len(label_names)) if ref[:, i].any() or pred[:, i].any()]
    macro = [float(np.mean([per_label[label_names[i]][k] for i in active])) if active else 0.0
             for k in ("precision", "recall", "f1")]
    return {"micro_precision": micro[0], "micro_recall": micro[1], "micro_f1": micro[2],
            "macro_precision": macro[0], "macro_recall": macro[1], "macro_f1": macro[2], "per_label": per_label}


# ---------------------------------------------------------------------------------------------- retrieval
# Image-text retrieval (recall@k both ways, mean/median rank) and binary classification (AUROC, F1, accuracy) as
# CT-CLIP reports them. Ranks are 1-based; ties are broken pessimistically (a candidate that scores the same as the
# true match counts as ranked above it), so a constant similarity matrix gives rank N, never a lucky rank 1.
RETRIEVAL_KS = (1, 5, 10, 50, 100)


def retrieval_ranks(similarity: Any, match: Any = None) -> np.ndarray:
    """1-based rank of the true match of each query among all candidates.

    Args:
        similarity: [Q, C] scores, larger = more similar (query i against candidate j).
        match: [Q] index of each query's true candidate; default ``arange(Q)`` (the diagonal, Q == C).

    Returns:
        [Q] int array: 1 + the number of candidates scoring at least as high as the true one (itself excluded).
    """
    sim = np.asarray(similarity.detach().cpu() if isinstance(similarity, torch.Tensor) else similarity,
                     dtype=np.float64)
    if sim.ndim != 2:
        raise ValueError(f"similarity must be a [queries, candidates] matrix, got shape {sim.shape}")
    match = np.arange(sim.shape[0]) if match is None else np.asarray(match, dtype=np.int64)
    if match.shape != (sim.shape[0],) or (match.size and (match.min() < 0 or match.max() >= sim.shape[1])):
        raise ValueError(f"match must hold one candidate index in [0, {sim.shape[1]}) per query, got {match!r}")
    true = sim[np.arange(sim.shape[0]), match][:, None]
    return (sim >= true).sum(axis=1).astype(np.int64)  # includes the true candidate itself: rank >= 1


def retrieval_metrics(similarity: Any, match: Any = None, ks: Sequence[int] = RETRIEVAL_KS) -> dict[str, float]:
    """Recall@k (fraction of queries whose match ranks <= k), mean and median rank, and chance R@k.

    Returns:
        ``{"R@1": .., "R@5": .., ..., "mean_rank": .., "median_rank": .., "n_queries": Q, "n_candidates": C,
        "chance_R@1": 1/C, ...}``; k larger than C are left out.
    """
    ranks = retrieval_ranks(similarity, match)
    n_candidates = int(np.shape(similarity)[1])
    out: dict[str, float] = {}
    for k in ks:
        if k <= n_candidates:
            out[f"R@{k}"] = float((ranks <= k).mean()) if ranks.size else float("nan")
    out["mean_rank"] = float(ranks.mean()) if ranks.size else float("nan")
    out["median_rank"] = float(np.median(ranks)) if ranks.size else float("nan")
    out["n_queries"] = int(ranks.size)
    out["n_candidates"] = n_candidates
    for k in ks:
        if k <= n_candidates:
            out[f"chance_R@{k}"] = k / n_candidates
    return out


def auroc(labels: Any, scores: Any) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney U) formula, ties counted half.

    Args:
        labels: [N] 0/1 ground truth.
        scores: [N] larger = more likely positive.

    Returns:
        AUROC in [0, 1]; NaN when only one class is present (it is undefined there).
    """
    from scipy.stats import rankdata

    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape} vs {s.shape}")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)  # average ranks for ties: a tied (positive, negative) pair counts 1/2
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def binary_classification_metrics(labels: Any, scores: Any, threshold: float = 0.5) -> dict[str, float]:
    """AUROC (threshold-free) plus accuracy, precision, recall, specificity and F1 of ``scores >= threshold``.

    Precision/recall/F1 are NaN when undefined (no predicted / no true positives), not a silent 0.
    """
    y = np.asarray(labels).astype(bool).ravel()
    pred = np.asarray(scores, dtype=np.float64).ravel() >= threshold
    tp, fp = int((pred & y).sum()), int((pred & ~y).sum())
    fn, tn = int((~pred & y).sum()), int((~pred & ~y).sum())
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fn else float("nan")
    return {"auroc": auroc(y, scores), "accuracy": (tp + tn) / max(len(y), 1), "precision": precision,
            "recall": recall, "specificity": tn / (tn + fp) if tn + fp else float("nan"), "f1": f1,
            "n_positive": tp + fn, "n": int(len(y))}


def best_f1_threshold(labels: Any, scores: Any) -> float:
    """The score threshold that maximises F1 on (labels, scores): how CT-CLIP picks its per-label cut-off.

    Choose it on a validation split and apply it to the test split; choosing it on the test split is optimistic.
    """
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if not y.any():
        return float(np.inf)
    candidates = np.unique(s)
    best, best_t = -1.0, float(candidates[-1])
    for t in candidates:
        pred = s >= t
        tp = int((pred & y).sum())
        f1 = 2 * tp / (pred.sum() + y.sum())
        if f1 > best:
            best, best_t = f1, float(t)
    return best_t


# ---------------------------------------------------------------------------------------------- position reasoning
# Position accuracy of predicted masks/answers (prs_med: "top left", ..., "center") goes here.
# The five labels of the official PRS-Med generator (data_processing/mask_position.py): the mask's bounding box
# against the image centre. Answers are free text, so accuracy is computed by parsing the phrase back out of the
# text (no LLM judge offline; the paper asks Qwen2-7B / Llama-3-8B "is this position correct?" instead).
POSITIONS = ("center", "top left", "top right", "bottom left", "bottom right")

_POSITION_SYNONYMS = (
    (re.compile(r"\b(upper)\b"), "top"),
    (re.compile(r"\b(lower)\b"), "bottom"),
    (re.compile(r"\b(centre|central|centrally|middle|centered|centred)\b"), "center"),
    (re.compile(r"\b(leftmost|left-hand|left-sided)\b"), "left"),
    (re.compile(r"\b(rightmost|right-hand|right-sided)\b"), "right"),
)
# "top left", "top-left", "top_left", "left top", "top of the image on the left"... within a few words.
_QUADRANT = re.compile(r"\b(top|bottom)\b(?:\W+\w+){0,4}?\W+\b(left|right)\b"
                       r"|\b(left|right)\b(?:\W+\w+){0,4}?\W+\b(top|bottom)\b")
_CENTER = re.compile(r"\bcenter\b")


def parse_position(text: Any) -> str | None:
    """The position phrase of a free-text answer, as one of :data:`POSITIONS`, or ``None`` when it names none.

    Accepts the labels themselves and sentences such as "The tumour is in the upper-left part of the image." or
    "It lies near the centre." Hyphens and underscores count as spaces; "upper"/"lower" mean top/bottom and
    "centre"/"middle"/"central" mean center. A quadrant (vertical and horizontal word within five words of each
    other) wins over "center" when both appear ("top left, close to the center" is top left), because the official
    templates for lesions near the centre still name the quadrant. The first quadrant mentioned counts.

    Args:
        text: an answer or label; ``None``/NaN give ``None``.
    """
    if text is None or (isinstance(text, float) and np.isnan(text)):
        return None
    s = re.sub(r"[-_/]", " ", str(text).lower())
    for pattern, replacement in _POSITION_SYNONYMS:
        s = pattern.sub(replacement, s)
    m = _QUADRANT.search(s)
    if m:
        vertical = m.group(1) or m.group(4)
        horizontal = m.group(2) or m.group(3)
        return f"{vertical} {horizontal}"
    return "center" if _CENTER.search(s) else None


def position_accuracy(predicted: Sequence[Any], truth: Sequence[Any], parse: bool = True) -> dict[str, Any]:
    """Fraction of answers whose position phrase equals the true position.

    Args:
        predicted: generated answers (``parse=True``) or position labels.
        truth: true positions, labels or sentences (parsed the same way; a truth that names no position is an
            error, since it cannot be scored).
        parse: run :func:`parse_position` over ``predicted`` first.

    Returns:
        ``{"accuracy", "n", "n_unparsed"}``; an answer naming no position counts as wrong (``n_unparsed``).
    """
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} predictions but {len(truth)} true positions")
    pred = [parse_position(p) if parse else (p if p in POSITIONS else None) for p in predicted]
    true = [parse_position(t) for t in truth]
    bad = [i for i, t in enumerate(true) if t is None]
    if bad:
        raise ValueError(f"true position {truth[bad[0]]!r} (item {bad[0]}) names none of {list(POSITIONS)}")
    n = len(true)
    correct = sum(p == t for p, t in zip(pred, true))
    return {"accuracy": correct / n if n else None, "n": n, "n_unparsed": sum(p is None for p in pred)}


def most_frequent_position_baseline(train_positions: Sequence[str], test_positions: Sequence[str]) -> dict[str, Any]:
    """Accuracy of always answering the most frequent training position (ties: the first in :data:`POSITIONS`).

    Returns:
        ``{"position", "accuracy", "n"}`` over ``test_positions``.
    """
    train = [parse_position(p) for p in train_positions]
    counts = {p: train.count(p) for p in POSITIONS}
    if not any(counts.values()):
        raise ValueError("no training positions to take the most frequent one from")
    best = max(POSITIONS, key=lambda p: counts[p])  # max keeps the first of equal counts
    result = position_accuracy([best] * len(test_positions), test_positions, parse=False)
    return {"position": best, "accuracy": result["accuracy"], "n": result["n"]}
