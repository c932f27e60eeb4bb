"""Preprocessing on volumes with known content and anisotropic spacing: shape, spacing, HU window, orientation,
agreement with the seed's MONAI chain (CT-Data preprocess.py), the many-volume runner (skip, redo, failures)
and its command line."""
from __future__ import annotations

import gzip
import sys

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


def _affine(spacing, axes=(0, 1, 2), flips=(False, False, False), degrees=0.0) -> np.ndarray:
    """Stored axis a runs along world axis ``axes[a]`` (towards L/P/I where flipped), rotated about S by ``degrees``."""
    affine = np.eye(4)
    affine[:3, :3] = 0.0
    for a, (w, f, s) in enumerate(zip(axes, flips, spacing)):
        affine[w, a] = -s if f else s
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    affine[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ affine[:3, :3]
    affine[:3, 3] = [-31.0, 17.5, -80.0]
    return affine


def _write_header_scaled(path, stored: np.ndarray, affine: np.ndarray, slope: float, intercept: float,
                         endianness: str = "<") -> None:
    """A gzipped NIfTI whose header carries the HU rescale (scl_slope / scl_inter, bytes 112-119), as MONAI's
    LoadImaged applies it; nibabel itself would reset the scaling of int16 data it writes."""
    header = nib.Nifti1Header(endianness=endianness)
    header.set_data_dtype(stored.dtype)
    raw = bytearray(nib.Nifti1Image(stored, affine, header).to_bytes())
    raw[112:120] = np.array([slope, intercept], dtype=f"{endianness}f4").tobytes()
    path.write_bytes(gzip.compress(bytes(raw), 1))


def _random_ct(shape, seed: int) -> np.ndarray:
    """Stored values (HU + 1024, int16) of smooth anatomy plus noise, spanning and exceeding the -1000..1500 window."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    hu = 1800 * np.cos(3 * grids[0] + 1) * np.sin(2 * grids[1] + 0.5) + 600 * grids[2] + rng.normal(0, 150, shape)
    return np.clip(hu + 1024, -1000, 4000).astype(np.int16)


# (stored axes -> world axes, flips, rotation about S, voxel size): RAS, LPS as DICOM exports (the demo data's
# other half), transposed storage, an oblique (rotated) affine, and an axis within MONAI's 1e-3 mm of the target.
GEOMETRIES = {
    "ras": ((0, 1, 2), (False, False, False), 0.0, (0.9, 0.8, 3.0)),
    "lps": ((0, 1, 2), (True, True, False), 0.0, (0.9, 0.8, 3.0)),
    "transposed-lpi": ((1, 0, 2), (True, True, True), 0.0, (0.8, 0.9, 3.0)),
    "oblique-lps": ((0, 1, 2), (True, True, False), 7.0, (0.9, 0.8, 3.0)),
    "spacing-kept": ((0, 1, 2), (True, False, False), 0.0, (1.2504, 0.7, 2.5)),
}


@pytest.mark.parametrize("geometry", list(GEOMETRIES), ids=list(GEOMETRIES))
def test_fast_path_equals_the_seeds_monai_chain(tmp_path, geometry):
    """CT-Data's chain (MONAI LoadImaged -> Orientationd RAS -> Spacingd trilinear align_corners -> window ->
    pad / centre crop -> float16) on the same file, to 1e-3: the grid (size, exact target spacing, first voxel on
    the first voxel, border padding), orientation and window all have to agree. 64 x 64 x 40 voxels with a z
    size that rounds a half ((40 - 1) * 3 / 2 + 1 = 59.5 -> 60); the spec crops x and z and pads y."""
    axes, flips, degrees, spacing = GEOMETRIES[geometry]
    stored = _random_ct((64, 64, 40), seed=len(geometry))
    _write_header_scaled(tmp_path / "ct.nii.gz", stored, _affine(spacing, axes, flips, degrees), 1.0, -1024.0)
    spec = ct_pre.PreprocessSpec(spacing=(1.25, 1.25, 2.0), shape=(40, 48, 56))
    seed = ct_pre.monai_chain(spec)(tmp_path / "ct.nii.gz")
    ct = ct_pre.load_ct(tmp_path / "ct.nii.gz")  # the header's rescale, as LoadImaged
    assert (ct.slope, ct.intercept) == (1.0, -1024.0)
    ours, out_spacing = ct_pre.preprocess_volume(ct, spec)
    assert ours.shape == seed.shape == (1, 40, 48, 56) and ours.dtype == seed.dtype == np.float16
    assert 0.05 < (seed > 0).mean() and (seed == 1).any() and (seed == 0).any()  # window edges reached
    assert np.abs(ours.astype(np.float32) - seed.astype(np.float32)).max() <= 1e-3
    expected = [1.25, 1.25, 2.0] if geometry != "spacing-kept" else [1.2504, 1.25, 2.0]
    assert out_spacing == pytest.approx(expected)


def test_metadata_rescale_equals_the_chain_given_the_same_hu(tmp_path):
    """CT-RATE keeps the rescale in its metadata CSV: ours with the metadata values equals the seed's chain with
    that rescale applied after loading (the demo volumes are stored this way)."""
    stored = _random_ct((48, 52, 30), seed=7)
    path = tmp_path / "ct.nii.gz"
    path.write_bytes(gzip.compress(nib.Nifti1Image(stored, _affine((0.9, 0.8, 3.0), flips=(True, True, False)))
                                   .to_bytes(), 1))
    spec = ct_pre.PreprocessSpec(spacing=(1.25, 1.25, 2.0), shape=(32, 40, 48))
    seed = ct_pre.monai_chain(spec, rescale=(1.0, -1024.0))(path)
    ours, _ = ct_pre.preprocess_volume(ct_pre.load_ct(path, slope=1.0, intercept=-1024.0), spec)
    assert np.abs(ours.astype(np.float32) - seed.astype(np.float32)).max() <= 1e-3


@pytest.mark.parametrize("isal", ["installed", "absent"])
def test_volume_decodes_the_same_with_or_without_isal(tmp_path, monkeypatch, isal):
    """ISA-L inflates when importable, zlib otherwise; either way the stored voxels are the file's."""
    if isal == "absent":
        monkeypatch.setitem(sys.modules, "isal", None)  # `from isal import ...` now raises ImportError
    stored = _random_ct((30, 20, 10), seed=1)
    _write_header_scaled(tmp_path / "ct.nii.gz", stored, _affine((0.9, 0.8, 3.0)), 2.0, -1000.0, endianness=">")
    ct = ct_pre.load_ct(tmp_path / "ct.nii.gz")
    assert ct.stored.dtype == np.dtype(">i2")  # a view of the big-endian bytes as they are
    np.testing.assert_array_equal(ct.stored, stored)
    assert (ct.slope, ct.intercept) == (2.0, -1000.0)


def test_corrupt_gzip_is_reported_with_the_file_name(tmp_path):
    stored, spacing = _phantom()
    data = gzip.compress(nib.Nifti1Image(stored, np.diag([*spacing, 1.0])).to_bytes(), 1)
    path = tmp_path / "ct.nii.gz"
    path.write_bytes(data[:200] + bytes(b ^ 0xFF for b in data[200:260]) + data[260:])
    with pytest.raises(ValueError, match="ct.nii.gz: cannot decompress"):
        ct_pre.load_ct(path)
    path.write_bytes(data[:-8] + b"\0" * 8)  # intact deflate stream, wrong CRC
    with pytest.raises(ValueError, match="ct.nii.gz: cannot decompress"):
        ct_pre.load_ct(path)


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
    # other settings: another folder, every volume made again (never a 64x64x48 volume passed off as 32x32x24)
    other = argv[:argv.index("--shape")] + ["--shape", "32", "32", "24"] + argv[argv.index("--shape") + 4:]
    assert ct_pre.main(other) == 0
    assert (pd.read_csv(tmp_path / "status.csv").status == "done").all()
    second = pd.read_csv(manifest)
    assert second.image[0] != frame.image[0]
    assert ct_data.read_preprocessed(root / second.image[0]).shape == (1, 32, 32, 24)
