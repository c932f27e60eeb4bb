"""Merlin's image encoder: I3ResNet, an ImageNet ResNet-152 inflated to 3-D, 2048-d features (CT-Data's image tower).

CT-Data builds ``Merlin(ImageEmbedding=True)`` (``training/main.py:189``): Merlin's ``I3ResNet`` over
torchvision's ``resnet152`` with ``conv_class=True`` (StanfordMIMI/Merlin ``merlin/models/build.py:23-31``), whose
``ImageEmbedding`` output is the global average of the last stage, (B, 2048) (``merlin/models/i3res.py:92-96``).
The layers, as inflated by ``merlin/models/inflate.py`` and ``i3res.py``:

* input (B, 1, H, W, D) -> (B, 1, D, H, W), the channel repeated 3 times (``i3res.py:68-69``): depth is the
  inflated ("time") axis;
* stem: ``conv1`` 3x7x7, stride (1, 2, 2), padding (1, 3, 3), no bias (``inflate.py:12-38``); ``bn1``; ReLU;
  ``maxpool`` 3x3x3, stride 2, padding 1 (``i3res.py:39-41``, ``inflate.py:94-111``);
* ``layer1..4``: ResNet-152's 3, 8, 36, 3 bottlenecks (widths 64, 128, 256, 512, expansion 4); in each,
  ``conv1`` and ``conv3`` 1x1x1, ``conv2`` 3x3x3 with padding 1 and the block's stride on all three axes, and a
  ``downsample`` (1x1x1 conv with that stride, BatchNorm) where the shape changes (``i3res.py:129-197``);
* ``avgpool`` to 1x1x1; ``classifier`` (1692 phenotypes) and ``contrastive_head`` (512), 1x1x1 convolutions
  (``i3res.py:48-58``) that the image embedding does not use.

Merlin recomputes its stages in the backward pass (gradient checkpointing, ``i3res.py:79-88, 180-183``); so does
:class:`I3ResNet`, per bottleneck, while gradients flow (BatchNorm's running statistics then see a batch more than
once, as in Merlin). :func:`load_merlin_weights` reads
Merlin's published checkpoints as downloaded (``i3_resnet_clinical_longformer_best_clip_04-02-2024_23-21-36_epoch_99
.pt``: the whole CLIP model, image tensors under ``encode_image.i3_resnet.``; the five-year-prediction file: the
I3ResNet alone, ``merlin/models/load.py:11-25, 84-87``).
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nbsupport.weights import Log, WeightsMismatchError, load_into, read_state_dict

RESNET152_BLOCKS = (3, 8, 36, 3)  # torchvision resnet152 (Bottleneck, [3, 8, 36, 3])
MERLIN_CLASSES = 1692  # build.py:26
MERLIN_CONTRASTIVE_DIM = 512  # i3res.py:56-58
MERLIN_DOWNLOAD = ("hf download stanfordmimi/Merlin i3_resnet_clinical_longformer_best_clip_04-02-2024_23-21-36_epoch_99"
                   ".pt --local-dir weights/merlin")  # the Hub repo and file load.py:11-15 fetch
MERLIN_PREFIX = "encode_image.i3_resnet."  # MerlinArchitecture.encode_image (build.py:81) -> ImageEncoder.i3_resnet
# The rest of Merlin's CLIP checkpoint: its Clinical-Longformer text tower and the logit scale (build.py:86-87).
NOT_IMAGE_ENCODER = ("encode_text.", "logit_scale")
EXPANSION = 4


class Bottleneck3d(nn.Module):
    """ResNet bottleneck inflated to 3-D (1x1x1 -> 3x3x3 with the stride -> 1x1x1, residual)."""

    def __init__(self, c_in: int, width: int, stride: int):
        super().__init__()
        c_out = width * EXPANSION
        self.conv1 = nn.Conv3d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(width)
        self.conv2 = nn.Conv3d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm3d(width)
        self.conv3 = nn.Conv3d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(c_out)
        self.downsample = None if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv3d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm3d(c_out))
        self.checkpointing = True

    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        return self.bn3(self.conv3(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        if self.checkpointing and x.requires_grad and torch.is_grad_enabled():
            out = checkpoint(self._branch, x, use_reentrant=False)
        else:
            out = self._branch(x)
        return F.relu(out + residual, inplace=True)


class I3ResNet(nn.Module):
    """Merlin's I3ResNet, (B, 1, X, Y, Z) -> feature map (B, 2048, X/32, Y/32, Z/32) -> pooled (B, 2048).

    Args:
        width: channels of the stem and the first stage's bottleneck (64 for ResNet-152; smaller for tests).
        blocks: bottlenecks per stage (ResNet-152: 3, 8, 36, 3).
        num_classes, contrastive_dim: sizes of Merlin's two 1x1x1 heads (kept so that the tensor names and shapes
            are Merlin's; frozen, since the image embedding never runs them).
    """

    def __init__(self, width: int = 64, blocks: Sequence[int] = RESNET152_BLOCKS, num_classes: int = MERLIN_CLASSES,
                 contrastive_dim: int = MERLIN_CONTRASTIVE_DIM):
        super().__init__()
        if len(blocks) != 4:
            raise ValueError(f"I3ResNet has four stages; got image_blocks {tuple(blocks)}")
        self.conv1 = nn.Conv3d(3, width, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False)
        self.bn1 = nn.BatchNorm3d(width)
        self.maxpool = nn.MaxPool3d(3, stride=2, padding=1)
        c_in = width
        for i, n in enumerate(blocks):
            stage_width = width * 2 ** i
            stage = nn.Sequential(*[Bottleneck3d(c_in if b == 0 else stage_width * EXPANSION, stage_width,
                                                 2 if b == 0 and i > 0 else 1) for b in range(n)])
            setattr(self, f"layer{i + 1}", stage)
            c_in = stage_width * EXPANSION
        self.out_dim = c_in
        self.classifier = nn.Conv3d(c_in, num_classes, 1)
        self.contrastive_head = nn.Conv3d(c_in, contrastive_dim, 1)
        for head in (self.classifier, self.contrastive_head):
            head.requires_grad_(False)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Last-stage features, back in the input's (X, Y, Z) axis order (for relevance maps)."""
        x = x.permute(0, 1, 4, 2, 3)  # (B, C, X, Y, Z) -> (B, C, Z, X, Y): depth first, as Merlin
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1, -1)
        x = self.maxpool(F.relu(self.bn1(self.conv1(x)), inplace=True))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
        return x.permute(0, 1, 3, 4, 2)

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """Merlin's image embedding: the global average of the last stage (``avgpool``), (B, 2048)."""
        return features.mean(dim=(2, 3, 4))


def merlin_image_state(state: dict[str, torch.Tensor], source: str | os.PathLike) -> tuple[dict[str, torch.Tensor],
                                                                                           list[str]]:
    """The I3ResNet tensors of a Merlin checkpoint by I3ResNet's names, and the names of the other towers' tensors.

    Accepts Merlin's CLIP checkpoint (``encode_image.i3_resnet.*``, the text tower ``encode_text.*`` and
    ``logit_scale``) and a bare I3ResNet state dict (the five-year-prediction file). Any other tensor is kept under
    its own name, so that the load reports it as unexpected.

    Raises:
        WeightsMismatchError: the file holds no I3ResNet tensors at all.
    """
    if any(k.startswith(MERLIN_PREFIX) for k in state):
        image = {k.removeprefix(MERLIN_PREFIX): v for k, v in state.items() if not k.startswith(NOT_IMAGE_ENCODER)}
    elif "conv1.weight" in state and any(k.startswith("layer1.") for k in state):
        image = {k: v for k, v in state.items() if not k.startswith(NOT_IMAGE_ENCODER)}
    else:
        raise WeightsMismatchError(f"{source}: no I3ResNet tensors (neither '{MERLIN_PREFIX}conv1.weight' nor "
                                   f"'conv1.weight'); found e.g. {sorted(state)[:5]}")
    return image, sorted(k for k in state if k.startswith(NOT_IMAGE_ENCODER))


def load_merlin_weights(encoder: I3ResNet, path: str | os.PathLike, log: Log | None = print) -> None:
    """Load Merlin's published image weights into ``encoder``, every I3ResNet tensor by name and shape (one report
    line); the other towers' tensors of a CLIP checkpoint are counted in a second line. The phenotype head takes the
    checkpoint's class count (1692 in the CLIP checkpoint, 6 in the five-year one): the embedding never runs it."""
    tensors, other_towers = merlin_image_state(read_state_dict(path), path)
    classes = tensors.get("classifier.weight")
    if classes is not None and classes.shape[0] != encoder.classifier.out_channels:
        encoder.classifier = nn.Conv3d(encoder.out_dim, classes.shape[0], 1).requires_grad_(False)
    load_into(encoder, tensors, path, log=log)
    if other_towers and log is not None:
        log(f"{path}: left out {len(other_towers)} tensors of Merlin's other parts (its text tower encode_text.*, "
            "logit_scale): not part of the image encoder")
