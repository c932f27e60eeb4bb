"""Preprocessing on volumes with known content and anisotropic spacing: shape, spacing, HU window, orientation,
agreement with the straightforward scipy reference, the many-volume runner (skip, redo, failures) and its command
line."""
from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from nbsupport.ct_clip import data as ct_data
from nbsupport.ct_clip import demo_data
from nbsupport.ct_clip import preprocessing as ct_pre

SPEC = ct_pre.PreprocessSpec(spacing=(2.0, 2.0, 4.0), shape=(40, 36, 32))


def _write_nifti(path, stored: np.ndarray, spacing, lps: bool = False) -> None:
    affine = np.diag([*spacing, 1.0])
    if lps:
        affine[0, 0], affine[1, 1] = -spacing[0], -spacing[1]
    path.write_bytes(gzip.compress(nib.Nifti1Image(stored, affine).to_bytes(), 1))


def _phantom(lps: bool = False) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Air (-1000 HU) with a 250 HU box of 24 x 22 x 40 mm and a 3000 HU marker towards the patient's right,
    stored as HU + 1024 (intercept -1024) on a 0.8 x 1.1 x 5 mm grid."""
    spacing = (0.8, 1.1, 5.0)
    hu = np.full((90, 70, 24), -1000.0, dtype=np.float32)
    hu[30:60, 20:40, 8:16] = 250.0  # 30 x 0.8 = 24 mm, 20 x 1.1 = 22 mm, 8 x 5 = 40 mm
    hu[80:86, 30:36, 18:22] = 3000.0  # RAS: high x index = patient's right (above the box)
    stored = (hu + 1024).astype(np.int16)
    if lps:
        stored = stored[::-1, ::-1].copy()
    return stored, spacing


@pytest.mark.parametrize("lps", [False, True], ids=["ras", "lps"])
def test_shape_spacing_window_and_orientation_of_a_known_phantom(tmp_path, lps):
    stored, spacing = _phantom(lps)
    _write_nifti(tmp_path / "ct.nii.gz", stored, spacing, lps)
    ct = ct_pre.load_ct(tmp_path / "ct.nii.gz", slope=1.0, intercept=-1024.0)
    image, out_spacing = ct_pre.preprocess_volume(ct, SPEC)
    assert image.shape == (1, 40, 36, 32) and image.dtype == np.float16
    assert out_spacing == pytest.approx((2.0, 2.0, 4.0), rel=0.03)
    vol = image[0].astype(np.float32)
    assert vol.min() == 0.0 and vol.max() == 1.0  # air -> 0, 3000 HU clipped to 1
    box = vol > 0.25
    assert np.median(vol[box & (vol < 0.9)]) == pytest.approx((250 + 1000) / 2500, abs=1e-3)
    centre = np.round(np.argwhere(np.abs(vol - 0.5) < 2e-3).mean(axis=0)).astype(int)
    # Lines through the box centre: voxels above half the box contrast span the box's length in mm / spacing.
    extent = [(vol[:, centre[1], centre[2]] > 0.25).sum(), (vol[centre[0], :, centre[2]] > 0.25).sum(),
              (vol[centre[0], centre[1], :] > 0.25).sum()]
    assert extent[0] == pytest.approx(24 / 2.0, abs=1.5)
    assert extent[1] == pytest.approx(22 / 2.0, abs=1.5)
    assert extent[2] == pytest.approx(40 / 4.0, abs=1.5)
    marker_x = np.argwhere(vol > 0.99)[:, 0].mean()
    box_x = np.argwhere(box & (vol < 0.9))[:, 0].mean()
    assert marker_x > box_x  # the marker stays on the patient's right whatever order the file stores


def test_metadata_spacing_overrides_the_header(tmp_path):
    stored, spacing = _phantom()
    _write_nifti(tmp_path / "ct.nii.gz", stored, (1.0, 1.0, 1.0))  # a wrong header, as some CT-RATE files
    ct = ct_pre.load_ct(tmp_path / "ct.nii.gz", 1.0, -1024.0, xy_spacing=(spacing[1], spacing[0]),
                        z_spacing=spacing[2])
    assert ct.spacing == spacing
    _, out_spacing = ct_pre.preprocess_volume(ct, SPEC)
    assert out_spacing == pytest.approx((2.0, 2.0, 4.0), rel=0.03)


@pytest.mark.parametrize("lps", [False, True], ids=["ras", "lps"])
def test_fast_path_equals_the_scipy_reference(lps):
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 3000, size=(70, 64, 30)).astype(np.int16)
    ct = ct_pre.CTVolume(np.asfortranarray(stored), 1.0, -1024.0, (0.7, 0.9, 3.0), (0, 1, 2), (lps, lps, False))
    spec = ct_pre.PreprocessSpec(spacing=(1.25, 1.25, 2.0), shape=(32, 60, 40))  # crops x, pads y and z
    fast, _ = ct_pre.preprocess_volume(ct, spec)
    reference = ct_pre.reference_preprocess(ct, spec)
    assert np.abs(fast.astype(np.float32) - reference.astype(np.float32)).max() <= 1e-3


def test_transposed_storage_is_reoriented():
    """A volume stored (A, R, S) instead of (R, A, S) comes out in RAS order."""
    stored, spacing = _phantom()
    ras = ct_pre.CTVolume(stored, 1.0, -1024.0, spacing, (0, 1, 2), (False, False, False))
    swapped = ct_pre.CTVolume(stored.transpose(1, 0, 2).copy(), 1.0, -1024.0, (spacing[1], spacing[0], spacing[2]),
                              (1, 0, 2), (False, False, False))
    a, _ = ct_pre.preprocess_volume(ras, SPEC)
    b, _ = ct_pre.preprocess_volume(swapped, SPEC)
    np.testing.assert_array_equal(a, b)


def test_runner_skips_done_volumes_redoes_on_request_and_reports_failures(tmp_path):
    stored, spacing = _phantom()
    _write_nifti(tmp_path / "good.nii.gz", stored, spacing)
    (tmp_path / "bad.nii.gz").write_bytes(b"not a nifti")
    jobs = [ct_pre.VolumeJob("good", str(tmp_path / "good.nii.gz"), str(tmp_path / "out" / "good.npz"), 1.0, -1024.0),
            ct_pre.VolumeJob("bad", str(tmp_path / "bad.nii.gz"), str(tmp_path / "out" / "bad.npz"))]
    status = ct_pre.run_jobs(jobs, SPEC).set_index("volume")
    assert status.loc["good", "status"] == "done" and status.loc["bad", "status"] == "failed"
    assert "bad.nii.gz" in status.loc["bad", "reason"] or "nifti" in status.loc["bad", "reason"].lower()
    with np.load(tmp_path / "out" / "good.npz") as npz:
        assert npz["image"].shape == (1, 40, 36, 32)
    again = ct_pre.run_jobs(jobs, SPEC).set_index("volume")
    assert again.loc["good", "status"] == "skipped"
    assert again.loc["good", "spacing_x"] == pytest.approx(status.loc["good", "spacing_x"])
    assert ct_pre.run_jobs(jobs, SPEC, redo=True).set_index("volume").loc["good", "status"] == "done"


def test_real_ct_slice_from_pydicom_keeps_hounsfield_units():
    from nbsupport.ct_clip.data import dicom_to_ct, packaged_real_ct

    ct = dicom_to_ct(packaged_real_ct())
    hu = ct.stored.astype(np.float32) * ct.slope + ct.intercept
    assert ct.stored.shape[:2] == (128, 128) and ct.spacing[0] == pytest.approx(0.661468, abs=1e-4)
    assert hu.min() < -800 and hu.max() > 1000  # air around the patient and dense bone: real HU
    image, spacing = ct_pre.preprocess_volume(ct, ct_pre.PreprocessSpec(spacing=(1.25, 1.25, 2.0), shape=(96, 96, 8)))
    assert image.shape == (1, 96, 96, 8) and 0.0 <= image.min() and image.max() <= 1.0
    assert image.max() > 0.8  # bone above ~1000 HU survives the -1000..1500 window


def test_cluster_command_line_writes_the_manifest_and_skips_done_volumes(tmp_path, capsys):
    root = demo_data.write_demo_dataset(tmp_path / "data", n_train_patients=4, n_valid_patients=2, scale=0.2)
    manifest = tmp_path / "ct.csv"
    argv = ["--data-root", str(root), "--manifest", str(manifest), "--workers", "1", "--spacing", "5", "5", "8",
            "--shape", "64", "64", "48", "--val-fraction", "0.25", "--status-csv", str(tmp_path / "status.csv")]
    assert ct_pre.main(argv) == 0
    frame = pd.read_csv(manifest)
    assert len(frame) == 6 and set(frame.split) == {"train", "val", "test"}
    assert list(frame.columns[:3]) == ["volume", "patient", "image"]
    assert frame.spacing_x.between(4.8, 5.2).all() and frame.spacing_z.between(7.6, 8.4).all()
    assert (pd.read_csv(tmp_path / "status.csv").status == "done").all()
    assert ct_pre.main(argv) == 0
    assert (pd.read_csv(tmp_path / "status.csv").status == "skipped").all()
    image = ct_data.read_preprocessed(root / frame.image[0])
    assert image.shape == (1, 64, 64, 48)
