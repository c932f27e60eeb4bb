"""Reading DICOM pixels without carrying patient identifiers forward: the one DICOM reader for every system.

:func:`read_dicom_image` returns the display-ready pixels of a single-frame grayscale DICOM (radiograph, CT or
MR slice) and a :class:`DicomImageInfo` holding only what image processing needs (size, spacing, rescale,
window, photometric interpretation, modality, view). :func:`read_dicom_series` returns a CT or MR series (or an
enhanced multi-frame image) as an HU volume and its voxel -> RAS affine, checked to be one evenly spaced stack.
The pydicom ``Dataset`` — with PatientName, PatientID, PatientBirthDate, AccessionNumber, InstitutionName, UIDs
and dates — never leaves this module (except inside :func:`series_headers`, for the DICOM-SEG writer), so it
cannot end up in a manifest, a log line, a figure title or a report. Warnings and log records pydicom emits while
reading (which can quote tag values) are re-issued with every identifying value of the files replaced by
``<redacted>``; its debug dumps of raw elements are dropped.

Pixel pipeline (DICOM PS3.3 C.11, PS3.4 N.2):

1. stored values -> Modality LUT (RescaleSlope/Intercept: Hounsfield units for CT);
2. ``window="auto"``: the first VOI LUT (VOI LUT Sequence) or else the first WindowCenter/WindowWidth pair,
   mapped to [0, 1]; ``window=(center, width)`` forces a window (e.g. ``(40, 400)``, soft tissue);
   ``window=None`` keeps the modality values (HU);
3. MONOCHROME1 (0 = white, common for radiographs) is inverted so that larger is always brighter.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

# Attributes that identify a patient, a visit or a place (DICOM PS3.15 Annex E, the ones radiology exports
# carry most often). Their values are scrubbed from any message this module passes on.
IDENTIFYING_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime", "OtherPatientIDs", "OtherPatientNames",
    "PatientAddress", "PatientTelephoneNumbers", "IssuerOfPatientID", "MedicalRecordLocator",
    "AccessionNumber", "StudyID", "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
    "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName", "PhysiciansOfRecord",
    "StationName", "DeviceSerialNumber", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
    "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "StudyTime", "SeriesTime", "AcquisitionTime",
)
REDACTED = "<redacted>"
HELD_LOGGERS = ("pydicom", "highdicom")  # loggers whose records can quote tag values
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) in little-endian group/element order


class DicomError(ValueError):
    """A DICOM file cannot be used: the message names the file, the attribute and what was expected."""


@dataclasses.dataclass(frozen=True)
class DicomImageInfo:
    """The non-identifying facts about a DICOM image that preprocessing needs.

    Attributes:
        modality: e.g. ``"CR"``, ``"DX"``, ``"CT"``, ``"MR"``.
        rows, columns: image height and width in pixels.
        pixel_spacing_mm: (row spacing, column spacing) in mm from PixelSpacing, else ImagerPixelSpacing (the
            detector plane, for radiographs); None when neither is present or both are written as 0\\0.
        slice_thickness_mm: SliceThickness, or None.
        photometric: PhotometricInterpretation as stored (``MONOCHROME1`` / ``MONOCHROME2``).
        inverted: the pixels were inverted because the file is MONOCHROME1.
        bits_stored: BitsStored.
        rescale_slope, rescale_intercept: the Modality LUT applied (1 and 0 when absent).
        voi: what mapped the values to [0, 1]: ``"voi_lut"``, ``"window"``, or ``"none"`` (values are modality
            values, e.g. HU).
        window_center, window_width: the window applied, when ``voi == "window"``.
        view_position: ViewPosition (``"PA"``, ``"AP"``, ``"LATERAL"``...), or None.
        body_part: BodyPartExamined, or None.
    """

    modality: str | None
    rows: int
    columns: int
    pixel_spacing_mm: tuple[float, float] | None
    slice_thickness_mm: float | None
    photometric: str
    inverted: bool
    bits_stored: int
    rescale_slope: float
    rescale_intercept: float
    voi: Literal["voi_lut", "window", "none"]
    window_center: float | None = None
    window_width: float | None = None
    view_position: str | None = None
    body_part: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists), e.g. for manifest columns."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def read_dicom_image(
    path: str | os.PathLike, window: Literal["auto"] | tuple[float, float] | None = "auto",
) -> tuple[np.ndarray, DicomImageInfo]:
    """Pixels of a single-frame grayscale DICOM and its non-identifying description.

    Args:
        path: the DICOM file (a file without the 128-byte preamble is accepted too).
        window: ``"auto"`` (the file's VOI LUT or first window; none: modality values), ``(center, width)`` in
            modality units, or ``None`` (modality values, e.g. HU).

    Returns:
        ``(image, info)``: float32 (rows, columns), in [0, 1] when a VOI LUT or window was applied, else in
        modality units; larger is brighter (MONOCHROME1 inverted).

    Raises:
        FileNotFoundError: no file.
        DicomError: not a DICOM file, truncated pixel data, a multi-frame or colour image, missing or
            non-positive pixel spacing or window width — naming the file and the attribute.
    """
    from pydicom.pixels import apply_modality_lut, apply_voi

    path = Path(path)
    with _reading() as identifying:
        ds = _open(path)
        identifying += _identifying_values(ds)
        with _decoding(path):
            image, info = _pixels(ds, path, window, apply_modality_lut, apply_voi)
        del ds  # nothing identifying is kept past this point
    return image, info


def _open(path: Path, header_only: bool = False) -> Any:
    """The pydicom ``Dataset`` of ``path`` (``header_only``: without the pixel data), or a :class:`DicomError`
    that names the file and says what is wrong with it."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such DICOM file")
    try:
        return pydicom.dcmread(path, force=False, stop_before_pixels=header_only)
    except InvalidDicomError:
        try:  # files written without the preamble and 'DICM' prefix are common in exports
            ds = pydicom.dcmread(path, force=True, stop_before_pixels=header_only)
        except Exception as err:
            raise DicomError(f"{path}: not a readable DICOM file ({type(err).__name__})") from None
        if "PixelData" not in ds and "SOPClassUID" not in ds:
            raise DicomError(f"{path}: not a DICOM file (no 'DICM' prefix, no DICOM attributes)") from None
        return ds
    except Exception as err:  # truncated headers raise EOFError, OSError, struct errors...
        raise DicomError(f"{path}: cannot parse the DICOM header ({type(err).__name__}); the file is "
                         "truncated or damaged") from None


@contextlib.contextmanager
def _decoding(path: Path) -> Iterator[None]:
    """Turn a decoder's failure inside into a :class:`DicomError` naming the file."""
    try:
        yield
    except DicomError:
        raise
    except Exception as err:
        raise DicomError(f"{path}: cannot decode the pixel data ({type(err).__name__}: {err}); expected "
                         "complete, uncompressed or decodable PixelData") from None


@contextlib.contextmanager
def _reading() -> Iterator[list[str]]:
    """The scope in which DICOM files are read: it yields a list that the caller fills with the identifying
    values of each file it opens. pydicom's warnings and log records are held back meanwhile and re-issued on
    success with those values redacted; a :class:`DicomError` raised inside leaves with them redacted too."""
    identifying: list[str] = []
    with warnings.catch_warnings(record=True) as caught, _pydicom_logs_held() as held:
        warnings.simplefilter("always")
        try:
            yield identifying
        except DicomError as err:
            raise DicomError(scrub(str(err), identifying)) from None
    _pass_on(caught, held, identifying)


@contextlib.contextmanager
def _pydicom_logs_held() -> Iterator[list[logging.LogRecord]]:
    """Hold back what pydicom (and highdicom, writing DICOM-SEG) log meanwhile, from their modules' loggers too:
    their messages can quote tag values, and with ``pydicom.config.debug(True)`` pydicom dumps every element,
    bytes included, through a handler of its own. Their handlers are swapped for one that keeps the records."""
    held: list[logging.LogRecord] = []

    class Hold(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            held.append(record)

    hold = Hold()
    saved = [(logger, logger.handlers[:], logger.propagate) for logger in map(logging.getLogger, HELD_LOGGERS)]
    for logger, _, _ in saved:
        logger.handlers, logger.propagate = [hold], False
    try:
        yield held
    finally:
        for logger, handlers, propagate in saved:
            logger.handlers, logger.propagate = handlers, propagate


def _pass_on(caught: list[warnings.WarningMessage], held: list[logging.LogRecord], identifying: list[str]) -> None:
    """Re-issue pydicom's warnings and WARNING+ log records with identifying values redacted; debug element
    dumps are dropped (they show values as bytes, which no text replacement catches)."""
    for w in caught:  # stacklevel: past _reading, contextlib and the reader, to the reader's caller
        warnings.warn(scrub(str(w.message), identifying), w.category, stacklevel=5)
    for record in held:
        if record.levelno >= logging.WARNING:
            record.msg, record.args = scrub(record.getMessage(), identifying), None
            logging.getLogger(record.name).handle(record)


def scrub(text: str, identifying: list[str]) -> str:
    """``text`` with each identifying value (and the parts of person names) replaced by ``<redacted>``."""
    for value in sorted(identifying, key=len, reverse=True):
        text = text.replace(value, REDACTED)
    return text


def _identifying_values(ds: Any) -> list[str]:
    values: list[str] = []
    for keyword in IDENTIFYING_KEYWORDS:
        element = ds.get(keyword)
        if element is None or element == "":
            continue
        items = element if isinstance(element, (list, tuple)) or type(element).__name__ == "MultiValue" \
            else [element]
        for item in items:
            text = str(item).strip()
            if len(text) >= 2:
                values.append(text)
                values += [part for part in text.replace("^", " ").split() if len(part) >= 2]
    return values


def _number(ds: Any, keyword: str, default: float | None = None) -> float | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


def _pixels(ds: Any, path: Path, window: Any, apply_modality_lut: Any,
            apply_voi: Any) -> tuple[np.ndarray, DicomImageInfo]:
    if "PixelData" not in ds:
        # pydicom stops quietly at the end of a cut-off file: tell a truncated image from a non-image object.
        if _PIXEL_DATA_TAG in path.read_bytes():
            raise DicomError(f"{path}: attribute PixelData is cut off: the file is truncated (copy it again)")
        raise DicomError(f"{path}: attribute PixelData is missing; expected an image (not a report or SR object) "
                         "- or the file is truncated before its pixel data")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DicomError(f"{path}: PhotometricInterpretation is {photometric!r} with SamplesPerPixel="
                         f"{ds.get('SamplesPerPixel')}; expected a grayscale image (MONOCHROME1 or MONOCHROME2)")
    frames = int(_number(ds, "NumberOfFrames", 1) or 1)
    if frames != 1:
        raise DicomError(f"{path}: NumberOfFrames is {frames}; expected a single-frame image")
    spacing = None
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        raw = ds.get(keyword)
        if raw is not None and raw != "":
            try:
                spacing = tuple(float(v) for v in raw)
            except (TypeError, ValueError):
                raise DicomError(f"{path}: {keyword} is {str(raw)!r}; expected two numbers in mm") from None
            if spacing == (0.0, 0.0):  # written as 'not recorded' by real exporters (pydicom-data's RG1_UNCR.dcm)
                spacing = None
                continue
            if len(spacing) != 2 or not all(np.isfinite(spacing)) or min(spacing) <= 0:
                raise DicomError(f"{path}: {keyword} is {list(spacing)}; expected two positive spacings in mm")
            break
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is not None and not syntax.is_compressed:
        expected = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * int(ds.BitsAllocated) // 8
        if len(ds.PixelData) < expected:
            raise DicomError(f"{path}: attribute PixelData is cut off ({len(ds.PixelData)} of {expected} bytes for "
                             f"{ds.Rows}x{ds.Columns} pixels): the file is truncated (copy it again)")
    stored = ds.pixel_array
    if stored.ndim != 2:
        raise DicomError(f"{path}: pixel array has shape {stored.shape}; expected (Rows, Columns)")
    values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    if not np.isfinite(values).all():
        raise DicomError(f"{path}: RescaleSlope/RescaleIntercept give non-finite values")
    bits = int(ds.get("BitsStored", stored.dtype.itemsize * 8))
    slope, intercept = _number(ds, "RescaleSlope", 1.0), _number(ds, "RescaleIntercept", 0.0)
    voi, center, width = "none", None, None
    if window == "auto" and "VOILUTSequence" in ds:
        lut = ds.VOILUTSequence[0]
        out_bits = int(lut.LUTDescriptor[2])
        values = np.asarray(apply_voi(values, ds), dtype=np.float64)
        values = values / float(2 ** out_bits - 1)
        voi = "voi_lut"
    elif window is not None:
        if window == "auto":
            center, width = _number(ds, "WindowCenter"), _number(ds, "WindowWidth")
        else:
            center, width = (float(v) for v in window)
        if center is not None and width is not None:
            if not width >= 1:
                raise DicomError(f"{path}: WindowWidth is {width}; expected >= 1")
            # DICOM linear window (PS3.3 C.11.2.1.2.1), to [0, 1]
            values = np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
            voi = "window"
    inverted = photometric == "MONOCHROME1"
    if inverted:
        if voi == "none":
            unsigned = int(ds.get("PixelRepresentation", 0)) == 0
            low, high = (0, 2 ** bits - 1) if unsigned else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
            low, high = sorted((low * slope + intercept, high * slope + intercept))
            values = low + high - values
        else:
            values = 1.0 - values
    info = DicomImageInfo(
        modality=str(ds.get("Modality", "")) or None, rows=int(stored.shape[0]), columns=int(stored.shape[1]),
        pixel_spacing_mm=spacing, slice_thickness_mm=_number(ds, "SliceThickness"), photometric=photometric,
        inverted=inverted, bits_stored=bits, rescale_slope=float(slope), rescale_intercept=float(intercept),
        voi=voi, window_center=center if voi == "window" else None, window_width=width if voi == "window" else None,
        view_position=str(ds.get("ViewPosition", "")) or None, body_part=str(ds.get("BodyPartExamined", "")) or None,
    )
    return values.astype(np.float32), info


# ============================================================================================ series -> volume
# A CT or MR series is a set of 2-D planes; where each lies comes from the Image Plane module (DICOM PS3.3
# C.7.6.2.1.1): voxel (row j, column i) of a plane is at  ImagePositionPatient + i * PixelSpacing[1] * row
# direction (ImageOrientationPatient[:3]) + j * PixelSpacing[0] * column direction (ImageOrientationPatient[3:]),
# in the patient's LPS mm frame. Enhanced (multi-frame) files carry the same attributes per frame in their
# Plane Position / Plane Orientation / Pixel Measures functional groups (PS3.3 C.7.6.16.2).
MISSING_GAP = 1.5  # a gap between neighbouring slices over 1.5x the median gap: slices are missing
SPACING_TOLERANCE_MM, SPACING_TOLERANCE = 0.01, 0.01  # gaps may differ from the median by max(0.01 mm, 1 %)
ORIENTATION_TOLERANCE = 1e-3  # direction cosines are written to ~6 digits; unit, orthogonal and equal within this
NOT_SERIES_FILES = ("DICOMDIR",)  # a media directory index sits next to the images on CDs and exports
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclasses.dataclass(frozen=True)
class DicomPlane:
    """One 2-D image of a series: a single-frame file, or frame ``frame`` of an enhanced multi-frame file. ``label``
    names it in errors (path below the series folder); ``series`` numbers its SeriesInstanceUID and
    FrameOfReferenceUID in reading order (the UIDs identify the study and are not kept); directions
    (ImageOrientationPatient, unit) and ``position`` (ImagePositionPatient) are LPS mm; ``spacing`` is PixelSpacing
    (between rows, between columns); ``thickness`` SpacingBetweenSlices or SliceThickness (for one-plane series)."""

    path: Path
    label: str
    frame: int | None
    series: int
    row_direction: tuple[float, float, float]
    column_direction: tuple[float, float, float]
    position: tuple[float, float, float]
    shape: tuple[int, int]
    spacing: tuple[float, float]
    thickness: float | None


@dataclasses.dataclass(frozen=True)
class DicomSeriesGeometry:
    """The voxel grid of a series: its planes in volume order and where each voxel lies.

    Attributes:
        planes: the planes sorted by position along the slice normal (row direction x column direction):
            ``planes[d]`` is slice ``d`` of the ``(D, H, W)`` volume.
        affine: 4x4 voxel index ``(d, h, w)`` -> RAS+ mm, nibabel's convention (DICOM LPS with x and y negated):
            ``nibabel.Nifti1Image(volume, affine)`` is the same image as the series.
    """

    planes: tuple[DicomPlane, ...]
    affine: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.planes), *self.planes[0].shape)


def read_dicom_series(folder_or_files: str | os.PathLike | Sequence[str | os.PathLike]
                      ) -> tuple[np.ndarray, np.ndarray]:
    """A CT or MR series as a volume: HU (modality values) and the voxel -> RAS+ affine.

    Args:
        folder_or_files: a folder with the files of one series (subfolders are not searched; hidden files and
            DICOMDIR are skipped), one file (a slice, or an enhanced multi-frame image), or a list of files.
            File names and InstanceNumber play no part in the order.

    Returns:
        ``(volume, affine)``: float32 ``(D, H, W)`` = (slice, row, column), slices sorted by position along the
        slice normal, values after each plane's RescaleSlope/RescaleIntercept (HU for CT); float64 4x4 voxel
        ``(d, h, w)`` -> RAS+ mm (:class:`DicomSeriesGeometry`). ``nibabel.Nifti1Image(volume, affine)`` saved and
        read back gives the same array and affine; ``nibabel.io_orientation`` (textseg3d's ``to_canonical``, ct_clip's
        ``CTVolume``) reorients it like any NIfTI. One plane: a slice step of SpacingBetweenSlices, SliceThickness
        or 1 mm.

    Raises:
        FileNotFoundError: no such file or folder.
        DicomError: naming the files: a non-DICOM or undecodable file, files of several series, mixed
            orientations, image sizes or pixel spacings, two planes at one position, missing slices (a gap over
            1.5x the median), uneven spacing, positions off one line. No patient identifier is in any message,
            warning or log record (as for :func:`read_dicom_image`).
    """
    from pydicom.pixels import apply_modality_lut, apply_voi

    geometry = dicom_series_geometry(folder_or_files)
    values: dict[Path, np.ndarray] = {}
    with _reading() as identifying:
        for path in dict.fromkeys(plane.path for plane in geometry.planes):
            ds = _open(path)
            identifying += _identifying_values(ds)
            with _decoding(path):
                values[path] = (_enhanced_frames(ds, path) if _is_enhanced(ds)
                                else _pixels(ds, path, None, apply_modality_lut, apply_voi)[0][None])
            del ds
    volume = np.stack([values[p.path][p.frame or 0] for p in geometry.planes]).astype(np.float32, copy=False)
    return volume, geometry.affine.copy()


def dicom_series_geometry(folder_or_files: str | os.PathLike | Sequence[str | os.PathLike]) -> DicomSeriesGeometry:
    """The checked voxel grid of a series, from the headers alone (pixels are not read).

    The ordering and every check of :func:`read_dicom_series` happen here, so that a writer of derived objects
    (:func:`nbsupport.dicom_seg.write_dicom_seg`) lines its frames up with exactly the volume that was read.
    """
    paths = [p.absolute() for p in dicom_series_files(folder_or_files)]
    root = Path(os.path.commonpath([p.parent for p in paths]))
    planes: list[DicomPlane] = []
    series: dict[tuple[str, str], int] = {}
    with _reading() as identifying:
        for path in paths:
            ds = _open(path, header_only=True)
            identifying += _identifying_values(ds)
            uids = (str(ds.get("SeriesInstanceUID", "")), str(ds.get("FrameOfReferenceUID", "")))
            number = series.setdefault(uids, len(series))
            planes += _planes(ds, path, path.relative_to(root).as_posix(), number)
            del ds
        return _geometry(planes, root)


@contextlib.contextmanager
def series_headers(geometry: DicomSeriesGeometry) -> Iterator[list[Any]]:
    """The header datasets (no pixel data) of a series' files in volume order, for a writer of derived objects
    that must copy their patient and study (DICOM-SEG). Inside the block pydicom's and highdicom's warnings and
    log records, and any :class:`DicomError`, are redacted; the datasets must not outlive it."""
    with _reading() as identifying:
        datasets = []
        for path in dict.fromkeys(plane.path for plane in geometry.planes):
            datasets.append(_open(path, header_only=True))
            identifying += _identifying_values(datasets[-1])
        yield datasets


def dicom_series_files(folder_or_files: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The files of a series: a folder's files (hidden files and DICOMDIR skipped), one file, or a list."""
    single = isinstance(folder_or_files, (str, os.PathLike))
    files = [Path(folder_or_files)] if single else [Path(p) for p in folder_or_files]  # type: ignore[arg-type]
    if single and files[0].is_dir():
        folder, files = files[0], sorted(p for p in files[0].iterdir() if p.is_file() and not p.name.startswith(".")
                                         and p.name.upper() not in NOT_SERIES_FILES)
        if not files:
            raise DicomError(f"{folder}: holds no files; expected the DICOM files of one series directly in it")
    absent = [str(p) for p in files if not p.is_file()]
    if absent or not files:
        raise FileNotFoundError(f"no such DICOM file or series folder: {_listed(absent) or '(none given)'}")
    return files


def _is_enhanced(ds: Any) -> bool:
    """An enhanced (multi-frame) image: plane attributes sit in functional groups, not at the top level."""
    return "PerFrameFunctionalGroupsSequence" in ds or int(_number(ds, "NumberOfFrames", 1) or 1) > 1


def _frame_attribute(ds: Any, frame: int | None, macro: str, keyword: str) -> Any:
    """``keyword`` from the frame's ``macro`` functional group (per-frame first, then shared), else the top level."""
    if frame is not None:
        for groups in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
            sequence = ds.get(groups)
            group = (sequence[frame if groups.startswith("Per") else 0] if sequence else None)
            items = group.get(macro) if group is not None else None
            value = items[0].get(keyword) if items else None
            if value is not None and value != "":
                return value
    value = ds.get(keyword)
    return None if value == "" else value


def _numbers(ds: Any, path: Path, frame: int | None, macro: str, keyword: str, count: int) -> tuple[float, ...]:
    value = _frame_attribute(ds, frame, macro, keyword)
    where = f"{path}" + (f" frame {frame + 1}" if frame is not None else "")
    if value is None:
        raise DicomError(f"{where}: attribute {keyword} is missing; a series needs the position, orientation and "
                         "pixel spacing of every plane")
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise DicomError(f"{where}: {keyword} is {str(value)!r}; expected {count} numbers") from None
    if len(numbers) != count or not np.isfinite(numbers).all():
        raise DicomError(f"{where}: {keyword} is {list(numbers)}; expected {count} finite numbers")
    return numbers


def _planes(ds: Any, path: Path, label: str, series: int) -> list[DicomPlane]:
    """The planes of one file, with their geometry checked: unit, orthogonal directions, positive spacing."""
    if "Rows" not in ds or "Columns" not in ds:
        raise DicomError(f"{path}: attribute Rows/Columns is missing; expected an image")
    enhanced = _is_enhanced(ds)
    planes = []
    for frame in range(int(_number(ds, "NumberOfFrames", 1) or 1)) if enhanced else [None]:
        at = frame if enhanced else None
        orientation = np.array(_numbers(ds, path, at, "PlaneOrientationSequence", "ImageOrientationPatient", 6))
        row, column = orientation[:3], orientation[3:]
        if (abs(np.linalg.norm(row) - 1) > ORIENTATION_TOLERANCE or abs(np.linalg.norm(column) - 1) >
                ORIENTATION_TOLERANCE or abs(row @ column) > ORIENTATION_TOLERANCE):
            raise DicomError(f"{path}: ImageOrientationPatient is {orientation.round(6).tolist()}; expected two "
                             "orthogonal unit vectors")
        spacing = _numbers(ds, path, at, "PixelMeasuresSequence", "PixelSpacing", 2)
        if min(spacing) <= 0:
            raise DicomError(f"{path}: PixelSpacing is {list(spacing)}; expected two positive spacings in mm")
        thickness = next((float(v) for k in ("SpacingBetweenSlices", "SliceThickness")
                          if (v := _frame_attribute(ds, at, "PixelMeasuresSequence", k)) is not None
                          and float(v) > 0), None)
        planes.append(DicomPlane(
            path=path, label=label + (f" frame {frame + 1}" if enhanced else ""), frame=at, series=series,
            row_direction=tuple(row / np.linalg.norm(row)), column_direction=tuple(column / np.linalg.norm(column)),
            position=_numbers(ds, path, at, "PlanePositionSequence", "ImagePositionPatient", 3),  # type: ignore
            shape=(int(ds.Rows), int(ds.Columns)), spacing=spacing, thickness=thickness))  # type: ignore[arg-type]
    return planes


def _geometry(planes: list[DicomPlane], root: Path) -> DicomSeriesGeometry:
    """Check that the planes form one evenly spaced stack and sort them along its normal; the affine."""
    for what, key, same in (
            ("belong to more than one series (SeriesInstanceUID or FrameOfReferenceUID differs)",
             lambda p: p.series, None),
            ("have different orientations (ImageOrientationPatient)", lambda p: p.row_direction + p.column_direction,
             lambda a, b: np.abs(np.subtract(a, b)).max() <= ORIENTATION_TOLERANCE),
            ("have different image sizes (Rows x Columns)", lambda p: p.shape, None),
            ("have different PixelSpacing", lambda p: p.spacing, lambda a, b: np.allclose(a, b, rtol=1e-4, atol=0))):
        groups = _groups(planes, key, same)
        if len(groups) > 1:
            kinds = [f"{_describe(key(g[0]), i)}: {_listed([p.label for p in g])}" for i, g in enumerate(groups)]
            raise DicomError(f"{root}: the files {what}; expected one series of parallel planes: "
                             + "; ".join(kinds) + ". Pass the files of one series (its own folder or a list)")
    row, column = np.array(planes[0].row_direction), np.array(planes[0].column_direction)
    normal = np.cross(row, column)
    ordered = sorted(planes, key=lambda p: float(normal @ p.position))
    along = np.array([normal @ p.position for p in ordered])
    positions = np.array([p.position for p in ordered])
    if len(ordered) > 1:
        gaps = np.diff(along)
        median = float(np.median(gaps))
        tolerance = max(SPACING_TOLERANCE_MM, SPACING_TOLERANCE * median)
        between = [f"{ordered[k].label} and {ordered[k + 1].label} ({gaps[k]:.4g} mm)" for k in range(len(gaps))]
        if (gaps < tolerance).any():
            raise DicomError(f"{root}: two planes lie at the same position along the slice normal: "
                             + _listed([between[k] for k in np.flatnonzero(gaps < tolerance)])
                             + "; expected one image per position (two acquisitions, or a file copied twice?)")
        if (gaps > MISSING_GAP * median).any():
            raise DicomError(f"{root}: slices are missing: a gap over {MISSING_GAP}x the median spacing of "
                             f"{median:.4g} mm between " + _listed([between[k] for k in
                                                                   np.flatnonzero(gaps > MISSING_GAP * median)]))
        if (np.abs(gaps - median) > tolerance).any():
            raise DicomError(f"{root}: uneven slice spacing (median {median:.4g} mm, tolerance {tolerance:.2g} mm) "
                             "between " + _listed([between[k] for k in np.flatnonzero(np.abs(gaps - median) >
                                                                                     tolerance)]))
        step = (positions[-1] - positions[0]) / (len(ordered) - 1)  # along the normal, or tilted (gantry tilt)
        off = np.linalg.norm(positions - (positions[0] + np.outer(np.arange(len(ordered)), step)), axis=1)
        if (off > tolerance).any():
            raise DicomError(f"{root}: the slice positions (ImagePositionPatient) do not lie on one line: "
                             + _listed([f"{ordered[k].label} is {off[k]:.3g} mm off" for k in np.flatnonzero(
                                 off > tolerance)]))
    else:
        step = normal * (ordered[0].thickness or 1.0)
    lps = np.eye(4)
    lps[:3, 0] = step  # d: slice to slice
    lps[:3, 1] = column * ordered[0].spacing[0]  # h: row to row, along the column direction, PixelSpacing[0]
    lps[:3, 2] = row * ordered[0].spacing[1]  # w: column to column, along the row direction, PixelSpacing[1]
    lps[:3, 3] = positions[0]
    return DicomSeriesGeometry(planes=tuple(ordered), affine=_LPS_TO_RAS @ lps)


def _groups(planes: list[DicomPlane], key: Any, same: Any = None) -> list[list[DicomPlane]]:
    """Planes grouped by ``key`` (equal, or ``same(a, b)``), in order of first appearance."""
    groups: list[list[DicomPlane]] = []
    for plane in planes:
        k = key(plane)
        match = next((g for g in groups if (same(key(g[0]), k) if same else key(g[0]) == k)), None)
        if match is None:
            groups.append([plane])
        else:
            match.append(plane)
    return groups


def _describe(value: Any, index: int) -> str:
    if isinstance(value, int):
        return f"series {index + 1}"  # the UID itself is identifying
    return str([round(float(v), 4) for v in value])


def _listed(items: list[str], limit: int = 6) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _enhanced_frames(ds: Any, path: Path) -> np.ndarray:
    """Modality values (HU for CT) of every frame of an enhanced image, (frames, rows, columns) float32: each
    frame rescaled by its Pixel Value Transformation functional group (PS3.3 C.7.6.16.2.9)."""
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric != "MONOCHROME2":  # what the Enhanced CT / MR Image modules allow for grayscale
        raise DicomError(f"{path}: PhotometricInterpretation is {photometric!r}; expected MONOCHROME2")
    stored = np.asarray(ds.pixel_array).reshape(-1, int(ds.Rows), int(ds.Columns))
    out = np.empty(stored.shape, dtype=np.float32)
    for frame in range(stored.shape[0]):
        slope = _frame_attribute(ds, frame, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _frame_attribute(ds, frame, "PixelValueTransformationSequence", "RescaleIntercept")
        out[frame] = stored[frame] * float(1.0 if slope is None else slope) + float(intercept or 0.0)
    if not np.isfinite(out).all():
        raise DicomError(f"{path}: RescaleSlope/RescaleIntercept give non-finite values")
    return out
