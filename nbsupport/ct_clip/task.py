"""What the shared training loop needs from ct_clip: the model, the datasets, the contrastive step, the validation
retrieval metrics (see :class:`nbsupport.train.TrainingTask`), and how training processes are launched."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from nbsupport.ct_clip.config import TrainConfig
from nbsupport.ct_clip.data import CTVolumeDataset
from nbsupport.ct_clip.model import CTClip, CTClipSpec, contrastive_loss, report_features, split_sentences
from nbsupport.metrics import retrieval_metrics
from nbsupport.optim import resolve_mixed_precision
from nbsupport.stages import ManifestTask

ACCELERATE_ZERO1 = Path(__file__).with_name("accelerate_zero1.yaml")


def distributed_config(num_processes: int, cuda: bool | None = None) -> Path | None:
    """The accelerate config for ``num_processes``: DeepSpeed ZeRO-1 (the seed's) on CUDA, None (DDP) otherwise."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    return ACCELERATE_ZERO1 if num_processes > 1 and cuda else None


def checkpoint_monitor(select_checkpoint_by: str) -> str:
    """The validation metric (:meth:`CTClipTrainingTask.evaluate`'s key, ``val_`` prefixed) that picks the best
    checkpoint."""
    return {"r5": "val_r5_report_to_volume", "mean_rank": "val_mean_rank_report_to_volume"}[select_checkpoint_by]


class CTClipTrainingTask(ManifestTask):
    """Contrastive training of :class:`CTClip` on the manifest's train split, validated by retrieval on val.

    A frozen text tower's report features are computed once (``_text_cache``); with ``sentence_keep < 1`` each
    training report is a random subset of its sentences (from cached per-sentence features when frozen).
    """

    CONFIG = TrainConfig
    SPEC = CTClipSpec

    def setup(self) -> None:
        self._text_cache: dict[str, torch.Tensor] = {}
        self._sentence_cache: list[torch.Tensor] = []  # train reports' per-sentence features (frozen tower)
        self._generator = torch.Generator().manual_seed(self.cfg.seed)

    def build_model(self) -> CTClip:
        torch.manual_seed(self.cfg.seed)
        model = CTClip(self.spec, seed=self.cfg.seed)
        if model.text_encoder.frozen:  # the frozen tower's outputs never change: embed every report once
            for split in ("train", "val"):
                part = self.split(split)
                if len(part):
                    self._text_cache[split] = report_features(model, list(part.report))
            if self.cfg.sentence_keep < 1 and self.spec.text_pooling == "sentence_mean":
                sentences = [split_sentences(r) for r in self.split("train").report]
                flat = report_features(model, [s for group in sentences for s in group])
                self._sentence_cache = list(torch.split(flat, [len(group) for group in sentences]))
        return model

    def _keep_mask(self, n: int) -> torch.Tensor:
        """Which of ``n`` sentences a sampled training report keeps (each with ``sentence_keep``, at least one)."""
        keep = torch.rand(n, generator=self._generator) < self.cfg.sentence_keep
        if not keep.any():
            keep[torch.randint(n, (), generator=self._generator)] = True
        return keep

    def _dataset(self, split: str, augment: bool) -> CTVolumeDataset | None:
        part = self.split(split)
        if not len(part):
            return None
        return CTVolumeDataset(part, self.root, self.cfg.input_size, augment=augment)

    def train_dataset(self) -> CTVolumeDataset:
        dataset = self._dataset("train", self.cfg.augment)
        if dataset is None:
            raise ValueError(f"{self.cfg.manifest} has no train rows")
        self._train = dataset
        return dataset

    def val_dataset(self) -> CTVolumeDataset | None:
        self._val = self._dataset("val", False)
        return self._val

    def trainable_parameters(self, model: torch.nn.Module) -> list[dict[str, Any]]:
        """AdamW groups: no weight decay on norms, biases, logit scale/bias (as open_clip)."""
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 and "logit" not in name else no_decay).append(p)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    def _text(self, model: torch.nn.Module, split: str, indices: torch.Tensor) -> torch.Tensor:
        """Pooled text features of the reports of ``split`` rows ``indices`` (sentence subsets when training)."""
        bare = getattr(model, "module", model)
        device = next(bare.parameters()).device
        sample = split == "train" and self.cfg.sentence_keep < 1 and bare.training
        if sample and self._sentence_cache:  # a sentence-mean report of the kept sentences, from cached features
            rows = [self._sentence_cache[int(i)] for i in indices.cpu()]
            return torch.stack([r[self._keep_mask(len(r))].mean(0) for r in rows]).to(device)
        if split in self._text_cache and not sample:
            return self._text_cache[split][indices.cpu()].to(device)
        part = self.split(split).reset_index(drop=True)
        texts = [part.report[int(i)] for i in indices]
        if sample:
            texts = [" ".join(s for s, k in zip(group, self._keep_mask(len(group))) if k)
                     for group in map(split_sentences, texts)]
        return bare.text_encoder(texts)

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """bf16 autocast for both towers where ``cfg.mixed_precision`` resolves to bf16: the text features are
        computed outside ``model.forward``, which is all that the loop's autocast covers. Otherwise no context at
        all (an ``enabled=False`` autocast would switch off the one accelerate puts around the forward on CUDA)."""
        if resolve_mixed_precision(self.cfg.mixed_precision) == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def training_step(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        bare = getattr(model, "module", model)
        with self._autocast(batch["image"].device):
            image_emb, text_emb = model(batch["image"], self._text(model, "train", batch["report_index"]))
        return contrastive_loss(bare, image_emb.float(), text_emb.float())

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, loader: Any, device: torch.device) -> dict[str, float]:
        """Report->volume and volume->report R@5 and mean rank over the whole validation split."""
        images, texts = [], []
        for batch in loader:
            with self._autocast(device):
                img, txt = model(batch["image"].to(device), self._text(model, "val", batch["report_index"]))
            images.append(img.float().cpu())
            texts.append(txt.float().cpu())
        with torch.autocast("cpu", enabled=False):  # the loop evaluates under its autocast: rank in float32
            sim = torch.cat(texts) @ torch.cat(images).T  # reports x volumes
        t2i = retrieval_metrics(sim, ks=(1, 5))
        i2t = retrieval_metrics(sim.T, ks=(1, 5))
        return {"r5_report_to_volume": t2i.get("R@5", t2i["R@1"]), "r5_volume_to_report": i2t.get("R@5", i2t["R@1"]),
                "mean_rank_report_to_volume": t2i["mean_rank"]}
