"""seg2d speed and memory at the demo size, side by side in one run.

For each architecture (SegFormer, DPT, BEiT, UperNet; random-init ``small`` configs at the demo input size) a
fresh subprocess measures training samples/s (forward + backward + AdamW step, after warm-up) and its peak
resident memory (also as the increase over the RSS before the first step, i.e. what training adds), and the
process CPU time per step (user + sys): on a machine shared with other jobs, wall-clock rates depend on the load,
CPU seconds much less. Where the CPU computes bf16 natively, SegFormer is measured a second time under bf16
autocast (the demo profile's ``mixed_precision="bf16_native"``).
The data path is measured on the same demo slices: building the in-memory ``SliceDataset``
(PNG decode + RLE decode + resize) in slices/s, and iterating a DataLoader over it in slices/s. Everything is
reported as ratios: each architecture against SegFormer, and the data loader against the fastest model's step
rate (a ratio well above 1 means the loader is not the bottleneck).

    nbsupport bench seg2d [--image-size N] [--batch-size N] [--steps 6] [--out outputs/bench]

Input size and batch default to the seg2d demo profile's (``TrainConfig.PROFILES["demo"]``).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARCHS = ("segformer", "dpt", "beit", "upernet")


def measure_model(arch: str, image_size: int, batch_size: int, steps: int, precision: str = "fp32") -> dict:
    """Runs in its own process so that peak RSS belongs to one architecture only. ``precision="bf16"``: the
    forward under CPU bf16 autocast and the loss in fp32, as the training loop's ``mixed_precision="bf16"`` does."""
    import contextlib

    import torch

    from nbsupport.seg2d.model import BCEDiceLoss, build_seg2d_model

    torch.manual_seed(0)
    model = build_seg2d_model(arch, 3, image_size, width="small")
    loss_fn = BCEDiceLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.rand(batch_size, 1, image_size, image_size)
    y = (torch.rand(batch_size, 3, image_size, image_size) > 0.7).float()

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext():
            logits = model(x)
        loss_fn(logits.float(), y).backward()
        opt.step()
        opt.zero_grad()

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(2):  # warm-up: allocator and kernels
        step()
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {"arch": arch if precision == "fp32" else f"{arch} ({precision} autocast)", "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
            "samples_per_s": steps * batch_size / elapsed, "step_s": elapsed / steps, "cpu_s_per_step": cpu / steps,
            "peak_rss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_before_train_MiB": rss_before / 1024}


def measure_data(data_root: Path, image_size: int, batch_size: int) -> dict:
    import torch

    from nbsupport.seg2d import data as seg_data

    manifest = seg_data.build_manifest(data_root, val_fraction=0.0, test_fraction=0.0, seed=0)
    start = time.perf_counter()
    dataset = seg_data.SliceDataset(manifest, data_root, image_size=image_size, augment=True)
    build_s = time.perf_counter() - start
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True)
    start = time.perf_counter()
    n = sum(len(batch["image"]) for _ in range(3) for batch in loader)
    iter_s = time.perf_counter() - start
    return {"slices": len(dataset), "decode_slices_per_s": len(dataset) / build_s, "loader_slices_per_s": n / iter_s}


def main(argv: list[str] | None = None) -> int:
    from nbsupport.seg2d.config import TrainConfig

    demo = TrainConfig.PROFILES["demo"]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=demo["image_size"], help="model input (demo profile)")
    parser.add_argument("--batch-size", type=int, default=demo["batch_size"], help="training batch (demo profile)")
    parser.add_argument("--steps", type=int, default=6, help="timed training steps per architecture")
    parser.add_argument("--data-root", default="", help="a seg2d dataset; default: a fresh demo dataset")
    parser.add_argument("--out", default="outputs/bench", help="folder for seg2d.json and seg2d.md")
    parser.add_argument("--_one", default="", help=argparse.SUPPRESS)  # internal: measure one arch, print JSON
    args = parser.parse_args(argv)
    if args._one:
        arch, _, precision = args._one.partition(":")
        print(json.dumps(measure_model(arch, args.image_size, args.batch_size, args.steps, precision or "fp32")))
        return 0

    import torch

    from nbsupport.optim import native_bf16
    from nbsupport.paths import resolve_path
    from nbsupport.seg2d.demo_data import write_demo_dataset

    models = []
    # the demo profile's setting (mixed_precision="bf16_native") where this CPU computes bf16 natively
    for arch in ARCHS + (("segformer:bf16",) if native_bf16() else ()):
        out = subprocess.run([sys.executable, __file__, "--_one", arch, "--image-size", str(args.image_size),
                              "--batch-size", str(args.batch_size), "--steps", str(args.steps)],
                             capture_output=True, text=True, check=True)
        models.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"measured {arch}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        root = resolve_path(args.data_root) if args.data_root else write_demo_dataset(
            Path(tmp) / "seg2d", n_cases=8)
        data = measure_data(Path(root), args.image_size, args.batch_size)

    ref = next(m for m in models if m["arch"] == "segformer")  # fp32
    fastest = max(m["samples_per_s"] for m in models)
    lines = [f"# seg2d benchmark ({time.strftime('%Y-%m-%d')}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads, {os.cpu_count()} cores, CPU)",
             f"input {args.image_size}x{args.image_size}, batch {args.batch_size}, {args.steps} timed steps",
             "", "| arch | params (M) | train samples/s | × SegFormer speed | CPU s/step | peak RSS (MiB) "
             "| training Δ RSS (MiB) | × SegFormer Δ RSS |", "|---|---|---|---|---|---|---|---|"]
    def train_rss(m: dict) -> float:  # what training adds on top of the interpreter, torch and the built model
        return m["peak_rss_MiB"] - m["rss_before_train_MiB"]

    for m in models:
        lines.append(f"| {m['arch']} | {m['params_M']:.2f} | {m['samples_per_s']:.1f} | "
                     f"{m['samples_per_s'] / ref['samples_per_s']:.2f} | {m['cpu_s_per_step']:.3f} | "
                     f"{m['peak_rss_MiB']:.0f} | "
                     f"{train_rss(m):.0f} | {train_rss(m) / train_rss(ref):.2f} |")
    lines += ["", "| data path | slices/s | × fastest model's samples/s |", "|---|---|---|",
              f"| decode + RLE + resize (dataset build, {data['slices']} slices) | {data['decode_slices_per_s']:.0f} | "
              f"{data['decode_slices_per_s'] / fastest:.1f} |",
              f"| DataLoader over cached slices (augment on) | {data['loader_slices_per_s']:.0f} | "
              f"{data['loader_slices_per_s'] / fastest:.1f} |"]
    report = "\n".join(lines)
    print(report)
    out_dir = resolve_path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "seg2d.json").write_text(json.dumps({"models": models, "data": data, "args": vars(args)}, indent=2))
    (out_dir / "seg2d.md").write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
