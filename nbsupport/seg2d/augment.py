"""The seed's training augmentations, rebuilt with MONAI transforms (no albumentations, no OpenCV GUI build).

The seed (JaeL17/Medical-Image-Segmentation, ``utils.py:128-133``) augments each training pair with albumentations
1.3.1 (``requirements.txt``), in this order, each with probability 0.5:

* ``HorizontalFlip``, ``VerticalFlip``;
* ``ShiftScaleRotate(scale_limit=0.12, rotate_limit=0.15, shift_limit=0.12)``: one isotropic scale in
  1 ± 0.12, a rotation in ± 0.15 *degrees* (albumentations' unit: the seed's rotation is negligible, and copied as
  it is), a shift of ± 12 % of the side per axis; bilinear for the image, nearest for the mask, reflected borders;
* ``RandomBrightnessContrast()`` (defaults 0.2 / 0.2, brightness by the maximum): ``image * a + b`` with
  ``a`` in 1 ± 0.2 and ``b`` in ± 0.2 of the full range, clipped to the range;
* ``CoarseDropout(max_holes=8, min_holes=5, max_height=H // 20, max_width=W // 20, fill_value=0,
  mask_fill_value=0)``: 5 to 8 holes of (H // 20) x (W // 20) pixels, zero in the image and in every mask.

Here the image is the [0, 1] model input (the seed's 8-bit image over 255), the masks our multi-label (3, S, S)
channels. MONAI draws ``RandAffine``'s scale per axis, so ShiftScaleRotate is a small random wrapper that draws the
seed's parameters and applies MONAI's ``Affined``; the rest are MONAI's own random transforms.
"""
from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from typing import Any

import torch
from monai.transforms import (Affined, Compose, EnsureTyped, Identityd, MapTransform, OneOf, RandCoarseDropoutd,
                              RandFlipd, RandomizableTransform, RandScaleIntensityd, RandShiftIntensityd,
                              ScaleIntensityRanged)

KEYS = ("image", "masks")
SHIFT_LIMIT = 0.12  # utils.py:130
SCALE_LIMIT = 0.12  # utils.py:130
ROTATE_LIMIT_DEGREES = 0.15  # utils.py:130 (albumentations' rotate_limit is in degrees)
BRIGHTNESS_LIMIT = CONTRAST_LIMIT = 0.2  # albumentations 1.3.1 RandomBrightnessContrast defaults (utils.py:131)
MIN_HOLES, MAX_HOLES, HOLE_FRACTION = 5, 8, 20  # utils.py:132: holes of size // 20
PROB = 0.5  # every transform of utils.py:129-132


class RandShiftScaleRotated(RandomizableTransform, MapTransform):
    """albumentations' ``ShiftScaleRotate`` on ``image`` (bilinear) and ``masks`` (nearest), through MONAI's
    ``Affined``: one scale for both axes, one shift per axis as a fraction of the side, a rotation in degrees."""

    def __init__(self, shift_limit: float, scale_limit: float, rotate_limit_degrees: float, prob: float):
        MapTransform.__init__(self, KEYS)
        RandomizableTransform.__init__(self, prob)
        self.shift_limit, self.scale_limit, self.rotate_limit = shift_limit, scale_limit, rotate_limit_degrees

    def randomize(self, data: Any = None) -> None:
        """Draw whether to transform and, as albumentations does, the rotation (radians), the scale and the shift
        (fractions of the side, rows then columns)."""
        super().randomize(None)
        self.angle = math.radians(self.R.uniform(-self.rotate_limit, self.rotate_limit))
        self.scale = self.R.uniform(1 - self.scale_limit, 1 + self.scale_limit)
        self.shift = (self.R.uniform(-self.shift_limit, self.shift_limit),
                      self.R.uniform(-self.shift_limit, self.shift_limit))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        self.randomize()
        if not self._do_transform:
            return dict(data)
        rows, cols = data["image"].shape[-2:]
        # MONAI's affine maps output to input coordinates: 1 / scale enlarges by scale, -shift moves by +shift.
        affine = Affined(KEYS, rotate_params=self.angle, scale_params=(1 / self.scale, 1 / self.scale),
                         translate_params=(-self.shift[0] * rows, -self.shift[1] * cols),
                         mode=("bilinear", "nearest"), padding_mode="reflection")
        return affine(data)


def seed_augmentation(image_size: int) -> Compose:
    """The seed's augmentation chain for ``{"image": (1, S, S) in [0, 1], "masks": (C, S, S) in {0, 1}}`` tensors;
    returns plain tensors. Seed it per item with ``set_random_state`` (MONAI's default is the OS's entropy)."""
    hole = max(1, image_size // HOLE_FRACTION)
    brightness_contrast = Compose([
        RandScaleIntensityd("image", factors=CONTRAST_LIMIT, prob=1.0),  # image * (1 + U(-0.2, 0.2))
        RandShiftIntensityd("image", offsets=BRIGHTNESS_LIMIT, prob=1.0),  # + U(-0.2, 0.2) of the range
        ScaleIntensityRanged("image", a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=True),  # clipped to it
    ])
    return Compose([
        RandFlipd(KEYS, prob=PROB, spatial_axis=1),  # HorizontalFlip: along the columns
        RandFlipd(KEYS, prob=PROB, spatial_axis=0),  # VerticalFlip: along the rows
        RandShiftScaleRotated(SHIFT_LIMIT, SCALE_LIMIT, ROTATE_LIMIT_DEGREES, prob=PROB),
        OneOf([brightness_contrast, Identityd("image")], weights=[PROB, 1 - PROB]),  # one draw for both, as the seed
        RandCoarseDropoutd(KEYS, holes=MIN_HOLES, max_holes=MAX_HOLES, spatial_size=hole, fill_value=0.0,
                           prob=PROB),
        EnsureTyped(KEYS, data_type="tensor", dtype=torch.float32, track_meta=False),
    ])
