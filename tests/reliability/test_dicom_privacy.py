"""nbsupport.dicom: correct display pixels (Modality LUT, window / VOI LUT, MONOCHROME1) and no patient identifier
in anything a run writes: manifest, sidecar, metrics, logs, warnings, figure text."""
from __future__ import annotations

import json
import logging
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import matplotlib.text
import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from nbsupport.dicom import DicomError, read_dicom_image
from nbsupport.manifest import Column, ManifestError, ManifestSchema, read_manifest, write_manifest
from nbsupport.runs import RunFolder
from nbsupport.viz import image_grid

sys.path.insert(0, str(Path(__file__).parent))
from catalogue import BadInput, Expect, assert_reports

IDENTIFIERS = {
    "PatientName": "Doe^Jane^Quincy",
    "PatientID": "MRN-8675309",
    "PatientBirthDate": "1964-02-29",  # not the DA format: pydicom warns and quotes it while reading
    "AccessionNumber": "ACC-55512",
    "InstitutionName": "St. Example General Hospital",
    "ReferringPhysicianName": "Strangelove^Merkwurdig",
    "StudyDate": "20240305",
}
# What must not appear anywhere: each value, and the parts of the names.
FORBIDDEN = [*IDENTIFIERS.values(), "Jane", "Quincy", "Strangelove", "Merkwurdig", "8675309", "55512",
             "Example General"]
STORED = np.array([[0, 1000, 1064, 1264], [2000, 4095, 1164, 1114]], dtype=np.uint16)  # 12-bit


def write_dicom(path: Path, photometric: str = "MONOCHROME1", pixels: np.ndarray = STORED,
                **attributes: object) -> Path:
    """A CR-like DICOM with every identifier above, a window of 40/400 HU-like units after rescale -1024."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR image storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    with pydicom.config.disable_value_validation():  # the malformed birth date is deliberate; no warning here
        return _write_dicom(path, meta, photometric, pixels, attributes)


def _write_dicom(path: Path, meta: FileMetaDataset, photometric: str, pixels: np.ndarray,
                 attributes: dict[str, object]) -> Path:
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    for keyword, value in IDENTIFIERS.items():
        setattr(ds, keyword, value)
    ds.Modality, ds.ViewPosition, ds.BodyPartExamined = "CR", "PA", "CHEST"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.PixelSpacing = [0.139, 0.143]
    for keyword, value in attributes.items():
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):  # (VR, value): a wrong VR
            del ds[keyword]
            ds.add_new(pydicom.datadict.tag_for_keyword(keyword), *value)
        else:
            setattr(ds, keyword, value)
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


# ---------------------------------------------------------------------------------------------- pixels
def test_window_then_monochrome1_inversion_by_hand(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deliberately malformed birth date
        image, info = read_dicom_image(write_dicom(tmp_path / "a.dcm"))
        plain, _ = read_dicom_image(write_dicom(tmp_path / "b.dcm", photometric="MONOCHROME2"))
        hu, raw_info = read_dicom_image(tmp_path / "b.dcm", window=None)
    # stored - 1024 = HU: [-1024, -24, 40, 240], [976, 3071, 140, 90]; window 40/400: (hu - 39.5) / 399 + 0.5
    expected = np.clip((STORED.astype(float) - 1024 - 39.5) / 399 + 0.5, 0, 1)
    np.testing.assert_allclose(plain, expected, atol=1e-6)
    np.testing.assert_allclose(image, 1 - expected, atol=1e-6)  # MONOCHROME1: 0 is white
    np.testing.assert_allclose(hu, STORED.astype(float) - 1024)
    assert info.inverted and info.voi == "window" and (info.window_center, info.window_width) == (40, 400)
    assert info.pixel_spacing_mm == (0.139, 0.143) and (info.rows, info.columns) == (2, 4)
    assert raw_info.voi == "none" and info.view_position == "PA" and info.modality == "CR"


def test_voi_lut_sequence_is_applied_before_a_window(tmp_path: Path) -> None:
    lut = pydicom.Dataset()
    lut.LUTDescriptor = [4, 0, 8]  # 4 entries, first input value 0 (after rescale), 8-bit output
    lut.add_new(0x00283006, "US", [0, 85, 170, 255])  # LUTData
    path = write_dicom(tmp_path / "lut.dcm", photometric="MONOCHROME2", pixels=np.array([[0, 1, 2, 3]]),
                       RescaleIntercept=0, VOILUTSequence=pydicom.Sequence([lut]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image, info = read_dicom_image(path)
    assert info.voi == "voi_lut"
    np.testing.assert_allclose(image, [[0, 1 / 3, 2 / 3, 1]], atol=1e-6)


# ---------------------------------------------------------------------------------------------- privacy
DICOM_SCHEMA = ManifestSchema(
    dataset="dicom-privacy-check", key="id",
    columns=(Column("id"), Column("image", "path"), Column("modality"), Column("view_position"),
             Column("pixel_spacing_row", "float"), Column("pixel_spacing_col", "float")),
    readers={"image": read_dicom_image},
)


def test_no_identifier_reaches_any_file_a_run_writes(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                     capsys: pytest.CaptureFixture) -> None:
    data_root = tmp_path / "data"
    source = write_dicom((data_root / "images").mkdir(parents=True) or data_root / "images" / "study-001.dcm")
    raw = source.read_bytes()
    assert all(value.encode() in raw for value in IDENTIFIERS.values()), "the input must really carry them"

    run = RunFolder.create("cxr_privacy", root=tmp_path / "runs")
    log_file = run.file("run.log")
    handler = logging.FileHandler(log_file)
    root_logger = logging.getLogger()
    root_logger.addHandler(handler)
    old_level = root_logger.level
    root_logger.setLevel(logging.DEBUG)
    pydicom.config.debug(True)  # pydicom then logs every element it reads, values and bytes included
    try:
        with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG):
            warnings.simplefilter("always")
            image, info = read_dicom_image(source)
            print(f"read {source.name}: {info}")
            logging.getLogger("nbsupport.test").info("info %s", info.to_dict())
            row = {"id": "study-001", "image": "images/study-001.dcm", "modality": info.modality,
                   "view_position": info.view_position, "pixel_spacing_row": info.pixel_spacing_mm[0],
                   "pixel_spacing_col": info.pixel_spacing_mm[1]}
            manifest = write_manifest(pd.DataFrame([row]), tmp_path / "manifests" / "cxr.csv", DICOM_SCHEMA,
                                      data_root)
            read_manifest(manifest, DICOM_SCHEMA)
            title = f"{info.modality} {info.view_position} {info.rows}x{info.columns}, {info.pixel_spacing_mm} mm"
            figure = image_grid([image], titles=[title], suptitle="DICOM preview")
            run.save_figure(figure, "preview")
            figure.savefig(run.file("figures/preview.svg"), format="svg")  # text stays text: greppable
            texts = " ".join(t.get_text() for t in figure.findobj(matplotlib.text.Text))
            run.write_metrics("01_preprocess", {"image": info.to_dict(), "mean": float(image.mean())})
        warning_text = "\n".join(str(w.message) for w in caught)
        run.file("warnings.txt").write_text(warning_text)
        run.file("stdout.txt").write_text(capsys.readouterr().out)
        run.file("caplog.txt").write_text(caplog.text)
    finally:
        pydicom.config.debug(False)
        root_logger.removeHandler(handler)
        root_logger.setLevel(old_level)
        handler.close()

    written = [p for p in [*run.path.rglob("*"), *manifest.parent.rglob("*")] if p.is_file()]
    assert {p.suffix for p in written} >= {".csv", ".json", ".png", ".svg", ".log", ".txt"}
    forms = [v.lower().encode() for v in FORBIDDEN] + [v.encode().hex(" ").encode() for v in FORBIDDEN]  # dumps
    leaks = [f"{p.name}: {form!r}" for p in written for form in forms if form in p.read_bytes().lower()]
    leaks += [f"figure text: {value!r}" for value in FORBIDDEN if value.lower() in texts.lower()]
    assert leaks == [], "identifiers leaked:\n" + "\n".join(leaks)


# ---------------------------------------------------------------------------------------------- bad DICOM files
def dicom_case(change: Callable[[Path], Path], attribute: str | None, says: str) -> Callable[[Path], tuple]:
    def damage(folder: Path) -> tuple[Path, tuple[Expect, ...]]:
        path = change(folder)
        return path, (Expect(path.name, None, says), *((Expect(None, None, attribute),) if attribute else ()))
    return damage


def _truncate(fraction: float) -> Callable[[Path], Path]:
    def change(folder: Path) -> Path:
        pixels = np.random.default_rng(0).integers(0, 4096, size=(64, 64))  # 8 KiB: the cut lands inside them
        path = write_dicom(folder / "truncated.dcm", pixels=pixels)
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * fraction)])
        return path
    return change


def _raw(data: bytes) -> Callable[[Path], Path]:
    def change(folder: Path) -> Path:
        (folder / "x.dcm").write_bytes(data)
        return folder / "x.dcm"
    return change


def _with(**attributes: object) -> Callable[[Path], Path]:
    return lambda folder: write_dicom(folder / "bad.dcm", **attributes)


CASES = [
    BadInput("dicom_truncated_pixel_data",
             dicom_case(_truncate(0.97), "PixelData", r"cut off \(\d+ of 8192 bytes.*truncated")),
    BadInput("dicom_truncated_header", dicom_case(_truncate(0.05), "PixelData", "missing.*or the file is truncated")),
    BadInput("dicom_not_a_dicom", dicom_case(_raw(b"\x89PNG\r\n\x1a\n" * 50), None, "not a (readable )?DICOM file")),
    BadInput("dicom_empty_file", dicom_case(_raw(b""), None, "not a (readable )?DICOM file")),
    BadInput("dicom_rgb_where_grayscale_expected",
             dicom_case(_with(PhotometricInterpretation="RGB", SamplesPerPixel=3, PlanarConfiguration=0,
                              pixels=np.zeros((2, 4, 3), np.uint16).reshape(2, 12)),
                        "PhotometricInterpretation", "expected a grayscale image")),
    BadInput("dicom_without_pixel_data", dicom_case(
        lambda f: _strip_pixels(write_dicom(f / "np.dcm")), "PixelData", "expected an image")),
    BadInput("dicom_zero_pixel_spacing", dicom_case(_with(PixelSpacing=[0, 0.143]), "PixelSpacing",
                                                    "expected two positive spacings")),
    BadInput("dicom_negative_pixel_spacing", dicom_case(_with(PixelSpacing=[-0.1, 0.1]), "PixelSpacing",
                                                        "expected two positive spacings")),
    BadInput("dicom_unparseable_pixel_spacing", dicom_case(_with(PixelSpacing=("LO", "abc")), "PixelSpacing",
                                                           "expected two numbers in mm")),
    BadInput("dicom_zero_window_width", dicom_case(_with(WindowWidth=0), "WindowWidth", "expected >= 1")),
    BadInput("dicom_multi_frame", dicom_case(_with(NumberOfFrames=2, pixels=np.zeros((2, 4), np.uint16)),
                                             "NumberOfFrames", "expected a single-frame image")),
]


def _strip_pixels(path: Path) -> Path:
    ds = pydicom.dcmread(path)
    del ds.PixelData
    with pydicom.config.disable_value_validation():
        ds.save_as(path)
    return path


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_dicom_is_refused_naming_file_and_attribute_without_identifiers(case: BadInput, tmp_path: Path):
    path, expect = case.damage(tmp_path)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(DicomError) as raised:
        warnings.simplefilter("always")
        read_dicom_image(path)
    assert_reports(raised.value, expect)
    messages = str(raised.value) + "\n".join(str(w.message) for w in caught)
    assert [v for v in FORBIDDEN if v.lower() in messages.lower()] == []


def test_a_manifest_of_a_bad_dicom_reports_it_and_writes_nothing(tmp_path: Path) -> None:
    data_root = tmp_path / "data"
    (data_root / "images").mkdir(parents=True)
    write_dicom(data_root / "images" / "good.dcm")
    _truncate(0.97)(data_root / "images")
    rows = [{"id": name, "image": f"images/{name}.dcm", "modality": "CR", "view_position": "PA",
             "pixel_spacing_row": 0.1, "pixel_spacing_col": 0.1} for name in ("good", "truncated")]
    target = tmp_path / "manifests" / "cxr.csv"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ManifestError) as raised:
            write_manifest(pd.DataFrame(rows), target, DICOM_SCHEMA, data_root)
    assert_reports(raised.value, (Expect("truncated.dcm", "image", "PixelData is cut off", line=3),))
    assert not target.exists() and not any(v in str(raised.value) for v in FORBIDDEN)
    assert json.dumps([str(p) for p in raised.value.problems])  # problems are plain, printable records
