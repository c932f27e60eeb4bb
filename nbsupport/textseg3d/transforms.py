"""MONAI transform chains of LLMSeg (the public code's, minus ``Rotate90d``: volumes are already in one canonical
orientation here) and the collate that turns their output into training batches."""
from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CropForegroundd,
    MapTransform,
    Randomizable,
    Orientationd,
    RandCropByPosNegLabeld,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRanged,
    SpatialPadd,
)

from nbsupport.textseg3d.data import CANONICAL_AXCODES, ORIENTATION_LABELS, flip_side, read_volume

HU_WINDOW = (-1000.0, 1000.0)  # public code: ScaleIntensityRanged(-1000..1000 -> 0..1, clip)


class LoadCaseVolumed(MapTransform):
    """Read ``image``/``label`` paths of either layout (npz or NIfTI, or a DICOM series) into channel-first
    MetaTensors with their voxel->RAS affine, so that ``Orientationd`` can bring both to the canonical orientation;
    ``meta["original_affine"]`` keeps the affine as stored (outputs are written back with it)."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = True):
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            if not d[key]:
                continue
            array, affine = read_volume(d[key], "label" if key == "label" else "data")
            values = (array > 0).astype(np.float32) if key == "label" else array.astype(np.float32)
            d[key] = MetaTensor(torch.from_numpy(values)[None], affine=torch.from_numpy(affine),
                                meta={"filename_or_obj": str(d[key]), "original_affine": affine})
        return d


class RandMirrorSided(Randomizable, MapTransform):
    """With probability ``prob`` mirror ``keys`` along the patient's left-right axis (W, the last axis of the
    canonical IPL orientation) and swap "left"/"right" in the report: the pair stays consistent, and the same
    anatomy is seen with both sides treated, so a network cannot tell the side from the image of a training case
    (our addition, not in the public code; the mirrored heart is on the right, which does not name the side)."""

    def __init__(self, keys: KeysCollection, prompt_key: str = "prompt", prob: float = 0.5):
        MapTransform.__init__(self, keys, allow_missing_keys=True)
        self.prompt_key, self.prob = prompt_key, prob
        self._do = False

    def randomize(self, data: Any = None) -> None:
        self._do = self.R.random() < self.prob

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        if not self._do:
            return d
        for key in self.key_iterator(d):
            d[key] = torch.flip(torch.as_tensor(d[key]), dims=[-1])
        d[self.prompt_key] = flip_side(str(d[self.prompt_key]))
        return d


def _orientation(keys: Sequence[str]) -> Orientationd:
    return Orientationd(keys=list(keys), axcodes=CANONICAL_AXCODES, labels=ORIENTATION_LABELS)


def train_transforms(roi: Sequence[int], neg_ratio: float = 0.1, side_mirror_prob: float = 0.0) -> Compose:
    """Load -> orient -> HU window -> crop to the body -> pad to ``roi`` -> a positive/negative random crop of
    ``roi`` -> small intensity jitter (public code, p = 0.1 each) -> (``side_mirror_prob`` > 0) left-right mirror
    with the report's side swapped."""
    keys = ["image", "label"]
    mirror = [RandMirrorSided(keys, "prompt", side_mirror_prob)] if side_mirror_prob > 0 else []
    return Compose([
        LoadCaseVolumed(keys),
        _orientation(keys),
        ScaleIntensityRanged(keys="image", a_min=HU_WINDOW[0], a_max=HU_WINDOW[1], b_min=0.0, b_max=1.0, clip=True),
        CropForegroundd(keys=keys, source_key="image", allow_smaller=True),
        SpatialPadd(keys=keys, spatial_size=tuple(roi)),
        RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=tuple(roi), pos=1.0, neg=neg_ratio,
                               num_samples=1, image_key="image", image_threshold=0.0),
        RandScaleIntensityd(keys="image", factors=0.1, prob=0.1),
        RandShiftIntensityd(keys="image", offsets=0.1, prob=0.1),
        *mirror,
    ])


def eval_transforms(with_label: bool = True) -> Compose:
    """Whole volumes for sliding-window inference: load -> orient -> HU window (no crop, no padding)."""
    keys = ["image", "label"] if with_label else ["image"]
    return Compose([
        LoadCaseVolumed(keys),
        _orientation(keys),
        ScaleIntensityRanged(keys="image", a_min=HU_WINDOW[0], a_max=HU_WINDOW[1], b_min=0.0, b_max=1.0, clip=True),
    ])


def window_hu(volume: np.ndarray) -> np.ndarray:
    """HU -> 0..1 with the training window (for display and for arrays that bypass the transforms)."""
    lo, hi = HU_WINDOW
    return np.clip((np.asarray(volume, dtype=np.float32) - lo) / (hi - lo), 0.0, 1.0)


def collate_cases(items: Sequence[Any]) -> dict[str, Any]:
    """Flatten ``RandCropByPosNegLabeld``'s per-item lists and stack plain tensors; prompts stay a list of str."""
    flat: list[Mapping[str, Any]] = []
    for item in items:
        flat.extend(item if isinstance(item, list) else [item])
    batch: dict[str, Any] = {
        "image": torch.stack([torch.as_tensor(i["image"]).as_subclass(torch.Tensor) for i in flat]),
        "prompt": [str(i["prompt"]) for i in flat],
        "case": [str(i["case"]) for i in flat],
    }
    if all(i.get("label") is not None and not isinstance(i.get("label"), str) for i in flat):
        batch["label"] = torch.stack([torch.as_tensor(i["label"]).as_subclass(torch.Tensor) for i in flat])
    return batch
