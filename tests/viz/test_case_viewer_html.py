"""The offline case viewer's file: what it embeds decodes back to the input, size bounds hold, nothing remote."""
from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest

from nbsupport.viz.case_viewer_html import CT_WINDOWS, save_case_viewer_html


def page_data(path) -> dict:
    text = path.read_text(encoding="utf-8")
    match = re.search(r'<script id="case-data" type="application/json">(.*?)</script>', text, re.DOTALL)
    return json.loads(match.group(1).replace("<\\/", "</"))


def decode(b64: str, dtype) -> np.ndarray:
    return np.frombuffer(base64.b64decode(b64), dtype=np.dtype(dtype).newbyteorder("<"))


def test_ct_volume_round_trips_hounsfield_units_masks_and_attention(tmp_path):
    rng = np.random.default_rng(1)
    volume = rng.integers(-1000, 1500, size=(12, 20, 24)).astype(float)
    lesion = np.zeros(volume.shape, bool)
    lesion[5:8, 4:10, 6:12] = True
    organ = np.zeros(volume.shape, bool)
    organ[2:10, 10:18, 2:20] = True
    attention = rng.random((3, 5, 6))
    path = save_case_viewer_html([{"image": volume, "masks": {"lesion": lesion, "organ": organ}, "modality": "CT",
                                   "spacing": (3.0, 0.8, 0.7), "attention": attention, "text": "a report"}],
                                 tmp_path / "viewer.html", title="t")
    data = page_data(path)
    case = data["cases"][0]
    assert case["shape"] == [12, 20, 24] and case["spacing"] == [3.0, 0.8, 0.7] and case["volume"]
    assert case["dtype"] == "i16"
    np.testing.assert_array_equal(decode(case["pixels"], np.int16).reshape(volume.shape), volume.astype(np.int16))
    values = decode(case["mask_runs"], np.uint8)
    lengths = decode(case["mask_run_lengths"], np.uint32)
    bits = np.repeat(values, lengths).reshape(volume.shape)
    names = [m["name"] for m in data["masks"]]
    np.testing.assert_array_equal((bits >> names.index("lesion")) & 1, lesion)
    np.testing.assert_array_equal((bits >> names.index("organ")) & 1, organ)
    heat = decode(case["attention"]["data"], np.uint8).reshape(attention.shape)
    assert heat.min() == 0 and heat.max() == 255
    assert np.unravel_index(heat.argmax(), heat.shape) == np.unravel_index(attention.argmax(), attention.shape)
    assert case["default_slice"] == 5 or organ[case["default_slice"]].any()
    assert data["ct_windows"]["lung"] == list(CT_WINDOWS["lung"])
    assert case["text"] == "a report"


def test_size_bounds_downsample_in_plane_and_slices_with_spacing_rescaled(tmp_path):
    volume = np.random.default_rng(0).random((100, 256, 200))
    path = save_case_viewer_html(volume, tmp_path / "v.html", spacing=(1.0, 0.5, 0.5), modality="MR",
                                 max_side=128, max_slices=50)
    case = page_data(path)["cases"][0]
    assert case["shape"] == [50, 128, 100]
    assert case["spacing"] == pytest.approx([2.0, 1.0, 1.0])
    assert case["dtype"] == "u8"
    assert path.stat().st_size < 1.0e6


def test_page_has_no_remote_reference(tmp_path):
    path = save_case_viewer_html(np.zeros((8, 8)), tmp_path / "v.html", masks={"m": np.eye(8, dtype=bool)})
    text = path.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)
    assert "http://" not in text and "https://" not in text


def test_bad_input_names_the_case_and_what_was_expected(tmp_path):
    with pytest.raises(ValueError, match=r"case 1: spacing must be positive"):
        save_case_viewer_html([{"image": np.zeros((4, 4))}, {"image": np.zeros((4, 4)), "spacing": (0.0, 1.0)}],
                              tmp_path / "v.html")
    with pytest.raises(ValueError, match="at most 32 masks"):
        save_case_viewer_html(np.zeros((4, 4)), tmp_path / "v.html",
                              masks={f"m{i}": np.zeros((4, 4), bool) for i in range(33)})


def test_one_image_shown_with_many_heatmaps_is_stored_once(tmp_path):
    rng = np.random.default_rng(2)
    volume = rng.integers(-1000, 1500, size=(10, 16, 16)).astype(float)
    mask = np.zeros(volume.shape, bool)
    mask[3:6, 4:9, 4:9] = True
    cases = [{"image": volume, "masks": {"target": mask}, "modality": "CT", "attention": rng.random((2, 4, 4)),
              "title": f"token {t}"} for t in range(4)]
    cases.append({"image": volume + 1, "masks": {"target": mask}, "modality": "CT", "title": "another volume"})
    data = page_data(save_case_viewer_html(cases, tmp_path / "viewer.html"))
    stored = data["cases"]
    assert [c.get("pixels_from") for c in stored] == [None, 0, 0, 0, None]
    assert [c.get("masks_from") for c in stored] == [None, 0, 0, 0, 0]
    assert all(c["pixels"] == "" for c in stored[1:4]) and stored[4]["pixels"]
    np.testing.assert_array_equal(decode(stored[4]["pixels"], np.int16).reshape(volume.shape), volume + 1)
    # each case keeps its own heatmap
    assert len({c["attention"]["data"] for c in stored[:4]}) == 4


def test_an_rgb_photograph_is_stored_in_colour_and_refused_in_the_wrong_shape(tmp_path):
    photo = np.zeros((30, 40, 3), np.uint8)
    photo[..., 0], photo[5:10, 5:10, 1] = 180, 90
    polyp = np.zeros((30, 40), bool)
    polyp[5:10, 5:10] = True
    data = page_data(save_case_viewer_html([{"image": photo, "masks": {"polyp": polyp}, "modality": "RGB"}],
                                           tmp_path / "viewer.html"))
    (case,) = data["cases"]
    assert case["dtype"] == "rgb8" and case["shape"] == [1, 30, 40]
    np.testing.assert_array_equal(decode(case["pixels"], np.uint8).reshape(1, 30, 40, 3)[0], photo)
    with pytest.raises(ValueError, match=r"case 0: an RGB image must be \(H, W, 3\)"):
        save_case_viewer_html([{"image": photo[..., 0], "modality": "RGB"}], tmp_path / "bad.html")
