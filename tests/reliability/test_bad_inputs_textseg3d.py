"""Bad inputs for textseg3d (LLMSeg: breast CT case folders in npz or NIfTI + a report table), through the real
stage verbs: dataset cases through ``textseg3d.preprocess`` (01_preprocess), manifest cases through
``textseg3d.train`` (02_train, whose first act is reading the manifest), parameter cases through ``from_params``.
See catalogue.py for what each case must show.
"""
from __future__ import annotations

import gzip
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from nbsupport.manifest import meta_path
from nbsupport.runs import RunFolder
from nbsupport import textseg3d
from nbsupport.textseg3d import data as ts_data
from nbsupport.textseg3d.demo_data import write_demo_dataset

sys.path.insert(0, str(Path(__file__).parent))
from catalogue import (
    BadInput,
    Expect,
    assert_02_train_refuses,
    assert_parameters_refused,
    assert_refused,
    manifest_cell,
    manifest_duplicate,
    manifest_moved_from_its_data,
    parameter_cases,
    several,
)

SIZES = {"n_cases": 4, "shape": (4, 8, 8), "spacing": (8.0, 6.0, 6.0), "table": "csv"}  # BC001..BC004


# ---------------------------------------------------------------------------------------------- damage helpers
def file_bytes(case: str, name: str, change: Callable[[bytes], bytes], field: str,
               says: str) -> Callable[[Path], tuple[Expect, ...]]:
    def damage(root: Path) -> tuple[Expect, ...]:
        path = root / case / name
        path.write_bytes(change(path.read_bytes()))
        return (Expect(f"{case}/{name}", field, says),)
    return damage


def corrupt_middle(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes(b ^ 0x5A for b in data[middle:middle + 16]) + data[middle + 16:]


def corrupt_crc(data: bytes) -> bytes:
    """Voxel bytes changed after compression (a bad disk, a broken copy): the stream still inflates, only the gzip
    CRC-32 at its end disagrees; nibabel alone reads such a file without complaint."""
    raw = bytearray(gzip.decompress(data))
    raw[-5] ^= 0x01  # one voxel's low bit
    crc_of_the_original = data[-8:]
    return gzip.compress(bytes(raw))[:-8] + crc_of_the_original


def remove(case: str, name: str, field: str, says: str) -> Callable[[Path], tuple[Expect, ...]]:
    def damage(root: Path) -> tuple[Expect, ...]:
        (root / case / name).unlink()
        return (Expect(case, field, says),)
    return damage


def npz_case(case: str, *, image: Callable[[np.ndarray], np.ndarray] | None = None,
             label: Callable[[np.ndarray], np.ndarray] | None = None, spacing: tuple | None = None,
             field: str, says: str) -> Callable[[Path], tuple[Expect, ...]]:
    """Rewrite an npz case with a changed image, label or spacing array (a valid npz of the wrong content)."""
    def damage(root: Path) -> tuple[Expect, ...]:
        with np.load(root / case / "data.npz") as z:
            data, old_spacing = z["data"], z["spacing"]
        np.savez_compressed(root / case / "data.npz", data=image(data) if image else data,
                            spacing=np.asarray(spacing if spacing is not None else old_spacing, dtype=float))
        if label is not None:
            with np.load(root / case / "label.npz") as z:
                np.savez_compressed(root / case / "label.npz", label=label(z["label"]))
        return (Expect(f"{case}/", field, says),)
    return damage


def label_spacing(case: str, spacing: tuple[float, float, float]) -> Callable[[Path], tuple[Expect, ...]]:
    """A label.npz that carries its own spacing, another than its image's: drawn on another grid."""
    def damage(root: Path) -> tuple[Expect, ...]:
        with np.load(root / case / "label.npz") as z:
            np.savez_compressed(root / case / "label.npz", label=z["label"], spacing=np.asarray(spacing))
        return (Expect(f"{case}/label.npz", "label", r"label spacing \[8.0, 6.0, 3.0\] mm differs from the image's"),)
    return damage


def nifti_case(case: str, name: str, change: Callable[[nib.Nifti1Image], nib.Nifti1Image], field: str,
               says: str) -> Callable[[Path], tuple[Expect, ...]]:
    """Rewrite a NIfTI volume of a case (a valid file of the wrong content)."""
    def damage(root: Path) -> tuple[Expect, ...]:
        path = root / case / name
        image = nib.load(str(path))
        image = nib.Nifti1Image(np.asanyarray(image.dataobj), image.affine, image.header)
        nib.save(change(image), str(path))
        return (Expect(f"{case}/{name}", field, says),)
    return damage


def with_nan(image: nib.Nifti1Image) -> nib.Nifti1Image:
    data = np.asanyarray(image.dataobj).astype(np.float32)
    data[1, 2, 3] = np.nan
    data[0, 0, 0] = np.inf
    return nib.Nifti1Image(data, image.affine)


def shifted(image: nib.Nifti1Image) -> nib.Nifti1Image:
    affine = image.affine.copy()
    affine[:3, 3] += (0.0, 0.0, 16.0)  # the label two slices (16 mm) off: a silently misplaced target
    return nib.Nifti1Image(np.asanyarray(image.dataobj), affine)


def resampled(image: nib.Nifti1Image) -> nib.Nifti1Image:
    affine = image.affine.copy()
    affine[0, 0] *= 0.5  # same shape, other voxel size: a label drawn on another grid
    return nib.Nifti1Image(np.asanyarray(image.dataobj), affine)


def zero_pixdim(case: str) -> Callable[[Path], tuple[Expect, ...]]:
    """No qform/sform and a zero voxel size in the header's ``pixdim`` (a broken export; nibabel would not write it,
    and reads it as 1 mm)."""
    def damage(root: Path) -> tuple[Expect, ...]:
        path = root / case / "data.nii.gz"
        image = nib.load(str(path))
        header = nib.Nifti1Header()
        header.set_data_shape(image.shape)
        header.set_data_dtype(image.get_data_dtype())
        header.set_zooms((6.0, 7.0, 8.0))
        nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj), None, header), str(path))
        raw = bytearray(gzip.decompress(path.read_bytes()))
        raw[84:88] = np.float32(0.0).tobytes()  # pixdim[2] (pixdim at header offset 76, float32)
        path.write_bytes(gzip.compress(bytes(raw)))
        return (Expect(f"{case}/data.nii.gz", "spacing", r"spacing \[6.0, 0.0, 8.0\] mm .*expected three finite"),)
    return damage


def report_table(change: Callable[[pd.DataFrame], pd.DataFrame], line: int | None, field: str,
                 says: str) -> Callable[[Path], tuple[Expect, ...]]:
    def damage(root: Path) -> tuple[Expect, ...]:
        path = root / "demo_report.csv"
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
        change(table).to_csv(path, index=False, lineterminator="\n")
        return (Expect("demo_report.csv", field, says, line=line),)
    return damage


def empty_report(table: pd.DataFrame) -> pd.DataFrame:
    for column in ts_data.REPORT_COLUMNS:
        if column not in ("Number", "Unit No"):
            table.loc[1, column] = ""
    return table


def row_for_missing_case(table: pd.DataFrame) -> pd.DataFrame:
    extra = table.iloc[[0]].assign(**{"Unit No": "BC099", "Number": "99"})
    return pd.concat([table, extra], ignore_index=True)


def case_without_report(root: Path) -> tuple[Expect, ...]:
    shutil.copytree(root / "BC002", root / "XYZ9")
    return (Expect("demo_report.csv", "Unit No", "a report row for case 'XYZ9'"),)


NIFTI_CASES = [
    BadInput("textseg3d_nifti_corrupt", file_bytes("BC001", "data.nii.gz", corrupt_middle, "image",
                                                   "cannot read data.nii.gz .*expected a gzipped NIfTI-1")),
    BadInput("textseg3d_nifti_bytes_changed_crc", file_bytes("BC003", "data.nii.gz", corrupt_crc, "image",
                                                             "cannot read data.nii.gz .*CRC check failed")),
    BadInput("textseg3d_nifti_truncated", file_bytes("BC002", "data.nii.gz", lambda b: b[: len(b) // 2], "image",
                                                     "cannot read data.nii.gz")),
    BadInput("textseg3d_nifti_label_truncated", file_bytes("BC003", "label.nii.gz", lambda b: b[:40], "label",
                                                           "cannot read label.nii.gz")),
    BadInput("textseg3d_nifti_not_gzip", file_bytes("BC004", "data.nii.gz", lambda b: b"not a volume" * 9, "image",
                                                    "cannot read data.nii.gz")),
    BadInput("textseg3d_nan_inf_voxels", nifti_case("BC001", "data.nii.gz", with_nan, "image",
                                                    "2 NaN/inf voxels; expected finite values")),
    BadInput("textseg3d_affine_mismatch_origin", nifti_case("BC002", "label.nii.gz", shifted, "label",
                                                            "label affine differs from the image's")),
    BadInput("textseg3d_affine_mismatch_voxel_size", nifti_case("BC003", "label.nii.gz", resampled, "label",
                                                                "expected the same voxel grid")),
    BadInput("textseg3d_nifti_spacing_zero", zero_pixdim("BC004")),
    BadInput("textseg3d_nifti_missing_image", remove("BC001", "data.nii.gz", "image",
                                                     "has label.nii.gz but no data.nii.gz")),
]

NPZ_CASES = [
    BadInput("textseg3d_npz_corrupt", file_bytes("BC001", "data.npz", corrupt_middle, "image",
                                                 r"cannot read data.npz .*expected .npz")),
    BadInput("textseg3d_npz_truncated", file_bytes("BC002", "data.npz", lambda b: b[: len(b) // 2], "image",
                                                   "cannot read data.npz")),
    BadInput("textseg3d_npz_label_empty_file", file_bytes("BC003", "label.npz", lambda b: b"", "label",
                                                          "cannot read label.npz")),
    BadInput("textseg3d_missing_image", remove("BC002", "data.npz", "image", "has label.npz but no data.npz")),
    BadInput("textseg3d_missing_mask", remove("BC003", "label.npz", "label", "has no label.npz; expected the target")),
    BadInput("textseg3d_shape_mismatch", npz_case("BC004", label=lambda a: a[:, :-1], field="label",
                                                  says=r"label shape \(4, 7, 8\); expected the image shape")),
    BadInput("textseg3d_npz_label_spacing_mismatch", label_spacing("BC002", (8.0, 6.0, 3.0))),
    BadInput("textseg3d_nan_voxels_npz", npz_case("BC001", image=lambda a: np.where(a > 0, np.nan, a.astype(float)),
                                                  field="image", says="NaN/inf voxels")),
    BadInput("textseg3d_spacing_zero", npz_case("BC002", spacing=(8.0, 0.0, 6.0), field="spacing",
                                                says=r"expected three finite values > 0")),
    BadInput("textseg3d_spacing_negative", npz_case("BC003", spacing=(8.0, 6.0, -6.0), field="spacing",
                                                    says=r"spacing \[8.0, 6.0, -6.0\]; expected three finite")),
    BadInput("textseg3d_spacing_two_values", npz_case("BC004", spacing=(6.0, 6.0), field="spacing",
                                                      says=r"expected three finite values")),
    BadInput("textseg3d_duplicate_report_id", report_table(lambda t: pd.concat([t, t.iloc[[2]]], ignore_index=True),
                                                           6, "Unit No", "'BC003' appears more than once")),
    BadInput("textseg3d_empty_report", report_table(empty_report, 3, "Subsite 1", "empty report row")),
    BadInput("textseg3d_report_row_for_missing_case", report_table(row_for_missing_case, 6, "Unit No",
                                                                   "no case folder BC099/")),
    BadInput("textseg3d_case_without_report_row", case_without_report),
    BadInput("textseg3d_everything_at_once", several(
        file_bytes("BC001", "data.npz", lambda b: b[:100], "image", "cannot read"),
        npz_case("BC004", label=lambda a: a[:-1], field="label", says="label shape"),
        npz_case("BC002", spacing=(8.0, -1.0, 6.0), field="spacing", says="expected three finite values > 0"),
        report_table(row_for_missing_case, 6, "Unit No", "no case folder BC099/"))),
]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("textseg3d")
    return {layout: write_demo_dataset(folder / layout, layout=layout, **SIZES) for layout in ("npz", "nifti")}


def _preprocess_config(root: Path, manifest: Path, run_dir: Path) -> textseg3d.PreprocessConfig:
    return textseg3d.PreprocessConfig.from_params({"profile": "smoke", "data_root": str(root), "manifest": str(manifest),
                                                  "run_dir": str(run_dir), "n_examples": 1})


def test_the_undamaged_datasets_pass(datasets: dict[str, Path], tmp_path: Path) -> None:
    """The control: every failure below is the damage's doing (both layouts)."""
    for layout, root in datasets.items():
        cfg = _preprocess_config(root, tmp_path / layout / "m.csv", tmp_path / layout / "run" / "textseg3d")
        result = textseg3d.preprocess(cfg, RunFolder.for_stage(cfg))
        assert len(result.manifest) == 4 and set(result.manifest.layout) == {layout}


@pytest.mark.parametrize("case", NPZ_CASES + NIFTI_CASES, ids=lambda c: c.id)
def test_bad_dataset_is_refused_by_01_preprocess(case: BadInput, datasets: dict[str, Path], tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(datasets["nifti" if case in NIFTI_CASES else "npz"], root)
    expect = case.damage(root)
    manifest, run_dir = tmp_path / "manifests" / "textseg3d.csv", tmp_path / "runs" / "r" / "textseg3d"
    cfg = _preprocess_config(root, manifest, run_dir)
    run = RunFolder.for_stage(cfg)
    assert_refused(lambda: textseg3d.preprocess(cfg, run), expect, (run_dir, manifest.parent))
    assert not manifest.exists() and not meta_path(manifest).exists()


# ---------------------------------------------------------------------------------------------- manifest cases
MANIFEST_CASES = [
    BadInput("textseg3d_manifest_moved_away_from_data_root", manifest_moved_from_its_data),
    BadInput("textseg3d_manifest_spacing_list_string", manifest_cell(0, "spacing_d", "[0.7 0.7]", "expected a number")),
    BadInput("textseg3d_manifest_spacing_empty", manifest_cell(1, "spacing_h", "", "expected a number")),
    BadInput("textseg3d_manifest_spacing_text", manifest_cell(2, "spacing_w", "abc", "expected a number, got 'abc'")),
    BadInput("textseg3d_manifest_spacing_zero", manifest_cell(3, "spacing_d", "0", r"expected a voxel spacing > 0")),
    BadInput("textseg3d_manifest_spacing_negative", manifest_cell(0, "spacing_w", "-6", r"spacing > 0 mm, got -6")),
    BadInput("textseg3d_manifest_duplicate_id", manifest_duplicate(1, "case")),
    BadInput("textseg3d_manifest_unknown_side", manifest_cell(2, "side", "both", r"expected one of \['left'")),
    BadInput("textseg3d_manifest_empty_prompt", manifest_cell(3, "prompt", " ", "empty cell; expected report_to")),
]


@pytest.fixture(scope="module")
def valid_manifest(datasets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    return ts_data.build_manifest(datasets["npz"]).manifest


@pytest.mark.parametrize("case", MANIFEST_CASES, ids=lambda c: c.id)
def test_bad_manifest_is_refused_by_02_train_before_training(case: BadInput, datasets: dict[str, Path],
                                                             valid_manifest: pd.DataFrame, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(datasets["npz"], root)
    run_dir = assert_02_train_refuses(case, textseg3d, valid_manifest, ts_data.TEXTSEG3D_SCHEMA, root, tmp_path)
    assert not (run_dir / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------- parameter cases
PARAMETER_CASES = (parameter_cases("textseg3d", textseg3d.TrainConfig, "lr", "learning_rate")
                   + parameter_cases("textseg3d_01", textseg3d.PreprocessConfig, "val_fraction", "val_fractoin"))


@pytest.mark.parametrize("case", PARAMETER_CASES, ids=lambda c: c.id)
def test_bad_parameters_are_refused_by_from_params(case: BadInput, tmp_path: Path) -> None:
    assert_parameters_refused(case, tmp_path / "run")


CASES = NPZ_CASES + NIFTI_CASES + MANIFEST_CASES + PARAMETER_CASES
