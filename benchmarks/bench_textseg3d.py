"""textseg3d (LLMSeg) speed and memory at the demo size, side by side in one run.

Training: for LLMSeg (frozen MiniLM + context prompts + two-way fusion) and the image-only UNet with the same
feature size, a fresh subprocess measures the training step (random crops of the demo roi, DiceCE, AdamW) after
warm-up, and its peak resident memory (also as the increase over the RSS before the first step). Ratios: each model
against the image-only UNet, so the row says what the text path costs.

Inference: Gaussian sliding-window inference (overlap 0.5) of the LLMSeg network over whole volumes of three sizes,
seconds per volume, and the ratio to the smallest volume next to the ratio of voxel counts.

    nbsupport bench textseg3d [--feature-size 8] [--roi 32 32 64] [--batch-size 2] [--steps 4] [--out outputs/bench]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

MODELS = ("image_only", "llmseg")
VOLUMES = ((32, 32, 64), (64, 64, 128), (96, 96, 192))


def _spec(kind: str, feature_size: int, roi: tuple[int, int, int]):
    """The network the demo profile trains (text encoder, readout, prompts, positional encoding), at this size."""
    from nbsupport.textseg3d.config import TrainConfig
    from nbsupport.textseg3d.pipeline import model_spec

    cfg = TrainConfig.from_params({"profile": "demo", "feature_size": feature_size, "roi": roi})
    return model_spec(cfg, use_text=kind == "llmseg")


def measure_training(kind: str, feature_size: int, roi: tuple[int, int, int], batch_size: int, steps: int) -> dict:
    """Runs in its own process so that peak RSS belongs to one model only."""
    import torch
    from monai.losses import DiceCELoss

    from nbsupport.spec import count_parameters
    from nbsupport.textseg3d.model import build_llmseg

    model = build_llmseg(_spec(kind, feature_size, roi)).train()
    loss_fn = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x = torch.rand(batch_size, 1, *roi)
    y = (torch.rand(batch_size, 1, *roi) > 0.95).long()
    reports = ["N0, cT2, breast conserving surgery, left side", "N1, cT3, total mastectomy surgery, right side"]
    prompts = (reports * batch_size)[:batch_size]
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def step() -> None:
        loss_fn(model(x, prompts), y).backward()
        opt.step()
        opt.zero_grad()

    for _ in range(2):  # warm-up: allocator and kernels
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    elapsed = time.perf_counter() - start
    return {"model": kind, **{f"{k}_M": v / 1e6 for k, v in count_parameters(model).to_dict().items()},
            "step_s": elapsed / steps, "peak_rss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_before_train_MiB": rss_before / 1024}


def measure_inference(feature_size: int, roi: tuple[int, int, int], repeats: int) -> list[dict]:
    import torch

    from nbsupport.textseg3d.model import build_llmseg
    from nbsupport.textseg3d.inference import predict_volume

    model = build_llmseg(_spec("llmseg", feature_size, roi)).eval()
    rows = []
    for shape in VOLUMES:
        volume = torch.rand(1, 1, *shape)
        predict_volume(model, volume, "N0, cT2, breast conserving surgery, left side", roi)  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            predict_volume(model, volume, "N0, cT2, breast conserving surgery, left side", roi)
        rows.append({"shape": shape, "voxels": math.prod(shape), "s_per_volume": (time.perf_counter() - start) / repeats})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--feature-size", type=int, default=8, help="UNet feature size (the demo profile's)")
    parser.add_argument("--roi", type=int, nargs=3, default=[32, 32, 64], help="(D, H, W) crop (the demo profile's)")
    parser.add_argument("--batch-size", type=int, default=2, help="training batch (the demo profile's)")
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per model")
    parser.add_argument("--repeats", type=int, default=2, help="timed inferences per volume size")
    parser.add_argument("--out", default="outputs/bench", help="folder for textseg3d.json and textseg3d.md")
    parser.add_argument("--_one", default="", help=argparse.SUPPRESS)  # internal: measure one model, print JSON
    args = parser.parse_args(argv)
    roi = tuple(args.roi)
    if args._one:
        print(json.dumps(measure_training(args._one, args.feature_size, roi, args.batch_size, args.steps)))
        return 0

    import torch

    from nbsupport.paths import resolve_path

    models = []
    for kind in MODELS:
        out = subprocess.run([sys.executable, __file__, "--_one", kind, "--feature-size", str(args.feature_size),
                              "--roi", *map(str, roi), "--batch-size", str(args.batch_size), "--steps",
                              str(args.steps)], capture_output=True, text=True, check=True)
        models.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"measured training of {kind}", file=sys.stderr)
    inference = measure_inference(args.feature_size, roi, args.repeats)

    ref = next(m for m in models if m["model"] == "image_only")

    def train_rss(m: dict) -> float:  # what training adds on top of the interpreter, torch and the built model
        return m["peak_rss_MiB"] - m["rss_before_train_MiB"]

    lines = [f"# textseg3d benchmark ({time.strftime('%Y-%m-%d')}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads, {os.cpu_count()} cores, CPU, "
             f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')})",
             f"roi {'x'.join(map(str, roi))}, feature size {args.feature_size}, batch {args.batch_size}, "
             f"{args.steps} timed steps; text encoder all-MiniLM-L6-v2 (frozen), readout "
             f"{_spec('llmseg', args.feature_size, roi).text_readout!r} (the demo profile's)", "",
             "| model | trainable (M) | frozen (M) | train step (s) | × image-only time | peak RSS (MiB) "
             "| training Δ RSS (MiB) | × image-only Δ RSS |", "|---|---|---|---|---|---|---|---|"]
    for m in models:
        lines.append(f"| {m['model']} | {m['trainable_M']:.2f} | {m['frozen_M']:.1f} | {m['step_s']:.2f} | "
                     f"{m['step_s'] / ref['step_s']:.2f} | {m['peak_rss_MiB']:.0f} | {train_rss(m):.0f} | "
                     f"{train_rss(m) / max(train_rss(ref), 1e-9):.2f} |")
    base = inference[0]
    lines += ["", "| volume (D x H x W) | sliding-window s / volume | × smallest time | × smallest voxels |",
              "|---|---|---|---|"]
    for r in inference:
        lines.append(f"| {'x'.join(map(str, r['shape']))} | {r['s_per_volume']:.2f} | "
                     f"{r['s_per_volume'] / base['s_per_volume']:.1f} | {r['voxels'] / base['voxels']:.0f} |")
    report = "\n".join(lines)
    print(report)
    out_dir = resolve_path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "textseg3d.json").write_text(json.dumps({"models": models, "inference": inference,
                                                       "args": vars(args)}, indent=2, default=list))
    (out_dir / "textseg3d.md").write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
