"""CT volume preprocessing as CT-Data (the seed) does it, fast: HU, RAS, resample, window, pad/crop, float16 npz.

CT-Data's ``preprocess.py`` (lukeingawesome/CT-Data @ a8fed72, last changed in e1817c6, lines 21-24 and 28-40;
its first version, 2cff75c, had two windows and a tight crop) runs one MONAI chain per volume: ``LoadImaged``
(NibabelReader: the NIfTI header's ``scl_slope``/``scl_inter`` applied, float32) -> ``EnsureChannelFirstd`` ->
``Orientationd("RAS")`` -> ``Spacingd(pixdim=(1.25, 1.25, 2.0), mode="trilinear", align_corners=True)`` (MONAI's
defaults: ``padding_mode="border"``, float64 resampling) -> ``ScaleIntensityRanged(-1000..1500 -> 0..1,
clip=True)`` -> ``SpatialPadd((256, 256, 192))`` (symmetric, zeros) -> ``CenterSpatialCropd((256, 256, 192))`` ->
``CastToTyped(float16)``, saved with ``np.savez_compressed`` (key ``image``, shape (1, X, Y, Z)).
:func:`monai_chain` builds exactly that chain; the benchmark and the tests check :func:`preprocess_volume`
against it (max abs difference <= 1e-3 after float16).

MONAI Spacing's grid (monai 1.6.1 ``data/utils.py`` ``compute_shape_offset``, ``scale_extent=False``, and
``transforms/spatial/array.py`` ``Spacing.__call__``): the first output voxel sits on the first input voxel (of the
RAS-oriented array), the spacing is exactly the target, and an axis of ``n`` voxels at ``s_in`` mm becomes
``round((n - 1) * s_in / s_out + 1)`` voxels (numpy's round: halves to even); output voxel ``j`` samples input
index ``j * s_out / s_in``, clamped to the last voxel (border padding). An axis whose spacing is within 1e-3 mm of
the target keeps its own spacing (no resampling). :func:`preprocess_volume` computes the same numbers without
ever building the full resampled volume:

* only the input voxels that reach the centre crop are read (crop before resampling);
* the trilinear resample is three separable 1-D linear passes (float32 lerp), the axis that shrinks most first,
  so later passes touch fewer voxels; the first pass reads the stored int16 values directly, so the whole volume
  is never converted to float;
* reorientation to RAS is folded into the sample positions (a flipped axis reads its indices backwards, a
  transposed axis is a permuted view): no copy of the volume;
* rescale (slope/intercept), HU window and clipping commute with linear interpolation up to the clip, so they are
  applied once, in place, to the output only;
* ``.nii.gz`` is inflated by ISA-L (``isal``, several times faster than zlib) when it is installed, and the voxels
  are a view of the inflated bytes (no copy).

Where ours differs from CT-Data's script (benchmarks/RESULTS.md, "ct_clip preprocessing equal to the seed's chain"):

* HU, spacing and orientation: CT-Data trusts the NIfTI header (scaling, affine), which is right for CT-RATE's
  ``*_fixed`` re-release and any standard CT NIfTI, and what :func:`load_ct` does by default. CT-RATE's first
  release has no usable header (raw values, identity affine): there :func:`load_ct` takes the metadata CSV's
  ``RescaleSlope`` / ``RescaleIntercept``, ``XYSpacing`` / ``ZSpacing`` and the directions of
  ``ImageOrientationPatient``, as the dataset's own fix script does (:mod:`nbsupport.ct_clip.data` decides which
  from the folder). Equal to the chain on the fixed file made from the same volume (test). Either way
  :func:`check_air` refuses a volume whose air is not near -1000 HU (a rescale applied twice or not at all).
* sheared affines (gantry tilt): MONAI's Spacing resamples onto an orthogonal world grid (``zoom_affine``'s
  Cholesky factor), ours along the array axes, so the output differs (mean abs 0.10 at a 5 degree tilt on a
  64 x 64 x 40 test volume). Orthogonal affines, oblique (rotated) ones included, are equal.
* storage: CT-Data writes ``np.savez_compressed``; ours ``np.savez`` unless ``compress`` (the same array).

Command line (for clusters): ``python -m nbsupport.ct_clip.preprocessing --data-root DATA --manifest M.csv``.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import gzip
import multiprocessing
import os
import sys
import time
import traceback
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from nbsupport.progress import progress
from nbsupport.runs import atomic_path

TARGET_SPACING = (1.25, 1.25, 2.0)  # mm, RAS axes (CT-Data)
TARGET_SHAPE = (256, 256, 192)
HU_WINDOW = (-1000.0, 1500.0)
PREPROCESS_VERSION = 2  # bump when the voxels preprocess_volume makes change (2: MONAI Spacing's grid)


@dataclasses.dataclass(frozen=True)
class PreprocessSpec:
    """Output geometry and intensity window; the defaults are CT-Data's."""

    spacing: tuple[float, float, float] = TARGET_SPACING
    shape: tuple[int, int, int] = TARGET_SHAPE
    hu_min: float = HU_WINDOW[0]
    hu_max: float = HU_WINDOW[1]
    compress: bool = False  # np.savez_compressed (CT-Data) is ~3x smaller but costs more than the rest together

    def __post_init__(self) -> None:
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ValueError(f"spacing must be 3 positive mm values, got {self.spacing!r}")
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"shape must be 3 positive voxel counts, got {self.shape!r}")
        if not self.hu_max > self.hu_min:
            raise ValueError(f"hu_max must exceed hu_min, got {self.hu_min}..{self.hu_max}")

    def folder_name(self) -> str:
        """``<fingerprint>`` of what decides the voxels (the settings and the code's version, not the file format):
        volumes made with other settings never share a folder, so one is never reused for the other."""
        from nbsupport.cache import fingerprint

        settings = {k: v for k, v in dataclasses.asdict(self).items() if k != "compress"}
        return fingerprint({"version": PREPROCESS_VERSION, **settings})


@dataclasses.dataclass
class CTVolume:
    """A decoded CT: stored values, how they map to HU, voxel size and where the array axes point."""

    stored: np.ndarray  # (I, J, K) as stored in the file (ints, usually int16)
    slope: float
    intercept: float
    spacing: tuple[float, float, float]  # mm along the stored array axes
    ras_axis: tuple[int, int, int]  # RAS axis (0 R, 1 A, 2 S) that each stored axis runs along
    flipped: tuple[bool, bool, bool]  # whether a stored axis runs towards L / P / I (against RAS)


def _gzip_decoder() -> tuple[Any, tuple[type[BaseException], ...]]:
    """``(module with decompress, errors it raises on corrupt data)``: ISA-L's igzip when installed, else zlib's."""
    try:
        from isal import igzip, isal_zlib  # python-isal: several times faster than zlib's inflate
    except ImportError:
        return gzip, (OSError, EOFError, zlib.error)
    return igzip, (OSError, EOFError, zlib.error, isal_zlib.error)


def _inflate(raw: bytes, path: str | os.PathLike) -> bytes:
    """Decompress a whole gzip stream (its CRC catches corrupt bytes that still inflate)."""
    decoder, errors = _gzip_decoder()
    try:
        return decoder.decompress(raw)
    except errors as err:
        raise ValueError(f"{path}: cannot decompress ({type(err).__name__}: {err}); expected a gzipped NIfTI "
                         "volume") from err


def load_ct(path: str | os.PathLike, slope: float | None = None, intercept: float | None = None,
            xy_spacing: tuple[float, float] | None = None, z_spacing: float | None = None,
            directions: np.ndarray | Sequence[Sequence[float]] | None = None) -> CTVolume:
    """Decode a ``.nii(.gz)`` CT without scaling it (``stored`` is a read-only view of the inflated bytes).

    Args:
        path: the NIfTI file.
        slope, intercept: ``HU = slope * stored + intercept`` (CT-RATE first-release metadata); None: the NIfTI
            header's ``scl_slope`` / ``scl_inter`` (1 and 0 when unset), as MONAI's ``LoadImaged`` applies them.
        xy_spacing: CT-RATE ``XYSpacing`` as (row, column) mm; stored axis 0 runs along columns, axis 1 along rows.
        z_spacing: CT-RATE ``ZSpacing`` (mm) of stored axis 2. None: voxel sizes from the affine.
        directions: 3 x 3, column ``a`` the RAS direction stored axis ``a`` runs along (CT-RATE first release:
            from ``ImageOrientationPatient``); None: the affine's.
    """
    import nibabel as nib

    if str(path).endswith(".gz"):
        raw = _inflate(Path(path).read_bytes(), path)
        try:
            image = nib.Nifti1Image.from_bytes(raw)  # header only: the voxels are read below, without a copy
        except Exception as err:
            raise ValueError(f"{path}: not a NIfTI-1 volume ({type(err).__name__}: {err})") from err
        shape = image.shape
        offset, dtype = int(image.dataobj.offset), image.get_data_dtype()
        if offset + dtype.itemsize * int(np.prod(shape)) > len(raw):
            raise ValueError(f"{path}: {len(raw)} bytes after inflating, too few for a {shape} {dtype} volume "
                             f"at offset {offset}")
        stored = np.frombuffer(raw, dtype=dtype, count=int(np.prod(shape)), offset=offset).reshape(shape, order="F")
    else:
        image = nib.load(str(path))
        stored = np.asanyarray(image.dataobj.get_unscaled())
    if len(image.shape) != 3:
        raise ValueError(f"{path}: expected a 3-D volume, got shape {image.shape}")
    if stored.dtype.kind == "f" and not np.isfinite(stored).all():  # NaN would pass the window into training
        raise ValueError(f"{path}: {int((~np.isfinite(stored)).sum())} NaN/inf voxels; expected finite values")
    header_slope, header_inter = image.dataobj.slope, image.dataobj.inter
    affine = image.affine
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))  # MONAI affine_to_spacing: the columns' lengths
    spacing = [float(v) for v in zooms]
    if xy_spacing is not None:
        spacing[0], spacing[1] = float(xy_spacing[1]), float(xy_spacing[0])
    if z_spacing is not None:
        spacing[2] = float(z_spacing)
    if directions is not None:
        affine = np.eye(4)
        affine[:3, :3] = np.asarray(directions, dtype=float) * spacing
    ornt = nib.orientations.io_orientation(affine)
    return CTVolume(stored=stored,
                    slope=float(header_slope if slope is None else slope),
                    intercept=float(header_inter if intercept is None else intercept),
                    spacing=(spacing[0], spacing[1], spacing[2]),
                    ras_axis=tuple(int(a) for a in ornt[:, 0]),  # type: ignore[arg-type]
                    flipped=tuple(bool(f < 0) for f in ornt[:, 1]))  # type: ignore[arg-type]


AIR_HU = -1000.0  # Hounsfield's scale: air is -1000 HU, water 0 HU, by definition
AIR_TOLERANCE_HU = 500.0  # accepted air level: AIR_HU +/- this (see check_air)
_AIR_SAMPLE_VOXELS = 2_000_000  # check_air reads a regular subsample of about this many voxels


def air_level(stored: np.ndarray, slope: float = 1.0, intercept: float = 0.0) -> float:
    """Where air lies in ``HU = slope * stored + intercept``: the 1st percentile of the voxels (a regular subsample of
    about 2 million), the volume's minimum left out when it lies below the accepted air range.

    CT reconstructions pad the corners outside the circular field of view with one constant below air (-2048 or
    -3024 HU and the like, a fifth of a square slice); without it, what remains at the low end is air around the
    patient and in the airways and lungs. A minimum within the air range (noise-free air, as in a phantom) stays.
    """
    step = max(int(np.ceil((stored.size / _AIR_SAMPLE_VOXELS) ** (1 / 3))), 1)
    hu = np.asarray(stored[::step, ::step, ::step], dtype=np.float32).ravel() * slope + intercept
    lowest = hu.min()
    if lowest < AIR_HU - AIR_TOLERANCE_HU and (hu > lowest).any():
        hu = hu[hu > lowest]
    return float(np.percentile(hu, 1))


def check_air(ct: CTVolume, source: str | os.PathLike, reading: str) -> float:
    """The volume's air level in HU; ValueError naming ``source`` and what was seen where it is not air.

    Physics: air is -1000 HU by the definition of the scale, aerated lung -950..-700 HU, and no tissue lies below
    air, so the low end of a CT (padding outside the field of view left out, :func:`air_level`) is within
    -1000 +/- ``AIR_TOLERANCE_HU`` (500) HU whenever ``HU = slope * stored + intercept`` is right. A rescale
    applied twice or not at all moves it by the intercept, -1000 or -1024 HU (-8192 for some CT-RATE scanners):
    always more than 500 HU, so the two cases never meet. (CT-RATE's re-release double-rescaled by CT-CLIP's
    loader put water at -1024 HU: CT-CLIP issue #50.)

    Args:
        reading: how ``ct.slope`` / ``ct.intercept`` were obtained, named in the error (which convention).
    """
    air = air_level(ct.stored, ct.slope, ct.intercept)
    if ct.slope > 0 and abs(air - AIR_HU) <= AIR_TOLERANCE_HU:
        return air
    raise ValueError(
        f"{source}: air lies at {air:+.0f} HU with {reading} (HU = {ct.slope:g} * stored + {ct.intercept:g}); "
        f"a CT has air at {AIR_HU:.0f} HU (accepted {AIR_HU - AIR_TOLERANCE_HU:.0f}..{AIR_HU + AIR_TOLERANCE_HU:.0f},"
        f" measured as the 1st percentile without padding); the stored values themselves put it at "
        f"{air_level(ct.stored):+.0f}. A rescale applied twice or not at all shifts air by the intercept: is the "
        "volume in the folder of the other CT-RATE release (train/ and valid/ hold raw values, train_fixed/ and "
        "valid_fixed/ HU)?")


SPACING_TOLERANCE = 1e-3  # mm: MONAI Spacing keeps an axis whose spacing is this close to the target (AFFINE_TOL)


def output_spacing(spacing_in: float, spacing_out: float) -> float:
    """The spacing MONAI's Spacing gives an axis: the target, or the input's own when within 1e-3 mm of it."""
    return spacing_in if abs(spacing_in - spacing_out) <= SPACING_TOLERANCE else spacing_out


def resampled_size(n_in: int, spacing_in: float, spacing_out: float) -> int:
    """Voxels of the full resampled axis as MONAI's Spacing makes it: ``round((n_in - 1) * s_in / s_out + 1)``
    (first and last input voxel centres span the output; numpy's round, halves to even)."""
    ratio = spacing_in / output_spacing(spacing_in, spacing_out)
    return max(int(np.round((n_in - 1) * ratio + 1.0)), 1)


def _axis_plan(n_in: int, spacing_in: float, spacing_out: float, target: int,
               flipped: bool) -> tuple[slice, np.ndarray]:
    """Where one output axis comes from.

    Returns:
        (output slice that is filled, input positions [n_filled] float64 in stored-index units)
    """
    n_full = resampled_size(n_in, spacing_in, spacing_out)
    if n_full >= target:  # MONAI CenterSpatialCrop: start = n // 2 - target // 2
        start = n_full // 2 - target // 2
        j = np.arange(start, start + target)
        out = slice(0, target)
    else:  # MONAI SpatialPad (symmetric): before = (target - n) // 2
        before = (target - n_full) // 2
        j = np.arange(n_full)
        out = slice(before, before + n_full)
    # Output voxel j lies j * s_out mm from the first input voxel; past the last one, border padding repeats it.
    positions = np.minimum(j * (output_spacing(spacing_in, spacing_out) / spacing_in), n_in - 1.0)
    if flipped:
        positions = (n_in - 1) - positions
    return out, positions


def _linear_pass(volume: np.ndarray, axis: int, positions: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``volume`` along ``axis`` at fractional ``positions``: a new float32 array.

    Plain numpy, in place where possible: on a shared 2-core machine torch's OpenMP threads spin against other
    processes and made the same passes ten times slower.
    """
    n = volume.shape[axis]
    if n == 1:
        return np.repeat(volume, len(positions), axis=axis).astype(np.float32, copy=False)
    lower = np.clip(np.floor(positions).astype(np.intp), 0, n - 2)
    weight = (positions - lower).astype(np.float32)
    if axis == 0:
        # Slice by slice straight from the stored (cropped, strided) view: no gathered copies of the input, and
        # the int16 -> float32 conversion happens in the same copy.
        out = np.empty((len(positions), *volume.shape[1:]), dtype=np.float32)
        step = np.empty(volume.shape[1:], dtype=np.float32)
        for k, (i, w) in enumerate(zip(lower.tolist(), weight.tolist())):
            np.copyto(out[k], volume[i], casting="unsafe")
            if w:
                np.subtract(volume[i + 1], volume[i], out=step, dtype=np.float32)
                step *= w
                out[k] += step
        return out
    # Along an inner axis: one outer slice at a time, so the gathered temporaries stay in cache and are reused.
    out_shape = list(volume.shape)
    out_shape[axis] = len(positions)
    out = np.empty(out_shape, dtype=np.float32)
    weight_shape = [1] * (volume.ndim - 1)
    weight_shape[axis - 1] = len(positions)
    weight = weight.reshape(weight_shape)
    step = np.empty(out_shape[1:], dtype=np.float32)
    for k in range(volume.shape[0]):
        if volume.dtype == np.float32:
            np.take(volume[k], lower, axis=axis - 1, out=out[k])
            np.take(volume[k], lower + 1, axis=axis - 1, out=step)
        else:  # stored ints (this axis shrinks most): gather, then convert in the assignment
            out[k] = np.take(volume[k], lower, axis=axis - 1)
            step[...] = np.take(volume[k], lower + 1, axis=axis - 1)
        step -= out[k]
        step *= weight
        out[k] += step
    return out


def preprocess_volume(ct: CTVolume, spec: PreprocessSpec = PreprocessSpec()) -> tuple[np.ndarray, tuple[float, ...]]:
    """HU -> RAS -> resample -> window -> pad/crop, computed on the cropped region only.

    Returns:
        (float16 array (1, X, Y, Z) in RAS order with values in 0..1 (``hu_min`` -> 0, ``hu_max`` -> 1, pad = 0),
        effective output spacing in mm per RAS axis)
    """
    volume = ct.stored
    # plans[a]: the RAS output axis that stored axis a becomes, sampled in stored-index units (flips included).
    plans = [_axis_plan(volume.shape[a], ct.spacing[a], spec.spacing[ct.ras_axis[a]], spec.shape[ct.ras_axis[a]],
                        ct.flipped[a]) for a in range(3)]
    # Read only the stored index range the samples need (a view), then shift the sample positions into it.
    window = []
    for a, (_, positions) in enumerate(plans):
        first = int(max(np.floor(positions.min()), 0)) if len(positions) else 0
        last = int(min(np.floor(positions.max()) + 2, volume.shape[a])) if len(positions) else 1
        window.append((first, last))
    volume = volume[tuple(slice(f, l) for f, l in window)]
    positions = [plans[a][1] - window[a][0] for a in range(3)]
    # Work on the view whose axes run from the largest stride to the smallest (C order for NIfTI's Fortran
    # arrays): np.take along an outer axis copies whole rows, and its C-ordered output then keeps the layout.
    memory = sorted(range(3), key=lambda a: -abs(volume.strides[a]))
    volume = volume.transpose(memory)
    # The axis that shrinks most of the two outer ones first; the contiguous axis last, when the volume is
    # smallest, since gathers along it copy single elements instead of rows.
    outer = sorted((0, 1), key=lambda k: len(positions[memory[k]]) / max(volume.shape[k], 1))
    for k in [*outer, 2]:
        volume = _linear_pass(volume, k, positions[memory[k]])
    scale = ct.slope / (spec.hu_max - spec.hu_min)
    offset = (ct.intercept - spec.hu_min) / (spec.hu_max - spec.hu_min)
    volume *= scale
    volume += offset
    np.clip(volume, 0.0, 1.0, out=volume)
    # Stored axes -> RAS axes: a transposed view, copied once into the padded float16 output. The output is
    # Fortran-ordered when the stored volume was (NIfTI), so that copy runs in memory order; np.save records
    # the order and np.load restores the same (1, X, Y, Z) array.
    to_ras = [ct.ras_axis.index(d) for d in range(3)]  # stored axis of each RAS axis
    order = "F" if memory == [2, 1, 0] and to_ras == [0, 1, 2] else "C"
    out = np.zeros((1, *spec.shape), dtype=np.float16, order=order)
    filled = tuple(plans[to_ras[d]][0] for d in range(3))
    out[0][filled] = volume.transpose([memory.index(to_ras[d]) for d in range(3)])
    return out, tuple(output_spacing(ct.spacing[to_ras[d]], spec.spacing[d]) for d in range(3))


def monai_chain(spec: PreprocessSpec = PreprocessSpec(),
                rescale: tuple[float, float] | None = None) -> Any:
    """CT-Data's MONAI chain (``preprocess.py`` lines 28-40, at ``spec``'s geometry and window): ``path -> float16
    (1, X, Y, Z)`` array. The yardstick :func:`preprocess_volume` is checked (1e-3) and timed against.

    Args:
        rescale: ``(slope, intercept)`` applied to the loaded values (which carry the header's rescale already),
            for CT-RATE volumes whose HU rescale is in the metadata only; None: CT-Data's chain as it is.
    """
    from monai.transforms import (CastToTyped, CenterSpatialCropd, Compose, EnsureChannelFirstd, Lambdad, LoadImaged,
                                  Orientationd, ScaleIntensityRanged, Spacingd, SpatialPadd)

    hu = [] if rescale is None else [Lambdad(keys="image", func=lambda x: x * rescale[0] + rescale[1])]
    chain = Compose([
        LoadImaged(keys="image"),
        EnsureChannelFirstd(keys="image"),
        *hu,
        Orientationd(keys="image", axcodes="RAS"),
        Spacingd(keys="image", pixdim=spec.spacing, mode="trilinear", align_corners=True),
        ScaleIntensityRanged(keys="image", a_min=spec.hu_min, a_max=spec.hu_max, b_min=0.0, b_max=1.0, clip=True),
        SpatialPadd(keys="image", spatial_size=spec.shape),
        CenterSpatialCropd(keys="image", roi_size=spec.shape),
        CastToTyped(keys="image", dtype=np.float16),
    ])

    def run(path: str | os.PathLike) -> np.ndarray:
        return np.asarray(chain({"image": str(path)})["image"])

    return run


def save_preprocessed(path: str | os.PathLike, image: np.ndarray, compress: bool = False) -> None:
    """Write ``image`` as ``.npz`` (key ``image``) atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        (np.savez_compressed if compress else np.savez)(fh, image=image)


# ---------------------------------------------------------------------------------------------- many volumes
HEADER_READING = "the header's scl_slope / scl_inter (HU stored)"


@dataclasses.dataclass(frozen=True)
class VolumeJob:
    """One volume to preprocess (paths absolute) and how to decode it: each of ``slope`` / ``intercept``,
    ``xy_spacing`` / ``z_spacing`` and ``directions`` None means the NIfTI header's (see :func:`load_ct`);
    ``reading`` names that choice in errors."""

    volume: str
    nifti: str
    output: str
    slope: float | None = None
    intercept: float | None = None
    xy_spacing: tuple[float, float] | None = None
    z_spacing: float | None = None
    directions: tuple[tuple[float, float, float], ...] | None = None
    reading: str = ""  # '' = HEADER_READING, or "the job's slope / intercept" where they are given


def decode_job(job: VolumeJob) -> CTVolume:
    """The job's volume decoded, its HU checked against air (:func:`check_air`)."""
    ct = load_ct(job.nifti, job.slope, job.intercept, job.xy_spacing, job.z_spacing, job.directions)
    given = job.slope is not None or job.intercept is not None
    check_air(ct, job.nifti, job.reading or ("the job's slope / intercept" if given else HEADER_READING))
    return ct


def run_job(job: VolumeJob, spec: PreprocessSpec, redo: bool = False) -> dict[str, Any]:
    """Preprocess one volume; never raises: failures come back as ``status="failed"`` with the reason."""
    started = time.perf_counter()
    row: dict[str, Any] = {"volume": job.volume, "status": "", "reason": "", "seconds": 0.0, "original_shape": "",
                           "spacing_x": np.nan, "spacing_y": np.nan, "spacing_z": np.nan}
    try:
        if not redo and Path(job.output).is_file():
            row["status"] = "skipped"
            spacing = _effective_spacing_of(job, spec)
        else:
            ct = decode_job(job)
            row["original_shape"] = "x".join(str(s) for s in ct.stored.shape)
            image, spacing = preprocess_volume(ct, spec)
            save_preprocessed(job.output, image, spec.compress)
            row["status"] = "done"
        row["spacing_x"], row["spacing_y"], row["spacing_z"] = spacing
    except Exception as err:  # one bad volume must not stop the others; the reason goes into the status table
        row["status"] = "failed"
        row["reason"] = f"{type(err).__name__}: {err}".splitlines()[0][:500]
        if os.environ.get("NBSUPPORT_DEBUG"):
            traceback.print_exc()
    row["seconds"] = round(time.perf_counter() - started, 4)
    return row


def _effective_spacing_of(job: VolumeJob, spec: PreprocessSpec) -> tuple[float, ...]:
    """Output spacing of an already preprocessed volume, from the source header (no voxel data read)."""
    import nibabel as nib

    image = nib.load(job.nifti)
    zooms = [float(z) for z in np.sqrt((image.affine[:3, :3] ** 2).sum(axis=0))]
    if job.xy_spacing is not None:
        zooms[0], zooms[1] = job.xy_spacing[1], job.xy_spacing[0]
    if job.z_spacing is not None:
        zooms[2] = job.z_spacing
    affine = image.affine if job.directions is None else np.pad(np.asarray(job.directions) * zooms, ((0, 1), (0, 1)))
    ras = [int(a) for a in nib.orientations.io_orientation(affine)[:, 0]]
    out = [0.0, 0.0, 0.0]
    for axis, d in enumerate(ras):
        out[d] = output_spacing(zooms[axis], spec.spacing[d])
    return tuple(out)


def _init_worker() -> None:
    torch.set_num_threads(1)  # one volume per process; threads inside would only fight over the same cores


def run_jobs(jobs: Sequence[VolumeJob], spec: PreprocessSpec, workers: int = 1, redo: bool = False) -> pd.DataFrame:
    """Preprocess ``jobs`` in ``workers`` processes with a progress bar; returns one status row per volume
    (``volume, status (done / skipped / failed), reason, seconds, original_shape, spacing_x/y/z``)."""
    rows = []
    if workers <= 1 or len(jobs) <= 1:
        for job in progress(jobs, desc="preprocessing CT volumes"):
            rows.append(run_job(job, spec, redo))
    else:
        # spawn: a forked child of a process whose OpenMP pool already ran can deadlock in torch.
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker) as pool:
            futures = [pool.submit(run_job, job, spec, redo) for job in jobs]
            for future in progress(concurrent.futures.as_completed(futures), desc="preprocessing CT volumes",
                                   total=len(futures)):
                rows.append(future.result())
    order = {job.volume: i for i, job in enumerate(jobs)}
    return pd.DataFrame(rows).sort_values("volume", key=lambda s: s.map(order)).reset_index(drop=True)


def preprocess_dataset(data_root: str | os.PathLike, manifest_path: str | os.PathLike, output_dir: str = "",
                       spec: PreprocessSpec = PreprocessSpec(), workers: int = 1, redo: bool = False,
                       val_fraction: float = 0.1, report_fields: str = "findings", seed: int = 0,
                       limit: int | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """CT-RATE root -> preprocessed npz files + manifest (failed volumes left out and listed).

    Args:
        data_root: CT-RATE as downloaded: its repository root or its ``dataset`` folder, holding the re-release
            (``train_fixed``, ``valid_fixed``) or the first release (``train``, ``valid``); see
            ``nbsupport.ct_clip.data``. The manifest's paths are relative to it.
        manifest_path: CSV to write (its ``.meta.json`` sidecar records the data root).
        output_dir: folder for the npz files, relative to ``data_root``; '' = ``preprocessed/<spec.folder_name()>``
            (an existing npz is reused only if made with the same settings).
        limit: only the first ``limit`` volumes of each source split (a quick look at a huge dataset).

    Returns:
        (manifest, status table with one row per volume)
    """
    from nbsupport.ct_clip import data as ct_data
    from nbsupport.manifest import write_manifest
    from nbsupport.paths import resolve_path

    root = resolve_path(data_root)
    volumes = ct_data.scan_dataset(root)
    if limit is not None:
        volumes = volumes.groupby("source_split", group_keys=False).head(limit).reset_index(drop=True)
    out_folder = output_dir or f"{ct_data.PREPROCESSED_FOLDER}/{spec.folder_name()}"
    relative_out = [f"{out_folder}/{v}.npz" for v in volumes.volume]
    jobs = [ct_data.volume_job(root, row, str(root / rel))
            for row, rel in zip(volumes.to_dict("records"), relative_out)]
    status = run_jobs(jobs, spec, workers=workers, redo=redo)
    manifest = volumes.assign(image=relative_out, split=ct_data.assign_splits(volumes, val_fraction, seed))
    manifest["report"] = [ct_data.report_text(f, i, report_fields) for f, i in zip(manifest.findings,
                                                                                   manifest.impressions)]
    manifest = manifest.merge(status[["volume", "spacing_x", "spacing_y", "spacing_z"]], on="volume")
    ok = status.status.isin(["done", "skipped"]).to_numpy()
    columns = [c.name for c in ct_data.CT_CLIP_SCHEMA.columns]
    manifest = manifest.loc[ok, columns + ["source_split"]].reset_index(drop=True)
    write_manifest(manifest, resolve_path(manifest_path), ct_data.CT_CLIP_SCHEMA, root)
    return manifest, status


def main(argv: list[str] | None = None) -> int:
    """``python -m nbsupport.ct_clip.preprocessing --data-root DATA --manifest M.csv [--workers N] [--redo]``."""
    parser = argparse.ArgumentParser(prog="python -m nbsupport.ct_clip.preprocessing", description=(
        "Preprocess a CT-RATE data root as CT-Data does (HU, RAS, 1.25x1.25x2 mm, -1000..1500 HU -> 0..1, "
        "256x256x192, float16 npz) and write the manifest 02_train reads. Done volumes are skipped unless --redo; "
        "failed volumes are listed and do not stop the others."))
    parser.add_argument("--data-root", required=True, help="CT-RATE repository root or its 'dataset' folder")
    parser.add_argument("--manifest", required=True, help="manifest CSV to write")
    parser.add_argument("--output-dir", default="", help="npz folder relative to the data root (default preprocessed)")
    parser.add_argument("--workers", type=int, default=max((os.cpu_count() or 2) - 2, 1), help="processes")
    parser.add_argument("--redo", action="store_true", help="preprocess volumes whose npz exists again")
    parser.add_argument("--spacing", type=float, nargs=3, default=TARGET_SPACING, help="mm (R, A, S)")
    parser.add_argument("--shape", type=int, nargs=3, default=TARGET_SHAPE, help="voxels (R, A, S)")
    parser.add_argument("--compress", action="store_true", help="np.savez_compressed (smaller, slower)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="train patients held out for validation")
    parser.add_argument("--report-fields", default="findings", choices=["findings", "impressions",
                                                                        "findings+impressions"])
    parser.add_argument("--status-csv", default="", help="also write the per-volume status table here")
    args = parser.parse_args(argv)
    spec = PreprocessSpec(spacing=tuple(args.spacing), shape=tuple(args.shape), compress=args.compress)
    manifest, status = preprocess_dataset(args.data_root, args.manifest, args.output_dir, spec, args.workers,
                                          args.redo, args.val_fraction, args.report_fields)
    if args.status_csv:
        with atomic_path(args.status_csv) as tmp:
            status.to_csv(tmp, index=False)
    counts = status.status.value_counts().to_dict()
    print(f"{len(manifest)} volumes in {args.manifest}; {counts}")
    for row in status[status.status == "failed"].itertuples():
        print(f"FAILED {row.volume}: {row.reason}", file=sys.stderr)
    return 0 if not (status.status == "failed").any() else 1


if __name__ == "__main__":
    sys.exit(main())
