"""textseg3d transforms: the side mirror flips image, label and the report's side together."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nbsupport.textseg3d import data as ts_data
from nbsupport.textseg3d.config import TrainConfig
from nbsupport.textseg3d.data import case_items
from nbsupport.textseg3d.demo_data import DEMO_SIZES, write_demo_dataset
from nbsupport.textseg3d.transforms import collate_cases, train_transforms

SMOKE = DEMO_SIZES["smoke"]


def test_side_mirror_flips_image_label_and_the_reports_side_together(tmp_path: Path) -> None:
    """side_mirror_prob=1: the crop is mirrored along W (patient left-right) and the report names the other side;
    the mirrored label lies where the mirrored image's anatomy of that side is. prob=0 leaves the case as it is."""
    root = write_demo_dataset(tmp_path / "d", **SMOKE)
    manifest = ts_data.build_manifest(root).manifest
    item = case_items(manifest[manifest.side == "left"].head(1), root)[0]
    roi = SMOKE["shape"]
    kept_t, mirrored_t = train_transforms(roi, side_mirror_prob=0.0), train_transforms(roi, side_mirror_prob=1.0)
    kept_t.set_random_state(0)
    mirrored_t.set_random_state(0)  # the same crop and intensity jitter, the mirror last
    kept, mirrored = collate_cases([kept_t(item)]), collate_cases([mirrored_t(item)])
    assert kept["prompt"] == [item["prompt"]] and item["prompt"].endswith("left side")
    assert mirrored["prompt"] == [item["prompt"].replace("left side", "right side")]
    # the crop is the whole (padded) volume here, so the mirrored pair is the kept pair flipped along W
    torch.testing.assert_close(mirrored["label"], kept["label"].flip(-1))
    torch.testing.assert_close(mirrored["image"], kept["image"].flip(-1))
    width = kept["label"].shape[-1]
    left_mass = kept["label"][..., width // 2:].sum() / kept["label"].sum()
    assert left_mass > 0.9 and mirrored["label"][..., : width // 2].sum() / mirrored["label"].sum() > 0.9
    with pytest.raises(ValueError, match="side_mirror_prob"):
        TrainConfig.from_params({"profile": "smoke", "side_mirror_prob": 1.5})
    with pytest.raises(ValueError, match="center_text"):
        TrainConfig.from_params({"profile": "demo", "text_readout": "tokens", "center_text": True})
    assert TrainConfig.from_params({"profile": "demo", "text_readout": "mean", "center_text": True}).center_text
