"""Writing a predicted mask back as a DICOM Segmentation (DICOM-SEG) of the series it was predicted on.

:func:`write_dicom_seg` takes a label mask on exactly the voxel grid :func:`nbsupport.dicom.read_dicom_series`
returned for the source series ``(D, H, W)`` = (slice sorted along the slice normal, row, column) and writes a
BINARY Segmentation (PS3.3 A.51) with highdicom: one segment per label value, each frame referencing the source
image (SOP instance, and frame for an enhanced source) it was drawn on, the SEG in the source's study with a new
series. PACS and viewers (OHIF, 3D Slicer, radiotherapy systems) show it over the source series.

Privacy: a DICOM-SEG belongs to the patient's record, so the Patient and General Study modules are copied from the
source (the Segmentation IOD, PS3.3 A.51, includes them) - treat the written file like the source files. Nothing else carries them:
errors, warnings and log records while writing are redacted as when reading (:mod:`nbsupport.dicom`).

RTSTRUCT: highdicom (0.28) writes SEG, SR, KOS, parametric maps and presentation states, not RT Structure Sets;
radiotherapy systems that take no SEG get one from it through 3D Slicer's SlicerRT, or from the mask with rt-utils.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nbsupport.dicom import DicomError, DicomSeriesGeometry, dicom_series_geometry, series_headers

# Coded concepts as (value, scheme, meaning). The defaults describe textseg3d's output, a radiotherapy clinical
# target volume: category from CID 9580 "RT Segmentation Property Category", type from CID 9534 "Radiotherapy
# Target" (DICOM PS3.16).
RT_TARGET = ("130041", "DCM", "RT Target")
CLINICAL_TARGET_VOLUME = ("228792002", "SCT", "Clinical Target Volume")


@dataclasses.dataclass(frozen=True)
class Segment:
    """What one label value of a mask is.

    Attributes:
        name: SegmentLabel, shown in viewers (at most 64 characters).
        description: SegmentDescription, free text (at most 64 characters), or "".
        category, property_type: SegmentedPropertyCategory / SegmentedPropertyType codes (value, scheme, meaning).
    """

    name: str
    description: str = ""
    category: tuple[str, str, str] = RT_TARGET
    property_type: tuple[str, str, str] = CLINICAL_TARGET_VOLUME


def write_dicom_seg(mask: np.ndarray, source: str | os.PathLike | Sequence[str | os.PathLike],
                    out_path: str | os.PathLike, segments: Sequence[Segment | str], *, algorithm: str = "nbsupport",
                    series_description: str = "nbsupport segmentation", overwrite: bool = False) -> Path:
    """Write ``mask`` as a BINARY DICOM-SEG referencing the ``source`` series; the file appears atomically.

    Args:
        mask: integer (or bool) labels ``(D, H, W)`` on the grid :func:`nbsupport.dicom.read_dicom_series` returns
            for ``source``: 0 background, ``k`` = ``segments[k - 1]``.
        source: the series the mask was predicted on, as given to ``read_dicom_series`` (folder, file or list).
        out_path: the ``.dcm`` to write.
        segments: one :class:`Segment` (or just a name) per label value 1..N.
        algorithm: SegmentAlgorithmName and ManufacturerModelName (e.g. ``"textseg3d"``).
        series_description: SeriesDescription of the new SEG series.
        overwrite: replace an existing ``out_path`` (otherwise it is an error).

    Returns:
        ``out_path``. Frames that hold no voxel of their segment are left out (highdicom's default; an all-zero
        mask keeps all its frames); each frame's segment, source image and position are in its per-frame
        functional groups.

    Raises:
        DicomError: a mask of another shape than the series, labels without a segment, a segment name or
            description too long, or a source series :func:`read_dicom_series` refuses (naming the files).
        nbsupport.runs.RunExistsError: ``out_path`` exists and ``overwrite`` is false.
    """
    from nbsupport.runs import atomic_path

    geometry = dicom_series_geometry(source)
    described = [s if isinstance(s, Segment) else Segment(str(s)) for s in segments]
    labels = _checked_labels(np.asarray(mask), geometry.shape, described)
    out_path = Path(out_path)
    with atomic_path(out_path, overwrite=overwrite) as tmp, series_headers(geometry) as datasets:
        _segmentation(labels, geometry, datasets, described, algorithm, series_description).save_as(
            tmp, enforce_file_format=True)
        del datasets
    return out_path


def _checked_labels(mask: np.ndarray, shape: tuple[int, int, int], segments: list[Segment]) -> np.ndarray:
    if mask.shape != shape:
        raise DicomError(f"mask shape {mask.shape} differs from the source series' (D, H, W) {shape}; expected the "
                         "grid read_dicom_series returns (slices sorted along the normal, rows, columns)")
    if mask.dtype.kind not in "biu":
        raise DicomError(f"mask dtype is {mask.dtype}; expected integer labels (0 background, k: segment k)")
    if not segments:
        raise DicomError("no segments given; expected one Segment (or name) per label value 1..N")
    unnamed = [int(v) for v in np.unique(mask) if v < 0 or v > len(segments)]
    if unnamed:
        raise DicomError(f"mask holds label values {unnamed} without a segment; {len(segments)} segment(s) given, "
                         f"for labels 1..{len(segments)}")
    for k, s in enumerate(segments, 1):
        for field, text in (("name", s.name), ("description", s.description)):
            if len(text) > 64:  # LO value representation
                raise DicomError(f"segment {k} {field} has {len(text)} characters; DICOM allows at most 64")
        if not s.name.strip():
            raise DicomError(f"segment {k} has an empty name; expected a SegmentLabel")
    return mask.astype(np.uint8 if len(segments) < 256 else np.uint16)


def _segmentation(labels: np.ndarray, geometry: DicomSeriesGeometry, datasets: list[Any], segments: list[Segment],
                  algorithm: str, series_description: str) -> Any:
    """The highdicom Segmentation; ``labels`` reordered to the source's frame order for an enhanced source."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from nbsupport import __version__ as version

    identification = hd.AlgorithmIdentificationSequence(name=algorithm, family=codes.DCM.ArtificialIntelligence,
                                                        version=version)
    descriptions = []
    for number, segment in enumerate(segments, 1):
        description = hd.seg.SegmentDescription(
            segment_number=number, segment_label=segment.name,
            segmented_property_category=hd.sr.CodedConcept(*segment.category),
            segmented_property_type=hd.sr.CodedConcept(*segment.property_type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=identification)
        if segment.description:
            description.SegmentDescription = segment.description
        descriptions.append(description)
    frames = labels
    if len(datasets) == 1 and geometry.planes[0].frame is not None:  # one enhanced multi-frame source image
        frames = np.zeros_like(labels)
        frames[[p.frame for p in geometry.planes]] = labels
    try:
        seg = hd.seg.Segmentation(
            source_images=datasets, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=1,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="nbsupport",
            manufacturer_model_name=algorithm, software_versions=version, device_serial_number="0",
            series_description=series_description)
    except (ValueError, TypeError, AttributeError, KeyError) as err:
        raise DicomError(f"{geometry.planes[0].path.parent}: highdicom cannot build the Segmentation "
                         f"({type(err).__name__}: {err})") from None
    return seg

