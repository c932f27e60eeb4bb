"""``nbsupport predict ct_clip``: a trained smoke run embeds CT files that are in no manifest, in another folder (a
NIfTI, a DICOM series), with the run's own preprocessing, scores the 18 labels zero-shot, names a broken file
without stopping the others, and overwrites nothing unless asked."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch

from nbsupport.cli import EXIT_FAILED, EXIT_USAGE, main
from nbsupport.ct_clip.data import LABELS, CTVolumeDataset, read_volume
from nbsupport.ct_clip.pipeline import load_trained_model

TESTS_DIR = Path(__file__).parents[1]
if str(TESTS_DIR) not in sys.path:  # the DICOM series writer of the shared DICOM tests (importlib mode)
    sys.path.insert(0, str(TESTS_DIR))
from test_dicom_series import hu_volume, write_series  # noqa: E402


def test_new_files_are_embedded_with_the_runs_preprocessing(smoke_run, tmp_path: Path, capsys) -> None:
    manifest = pd.read_csv(smoke_run.manifest)
    row = manifest[manifest.split == "test"].iloc[0]
    ct = read_volume(smoke_run.data_root, row.volume)
    source = nib.load(str(smoke_run.data_root / row.nifti))
    folder = tmp_path / "my_scans"
    folder.mkdir()
    hu = (ct.stored.astype(np.float32) * ct.slope + ct.intercept).astype(np.int16)  # HU written as stored values
    nib.save(nib.Nifti1Image(hu, source.affine), str(folder / "scan.nii.gz"))
    write_series(folder / "series1", hu_volume((6, 5, 7)))
    (folder / "broken.nii.gz").write_bytes(b"not a volume" * 20)
    nib.save(nib.Nifti1Image((hu + 1024).astype(np.int16), source.affine), str(folder / "raw.nii.gz"))  # not HU
    out = tmp_path / "predictions"
    argv = ["predict", "ct_clip", "--run", str(smoke_run.run_dir), "-i", str(folder), "-o", str(out),
            "--device", "cpu"]
    assert main(argv) == EXIT_FAILED  # the broken file
    printed = capsys.readouterr().out
    assert f"FAILED {folder / 'broken.nii.gz'}" in printed and "wrote 6 file(s)" in printed
    assert f"FAILED {folder / 'raw.nii.gz'}" in printed and "air lies at" in printed  # raw values: refused
    assert sorted(p.name for p in out.iterdir()) == ["features.csv", "scan.npy", "scan_zero_shot.json",
                                                     "series1.npy", "series1_zero_shot.json", "zero_shot.csv"]
    # the training data's own view of the same volume: its preprocessed npz, resized, encoded
    model = load_trained_model(smoke_run.train.checkpoint)
    dataset = CTVolumeDataset(manifest[manifest.volume == row.volume], smoke_run.data_root, model.spec.input_size)
    with torch.no_grad():
        expected = model.encode_image(dataset[0]["image"][None])[0].numpy()
    embedding = np.load(out / "scan.npy")
    assert embedding.shape == expected.shape and float(embedding @ expected) > 0.999  # npz is float16
    scores = json.loads((out / "scan_zero_shot.json").read_text())["zero_shot"]
    assert list(scores) == list(LABELS) and all(0 <= p <= 1 for p in scores.values())
    table = pd.read_csv(out / "zero_shot.csv", index_col="input")
    assert list(table.index) == ["scan", "series1"] and np.allclose(table.loc["scan"].to_numpy(), list(scores.values()))
    features = pd.read_csv(out / "features.csv", index_col="input")
    assert np.allclose(features.loc["series1"].to_numpy(), np.load(out / "series1.npy"), atol=1e-6)

    assert main(argv) == EXIT_USAGE  # refuses to overwrite
    assert "already exist" in capsys.readouterr().err
