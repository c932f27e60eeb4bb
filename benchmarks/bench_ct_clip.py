"""ct_clip preprocessing speed: the fast path against merely decoding the .nii.gz and against a scipy reference.

For each volume, in one run: ``decode`` = ``nibabel.load`` + the stored array (what any pipeline must pay);
``fast`` = decode + :func:`preprocess_volume` (HU, RAS, resample to 1.25 x 1.25 x 2 mm, window, pad/crop to
256 x 256 x 192, float16) + writing the npz; ``reference`` = decode + :func:`reference_preprocess` (whole HU volume,
reorient, ``scipy.ndimage.zoom`` order 1, window, pad/crop) + writing the npz. The outputs are compared (max
absolute difference, must be <= 1e-3). Timings are the minimum over ``--repeats`` (the reference runs once), in
one process with the machine's threads; two sets of volumes: the demo volumes (CT-RATE layout from ``nbsupport
demo-data ct_clip``, or written here if absent) and synthetic 512 x 512 x 300 chest phantoms at 0.7 x 0.7 x 1 mm.

Targets (issue 6): fast <= 1.5 x decode, reference >= 3 x fast.

    nbsupport bench ct_clip [--demo-volumes 8] [--large-volumes 2] [--repeats 3]
"""
from __future__ import annotations

import argparse
import gzip
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


def large_phantom(path: Path, seed: int) -> None:
    """A 512 x 512 x 300 chest-like int16 volume (air, body, lungs, spine, noise), stored LPS like DICOM exports."""
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
    path.write_bytes(gzip.compress(nib.Nifti1Image(stored, affine).to_bytes(), compresslevel=6))


def decode(path: Path) -> np.ndarray:
    import nibabel as nib

    return np.asanyarray(nib.load(str(path)).dataobj.get_unscaled())


def measure(path: Path, slope: float, intercept: float, out: Path, repeats: int) -> dict:
    spec = ct_pre.PreprocessSpec()
    t_decode, t_fast = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        decode(path)
        t_decode.append(time.perf_counter() - start)
        start = time.perf_counter()
        ct = ct_pre.load_ct(path, slope, intercept)
        fast, _ = ct_pre.preprocess_volume(ct, spec)
        ct_pre.save_preprocessed(out / "fast.npz", fast)
        t_fast.append(time.perf_counter() - start)
    start = time.perf_counter()
    ct = ct_pre.load_ct(path, slope, intercept)
    reference = ct_pre.reference_preprocess(ct, spec)
    ct_pre.save_preprocessed(out / "reference.npz", reference)
    t_reference = time.perf_counter() - start
    return {"shape": "x".join(map(str, ct.stored.shape)), "decode": min(t_decode), "fast": min(t_fast),
            "reference": t_reference,
            "max_abs_diff": float(np.abs(fast.astype(np.float32) - reference.astype(np.float32)).max())}


def report(name: str, rows: list[dict]) -> list[str]:
    decode_s = float(np.mean([r["decode"] for r in rows]))
    fast_s = float(np.mean([r["fast"] for r in rows]))
    reference_s = float(np.mean([r["reference"] for r in rows]))
    worst = max(r["max_abs_diff"] for r in rows)
    shapes = sorted({r["shape"] for r in rows})
    return [f"| {name} ({len(rows)}; {', '.join(shapes[:3])}{', ...' if len(shapes) > 3 else ''}) | {decode_s:.3f} | "
            f"{fast_s:.3f} | {reference_s:.3f} | {fast_s / decode_s:.2f} | {reference_s / fast_s:.1f} | {worst:.1e} |"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-root", default="", help="CT-RATE-layout demo root (default: $NBSUPPORT_DATA/ct_clip)")
    parser.add_argument("--demo-volumes", type=int, default=8)
    parser.add_argument("--large-volumes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
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
            demo_rows.append(measure(root / row.nifti, row.rescale_slope, row.rescale_intercept, tmp, args.repeats))
            print(f"demo {row.volume}: {demo_rows[-1]}", flush=True)
        large_rows = []
        for k in range(args.large_volumes):
            path = tmp / f"large_{k}.nii.gz"
            large_phantom(path, k)
            large_rows.append(measure(path, 1.0, -1024.0, tmp, args.repeats))
            print(f"large {k}: {large_rows[-1]}", flush=True)
    print()
    print(f"Run: ({time.strftime('%Y-%m-%d')}, torch {torch.__version__}, numpy {np.__version__}, "
          f"{os.cpu_count()} cores, output 256x256x192 at 1.25x1.25x2 mm, float16 npz uncompressed; "
          f"min of {args.repeats} repeats, reference once)")
    lines = ["| volumes | decode s | fast s (decode + preprocess + save) | reference s | fast / decode | "
             "reference / fast | max abs diff |", "|---|---|---|---|---|---|---|"]
    lines += report("demo", demo_rows) if demo_rows else []
    lines += report("synthetic 512x512x300", large_rows) if large_rows else []
    print("\n".join(lines))
    ok = all(r["max_abs_diff"] <= 1e-3 for r in demo_rows + large_rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
