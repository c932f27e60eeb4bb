"""What the shared trainer (:func:`nbsupport.train.fit`) needs from seg2d: model, datasets, loss, validation Dice.

Every training process builds :class:`Seg2DTrainingTask` from what ``TrainConfig.launch_training`` passes (the
config, the manifest, the model spec's JSON), so one process and N data-parallel ones train the same way.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from nbsupport.seg2d.config import TrainConfig
from nbsupport.seg2d.data import SliceDataset
from nbsupport.seg2d.model import BCEDiceLoss, Seg2DModelSpec, Seg2DNet, model_from_spec
from nbsupport.stages import ManifestTask


class Seg2DTrainingTask(ManifestTask):
    """Slices of the manifest's train split at ``image_size``, BCE + Dice loss; validation loss and Dice on val."""

    CONFIG = TrainConfig
    SPEC = Seg2DModelSpec

    def setup(self) -> None:
        self.loss = BCEDiceLoss()

    def build_model(self) -> Seg2DNet:
        torch.manual_seed(self.cfg.seed)
        return model_from_spec(self.spec)

    def train_dataset(self) -> SliceDataset:
        return SliceDataset(self.split("train"), self.root, image_size=self.cfg.image_size, augment=self.cfg.augment)

    def val_dataset(self) -> SliceDataset | None:
        part = self.split("val")
        return SliceDataset(part, self.root, image_size=self.cfg.image_size) if len(part) else None

    def training_step(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.loss(model(batch["image"]), batch["masks"])

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, loader: Any, device: torch.device) -> dict[str, float]:
        """Validation loss and mean Dice at model resolution (both-empty pairs skipped, as the competition)."""
        losses, inter, sizes = [], [], []
        for batch in loader:
            logits = model(batch["image"].to(device))
            target = batch["masks"].to(device)
            losses.append(float(self.loss(logits, target)))
            pred = logits.sigmoid() > self.cfg.threshold
            inter.append((pred & (target > 0.5)).flatten(2).sum(-1).cpu())
            sizes.append((pred.flatten(2).sum(-1) + (target > 0.5).flatten(2).sum(-1)).cpu())
        inter_t, sizes_t = torch.cat(inter).float(), torch.cat(sizes).float()
        dice = torch.where(sizes_t > 0, 2 * inter_t / sizes_t.clamp(min=1), torch.nan)
        return {"loss": float(np.mean(losses)), "dice": float(torch.nanmean(dice))}
