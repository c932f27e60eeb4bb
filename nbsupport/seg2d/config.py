"""The seg2d stage configs: one frozen dataclass per notebook, built from its papermill parameters.

The shared fields (manifest, data root, optimisation, checkpoint, split) come from :mod:`nbsupport.stages`; what
is here is seg2d's own: the Kaggle layout, the four Hugging Face architectures, and how probabilities become masks.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

from nbsupport.config import param
from nbsupport.seg2d.data import SEG2D_SCHEMA
from nbsupport.stages import AttentionStage, HeldOutSplits, InferStage, PreprocessStage, TrainStage, system_stage

SYSTEM = "seg2d"
_Seg2D = system_stage(SYSTEM, SEG2D_SCHEMA, "data_manifests/uwmgi_demo.csv")


@dataclasses.dataclass(frozen=True)
class PreprocessConfig(_Seg2D, HeldOutSplits, PreprocessStage):
    """01_preprocess: read a dataset in the Kaggle layout and write the slice manifest."""

    data_root: str = param("", "dataset root holding train.csv and train/caseN/...; '' = the demo dataset")
    val_fraction: float = param(0.2, "fraction of cases held out for validation (checkpoint selection)")
    n_examples: int = param(6, "slices shown in the sample figure")


@dataclasses.dataclass(frozen=True)
class TrainConfig(_Seg2D, TrainStage):
    """02_train: transfer-learn (or train from a config) one of the four HF architectures."""

    PROFILES = {
        "smoke": {"width": "tiny", "image_size": 96, "epochs": 40, "batch_size": 8, "lr": 5e-3,
                  "scheduler": "warmup_cosine", "postprocess": "val_tuned"},
        # 480 steps of ~0.52 CPU s on the 768-slice demo dataset; 160 px (logits at 40x40) rather than 128 px,
        # paid for by the lighter 128-channel decoder of the `small` SegFormer; per-class threshold and min_area
        # chosen on val (benchmarks/RESULTS.md, "seg2d demo accuracy"). bf16 autocast where the CPU has it: a step
        # costs ~half the CPU time, test Dice at seed 0 0.771 (fp32: 0.769) (benchmarks/RESULTS.md, "make demo")
        "demo": {"width": "small", "image_size": 160, "epochs": 8, "batch_size": 8, "lr": 2e-3,
                 "scheduler": "warmup_cosine", "postprocess": "val_tuned", "mixed_precision": "bf16_native"},
        # The seed's recipe (JaeL17/Medical-Image-Segmentation at 5309879): run_train.sh:8-14 (model, batch 32,
        # weight decay 1e-4, AdamW, MultiStepLR, 100 epochs, lr 2e-4), model.py:95-97 (amsgrad=True), model.py:102
        # (one milestone at max_epochs // 2, gamma 0.1), utils.py:20 (288 x 288), utils.py:128-133 (augmentations),
        # trainer.py:57-65 (fp32, no gradient clipping), trainer.py:33 (12 loader workers: the augmentations cost
        # ~10-20 ms per 288 px slice on one CPU core). What stays different, and why: the README's recipe table.
        "full": {"arch": "upernet", "model_name_or_path": "openmmlab/upernet-convnext-small", "image_size": 288,
                 "epochs": 100, "batch_size": 32, "lr": 2e-4, "weight_decay": 1e-4, "optimizer": "adamw",
                 "amsgrad": True, "scheduler": "multistep", "milestones": (0.5,), "gamma": 0.1, "grad_clip": None,
                 "mixed_precision": "no", "augment": True, "num_workers": 12},
    }

    arch: Literal["segformer", "dpt", "beit", "upernet"] = param("segformer", "model family (seed --base_model)")
    model_name_or_path: str = param("", "hub id or local folder of a pretrained checkpoint; '' = random init")
    width: Literal["tiny", "small"] = param("small", "size of a random-init model")
    image_size: int = param(256, "square model input (pixels); slices are resized to it")
    epochs: int = param(6, "training epochs (seed --epochs)")
    batch_size: int = param(8, "global batch size (seed --train_batch_size)")
    lr: float = param(2e-4, "peak learning rate (seed --lr)")
    weight_decay: float = param(1e-4, "weight decay (seed --weight_decay)")
    optimizer: Literal["adamw", "adam", "sgd"] = param("adamw", "optimizer (seed --optimizer)")
    amsgrad: bool = param(False, "AMSGrad variant of adam / adamw (the seed's Adam and AdamW use it)")
    scheduler: Literal["constant", "warmup_cosine", "multistep"] = param("multistep", "seed --scheduler_name")
    milestones: tuple[float, ...] = param((0.5,), "multistep: the lr is multiplied by gamma at these fractions "
                                                  "of the training (seed: one, at epochs // 2)")
    gamma: float = param(0.1, "multistep decay factor per milestone (seed: 0.1)")
    augment: bool = param(False, "the seed's training augmentations: flips, shift/scale/rotate, brightness/contrast, "
                                 "coarse dropout (flips hide the organs' side)")
    threshold: float = param(0.5, "sigmoid probability above which a pixel belongs to a class")
    min_area: int = param(64, "predicted regions smaller than this (pixels at the slice's own size) are dropped")
    postprocess: Literal["fixed", "val_tuned"] = param(
        "fixed", "'fixed': threshold and min_area for every class; 'val_tuned': each class's threshold and "
                 "min_area chosen on the val split after training (our addition; the test split is never used)")

    def warmup_steps(self, n_train: int) -> int:
        """Linear warm-up of ``warmup_cosine``: one epoch of ``n_train`` slices, at most 100 optimizer steps."""
        steps_per_epoch = max(1, n_train // self.batch_size)
        return min(steps_per_epoch, 100) if self.scheduler == "warmup_cosine" else 0


@dataclasses.dataclass(frozen=True)
class InferConfig(_Seg2D, InferStage):
    """03_infer: predict masks for a split or a folder of new PNGs and write ``submission.csv``."""

    input_dir: str = param("", "folder in the Kaggle layout (train/ or test/ case folders) to predict instead of a split")
    threshold: float = param(0.5, "sigmoid probability above which a pixel belongs to a class")
    min_area: int = param(64, "predicted regions smaller than this (pixels at the slice's own size) are dropped")
    postprocess: Literal["from_training", "fixed"] = param(
        "from_training", "'from_training': the per-class threshold and min_area that 02_train chose on val when it "
                         "wrote postprocess.json next to the checkpoint, else threshold/min_area; 'fixed': those two")
    batch_size: int = param(16, "slices per forward pass")
    n_examples: int = param(6, "slices shown in the overlay figure")


@dataclasses.dataclass(frozen=True)
class AttentionConfig(_Seg2D, AttentionStage):
    """04_attention: self-attention of the transformer for a query pixel, and prediction vs truth."""

    slice_id: str = param("", "slice id (e.g. case123_day20_slice_0065); '' = the split's slice with most organ")
    query_organ: Literal["large_bowel", "small_bowel", "stomach"] = param(
        "stomach", "the query pixel is this organ's centre (used when query_point is None)")
    query_point: tuple[float, float] | None = param(None, "query pixel as (row, col) fractions of the slice")
    layer: int = param(-1, "layer whose heads are shown one by one (-1: last)")
