"""The two training tasks of cxr_report for the shared loop (:func:`nbsupport.train.fit`), built in every training
process by :meth:`nbsupport.stages.TrainStage.launch_training`.

1. :class:`VisionTrainingTask`: DenseNet + disease attention + the auxiliary 14-label classifier on the labels
   (the seed's separately pre-trained ``dense_net_121_d_e50``); uncertain labels are masked out of the loss.
2. :class:`ReportTrainingTask`: with the vision model frozen, its 14 disease tokens are computed once (a file the
   ``train`` verb writes); the projection and the LoRA adapters of the (4-bit) LM learn to write the report.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import safetensors.torch
import torch

from nbsupport.cxr_report.config import TrainConfig
from nbsupport.cxr_report.data import CachedReportImageDataset, label_matrix
from nbsupport.cxr_report.labeler import LABELS
from nbsupport.cxr_report.model import (
    CxrModelSpec,
    ReportGenerator,
    VisionModel,
    encode_example,
    keep_4bit_weights_trainable,
    lm_prompts,
    load_encoder_weights,
    load_language_model,
    pad_examples,
)
from nbsupport.paths import resolve_path
from nbsupport.stages import ManifestTask


def masked_bce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy averaged over the labels that count (``mask`` 0 where a label is uncertain)."""
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    return (loss * mask).sum() / mask.sum().clamp(min=1.0)


def label_aurocs(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """AUROC per label with both classes present, (N, 14) scores and 0/1 labels -> {label: auroc}.

    The Mann-Whitney form: the probability that a random positive scores above a random negative (ties 1/2).
    """
    from scipy.stats import rankdata

    out = {}
    for j, name in enumerate(LABELS):
        positive = labels[:, j] == 1
        n_pos, n_neg = int(positive.sum()), int((~positive).sum())
        if n_pos and n_neg:
            ranks = rankdata(scores[:, j])
            out[name] = float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return out


class VisionTrainingTask(ManifestTask):
    """Stage 1: DenseNet + disease attention + auxiliary classifier on the 14 labels; monitor: val AUROC."""

    CONFIG = TrainConfig
    SPEC = CxrModelSpec

    def build_model(self) -> VisionModel:
        torch.manual_seed(self.cfg.seed)
        model = VisionModel(self.spec)
        if self.cfg.encoder_weights:
            from accelerate import PartialState

            load_encoder_weights(model.features, resolve_path(self.cfg.encoder_weights),
                                 log=print if PartialState().is_main_process else None)
        return model

    def _images(self, split: str) -> CachedReportImageDataset | None:
        part = self.split(split)
        return CachedReportImageDataset(part, self.root, self.spec.image_size) if len(part) else None

    def train_dataset(self) -> CachedReportImageDataset | None:
        return self._images("train")

    def val_dataset(self) -> CachedReportImageDataset | None:
        return self._images("val")

    def training_step(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        _, logits, _ = model(batch["image"])
        return masked_bce(logits, batch["labels"], batch["label_mask"])

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, loader: Any, device: torch.device) -> dict[str, float]:
        """Validation loss and the mean AUROC of the auxiliary classifier over labels with both classes."""
        losses, scores, labels = [], [], []
        for batch in loader:
            _, logits, _ = model(batch["image"].to(device))
            losses.append(float(masked_bce(logits, batch["labels"].to(device), batch["label_mask"].to(device))))
            scores.append(logits.sigmoid().cpu().numpy())
            labels.append(batch["labels"].numpy())
        aurocs = label_aurocs(np.concatenate(scores), np.concatenate(labels))
        return {"loss": float(np.mean(losses)), "auroc": float(np.mean(list(aurocs.values()))) if aurocs else 0.5}


def prompt_findings(manifest: pd.DataFrame, probabilities: torch.Tensor) -> torch.Tensor:
    """(N, 14) label scores a findings prompt names for the manifest's rows in training: the report's own
    positive labels (1/0) in the train split, the classifier's ``probabilities`` elsewhere.

    Teacher forcing of the diagnosis: the LM learns to state exactly what its prompt names, which the classifier's
    imperfect calls on training images would blur; validation reads the classifier's calls, as inference does
    (val micro-F1 0.902 against 0.845: benchmarks/RESULTS.md, "Fourth pass").
    """
    train = torch.tensor((manifest.split == "train").to_numpy())
    own_labels = torch.tensor(label_matrix(manifest) == 1, dtype=probabilities.dtype)
    return torch.where(train[:, None], own_labels, probabilities)


def report_parameter_groups(model: ReportGenerator, lr: float, projection_lr: float | None,
                            weight_decay: float) -> list[dict[str, Any]]:
    """Optimizer groups of the report stage: the LoRA adapters at ``lr``, the visual projection at ``projection_lr``
    (None: ``lr``, the seed's single rate); weight decay on matrices only, as the shared trainer's default."""
    input_side = {id(p) for p in model.projection.parameters()}
    groups = []
    for group_lr, on_input_side in ((lr, False), (projection_lr or lr, True)):
        params = [p for p in model.parameters() if p.requires_grad and (id(p) in input_side) == on_input_side]
        for decay in (True, False):
            chosen = [p for p in params if (p.ndim >= 2) == decay]
            if chosen:
                groups.append({"params": chosen, "lr": group_lr, "weight_decay": weight_decay if decay else 0.0})
    return groups


class ReportTrainingTask(ManifestTask):
    """Stage 2: projection + LoRA adapters of the (4-bit) LM on the cached disease tokens; monitor: val loss."""

    CONFIG = TrainConfig
    SPEC = CxrModelSpec

    def __init__(self, config: Mapping[str, Any], manifest: str, data_root: str, spec_json: str, tokens_file: str):
        """``tokens_file``: safetensors with ``disease_tokens`` (N, 14, C) and ``probabilities`` (N, 14) of the
        manifest's rows, in manifest order (written by the ``train`` verb from the trained vision model)."""
        super().__init__(config, manifest, data_root, spec_json)
        self.manifest = self.manifest.reset_index(drop=True)
        stored = safetensors.torch.load_file(tokens_file)
        self.tokens = stored["disease_tokens"]
        self.prompts = lm_prompts(self.spec, list(self.manifest["prompt"]),
                                  prompt_findings(self.manifest, stored["probabilities"]))
        self.tokenizer: Any = None

    def build_model(self) -> ReportGenerator:
        """The LM (4-bit: quantized straight on this process's GPU) and the projection on the trainer's device."""
        from accelerate import PartialState

        lm, tokenizer = load_language_model(self.spec, PartialState().device)
        keep_4bit_weights_trainable(lm)  # validation between epochs must not repack the weights it trains through
        self.tokenizer = tokenizer
        torch.manual_seed(self.cfg.seed)
        return ReportGenerator(self.spec, lm, tokenizer, pack_sequences=self.cfg.pack_sequences)

    def _examples(self, split: str) -> list[dict[str, Any]] | None:
        if self.tokenizer is None:
            from transformers import AutoTokenizer

            from nbsupport.models import resolve_pretrained

            self.tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained(self.spec.language_model),
                                                           local_files_only=True)
        rows = np.flatnonzero((self.manifest.split == split).to_numpy())
        out = []
        for i in rows:
            example = encode_example(self.tokenizer, self.prompts[i], self.manifest.at[i, "report"],
                                     self.cfg.max_report_tokens)
            out.append({"disease_tokens": self.tokens[i], **example})
        return out or None

    def train_dataset(self) -> list[dict[str, Any]] | None:
        return self._examples("train")

    def val_dataset(self) -> list[dict[str, Any]] | None:
        return self._examples("val")

    def collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Right-pad token ids (pad id) and labels (-100)."""
        ids, mask, labels = pad_examples(items, self.tokenizer.pad_token_id if self.tokenizer is not None else 0)
        return {"disease_tokens": torch.stack([x["disease_tokens"] for x in items]), "input_ids": ids,
                "attention_mask": mask, "labels": labels}

    def trainable_parameters(self, model: ReportGenerator) -> list[dict[str, Any]]:
        return report_parameter_groups(model, self.cfg.lr, self.cfg.projection_lr, self.cfg.weight_decay)

    def training_step(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).loss

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, loader: Any, device: torch.device) -> dict[str, float]:
        """Token-weighted validation loss of the report tokens."""
        total, count = 0.0, 0
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            n = int((batch["labels"] != -100).sum())
            total += float(model(**batch).loss) * n
            count += n
        return {"loss": total / max(count, 1)}
