"""What the shared training loop needs from textseg3d: LLMSeg (or the image-only UNet) on random crops of the
training cases with the public code's DiceCE loss, scored by the whole-volume Dice of the validation cases."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset

from nbsupport.stages import ManifestTask
from nbsupport.textseg3d.config import TrainConfig
from nbsupport.textseg3d.data import case_items
from nbsupport.textseg3d.inference import predict_volume
from nbsupport.textseg3d.model import LLMSeg, LLMSegSpec, build_llmseg
from nbsupport.textseg3d.transforms import collate_cases, eval_transforms, train_transforms


class TorchSeededCacheDataset(CacheDataset):
    """MONAI's CacheDataset whose random transforms draw from torch's RNG: one seed per item from the global
    generator, which the trainer seeds from ``seed`` and restores on resume. MONAI's default seeds each chain
    from OS entropy, so no two runs (and no resumed run) would crop and jitter alike."""

    def _transform(self, index: int) -> Any:
        self.transform.set_random_state(seed=int(torch.randint(2**31 - 1, ()).item()))
        return super()._transform(index)


class TextSeg3DTrainingTask(ManifestTask):
    """One network of the 02_train stage (see ``nbsupport.train.TrainingTask``); ``spec.use_text`` says which."""

    CONFIG = TrainConfig
    SPEC = LLMSegSpec

    def setup(self) -> None:
        from monai.losses import DiceCELoss

        # the public code's loss (tvseg/MM-LLM-RO main.py:112 at 596e28a, without --squared_dice)
        self.loss = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True)
        self._train_dataset: Any = None

    def build_model(self) -> LLMSeg:
        model = build_llmseg(self.spec, self.cfg.seed)
        if self.cfg.foreground_prior_bias:
            set_foreground_prior_bias(model, foreground_fraction(self.train_dataset()))
        return model

    def train_dataset(self) -> Any:
        if self._train_dataset is None:
            # caches everything up to the first random transform (the crop), once per process
            self._train_dataset = TorchSeededCacheDataset(
                case_items(self.split("train"), self.root),
                train_transforms(self.spec.roi, self.cfg.neg_ratio, self.cfg.side_mirror_prob),
                cache_rate=1.0, num_workers=0, progress=False)
        return self._train_dataset

    def val_dataset(self) -> Any:
        part = self.split("val")
        if not len(part):
            return None
        return CacheDataset(case_items(part, self.root), eval_transforms(), cache_rate=1.0, num_workers=0,
                            progress=False)

    def collate(self, items: Sequence[Any]) -> dict[str, Any]:
        return collate_cases(items)

    def training_step(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        return self.loss(model(batch["image"], batch["prompt"]), batch["label"])

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, loader: Any, device: torch.device) -> dict[str, float]:
        """Mean foreground Dice of whole validation volumes (sliding window), one case at a time."""
        dices = []
        for item in loader.dataset:
            prob = predict_volume(model, item["image"][None], item["prompt"], self.spec.roi, device=device)
            pred, truth = prob.argmax(0) == 1, torch.as_tensor(item["label"])[0] > 0.5
            inter, size = float((pred & truth).sum()), float(pred.sum() + truth.sum())
            dices.append(2 * inter / size if size else 1.0)
        return {"dice": float(np.mean(dices))}


def foreground_fraction(dataset: Any) -> float:
    """Mean fraction of target voxels in one random training crop per case (the dataset's own transforms)."""
    fractions = []
    for i in range(len(dataset)):
        item = dataset[i]
        for crop in item if isinstance(item, list) else [item]:
            fractions.append(float(np.asarray(crop["label"]).mean()))
    return float(np.mean(fractions))


def set_foreground_prior_bias(model: LLMSeg, prior: float) -> None:
    """Output bias (0, log(p / (1 - p))): the untrained network's softmax gives p(target) ~= ``prior`` everywhere.

    With PyTorch's default init the network starts at p ~= 0.5, the cross-entropy term then drives it to predict no
    target at all for a while (the demo's "slow start"); starting at the prior avoids that collapse.
    """
    prior = min(max(prior, 1e-4), 0.5)
    with torch.no_grad():
        model.out.bias.copy_(torch.tensor([0.0, math.log(prior / (1 - prior))], dtype=model.out.bias.dtype))
