"""Reading DICOM pixels without carrying patient identifiers forward: the one DICOM reader for every system.

:func:`read_dicom_image` returns the display-ready pixels of a single-frame grayscale DICOM (radiograph, CT or
MR slice) and a :class:`DicomImageInfo` holding only what image processing needs (size, spacing, rescale,
window, photometric interpretation, modality, view). The pydicom ``Dataset`` — with PatientName, PatientID,
PatientBirthDate, AccessionNumber, InstitutionName, UIDs and dates — never leaves this module, so it cannot end
up in a manifest, a log line, a figure title or a report. Warnings and log records pydicom emits while reading
(which can quote tag values) are re-issued with every identifying value of the file replaced by ``<redacted>``;
its debug dumps of raw elements are dropped.

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
from collections.abc import Iterator
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
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such DICOM file")
    with warnings.catch_warnings(record=True) as caught, _pydicom_logs_held() as held:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(path, force=False)
        except InvalidDicomError:
            try:  # files written without the preamble and 'DICM' prefix are common in exports
                ds = pydicom.dcmread(path, force=True)
            except Exception as err:
                raise DicomError(f"{path}: not a readable DICOM file ({type(err).__name__})") from None
            if "PixelData" not in ds and "SOPClassUID" not in ds:
                raise DicomError(f"{path}: not a DICOM file (no 'DICM' prefix, no DICOM attributes)") from None
        except Exception as err:  # truncated headers raise EOFError, OSError, struct errors...
            raise DicomError(f"{path}: cannot parse the DICOM header ({type(err).__name__}); the file is "
                             "truncated or damaged") from None
        identifying = _identifying_values(ds)
        try:
            image, info = _pixels(ds, path, window, apply_modality_lut, apply_voi)
        except DicomError as err:
            raise DicomError(scrub(str(err), identifying)) from None
        except Exception as err:
            raise DicomError(scrub(f"{path}: cannot decode the pixel data ({type(err).__name__}: {err}); expected "
                                   "complete, uncompressed or decodable PixelData", identifying)) from None
        finally:
            del ds  # nothing identifying is kept past this point
    _pass_on(caught, held, identifying)
    return image, info


@contextlib.contextmanager
def _pydicom_logs_held() -> Iterator[list[logging.LogRecord]]:
    """Hold back what pydicom logs while a file is read: its messages can quote tag values (and with
    ``pydicom.config.debug(True)`` it dumps every element, bytes included)."""
    held: list[logging.LogRecord] = []

    class Hold(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            held.append(record)
            return False

    hold = Hold()
    logger = logging.getLogger("pydicom")
    logger.addFilter(hold)
    try:
        yield held
    finally:
        logger.removeFilter(hold)


def _pass_on(caught: list[warnings.WarningMessage], held: list[logging.LogRecord], identifying: list[str]) -> None:
    """Re-issue pydicom's warnings and WARNING+ log records with identifying values redacted; debug element
    dumps are dropped (they show values as bytes, which no text replacement catches)."""
    for w in caught:
        warnings.warn(scrub(str(w.message), identifying), w.category, stacklevel=3)
    logger = logging.getLogger("pydicom")
    for record in held:
        if record.levelno >= logging.WARNING:
            record.msg, record.args = scrub(record.getMessage(), identifying), None
            logger.handle(record)


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
