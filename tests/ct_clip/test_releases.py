"""CT-RATE's two releases: the same volume stored as the first release (raw values, identity affine, HU, spacing and
orientation in the metadata CSV) and as the ``*_fixed`` re-release (HU, real spacing and affine in the header) gives
the same HU and the same preprocessed volume; a volume whose values contradict its folder is refused naming it;
``data_root`` may be the repository root or its ``dataset/`` folder; with both trees present ``*_fixed`` is read."""
from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from nbsupport.ct_clip import data as ct_data
from nbsupport.ct_clip import demo_data
from nbsupport.ct_clip import preprocessing as ct_pre
from nbsupport.manifest import ManifestError

SPEC = ct_pre.PreprocessSpec(spacing=(6.0, 6.0, 8.0), shape=(24, 24, 16))
SIZE = {"n_train_patients": 3, "n_valid_patients": 1, "scale": 0.2}


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same demo volumes written in each release's layout."""
    base = tmp_path_factory.mktemp("ct_rate_releases")
    return {release: demo_data.write_demo_dataset(base / release, **SIZE, release=release)
            for release in ct_data.RELEASES}


def _ras_hu(ct: ct_pre.CTVolume) -> np.ndarray:
    """HU in R,A,S index order."""
    hu = ct.stored.astype(np.float32) * ct.slope + ct.intercept
    ornt = np.array([[a, -1 if f else 1] for a, f in zip(ct.ras_axis, ct.flipped)], dtype=float)
    return nib.orientations.apply_orientation(hu, ornt)


def test_the_releases_store_what_ct_rate_stores(releases):
    fixed = nib.load(str(releases["fixed"] / ct_data.volume_relative_path("train_2_a_1", "fixed")))
    first = nib.load(str(releases["first"] / ct_data.volume_relative_path("train_2_a_1", "first")))
    assert fixed.get_data_dtype() == np.int16 and fixed.dataobj.slope == 1.0 and fixed.dataobj.inter == 0.0
    assert nib.aff2axcodes(fixed.affine) == ("L", "P", "S")  # train_2 is stored as most of CT-RATE
    assert first.get_data_dtype() == np.float32 and np.array_equal(first.affine, np.eye(4))
    meta = pd.read_csv(releases["first"] / ct_data.METADATA_FILES["train"]).set_index("VolumeName")
    row = meta.loc["train_2_a_1.nii.gz"]
    assert row.ImageOrientationPatient == "[1, 0, 0, 0, 1, 0]" and row.RescaleIntercept in (-1024, -1000)
    # the stored values differ by exactly the intercept
    np.testing.assert_array_equal(np.asarray(fixed.dataobj, dtype=np.float32),
                                  np.asarray(first.dataobj, dtype=np.float32) + row.RescaleIntercept)


def test_01_preprocess_gives_the_same_hu_whichever_release_holds_the_volume(releases, tmp_path):
    """Acceptance: the same volume stored in either convention decodes to the same HU, spacing and orientation,
    and the preprocessing 01_preprocess runs (:func:`preprocess_dataset`) writes the same volume (float16)."""
    manifests = {}
    for release, root in releases.items():
        manifest, status = ct_pre.preprocess_dataset(root, tmp_path / f"{release}.csv", spec=SPEC)
        assert (status.status == "done").all(), status.reason.tolist()
        manifests[release] = manifest.set_index("volume")
    fixed, first = manifests["fixed"], manifests["first"]
    assert list(fixed.index) == list(first.index) and len(fixed) == 4
    assert first.nifti.str.startswith(("train/", "valid/")).all() and fixed.nifti.str.contains("_fixed/").all()
    for volume in fixed.index:
        ct_fixed, ct_first = (ct_data.read_volume(releases[r], volume) for r in ct_data.RELEASES)
        assert ct_first.spacing == pytest.approx(ct_fixed.spacing, rel=1e-6)
        np.testing.assert_array_equal(_ras_hu(ct_first), _ras_hu(ct_fixed))
        assert _ras_hu(ct_fixed).min() < -1000 < _ras_hu(ct_fixed).max()
        a = ct_data.read_preprocessed(releases["fixed"] / fixed.at[volume, "image"]).astype(np.float32)
        b = ct_data.read_preprocessed(releases["first"] / first.at[volume, "image"]).astype(np.float32)
        assert np.abs(a - b).max() <= 1e-3  # one float16 step at most (the int16 and float32 paths round apart)
        for axis in ("spacing_x", "spacing_y", "spacing_z"):
            assert first.at[volume, axis] == pytest.approx(fixed.at[volume, axis], rel=1e-6)


def _copy_dataset(source: Path, target: Path) -> None:
    """A copy of a demo dataset without the volumes other tests preprocessed (which would be reused)."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(ct_data.PREPROCESSED_FOLDER))


def _misplaced(releases: dict[str, Path], tmp_path: Path, folder: str) -> tuple[Path, Path]:
    """(data root, file): a copy of the ``folder`` release whose train_2_a_1 holds the other release's file."""
    other = "first" if folder == "fixed" else "fixed"
    root = tmp_path / folder
    _copy_dataset(releases[folder], root)
    wrong = root / ct_data.volume_relative_path("train_2_a_1", folder)
    shutil.copyfile(releases[other] / ct_data.volume_relative_path("train_2_a_1", other), wrong)
    return root, wrong


def test_a_volume_whose_values_contradict_its_folder_is_refused_naming_it(releases, tmp_path):
    # raw values (first release) in a _fixed folder: air at about +24 HU (less the noise at the 1st percentile)
    root, wrong = _misplaced(releases, tmp_path, "fixed")
    with pytest.raises(ValueError, match=r"air lies at [-+]\d\d? HU with the header's scl_slope") as err:
        ct_data.read_volume(root, "train_2_a_1")
    assert str(wrong) in str(err.value)
    _, status = ct_pre.preprocess_dataset(root, tmp_path / "fixed.csv", spec=SPEC)
    failed = status.set_index("volume").loc["train_2_a_1"]
    assert failed.status == "failed" and str(wrong) in failed.reason and "air lies at" in failed.reason
    assert (status.status == "done").sum() == 3  # the others are read
    # HU (the re-release) in a first-release folder while the CSV says intercept -1024: air at about -2024 HU
    root, wrong = _misplaced(releases, tmp_path, "first")
    with pytest.raises(ValueError, match=r"air lies at -2\d\d\d HU with the metadata CSV's RescaleSlope") as err:
        ct_data.read_volume(root, "train_2_a_1")
    assert str(wrong) in str(err.value) and "the stored values themselves put it at -10" in str(err.value)


def test_air_level_leaves_out_the_padding_outside_the_field_of_view():
    """A real CT's corners outside the reconstruction circle hold one padding value far below air (-3024 HU here):
    it is left out, so a correctly scaled volume passes and the padding does not hide a double rescale."""
    rng = np.random.default_rng(0)
    hu = rng.normal(40.0, 20.0, size=(64, 64, 8)).astype(np.float32)
    hu[:, :20] = rng.normal(-1000.0, 20.0, size=(64, 20, 8))  # air in front of the patient
    x, y = np.meshgrid(np.arange(64) - 31.5, np.arange(64) - 31.5, indexing="ij")
    hu[(x ** 2 + y ** 2) > 32 ** 2] = -3024.0
    stored = np.round(hu + 1024).astype(np.int16)
    assert ct_pre.air_level(stored, 1.0, -1024.0) == pytest.approx(-1000, abs=60)
    ct = ct_pre.CTVolume(stored, 1.0, -1024.0, (1.0, 1.0, 1.0), (0, 1, 2), (False, False, False))
    assert ct_pre.check_air(ct, "ok.nii.gz", "test") == pytest.approx(-1000, abs=60)
    twice = ct_pre.CTVolume(stored, 1.0, -2048.0, (1.0, 1.0, 1.0), (0, 1, 2), (False, False, False))
    with pytest.raises(ValueError, match=r"twice.nii.gz: air lies at -20\d\d HU"):
        ct_pre.check_air(twice, "twice.nii.gz", "test")


def test_data_root_may_be_the_repository_root_or_its_dataset_folder(releases, tmp_path):
    repository = tmp_path / "CT-RATE"
    _copy_dataset(releases["fixed"], repository / "dataset")
    (repository / "README.md").write_text("the dataset card")
    from_root = ct_data.scan_dataset(repository)
    from_dataset = ct_data.scan_dataset(repository / "dataset")
    assert list(from_root.volume) == list(from_dataset.volume)
    assert (from_root.nifti == "dataset/" + from_dataset.nifti).all()
    manifest, status = ct_pre.preprocess_dataset(repository, tmp_path / "ct.csv", spec=SPEC)
    assert (status.status == "done").all() and len(manifest) == 4
    assert (repository / manifest.nifti.iloc[0]).is_file() and (repository / manifest.image.iloc[0]).is_file()
    assert ct_data.read_volume(repository, "valid_1_a_1").stored.dtype == np.int16


def test_with_both_trees_the_re_release_is_read_and_the_choice_printed(releases, tmp_path, capsys):
    both = tmp_path / "both"
    _copy_dataset(releases["fixed"], both)
    for split in ("train", "valid"):
        shutil.copytree(releases["first"] / split, both / split)
    volumes = ct_data.scan_dataset(both)
    assert set(volumes.release) == {"fixed"} and volumes.nifti.str.contains("_fixed/").all()
    printed = capsys.readouterr().out
    assert "both train/ (first release) and train_fixed/ (re-release)" in printed and "reading train_fixed/" in printed


def test_a_split_without_either_volume_folder_is_one_problem(releases, tmp_path):
    root = tmp_path / "no_valid"
    _copy_dataset(releases["fixed"], root)
    shutil.rmtree(root / "valid_fixed")
    with pytest.raises(ManifestError) as err:
        ct_data.scan_dataset(root)
    assert len(err.value.problems) == 1
    assert "no volume folder for valid: expected valid_fixed/ (re-release) or valid/ (first release)" in str(err.value)


def test_image_orientation_patient_gives_the_stored_axes_directions():
    # DICOM LPS row/column cosines -> RAS columns: the common axial [1,0,0,0,1,0] is L,P,S
    assert np.array_equal(ct_data.parse_orientation("[1, 0, 0, 0, 1, 0]"), np.diag([-1.0, -1.0, 1.0]))
    assert np.array_equal(ct_data.parse_orientation("[-1.0, 0.0, 0.0, 0.0, -1.0, 0.0]"), np.eye(3))
    coronal = np.array(ct_data.parse_orientation("['1', '0', '0', '0', '0', '-1']"))
    assert nib.orientations.aff2axcodes(np.pad(coronal, ((0, 1), (0, 1)))) == ("L", "I", "P")
    for bad in ("[1, 0, 0, 0, 1]", "[1, 0, 0, 1, 0, 0]", "", "[2, 0, 0, 0, 1, 0]"):
        with pytest.raises(ValueError):
            ct_data.parse_orientation(bad)


def test_a_users_nifti_is_read_as_hu_and_checked(tmp_path):
    hu = np.full((32, 32, 6), -1000, dtype=np.int16)
    hu[8:24, 8:24] = 40
    affine = np.diag([-0.8, -0.8, 2.5, 1.0])
    nib.save(nib.Nifti1Image(hu, affine), str(tmp_path / "hu.nii.gz"))
    ct = ct_data.read_ct(tmp_path / "hu.nii.gz")
    assert (ct.slope, ct.intercept) == (1.0, 0.0) and ct.spacing == pytest.approx((0.8, 0.8, 2.5))
    nib.save(nib.Nifti1Image((hu + 1024).astype(np.int16), affine), str(tmp_path / "raw.nii.gz"))
    with pytest.raises(ValueError, match=r"raw.nii.gz: air lies at \+24 HU with the header's"):
        ct_data.read_ct(tmp_path / "raw.nii.gz")
