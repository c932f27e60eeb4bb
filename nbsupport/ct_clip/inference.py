"""What a trained ct_clip model computes: volume and report embeddings, retrieval both ways, zero-shot
classification, a text-free linear probe, the embedding of one CT file and the Grad-CAM relevance of a prompt."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from nbsupport.ct_clip import preprocessing as ct_pre
from nbsupport.ct_clip.config import PROMPT_ABSENT, PROMPT_PRESENT
from nbsupport.ct_clip.data import LABELS, CTVolumeDataset, label_matrix, resize_volume
from nbsupport.ct_clip.model import CTClip, report_features
from nbsupport.metrics import (RETRIEVAL_KS, auroc, binary_classification_metrics, bootstrap_ci95,
                               paired_bootstrap_diff, retrieval_metrics, retrieval_ranks, with_ci95)
from nbsupport.progress import progress


@torch.no_grad()
def encode_volumes(model: CTClip, dataset: CTVolumeDataset, device: torch.device,
                   batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(image embeddings [N, D], pooled encoder features [N, C]) of every volume of ``dataset``."""
    model.eval().to(device)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    embeddings, features = [], []
    encoder = model.image_encoder
    for batch in progress(loader, desc="encoding volumes"):
        pooled = encoder.pool(encoder.feature_map(batch["image"].to(device)))
        features.append(pooled.float().cpu())
        embeddings.append(torch.nn.functional.normalize(model.image_projection(pooled), dim=-1).float().cpu())
    return torch.cat(embeddings), torch.cat(features)


@torch.no_grad()
def zero_shot_scores(model: CTClip, image_emb: torch.Tensor, labels: tuple[str, ...] = LABELS,
                     present: str = PROMPT_PRESENT, absent: str = PROMPT_ABSENT) -> np.ndarray:
    """[N, L] probability that each label is present: softmax over the ("X is present.", "X is not present.")
    prompt pair, as CT-CLIP scores zero-shot classification."""
    prompts = [t.format(name) for name in labels for t in (present, absent)]
    text = model.encode_text(prompts).cpu()  # [2L, D]
    logits = model.logit_scale.exp().cpu() * image_emb @ text.T  # the bias cancels in the softmax
    pair = logits.view(len(image_emb), len(labels), 2)
    return pair.softmax(-1)[..., 0].numpy()


@dataclasses.dataclass
class Evaluation:
    """Retrieval and zero-shot results on one split."""

    split: str
    manifest: pd.DataFrame
    similarity: torch.Tensor  # [reports, volumes] cosine similarities
    image_emb: torch.Tensor
    retrieval: pd.DataFrame  # rows report->volume / volume->report (+ chance); columns R@k, mean/median rank
    zero_shot: pd.DataFrame  # per label present in the split: AUROC, F1, accuracy, precision, recall, positives
    scores: np.ndarray  # [N, 18] zero-shot probabilities

    def headline(self) -> dict[str, float]:
        t2i = self.retrieval.loc["report->volume"]
        out = {f"report_to_volume_{k}": float(t2i[k]) for k in t2i.index if k.startswith("R@")}
        out["report_to_volume_chance_R@5"] = float(self.retrieval.loc["chance", "R@5"]) \
            if "R@5" in self.retrieval.columns else None
        out["zero_shot_mean_auroc"] = float(self.zero_shot.loc["mean", "auroc"]) if len(self.zero_shot) else None
        return out

    @property
    def zero_shot_labels(self) -> list[str]:
        """The labels the zero-shot mean is taken over: those with both classes in the split."""
        return [name for name in self.zero_shot.index if name != "mean"]

    def headline_with_intervals(self) -> dict[str, Any]:
        """:meth:`headline` with a seeded 95 % bootstrap interval (``<metric>_ci95``) beside each measured metric and
        the paired interval of each against chance (``<metric>_minus_chance: {"diff", "ci95"}``).

        The cases are the split's volumes with their reports: report->volume R@k is resampled over report queries
        against the whole split's volumes (per-query hits), the zero-shot mean AUROC over volumes (recomputed per
        resample, a label without both classes in a resample left out of its mean). Chance is exact (k/N; 0.5 for
        AUROC, the score of a constant classifier), so its paired interval is the metric's own shifted by it.
        """
        metrics = self.headline()
        ranks = retrieval_ranks(self.similarity)
        hits = {key: (ranks <= int(key.rsplit("@", 1)[1])).astype(float)
                for key in metrics if key.startswith("report_to_volume_R@")}
        out = with_ci95(metrics, hits)
        for key, per_query in hits.items():
            chance = np.full_like(per_query, int(key.rsplit("@", 1)[1]) / len(per_query))
            out[f"{key}_minus_chance"] = paired_diff(per_query, chance)
        if metrics["zero_shot_mean_auroc"] is not None:
            truth, labels = label_matrix(self.manifest), self.zero_shot_labels

            def mean_zero_shot(scores: np.ndarray, truth: np.ndarray) -> float:
                return mean_auroc(truth, scores, labels)

            out["zero_shot_mean_auroc_ci95"] = ci95_list(bootstrap_ci95(mean_zero_shot, self.scores, truth))
            out["zero_shot_mean_auroc_minus_chance"] = paired_diff(
                (self.scores, truth), (np.full_like(self.scores, 0.5), truth), mean_zero_shot)
        return out


def retrieval_with_intervals(similarity: torch.Tensor, prefix: str) -> dict[str, Any]:
    """``<prefix>R@k`` (k up to the candidates), ``<prefix>mean_rank`` and ``<prefix>median_rank`` of the queries
    (rows of ``similarity``, true match on the diagonal), each with its 95 % bootstrap interval over queries."""
    ranks = retrieval_ranks(similarity).astype(float)
    ks = [k for k in RETRIEVAL_KS if k <= similarity.shape[1]]
    per_query = {f"{prefix}R@{k}": (ranks <= k).astype(float) for k in ks}
    per_query[f"{prefix}mean_rank"] = ranks
    metrics = with_ci95({key: float(values.mean()) for key, values in per_query.items()}, per_query)
    metrics[f"{prefix}median_rank"] = float(np.median(ranks))
    metrics[f"{prefix}median_rank_ci95"] = ci95_list(bootstrap_ci95(np.median, ranks))
    return metrics


def mean_auroc(truth: np.ndarray, scores: np.ndarray, labels: list[str]) -> float:
    """Mean AUROC over ``labels`` (names of :data:`LABELS`, columns of ``truth`` [N, 18] and ``scores`` [N, 18]);
    a label with one class in these cases is left out (NaN if all are)."""
    values = [auroc(truth[:, LABELS.index(name)], scores[:, LABELS.index(name)]) for name in labels]
    defined = [v for v in values if not np.isnan(v)]
    return float(np.mean(defined)) if defined else float("nan")


def paired_diff(a: Any, b: Any, metric: Any = None) -> dict[str, Any]:
    """:func:`nbsupport.metrics.paired_bootstrap_diff` as metrics.json records it: ``{"diff", "ci95": [lo, hi]}``."""
    diff, low, high = paired_bootstrap_diff(a, b, metric)
    return {"diff": float(diff), "ci95": ci95_list((low, high))}


def ci95_list(interval: tuple[float, float]) -> list[float | None]:
    """An interval as metrics.json records it: ``[low, high]``, ``None`` where undefined."""
    return [None if np.isnan(v) else float(v) for v in interval]


def evaluate_split(model: CTClip, manifest: pd.DataFrame, root: Path, split: str, device: torch.device,
                   batch_size: int = 8, present: str = PROMPT_PRESENT, absent: str = PROMPT_ABSENT) -> Evaluation:
    """Retrieval both ways (R@1/5/10/50/100, mean/median rank) and zero-shot AUROC/F1/accuracy on ``split``."""
    part = manifest[manifest.split == split].reset_index(drop=True)
    if not len(part):
        raise ValueError(f"the manifest has no {split!r} rows")
    dataset = CTVolumeDataset(part, root, model.spec.input_size)
    image_emb, _ = encode_volumes(model, dataset, device, batch_size)
    text_emb = model.project_text(report_features(model, list(part.report))).cpu()
    similarity = text_emb @ image_emb.T
    ks = [k for k in RETRIEVAL_KS if k <= len(part)]
    t2i = retrieval_metrics(similarity, ks=ks)
    i2t = retrieval_metrics(similarity.T, ks=ks)
    cols = [f"R@{k}" for k in ks] + ["mean_rank", "median_rank"]
    chance = {f"R@{k}": k / len(part) for k in ks}
    chance.update({"mean_rank": (len(part) + 1) / 2, "median_rank": (len(part) + 1) / 2})
    retrieval = pd.DataFrame([{c: t2i[c] for c in cols}, {c: i2t[c] for c in cols}, chance],
                             index=["report->volume", "volume->report", "chance"])
    scores = zero_shot_scores(model, image_emb, LABELS, present, absent)
    truth = label_matrix(part)
    rows = {}
    for j, name in enumerate(LABELS):
        if 0 < truth[:, j].sum() < len(truth):
            m = binary_classification_metrics(truth[:, j], scores[:, j], threshold=0.5)
            rows[name] = {k: m[k] for k in ("auroc", "f1", "accuracy", "precision", "recall", "n_positive")}
    zero_shot = pd.DataFrame.from_dict(rows, orient="index")
    if len(zero_shot):
        zero_shot.loc["mean"] = zero_shot.mean(numeric_only=True)
        zero_shot.loc["mean", "n_positive"] = np.nan
    return Evaluation(split, part, similarity, image_emb, retrieval, zero_shot, scores)


@dataclasses.dataclass
class LinearProbe:
    """A linear probe's result on a split: AUROC per label (+ "mean") and its scores [N, 18] (split order)."""

    auroc: pd.DataFrame
    scores: np.ndarray


def linear_probe(model: CTClip, manifest: pd.DataFrame, root: Path, split: str, device: torch.device,
                 batch_size: int = 8, epochs: int = 300) -> LinearProbe:
    """Text-free upper bound: logistic regression per label on frozen image-encoder features (train split) ->
    AUROC on ``split``."""
    train = manifest[manifest.split == "train"].reset_index(drop=True)
    test = manifest[manifest.split == split].reset_index(drop=True)
    _, x_train = encode_volumes(model, CTVolumeDataset(train, root, model.spec.input_size), device,
                                batch_size)
    _, x_test = encode_volumes(model, CTVolumeDataset(test, root, model.spec.input_size), device, batch_size)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    y_train = torch.from_numpy(label_matrix(train).astype(np.float32))
    y_test = label_matrix(test)
    torch.manual_seed(0)
    probe = torch.nn.Linear(x_train.shape[1], len(LABELS))
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=1e-3)
    with torch.enable_grad():
        for _ in range(epochs):
            optimizer.zero_grad()
            torch.nn.functional.binary_cross_entropy_with_logits(probe(x_train), y_train).backward()
            optimizer.step()
    with torch.no_grad():
        scores = probe(x_test).sigmoid().numpy()
    rows = {name: {"auroc": auroc(y_test[:, j], scores[:, j])} for j, name in enumerate(LABELS)
            if 0 < y_test[:, j].sum() < len(y_test) and 0 < y_train[:, j].sum() < len(y_train)}
    table = pd.DataFrame.from_dict(rows, orient="index")
    if len(table):
        table.loc["mean"] = table.mean()
    return LinearProbe(table, scores)


def extract_features(model: CTClip, nifti: str | Path, spec: ct_pre.PreprocessSpec | None = None,
                     slope: float | None = None, intercept: float | None = None) -> np.ndarray:
    """Embedding (D,) of one CT file (:func:`embed_ct` of it).

    Args:
        nifti: a ``.nii(.gz)``; HU from the header's scaling unless ``slope``/``intercept`` are given, checked
            against air (:func:`nbsupport.ct_clip.preprocessing.check_air`).
        spec: preprocessing geometry; default CT-Data's (1.25 x 1.25 x 2 mm, 256 x 256 x 192).
    """
    ct = ct_pre.load_ct(nifti, slope, intercept)
    ct_pre.check_air(ct, nifti, ct_pre.HEADER_READING if slope is None else "the given slope / intercept")
    return embed_ct(model, ct, spec or ct_pre.PreprocessSpec())


@torch.no_grad()
def embed_ct(model: CTClip, ct: ct_pre.CTVolume, spec: ct_pre.PreprocessSpec) -> np.ndarray:
    """Unit-length image embedding (D,) float32 of a decoded CT, preprocessed as the training data was
    (``spec``: 01_preprocess's geometry and window), resized to the model input like :class:`CTVolumeDataset`,
    encoded on the model's device."""
    image, _ = ct_pre.preprocess_volume(ct, spec)
    tensor = resize_volume(torch.from_numpy(image.astype(np.float32)), model.spec.input_size)
    device = next(model.parameters()).device
    return model.eval().encode_image(tensor[None].to(device))[0].float().cpu().numpy()


def relevance_map(model: CTClip, image: torch.Tensor, prompt: str) -> np.ndarray:
    """Grad-CAM of the prompt's similarity over the image encoder's last feature map, upsampled to the input.

    Args:
        image: (1, X, Y, Z) model input.

    Returns:
        (X, Y, Z) float array, 0..1: where the evidence for ``prompt`` is (ReLU of gradient-weighted channels).
    """
    model.eval()
    text = model.encode_text([prompt]).detach()
    encoder = model.image_encoder
    with torch.enable_grad():
        features = encoder.feature_map(image[None].to(text.device))
        features.retain_grad()
        emb = torch.nn.functional.normalize(model.image_projection(encoder.pool(features)), dim=-1)
        (emb @ text.T).sum().backward()
    weights = features.grad.mean(dim=(2, 3, 4), keepdim=True)
    cam = torch.relu((weights * features).sum(1, keepdim=True)).detach()
    cam = torch.nn.functional.interpolate(cam, size=tuple(image.shape[1:]), mode="trilinear", align_corners=False)
    cam = cam[0, 0].float().cpu().numpy()
    return cam / cam.max() if cam.max() > 0 else cam


def retrieve_reports(model: CTClip, part: pd.DataFrame, image_emb: torch.Tensor, own: int, top_k: int) -> pd.DataFrame:
    """The ``top_k`` reports of ``part`` most similar to one volume's embedding (D,): rank, whose report,
    similarity, whether it is the volume's own (row ``own``), and the text."""
    all_text = model.project_text(report_features(model, list(part.report))).detach().cpu()
    scores = (all_text @ image_emb).numpy()
    order = np.argsort(-scores)[:top_k]
    return pd.DataFrame({"rank": np.arange(1, len(order) + 1), "report of": part.volume.to_numpy()[order],
                         "similarity": scores[order].round(3), "is its own report": order == own,
                         "report": part.report.to_numpy()[order]})
