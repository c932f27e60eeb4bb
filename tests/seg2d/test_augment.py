"""seg2d's copy of the seed's augmentations (MONAI): image and masks move together, the seed's parameters, the
draws repeat from torch's seed."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nbsupport.seg2d.augment import RandShiftScaleRotated, seed_augmentation


def _square(size: int = 64, half: int = 8) -> dict[str, torch.Tensor]:
    image = torch.zeros(1, size, size)
    image[0, size // 2 - half:size // 2 + half, size // 2 - half:size // 2 + half] = 1.0
    masks = torch.cat([image, image, torch.zeros_like(image)])
    return {"image": image, "masks": masks}


def test_shift_scale_rotate_moves_image_and_masks_together_by_the_drawn_amounts():
    transform = RandShiftScaleRotated(shift_limit=0.12, scale_limit=0.12, rotate_limit_degrees=0.15, prob=1.0)
    for seed in range(6):
        transform.set_random_state(seed=seed)
        out = transform(_square())
        image, masks = np.asarray(out["image"][0]), np.asarray(out["masks"])
        assert set(np.unique(masks)) <= {0.0, 1.0} and not masks[2].any()
        assert (np.abs((image > 0.5) - masks[0]) > 0).mean() < 0.01  # same geometry: bilinear vs nearest
        # the square's area grows by scale^2 and its centre moves by the shift (albumentations' sense)
        assert masks[0].sum() == pytest.approx(256 * transform.scale ** 2, rel=0.15)
        rows, cols = np.nonzero(masks[0])
        assert rows.mean() - 31.5 == pytest.approx(transform.shift[0] * 64, abs=1.0)
        assert cols.mean() - 31.5 == pytest.approx(transform.shift[1] * 64, abs=1.0)
        assert abs(transform.angle) <= np.radians(0.15)
        assert 0.88 <= transform.scale <= 1.12 and max(map(abs, transform.shift)) <= 0.12


def test_chain_repeats_from_its_seed_and_keeps_ranges():
    chain = seed_augmentation(64)
    outs = []
    for seed in (1, 1, 2):
        chain.set_random_state(seed=seed)
        outs.append(chain(_square()))
    assert torch.equal(outs[0]["image"], outs[1]["image"]) and torch.equal(outs[0]["masks"], outs[1]["masks"])
    assert not torch.equal(outs[0]["image"], outs[2]["image"]) or not torch.equal(outs[0]["masks"], outs[2]["masks"])
    for out in outs:
        assert type(out["image"]) is torch.Tensor and out["image"].dtype == torch.float32
        assert out["image"].shape == (1, 64, 64) and out["masks"].shape == (3, 64, 64)
        assert 0.0 <= float(out["image"].min()) and float(out["image"].max()) <= 1.0
        assert set(out["masks"].unique().tolist()) <= {0.0, 1.0}


def test_coarse_dropout_holes_are_the_seeds_and_shared_by_image_and_masks():
    """On an all-ones slice nothing but the dropout makes zeros (flips and reflected borders keep ones, the
    brightness/contrast change keeps them >= 0.6): 5 to 8 holes of 64 // 20 = 3 pixels square, in half the draws."""
    chain = seed_augmentation(64)
    with_holes = 0
    for seed in range(60):
        chain.set_random_state(seed=seed)
        out = chain({"image": torch.ones(1, 64, 64), "masks": torch.ones(3, 64, 64)})
        holes = out["image"][0] == 0
        assert all(torch.equal(out["masks"][c] == 0, holes) for c in range(3))
        if holes.any():
            with_holes += 1
            assert 3 * 9 < int(holes.sum()) <= 8 * 9  # overlapping holes share pixels; at least two distinct
    assert 15 <= with_holes <= 45
