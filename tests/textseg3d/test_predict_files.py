"""``nbsupport predict textseg3d``: a trained smoke run segments volumes that are in no manifest, in another folder
(npz, NIfTI in another voxel order, a DICOM series) from a report string, with the run's own preprocessing; each
output carries its input's affine, a DICOM input also gets a DICOM-SEG of the same mask, a broken file is named
without stopping the others, and nothing is overwritten unless asked."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest

from nbsupport.cli import EXIT_FAILED, EXIT_USAGE, main
from nbsupport.dicom import read_dicom_series
from nbsupport.textseg3d import data as ts_data

TESTS_DIR = Path(__file__).parents[1]
if str(TESTS_DIR) not in sys.path:  # the DICOM series writer of the shared DICOM tests (importlib mode)
    sys.path.insert(0, str(TESTS_DIR))
from test_dicom_series import frames_as_mask, write_series  # noqa: E402


@pytest.fixture(scope="module")
def new_files(smoke_run, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """A folder outside the dataset holding one test case three ways, a broken file; the case and its report."""
    manifest = pd.read_csv(smoke_run.manifest)
    case = manifest[manifest.split == "test"].iloc[0]
    folder = tmp_path_factory.mktemp("my_scans")
    shutil.copy(smoke_run.data_root / case["image"], folder / "scan_npz.npz")  # data.npz under another name
    canonical = ts_data.load_case(smoke_run.data_root / case["image"])["image"]
    # NIfTI in RAS voxel order (the npz is IPL), so the output must be written back in this file's own order
    ras = nib.as_closest_canonical(nib.Nifti1Image(canonical, ts_data.npz_affine(case[["spacing_d", "spacing_h",
                                                                                       "spacing_w"]])))
    nib.save(ras, str(folder / "scan_ras.nii.gz"))
    # axial series: slice index towards the head, so the reversed canonical (inferior-first) volume
    write_series(folder / "series1", (np.round(canonical[::-1] / 2) * 2).astype(np.float32))
    (folder / "broken.nii.gz").write_bytes(b"not a volume" * 20)
    return folder, str(case["case"]), str(case["prompt"])


def test_new_files_are_segmented_with_the_runs_preprocessing(smoke_run, new_files, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    folder, case, prompt = new_files
    out = tmp_path / "masks"
    argv = ["predict", "textseg3d", "--run", str(smoke_run.run_dir), "-i", str(folder), "-o", str(out),
            "--report", prompt, "--device", "cpu"]
    assert main(argv) == EXIT_FAILED  # the broken file
    printed = capsys.readouterr().out
    assert f"FAILED {folder / 'broken.nii.gz'}" in printed and "wrote 4 file(s)" in printed
    assert sorted(p.name for p in out.iterdir()) == ["scan_npz.nii.gz", "scan_ras.nii.gz", "series1.nii.gz",
                                                     "series1_seg.dcm"]
    # 03_infer's prediction of the same case with the same report, in the canonical orientation
    expected = ts_data.load_case(smoke_run.run_dir / "predictions" / f"{case}.nii.gz")["image"]
    for name, source in (("scan_npz", folder / "scan_npz.npz"), ("scan_ras", folder / "scan_ras.nii.gz")):
        written = nib.load(str(out / f"{name}.nii.gz"))
        stored, affine = ts_data.read_volume(source)
        np.testing.assert_allclose(written.affine, affine, atol=1e-5)
        assert written.shape == stored.shape and written.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(ts_data.to_canonical(np.asarray(written.dataobj), written.affine), expected)

    series_mask = nib.load(str(out / "series1.nii.gz"))
    volume, affine = read_dicom_series(folder / "series1")
    np.testing.assert_allclose(series_mask.affine, affine, atol=1e-5)
    assert series_mask.shape == volume.shape
    seg = pydicom.dcmread(out / "series1_seg.dcm")
    slices = sorted(({"sop": pydicom.dcmread(f).SOPInstanceUID,
                      "position": np.array([float(v) for v in pydicom.dcmread(f).ImagePositionPatient])}
                     for f in (folder / "series1").iterdir()), key=lambda s: s["position"][2])
    assert seg.Modality == "SEG" and seg.SegmentSequence[0].SegmentLabel == "CTV"
    np.testing.assert_array_equal(frames_as_mask(seg, slices, volume.shape), np.asarray(series_mask.dataobj))


def test_a_second_call_refuses_to_overwrite_and_the_report_is_required(smoke_run, new_files, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    folder, _, prompt = new_files
    out = tmp_path / "masks"
    argv = ["predict", "textseg3d", "--run", str(smoke_run.run_dir), "-i", str(folder / "scan_npz.npz"), "-o",
            str(out), "--device", "cpu"]
    assert main(argv) == EXIT_USAGE
    assert "--report" in capsys.readouterr().err and not out.exists()
    assert main([*argv, "--report", prompt]) == 0
    first = (out / "scan_npz.nii.gz").stat().st_mtime_ns
    assert main([*argv, "--report", prompt]) == EXIT_USAGE
    assert "already exist" in capsys.readouterr().err
    assert (out / "scan_npz.nii.gz").stat().st_mtime_ns == first
    assert main([*argv, "--report", prompt, "--overwrite"]) == 0
