"""ct_clip preprocessing: ours against the seed's MONAI chain (equality and speed) and against merely decoding.

For each volume, side by side in one process: ``decode zlib`` = read the ``.nii.gz`` + inflate it with Python's
zlib (what any pipeline must pay); ``decode isal`` = the same with ISA-L (``isal.igzip``, when installed);
``ours`` = :func:`load_ct` + :func:`preprocess_volume` (HU, RAS, resample to 1.25 x 1.25 x 2 mm, window,
pad/crop to 256 x 256 x 192, float16) + writing the npz; ``MONAI`` = CT-Data's chain (:func:`monai_chain`:
LoadImaged, Orientationd RAS, Spacingd trilinear, ScaleIntensityRanged, SpatialPadd, CenterSpatialCropd, float16)
+ writing the npz the same way. The outputs are compared (max absolute difference, must be <= 1e-3). Timings are
the minimum over ``--repeats`` (MONAI over ``--monai-repeats``), with the machine's threads (torch's for MONAI,
ours is single-threaded numpy). Two sets of volumes: the demo volumes (CT-RATE layout from ``nbsupport demo-data
ct_clip``, or written here if absent; their HU rescale is in the metadata, so the MONAI chain gets it applied after
loading) and synthetic 512 x 512 x 300 chest phantoms at 0.7 x 0.7 x 1 mm stored LPS with the rescale in the
NIfTI header (the seed's chain exactly as it is).

Targets (issue 23): ours >= 5 x faster than the MONAI chain on 512 x 512 x 300 volumes, max abs diff <= 1e-3.

    nbsupport bench ct_clip [--demo-volumes 8] [--large-volumes 2] [--repeats 3] [--monai-repeats 1]
"""
from __future__ import annotations

import argparse
import gzip
import importlib.metadata
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nbsupport.ct_clip import data as ct_data
from nbsupport.ct_clip import demo_data
from nbsupport.ct_clip import preprocessing as ct_pre
from nbsupport.demo import DEMO_MARKER

try:
    from isal import igzip as isal_gzip
except ImportError:  # then ours inflates with zlib as well, and the isal column is nan
    isal_gzip = None


def large_phantom(path: Path, seed: int) -> None:
    """A 512 x 512 x 300 chest-like int16 volume (air, body, lungs, spine, noise), stored LPS like DICOM exports,
    ``HU = stored - 1024`` in the header's scl_slope / scl_inter (bytes 112-119; nibabel would reset them)."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    shape, spacing = (512, 512, 300), (0.7, 0.7, 1.0)
    x = ((np.arange(shape[0]) - 255.5) * spacing[0]).astype(np.float32)[:, None]
    y = ((np.arange(shape[1]) - 255.5) * spacing[1]).astype(np.float32)[None, :]
    plane = np.full(shape[:2], -1000, dtype=np.int16)
    plane[(x / 160) ** 2 + (y / 115) ** 2 <= 1] = 40
    for cx in (-75.0, 75.0):
        plane[((x - cx) / 60) ** 2 + (y / 85) ** 2 <= 1] = -850
    plane[x ** 2 + (y - 85) ** 2 <= 20 ** 2] = 450
    hu = np.repeat(plane[:, :, None], shape[2], axis=2)
    hu += rng.normal(0, 20, size=shape).astype(np.int16)
    stored = np.asfortranarray(hu + 1024)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    raw = bytearray(nib.Nifti1Image(stored, affine).to_bytes())
    raw[112:120] = np.array([1.0, -1024.0], dtype="<f4").tobytes()
    path.write_bytes(gzip.compress(bytes(raw), compresslevel=6))


def timed(fn, repeats: int) -> tuple[float, object]:
    """``(minimum seconds over repeats, last result)``."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def measure(path: Path, rescale: tuple[float, float] | None, out: Path, repeats: int, monai_repeats: int) -> dict:
    """Decode (zlib, isal), ours and the MONAI chain on one volume; ``rescale`` None: the header's."""
    import nibabel as nib

    spec = ct_pre.PreprocessSpec()
    slope, intercept = rescale if rescale is not None else (None, None)

    def ours() -> np.ndarray:
        image, _ = ct_pre.preprocess_volume(ct_pre.load_ct(path, slope, intercept), spec)
        ct_pre.save_preprocessed(out / "ours.npz", image)
        return image

    seed_chain = ct_pre.monai_chain(spec, rescale)

    def monai() -> np.ndarray:
        image = seed_chain(path)
        ct_pre.save_preprocessed(out / "monai.npz", image)
        return image

    row: dict = {"decode_zlib": timed(lambda: gzip.decompress(path.read_bytes()), repeats)[0],
                 "decode_isal": (timed(lambda: isal_gzip.decompress(path.read_bytes()), repeats)[0]
                                 if isal_gzip else float("nan"))}
    row["ours"], fast = timed(ours, repeats)
    row["monai"], reference = timed(monai, monai_repeats)
    row["shape"] = "x".join(map(str, nib.load(str(path)).shape))  # the header only
    row["max_abs_diff"] = float(np.abs(fast.astype(np.float32) - reference.astype(np.float32)).max())
    return row


def report(name: str, rows: list[dict]) -> list[str]:
    mean = {k: float(np.mean([r[k] for r in rows])) for k in ("decode_zlib", "decode_isal", "ours", "monai")}
    worst = max(r["max_abs_diff"] for r in rows)
    shapes = sorted({r["shape"] for r in rows})
    return [f"| {name} ({len(rows)}; {', '.join(shapes[:3])}{', ...' if len(shapes) > 3 else ''}) | "
            f"{mean['decode_zlib']:.3f} | {mean['decode_isal']:.3f} | {mean['ours']:.3f} | {mean['monai']:.3f} | "
            f"{mean['ours'] / mean['decode_zlib']:.2f} | {mean['ours'] / mean['decode_isal']:.2f} | "
            f"**{mean['monai'] / mean['ours']:.1f}** | {worst:.1e} |"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-root", default="", help="CT-RATE-layout demo root (default: $NBSUPPORT_DATA/ct_clip)")
    parser.add_argument("--demo-volumes", type=int, default=8)
    parser.add_argument("--large-volumes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--monai-repeats", type=int, default=1)
    args = parser.parse_args(argv)
    import monai
    import torch

    from nbsupport.paths import demo_data_root

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        root = Path(args.demo_root) if args.demo_root else demo_data_root() / "ct_clip"
        if not (root / DEMO_MARKER).exists():
            print(f"no demo data at {root}; writing {args.demo_volumes} demo volumes to a temporary folder")
            root = demo_data.write_demo_dataset(tmp / "demo", n_train_patients=args.demo_volumes, n_valid_patients=0,
                                              **{k: v for k, v in demo_data.DEMO_SIZES["demo"].items()
                                                 if k == "scale"})
        volumes = ct_data.scan_dataset(root, splits=("train",)).head(args.demo_volumes)
        demo_rows = []
        for row in volumes.itertuples():
            rescale = (row.rescale_slope, row.rescale_intercept) if row.release == "first" else None  # _fixed: HU
            demo_rows.append(measure(root / row.nifti, rescale, tmp,
                                     args.repeats, args.monai_repeats))
            print(f"demo {row.volume}: {demo_rows[-1]}", flush=True)
        large_rows = []
        for k in range(args.large_volumes):
            path = tmp / f"large_{k}.nii.gz"
            large_phantom(path, k)
            large_rows.append(measure(path, None, tmp, args.repeats, args.monai_repeats))
            print(f"large {k}: {large_rows[-1]}", flush=True)
    print()
    load = os.getloadavg()
    isal_version = importlib.metadata.version("isal") if isal_gzip else "not installed"
    print(f"Run: ({time.strftime('%Y-%m-%d %H:%M')}, load average {load[0]:.1f} / {load[1]:.1f}, torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads), monai {monai.__version__}, numpy "
          f"{np.__version__}, isal {isal_version}, {os.cpu_count()} cores; output 256x256x192 at 1.25x1.25x2 mm, float16 npz uncompressed; min of {args.repeats} repeats, "
          f"MONAI min of {args.monai_repeats})")
    lines = ["| volumes | decode zlib s | decode isal s | ours s | MONAI chain s | ours / zlib | ours / isal | "
             "MONAI / ours | max abs diff |", "|---|---|---|---|---|---|---|---|---|"]
    lines += report("demo", demo_rows) if demo_rows else []
    lines += report("synthetic 512x512x300", large_rows) if large_rows else []
    print("\n".join(lines))
    ok = all(r["max_abs_diff"] <= 1e-3 for r in demo_rows + large_rows)
    ok = ok and all(r["monai"] >= 5 * r["ours"] for r in large_rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
