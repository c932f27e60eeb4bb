"""Hugging Face SegFormer / DPT / BEiT / UperNet adapted to multi-label GI-tract segmentation.

The seed fine-tunes hub checkpoints (``nvidia/mit-b*``, ``Intel/dpt-*``, ``microsoft/beit-*``,
``openmmlab/upernet-convnext-*``). Here the same factory takes a hub id or local path (``full``) or builds a
random-init model from a small config (``smoke`` / ``demo``). Two things differ from the HF heads:

* the three organs overlap (stomach and bowel share pixels), so each class is an independent sigmoid trained
  with BCE + Dice, not the softmax cross-entropy the HF heads compute;
* SegFormer and BEiT predict at 1/4 of the input size; logits are upsampled (bilinear) to the input size
  before the loss and the metrics.

Grayscale MRI goes through a 1-channel stem when the model is built from a config, and is repeated to three
channels (then normalised with the checkpoint's mean/std) when a 3-channel pretrained checkpoint is loaded.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from nbsupport.models import resolve_pretrained
from nbsupport.spec import ModelSpec

Architecture = Literal["segformer", "dpt", "beit", "upernet"]
ARCHITECTURES: tuple[str, ...] = ("segformer", "dpt", "beit", "upernet")
# Model widths for random-init configs: "tiny" for smoke tests, "small" (a few M parameters) for the CPU demo.
WIDTHS = ("tiny", "small")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Seg2DModelSpec(ModelSpec):
    """Everything needed to rebuild the network: stored next to its checkpoints as ``model_spec.json``.

    The JSON (and so the fingerprint of architecture + label set + input size stored with checkpoints) is the
    :class:`nbsupport.spec.ModelSpec` default: indented by 2, keys sorted, every field.
    """

    arch: str
    num_labels: int
    image_size: int
    in_channels: int  # channels the HF model expects: 1 (our configs) or 3 (pretrained checkpoints)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hf_config: dict[str, Any]  # the HF config as a dict (PretrainedConfig.to_dict())
    source: str  # hub id / local path, or "config:<arch>-<width>"


def _hf_classes(arch: str) -> tuple[type, type]:
    import transformers as tf

    return {
        "segformer": (tf.SegformerConfig, tf.SegformerForSemanticSegmentation),
        "dpt": (tf.DPTConfig, tf.DPTForSemanticSegmentation),
        "beit": (tf.BeitConfig, tf.BeitForSemanticSegmentation),
        "upernet": (tf.UperNetConfig, tf.UperNetForSemanticSegmentation),
    }[arch]


def small_config(arch: str, width: str, num_labels: int, image_size: int) -> Any:
    """A random-init HF config of the given family with a 1-channel stem.

    ``small`` is the CPU demo size (2.5-6 M parameters; SegFormer ~ MiT-b0), ``tiny`` the smoke-test size.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
    if width not in WIDTHS:
        raise ValueError(f"width must be one of {WIDTHS}, got {width!r}")
    import transformers as tf

    tiny = width == "tiny"
    common = {"num_labels": num_labels, "attn_implementation": "eager"}  # eager: attention maps can be returned
    if arch == "segformer":
        hidden = [8, 16, 32, 64] if tiny else [32, 64, 160, 256]
        return tf.SegformerConfig(num_channels=1, hidden_sizes=hidden, decoder_hidden_size=64 if tiny else 128,
                                  depths=[1, 1, 1, 1] if tiny else [2, 2, 2, 2], num_attention_heads=[1, 2, 5, 8],
                                  **common)
    if arch in ("dpt", "beit"):
        patch = 16
        if image_size % patch:
            raise ValueError(f"{arch} needs image_size divisible by {patch}, got {image_size}")
        hidden, layers, heads = (48, 2, 2) if tiny else (192, 4, 3)
        if arch == "dpt":
            neck = [24, 48, 48, 48] if tiny else [48, 96, 192, 192]
            return tf.DPTConfig(image_size=image_size, patch_size=patch, num_channels=1, hidden_size=hidden,
                                num_hidden_layers=layers * 2, num_attention_heads=heads, intermediate_size=hidden * 2,
                                backbone_out_indices=[i * layers // 2 for i in range(4)] if not tiny else [0, 1, 2, 3],
                                neck_hidden_sizes=neck, fusion_hidden_size=32 if tiny else 64,
                                reassemble_factors=[4, 2, 1, 0.5], head_in_index=-1, **common)
        return tf.BeitConfig(image_size=image_size, patch_size=patch, num_channels=1, hidden_size=hidden,
                             num_hidden_layers=layers * 2, num_attention_heads=heads, intermediate_size=hidden * 2,
                             out_indices=[2, 4, 6, 8] if not tiny else [1, 2, 3, 4], use_relative_position_bias=True,
                             pool_scales=[1, 2, 3, 6], use_auxiliary_head=False, **common)
    backbone = tf.ConvNextConfig(num_channels=1, hidden_sizes=[16, 32, 64, 128] if tiny else [32, 64, 128, 256],
                                 depths=[1, 1, 1, 1] if tiny else [1, 1, 2, 1],
                                 out_features=["stage1", "stage2", "stage3", "stage4"])
    return tf.UperNetConfig(backbone_config=backbone, hidden_size=32 if tiny else 128, use_auxiliary_head=False,
                            pool_scales=[1, 2, 3, 6], **common)


class Seg2DNet(nn.Module):
    """An HF semantic-segmentation model that maps a grayscale batch to per-class logits at input size.

    Args:
        hf_model: a ``*ForSemanticSegmentation`` model.
        spec: its ``Seg2DModelSpec`` (channels, normalisation).
    """

    def __init__(self, hf_model: nn.Module, spec: Seg2DModelSpec):
        super().__init__()
        self.hf = hf_model
        self.spec = spec
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, -1, 1, 1), persistent=False)

    def prepare(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) in [0, 1] -> normalised (B, in_channels, H, W)."""
        if self.spec.in_channels == 3:
            image = image.expand(-1, 3, -1, -1)
        return (image - self.mean) / self.std

    def forward(self, image: torch.Tensor, output_attentions: bool = False) -> Any:
        """Logits (B, C, H, W) at the input size; with ``output_attentions`` also the HF attention tuple."""
        out = self.hf(pixel_values=self.prepare(image), output_attentions=output_attentions)
        logits = out.logits
        if logits.shape[-2:] != image.shape[-2:]:
            logits = F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
        if output_attentions:
            return logits, out.attentions
        return logits


def build_seg2d_model(arch: str, num_labels: int, image_size: int, model_name_or_path: str = "",
                      width: str = "small") -> Seg2DNet:
    """The one place seg2d models are made.

    Args:
        arch: ``segformer`` | ``dpt`` | ``beit`` | ``upernet``.
        num_labels: number of (independent, possibly overlapping) classes.
        image_size: square model input in pixels.
        model_name_or_path: hub id or local folder of a pretrained checkpoint (its head is re-initialised for
            ``num_labels``); empty for a random-init model of ``width``.
        width: ``tiny`` | ``small`` for random-init models.
    """
    config_cls, model_cls = _hf_classes(arch)
    if model_name_or_path:
        local = resolve_pretrained(model_name_or_path, what=f"{arch} segmentation checkpoint")
        config = config_cls.from_pretrained(local, num_labels=num_labels, attn_implementation="eager")
        hf_model = model_cls.from_pretrained(local, config=config, ignore_mismatched_sizes=True,
                                             local_files_only=True)
        in_channels = getattr(config, "num_channels", None) or config.backbone_config.num_channels
        mean, std = _checkpoint_normalisation(Path(local), in_channels)
        source = model_name_or_path
    else:
        config = small_config(arch, width, num_labels, image_size)
        hf_model = model_cls(config)
        in_channels, mean, std = 1, (0.0,), (1.0,)
        source = f"config:{arch}-{width}"
    spec = Seg2DModelSpec(arch=arch, num_labels=num_labels, image_size=image_size, in_channels=in_channels,
                          mean=tuple(mean), std=tuple(std), hf_config=hf_model.config.to_dict(), source=source)
    return Seg2DNet(hf_model, spec)


def _checkpoint_normalisation(folder: Path, in_channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std from the checkpoint's ``preprocessor_config.json``; ImageNet statistics otherwise."""
    pre = folder / "preprocessor_config.json"
    if pre.exists():
        d = json.loads(pre.read_text())
        if "image_mean" in d and "image_std" in d:
            return tuple(d["image_mean"]), tuple(d["image_std"])
    if in_channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (0.0,) * in_channels, (1.0,) * in_channels


def model_from_spec(spec: Seg2DModelSpec) -> Seg2DNet:
    """Rebuild the (untrained) network a checkpoint was saved from."""
    config_cls, model_cls = _hf_classes(spec.arch)
    hf_config = dict(spec.hf_config)
    hf_config.pop("model_type", None)
    config = config_cls.from_dict(hf_config)
    config._attn_implementation = "eager"
    return Seg2DNet(model_cls(config), spec)


class BCEDiceLoss(nn.Module):
    """Multi-label loss for overlapping organs: BCE on logits + soft Dice on sigmoid probabilities.

    Args (forward): logits (B, C, H, W); target (B, C, H, W) in {0, 1}.
    """

    def __init__(self, bce_weight: float = 0.5, dice_weight: float = 0.5):
        super().__init__()
        from monai.losses import DiceLoss  # here, not at the top: `import monai` costs ~4 s, and only training needs it

        self.bce_weight, self.dice_weight = bce_weight, dice_weight
        # Smoothing of 1 (not MONAI's 1e-5): a class absent from the whole batch must cost ~0 when the model
        # predicts near-0 probabilities, instead of a Dice of 0 that no finite logit can fix.
        self.dice = DiceLoss(sigmoid=True, smooth_nr=1.0, smooth_dr=1.0, batch=True)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        bce = F.binary_cross_entropy_with_logits(logits, target)
        return self.bce_weight * bce + self.dice_weight * self.dice(logits, target)


def save_hf_model(model: Seg2DNet, folder: Path, class_names: tuple[str, ...]) -> dict[str, str]:
    """The HF segmentation model inside ``model`` as ``save_pretrained`` writes it (``config.json`` with the class
    names as ``id2label``, ``model.safetensors``), so that ``AutoModelForSemanticSegmentation.from_pretrained(folder)``
    gives the same logits for the same ``pixel_values``. No image processor is written: the input is our own
    (:meth:`Seg2DNet.prepare` of a per-slice percentile-scaled slice), which the model card describes."""
    hf = model.hf
    hf.config.id2label = dict(enumerate(class_names))
    hf.config.label2id = {name: i for i, name in enumerate(class_names)}
    hf.save_pretrained(str(folder), safe_serialization=True)
    return {"config.json": f"{type(hf).__name__} config ({model.spec.source}), id2label {list(class_names)}",
            "model.safetensors": f"every weight ({sum(p.numel() for p in hf.parameters()) / 1e6:.2f} M parameters)"}
