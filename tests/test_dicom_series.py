"""nbsupport.dicom.read_dicom_series and nbsupport.dicom_seg.write_dicom_seg: a synthetic CT series in shuffled
files reads back to the NIfTI written from the same array; pydicom-data's real CT files read; bad series are refused
naming the files; the DICOM-SEG of a mask opens with pydicom, its frames equal the mask and it references the source
series; no patient identifier reaches a message, warning or log record."""
from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, SegmentationStorage, generate_uid

from nbsupport.dicom import DicomError, read_dicom_image, read_dicom_series
from nbsupport.dicom_seg import Segment, write_dicom_seg
from nbsupport.runs import RunExistsError

IDENTIFIERS = {"PatientName": "Doe^Jane^Quincy", "PatientID": "MRN-8675309", "AccessionNumber": "ACC-55512",
               "InstitutionName": "St. Example General Hospital", "ReferringPhysicianName": "Strangelove^Merkwurdig",
               "StudyDate": "20240305", "PatientBirthDate": "19640229"}
MALFORMED_BIRTH_DATE = {"PatientBirthDate": {d: "1964-02-29" for d in range(8)}}  # not DA: errors quote it
FORBIDDEN = [*IDENTIFIERS.values(), "Jane", "Quincy", "Strangelove", "Merkwurdig", "8675309", "55512",
             "Example General", "1964-02-29"]
SPACING = (2.5, 0.8, 0.6)  # mm between slices, rows, columns
# (row direction, column direction) = ImageOrientationPatient; slice normal = row x column (LPS)
ORIENTATIONS = {
    "axial": ((1, 0, 0), (0, 1, 0)),  # normal +z (towards the head)
    "axial_flipped_rows_cols": ((-1, 0, 0), (0, -1, 0)),  # normal +z
    "axial_flipped_columns": ((1, 0, 0), (0, -1, 0)),  # normal -z: slices run towards the feet
    "coronal": ((1, 0, 0), (0, 0, -1)),  # normal +y (posterior)
    "sagittal": ((0, 1, 0), (0, 0, -1)),  # normal -x (the patient's right)
}


def hu_volume(shape: tuple[int, int, int] = (6, 5, 7), seed: int = 0) -> np.ndarray:
    """Even HU values, so that stored = (hu + 1024) / 2 is exact with RescaleSlope 2."""
    return np.random.default_rng(seed).integers(-512, 1024, size=shape).astype(np.float32) * 2


def write_series(folder: Path, hu: np.ndarray, orientation: str = "axial", along_normal: bool = True,
                 origin: tuple[float, float, float] = (-100.0, -50.0, 20.0), **per_slice: dict) -> list[dict]:
    """Write ``hu`` (slice, row, column) as a CT series with every identifier above, in files whose names and
    InstanceNumbers are shuffled. Slice ``d`` lies at ``origin + d * SPACING[0] * (+/-) normal``.
    ``per_slice``: attribute -> {slice index: value} overrides. Returns each slice's position and UIDs."""
    folder.mkdir(parents=True, exist_ok=True)
    row, column = (np.array(v, float) for v in ORIENTATIONS[orientation])
    normal = np.cross(row, column) * (1 if along_normal else -1)
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    order = np.random.default_rng(1).permutation(len(hu))
    slices = []
    for d, image in enumerate(hu):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_reference
        for keyword, value in IDENTIFIERS.items():
            setattr(ds, keyword, value)
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 3, int(order[::-1][d]) + 1
        ds.PatientSex, ds.StudyTime, ds.StudyID, ds.Manufacturer = "F", "101010", "S1", "synthetic"
        position = np.array(origin) + d * SPACING[0] * normal
        ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
        ds.ImageOrientationPatient = [*row, *column]
        ds.PixelSpacing = [SPACING[1], SPACING[2]]
        ds.SliceThickness = SPACING[0]
        ds.Rows, ds.Columns = image.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 2, -1024
        ds.PixelData = ((image + 1024) / 2).astype(np.uint16).tobytes()
        for keyword, values in per_slice.items():
            if d in values:
                del ds[keyword]  # a new element, validated under the mode in force (below: none)
                with pydicom.config.disable_value_validation():  # a malformed birth date is deliberate
                    setattr(ds, keyword, values[d])
        with pydicom.config.disable_value_validation():
            ds.save_as(folder / f"IM{order[d]:04d}.dcm", enforce_file_format=True)
        slices.append({"file": f"IM{order[d]:04d}.dcm", "position": position, "sop": ds.SOPInstanceUID,
                       "series": series})
    return slices


def nifti_affine(orientation: str, along_normal: bool = True,
                 origin: tuple[float, float, float] = (-100.0, -50.0, 20.0)) -> np.ndarray:
    """The voxel (slice, row, column) -> RAS affine of ``write_series``' geometry: LPS columns, x and y negated."""
    row, column = (np.array(v, float) for v in ORIENTATIONS[orientation])
    normal = np.cross(row, column) * (1 if along_normal else -1)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = normal * SPACING[0], column * SPACING[1], row * SPACING[2], origin
    return np.diag([-1, -1, 1, 1.0]) @ lps


def read_quietly(source) -> tuple[np.ndarray, np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a well-formed series reads without a warning
        return read_dicom_series(source)


# ---------------------------------------------------------------------------------------------- geometry
def test_a_standard_axial_series_by_hand(tmp_path: Path) -> None:
    """Axial DICOM: the origin is the first pixel of the lowest slice, rows run towards posterior, columns towards
    the patient's left (PS3.3 C.7.6.2.1.1); in RAS x and y change sign."""
    hu = hu_volume()
    write_series(tmp_path / "ct", hu, along_normal=False)  # slice d at z = 20 - 2.5 d: written head-to-feet
    volume, affine = read_quietly(tmp_path / "ct")
    np.testing.assert_array_equal(volume, hu[::-1])  # sorted feet-to-head, whatever the files say
    assert nib.aff2axcodes(affine) == ("S", "P", "L")
    np.testing.assert_allclose(affine @ [0, 0, 0, 1], [100, 50, 7.5, 1], atol=1e-6)  # lowest slice z = 20 - 12.5
    np.testing.assert_allclose(affine @ [1, 2, 3, 1], [100 - 3 * 0.6, 50 - 2 * 0.8, 7.5 + 2.5, 1], atol=1e-6)
    assert volume.dtype == np.float32 and volume.shape == (6, 5, 7)


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_shuffled_series_reads_back_as_the_nifti_of_the_same_array(tmp_path: Path, orientation: str) -> None:
    hu = hu_volume()
    slices = write_series(tmp_path / "ct", hu, orientation)
    assert [s["file"] for s in slices] != sorted(s["file"] for s in slices), "file names must not give the order"
    nib.save(nib.Nifti1Image(hu, nifti_affine(orientation)), tmp_path / "ct.nii.gz")
    nifti = nib.load(tmp_path / "ct.nii.gz")

    volume, affine = read_quietly(tmp_path / "ct")
    np.testing.assert_array_equal(volume, np.asanyarray(nifti.dataobj))
    np.testing.assert_allclose(affine, nifti.affine, atol=1e-4)
    files = sorted((tmp_path / "ct").iterdir(), reverse=True)  # a list of files, in yet another order
    np.testing.assert_array_equal(read_quietly(files)[0], hu)


@pytest.mark.parametrize("orientation", ["axial", "sagittal"])
def test_a_series_stacked_against_its_normal_is_the_same_image(tmp_path: Path, orientation: str) -> None:
    """Files written with slices running against the normal: read sorted along the normal, the volume is
    reversed along D but nibabel puts both in the same canonical (RAS) array and affine."""
    hu = hu_volume()
    write_series(tmp_path / "ct", hu, orientation, along_normal=False)
    volume, affine = read_quietly(tmp_path / "ct")
    np.testing.assert_array_equal(volume, hu[::-1])
    written = nib.as_closest_canonical(nib.Nifti1Image(hu, nifti_affine(orientation, along_normal=False)))
    read = nib.as_closest_canonical(nib.Nifti1Image(volume, affine))
    np.testing.assert_array_equal(read.get_fdata(), written.get_fdata())
    np.testing.assert_allclose(read.affine, written.affine, atol=1e-4)


PYDICOM_DATA_CT = ["CT_small.dcm", "693_UNCR.dcm", "693_UNCI.dcm", "693_J2KR.dcm", "693_J2KI.dcm",
                   "J2K_pixelrep_mismatch.dcm", "explicit_VR-UN.dcm", "eCT_Supplemental.dcm"]


@pytest.mark.parametrize("name", PYDICOM_DATA_CT)
def test_real_ct_files_of_pydicom_data_read(name: str) -> None:
    """Every CT image that pydicom and pydicom-data ship whose pixels decode here (JPEG Lossless needs
    pylibjpeg-libjpeg or gdcm: bad_sequence.dcm is left out)."""
    path = Path(get_testdata_file(name))
    header = pydicom.dcmread(path, stop_before_pixels=True)
    volume, affine = read_dicom_series(path)
    frames = int(header.get("NumberOfFrames", 1))
    assert volume.shape == (frames, header.Rows, header.Columns) and np.isfinite(volume).all()
    assert -4100 < volume.min() < volume.max() < 4100  # HU
    assert abs(np.linalg.det(affine[:3, :3])) > 0
    if frames == 1:
        np.testing.assert_array_equal(volume[0], read_dicom_image(path, window=None)[0])
        x, y, z = (float(v) for v in header.ImagePositionPatient)
        np.testing.assert_allclose(affine[:3, 3], [-x, -y, z], atol=1e-5)  # LPS -> RAS


def test_pydicom_ct_small_geometry() -> None:
    volume, affine = read_dicom_series(get_testdata_file("CT_small.dcm"))
    np.testing.assert_allclose(affine[:3, 3], [158.135803, 179.035797, -75.699997], atol=1e-5)
    np.testing.assert_allclose(np.sqrt((affine[:3, :3] ** 2).sum(0)), [5.0, 0.661468, 0.661468], atol=1e-6)
    assert nib.aff2axcodes(affine) == ("S", "P", "L")  # one slice: step SliceThickness 5 mm along the normal


def test_enhanced_multiframe_ct_is_sorted_along_its_normal() -> None:
    """eCT_Supplemental.dcm: IOP (-1, 0, 0, 0, 1, 0) so the normal points to the feet; frame 2 (z = -149) is above
    frame 1 (z = -159), so it comes first."""
    path = get_testdata_file("eCT_Supplemental.dcm")
    volume, affine = read_dicom_series(path)
    ds = pydicom.dcmread(path)
    stored = ds.pixel_array.astype(np.float32) - 1024  # Pixel Value Transformation: slope 1, intercept -1024
    np.testing.assert_array_equal(volume, stored[::-1])
    np.testing.assert_allclose(affine[:3, 0], [0, 0, -10])
    np.testing.assert_allclose(affine[:3, 3], [-99.5, 301.5, -149.0])


# ---------------------------------------------------------------------------------------------- refused series
def refused(source) -> str:
    with warnings.catch_warnings(record=True) as caught, pytest.raises(DicomError) as raised:
        warnings.simplefilter("always")
        read_dicom_series(source)
    text = str(raised.value) + "\n".join(str(w.message) for w in caught)
    assert [v for v in FORBIDDEN if v.lower() in text.lower()] == [], text
    return str(raised.value)


def test_a_missing_slice_is_refused_naming_the_files_around_the_gap(tmp_path: Path) -> None:
    slices = write_series(tmp_path / "ct", hu_volume((8, 5, 7)))
    (tmp_path / "ct" / slices[4]["file"]).unlink()
    message = refused(tmp_path / "ct")
    assert "slices are missing" in message and f"{slices[3]['file']} and {slices[5]['file']} (5 mm)" in message


def test_mixed_orientations_are_refused_naming_the_odd_file(tmp_path: Path) -> None:
    slices = write_series(tmp_path / "ct", hu_volume(), ImageOrientationPatient={2: [1, 0, 0, 0, 0, -1]})
    message = refused(tmp_path / "ct")
    assert "different orientations (ImageOrientationPatient)" in message
    assert f"[1.0, 0.0, 0.0, 0.0, 0.0, -1.0]: {slices[2]['file']}" in message
    assert all(s["file"] in message for s in slices)


def test_two_series_are_refused_without_their_uids(tmp_path: Path) -> None:
    slices = write_series(tmp_path / "ct", hu_volume(), SeriesInstanceUID={0: "1.2.3.4.5", 1: "1.2.3.4.5"})
    message = refused(tmp_path / "ct")
    odd = ", ".join(sorted([slices[0]["file"], slices[1]["file"]]))  # numbered in the order files are read
    assert "more than one series" in message and re.search(rf"series [12]: {odd}[;.]", message)
    assert slices[2]["series"] not in message and "1.2.3.4.5" not in message


def test_uneven_spacing_is_refused(tmp_path: Path) -> None:
    shifted = [f"{v:.4f}" for v in (-100.0, -50.0, 20.0 + 3 * 2.5 + 0.6)]
    slices = write_series(tmp_path / "ct", hu_volume(), ImagePositionPatient={3: shifted})
    message = refused(tmp_path / "ct")
    assert "uneven slice spacing" in message
    assert f"{slices[2]['file']} and {slices[3]['file']} (3.1 mm)" in message


def test_two_files_at_one_position_are_refused(tmp_path: Path) -> None:
    slices = write_series(tmp_path / "ct", hu_volume(), ImagePositionPatient={3: ["-100", "-50", "25"]})
    message = refused(tmp_path / "ct")
    assert "same position" in message and slices[3]["file"] in message and slices[2]["file"] in message


def test_a_stray_file_in_the_series_folder_is_named(tmp_path: Path) -> None:
    write_series(tmp_path / "ct", hu_volume())
    (tmp_path / "ct" / "notes.txt").write_text("not an image")
    assert "notes.txt: not a DICOM file" in refused(tmp_path / "ct")


# ---------------------------------------------------------------------------------------------- privacy
def test_no_identifier_in_any_output_or_log_of_a_read(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                      capsys: pytest.CaptureFixture) -> None:
    write_series(tmp_path / "ct", hu_volume(), **MALFORMED_BIRTH_DATE)
    raw = b"".join(p.read_bytes() for p in (tmp_path / "ct").iterdir())
    carried = [v for k, v in IDENTIFIERS.items() if k != "PatientBirthDate"] + ["1964-02-29"]
    assert all(v.encode() in raw for v in carried), "the input must really carry them"
    pydicom.config.debug(True)  # pydicom then logs every element it reads
    try:
        with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG):
            warnings.simplefilter("always")
            volume, affine = read_dicom_series(tmp_path / "ct")
            print(volume.shape, affine)
    finally:
        pydicom.config.debug(False)
    captured = capsys.readouterr()
    text = "\n".join([*(str(w.message) for w in caught), caplog.text, captured.out, captured.err]).lower()
    hex_forms = [v.encode().hex(" ") for v in FORBIDDEN]
    assert [v for v in FORBIDDEN + hex_forms if v.lower() in text] == []


# ---------------------------------------------------------------------------------------------- DICOM-SEG
def seg_mask(shape: tuple[int, int, int]) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    mask[1:4, 1:3, 2:6] = 1
    mask[3:5, 3:5, 0:2] = 2
    return mask


def frames_as_mask(seg: pydicom.Dataset, slices: list[dict], shape: tuple[int, int, int]) -> np.ndarray:
    """The label mask a viewer sees: each frame placed at the slice of the source image it references (its segment
    per frame, or for a one-segment SEG in the shared functional groups)."""
    by_sop = {s["sop"]: d for d, s in enumerate(slices)}
    pixels = seg.pixel_array.reshape(-1, *shape[1:])
    shared = seg.SharedFunctionalGroupsSequence[0]
    out = np.zeros(shape, np.uint8)
    for frame, group in zip(pixels, seg.PerFrameFunctionalGroupsSequence):
        d = by_sop[group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        np.testing.assert_allclose([float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient],
                                   slices[d]["position"], atol=1e-3)
        segment = (group if "SegmentIdentificationSequence" in group else shared).SegmentIdentificationSequence[0]
        out[d][frame > 0] = segment.ReferencedSegmentNumber
    return out


@pytest.mark.parametrize("orientation", ["axial", "axial_flipped_columns", "sagittal"])
def test_dicom_seg_frames_equal_the_mask_and_reference_the_series(tmp_path: Path, orientation: str) -> None:
    slices = write_series(tmp_path / "ct", hu_volume(), orientation)
    volume, _ = read_quietly(tmp_path / "ct")
    order = np.argsort([s["position"] @ np.cross(*ORIENTATIONS[orientation]) for s in slices])
    slices = [slices[i] for i in order]  # the volume's order, from the test's own geometry
    mask = seg_mask(volume.shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = write_dicom_seg(mask, tmp_path / "ct", tmp_path / "out" / "ctv.dcm",
                              [Segment("CTV breast", "from the report"), "boost"], algorithm="textseg3d")
    seg = pydicom.dcmread(out)
    assert seg.SOPClassUID == SegmentationStorage and seg.SegmentationType == "BINARY"
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["CTV breast", "boost"]
    assert seg.SegmentSequence[0].SegmentDescription == "from the report"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == slices[0]["series"]
    assert seg.SeriesInstanceUID != slices[0]["series"] and seg.PatientID == IDENTIFIERS["PatientID"]
    np.testing.assert_array_equal(frames_as_mask(seg, slices, volume.shape), mask)
    assert sorted(p.name for p in out.parent.iterdir()) == ["ctv.dcm"]  # no temporary file left


def test_dicom_seg_is_never_overwritten_unless_asked(tmp_path: Path) -> None:
    write_series(tmp_path / "ct", hu_volume())
    mask = seg_mask((6, 5, 7))
    out = tmp_path / "ctv.dcm"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_dicom_seg(mask, tmp_path / "ct", out, ["CTV"] * 2)
        first = out.read_bytes()
        with pytest.raises(RunExistsError):
            write_dicom_seg(mask, tmp_path / "ct", out, ["CTV"] * 2)
        assert out.read_bytes() == first
        write_dicom_seg(np.zeros_like(mask), tmp_path / "ct", out, ["CTV"], overwrite=True)
    assert pydicom.dcmread(out).SOPInstanceUID != pydicom.dcmread(pydicom.filebase.DicomBytesIO(first)).SOPInstanceUID


@pytest.mark.parametrize("mask, segments, says", [
    (np.zeros((6, 5, 8), np.uint8), ["CTV"], r"mask shape \(6, 5, 8\) differs from the source series' .* \(6, 5, 7\)"),
    (np.full((6, 5, 7), 3, np.uint8), ["CTV", "boost"], r"label values \[3\] without a segment"),
    (np.zeros((6, 5, 7), np.float32), ["CTV"], "expected integer labels"),
    (np.zeros((6, 5, 7), np.uint8), ["x" * 65], "segment 1 name has 65 characters"),
])
def test_dicom_seg_refuses_a_mask_that_does_not_fit(tmp_path: Path, mask, segments, says) -> None:
    write_series(tmp_path / "ct", hu_volume())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DicomError, match=says):
            write_dicom_seg(mask, tmp_path / "ct", tmp_path / "ctv.dcm", segments)
    assert not (tmp_path / "ctv.dcm").exists()


def test_dicom_seg_of_an_enhanced_multiframe_source_references_its_frames(tmp_path: Path) -> None:
    source = get_testdata_file("eCT_Supplemental.dcm")
    mask = np.zeros((2, 512, 512), np.uint8)
    mask[0, 100:120, 200:240] = 1  # volume slice 0 is the file's frame 2 (see the multi-frame read test)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        seg = pydicom.dcmread(write_dicom_seg(mask, source, tmp_path / "seg.dcm", ["CTV"]))
    groups = seg.PerFrameFunctionalGroupsSequence
    assert len(groups) == 1  # the empty frame is left out
    assert groups[0].DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber == 2
    np.testing.assert_array_equal(seg.pixel_array, mask[0])


def test_no_identifier_in_any_log_of_a_dicom_seg_write(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                       capsys: pytest.CaptureFixture) -> None:
    write_series(tmp_path / "ct", hu_volume())
    pydicom.config.debug(True)
    try:
        with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG):
            warnings.simplefilter("always")
            write_dicom_seg(seg_mask((6, 5, 7)), tmp_path / "ct", tmp_path / "ctv.dcm", ["CTV", "boost"])
    finally:
        pydicom.config.debug(False)
    captured = capsys.readouterr()
    text = "\n".join([*(str(w.message) for w in caught), caplog.text, captured.out, captured.err]).lower()
    assert [v for v in FORBIDDEN + [v.encode().hex(" ") for v in FORBIDDEN] if v.lower() in text] == []


def test_a_refused_dicom_seg_names_no_identifier(tmp_path: Path) -> None:
    """highdicom copies the patient module and refuses a malformed birth date, quoting it: the error is redacted."""
    write_series(tmp_path / "ct", hu_volume(), **MALFORMED_BIRTH_DATE)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(DicomError, match="cannot build") as raised:
        warnings.simplefilter("always")
        write_dicom_seg(seg_mask((6, 5, 7)), tmp_path / "ct", tmp_path / "ctv.dcm", ["CTV", "boost"])
    text = (str(raised.value) + "\n".join(str(w.message) for w in caught)).lower()
    assert "<redacted>" in text and [v for v in FORBIDDEN + ["1964-02-29"] if v.lower() in text] == []
    assert not (tmp_path / "ctv.dcm").exists()


def test_dicom_seg_of_a_real_ct_slice(tmp_path: Path) -> None:
    source = get_testdata_file("CT_small.dcm")
    volume, _ = read_dicom_series(source)
    bone = (volume > 300).astype(np.uint8)
    assert 0 < bone.sum() < bone.size
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        seg = pydicom.dcmread(write_dicom_seg(bone, source, tmp_path / "bone.dcm", [Segment("bone")]))
    np.testing.assert_array_equal(seg.pixel_array, bone[0])
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == pydicom.dcmread(source).SeriesInstanceUID
