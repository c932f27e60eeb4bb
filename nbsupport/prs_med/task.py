"""What the shared training loop needs from prs_med (see :class:`nbsupport.train.TrainingTask`): the network, the
datasets, the official PRS-Med objective and the validation numbers; and the same for the image-only baseline.

Both tasks are rebuilt in every training process by :meth:`nbsupport.stages.TrainStage.launch_training` from the
config, the manifest and the spec's JSON.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from nbsupport.metrics import POSITIONS
from nbsupport.prs_med.config import TrainConfig
from nbsupport.prs_med.data import PositionQADataset, collate_qa
from nbsupport.prs_med.model import ImageOnlySegmenter, PRSMedNet, PRSMedSpec, structure_loss
from nbsupport.stages import ManifestTask


def _dice_per_image(logits: torch.Tensor, mask: torch.Tensor, threshold: float) -> list[float]:
    """Dice of each (1, S, S) prediction at model resolution (``logits`` thresholded after the sigmoid)."""
    pred, truth = logits.sigmoid() > threshold, mask > 0.5
    inter = (pred & truth).flatten(1).sum(-1).float()
    total = (pred.flatten(1).sum(-1) + truth.flatten(1).sum(-1)).float()
    return ((2 * inter + 1e-6) / (total + 1e-6)).tolist()


class PRSMedTrainingTask(ManifestTask):
    """The official PRS-Med objective: structure loss + ``lambda_txt`` * answer loss + ``lambda_cls`` * modality
    loss during the first ``cls_epochs`` epochs (+ ``lambda_position`` * the image tokens' position loss, ours)."""

    CONFIG = TrainConfig
    SPEC = PRSMedSpec

    def setup(self) -> None:
        n_train = len(self.split("train"))
        # The modality loss is on for the first cls_epochs epochs; the trainer counts steps, so convert.
        self.cls_steps = self.cfg.cls_epochs * max(1, n_train // self.cfg.batch_size)
        self.collate = collate_qa

    def build_model(self) -> PRSMedNet:
        return PRSMedNet(self.spec)

    def train_dataset(self) -> PositionQADataset:
        return PositionQADataset(self.split("train"), self.root, self.cfg.image_size)

    def val_dataset(self) -> PositionQADataset | None:
        part = self.split("val")
        return PositionQADataset(part, self.root, self.cfg.image_size) if len(part) else None

    def losses(self, model: PRSMedNet, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``seg`` (structure loss), ``lm`` (answer tokens' cross-entropy), ``cls`` (modality) for one batch."""
        device = batch["image"].device
        enc = model.encode(batch["question"], batch["answer"], device=device)
        out = model(batch["image"], enc["input_ids"], enc["attention_mask"], enc["labels"],
                    position_weight=self.cfg.position_weight)
        parts = {"seg": structure_loss(out.mask_logits, batch["mask"]), "lm": out.lm_loss,
                 "cls": torch.nn.functional.cross_entropy(out.modality_logits, batch["modality"].to(device)),
                 "logits": out.mask_logits}
        if out.position_logits is not None:  # every image token classified; the label is position_of(mask)
            labels = torch.tensor([POSITIONS.index(p) for p in batch["position"]], device=device)
            per_token = out.position_logits.flatten(0, 1)
            parts["position"] = torch.nn.functional.cross_entropy(
                per_token, labels.repeat_interleave(out.position_logits.shape[1]))
        return parts

    def trainable_parameters(self, model: PRSMedNet) -> list[dict[str, Any]]:
        """AdamW groups: the assembled VLM's random vision tower + projector at ``vision_lr_scale * lr`` (they start
        from nothing, unlike the LoRA-adapted language model); weight decay on matrices only."""
        groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            vision = ".vision_tower." in name or ".multi_modal_projector." in name
            groups.setdefault((vision, p.ndim >= 2), []).append(p)
        return [{"params": ps, "lr": self.cfg.lr * (self.cfg.vision_lr_scale if vision else 1.0),
                 "weight_decay": self.cfg.weight_decay if matrix else 0.0}
                for (vision, matrix), ps in sorted(groups.items())]

    def training_step(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        bare = getattr(model, "module", model)
        parts = self.losses(bare, batch)
        loss = parts["seg"] + self.cfg.lambda_txt * parts["lm"]
        if "position" in parts:
            loss = loss + self.cfg.lambda_position * parts["position"]
        # The step count lives in the model (restored from the checkpoint on resume), not in this task object,
        # which a resumed run rebuilds from scratch. After cls_steps the modality loss stays in the graph with weight
        # 0: every trainable tensor still gets a gradient, as DDP (find_unused_parameters=False) requires.
        cls_weight = self.cfg.lambda_cls if int(bare.trained_batches) < self.cls_steps else 0.0
        loss = loss + cls_weight * parts["cls"]
        bare.trained_batches += 1
        return loss

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, loader: Any, device: torch.device) -> dict[str, float]:
        """Teacher-forced validation: structure loss, answer loss and mean Dice at model resolution."""
        bare = getattr(model, "module", model)
        seg, lm, dice = [], [], []
        for batch in loader:
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            parts = self.losses(bare, batch)
            seg.append(float(parts["seg"]))
            lm.append(float(parts["lm"]))
            dice += _dice_per_image(parts["logits"], batch["mask"], self.cfg.threshold)
        return {"loss": float(np.mean(seg) + self.cfg.lambda_txt * np.mean(lm)), "seg_loss": float(np.mean(seg)),
                "lm_loss": float(np.mean(lm)), "dice": float(np.mean(dice))}


class ImageOnlyTrainingTask(PRSMedTrainingTask):
    """The baseline: the same encoder and decoder trained on the structure loss with no question; ``prompt_dim`` is
    the VLM's hidden size (the decoder's prompt width), taken from the trained PRS-Med network."""

    def __init__(self, config: Mapping[str, Any], manifest: str, data_root: str, spec_json: str, prompt_dim: int):
        super().__init__(config, manifest, data_root, spec_json)
        self.prompt_dim = prompt_dim

    def build_model(self) -> ImageOnlySegmenter:  # type: ignore[override]
        return ImageOnlySegmenter(self.spec, self.prompt_dim)

    def training_step(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        return structure_loss(model(batch["image"]), batch["mask"])

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, loader: Any, device: torch.device) -> dict[str, float]:
        losses, dice = [], []
        for batch in loader:
            logits = model(batch["image"].to(device))
            mask = batch["mask"].to(device)
            losses.append(float(structure_loss(logits, mask)))
            dice += _dice_per_image(logits, mask, self.cfg.threshold)
        return {"loss": float(np.mean(losses)), "dice": float(np.mean(dice))}
