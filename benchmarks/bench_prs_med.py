"""prs_med speed and memory at the demo size, side by side in one run.

Each variant is measured in a fresh subprocess (peak resident memory belongs to it alone): training samples/s
(forward + backward + AdamW step on the official loss, after warm-up) of the image-only baseline (SAM-style encoder
+ prompted decoder, no VLM), and of the full PRS-Med network with the packaged SmolLM2-135M cut to 4 (the demo
profile), 8 and all 30 decoder layers; plus inference (greedy answer + mask) images/s of the demo network. Everything
is reported as ratios against the demo network, which says what the demo's layer cut buys.

``--speed`` (issue 23) instead times one training step of the demo network and of the image-only baseline as the
demo profile ran before issue 23 (fp32, decoder dropout 0.1), with bf16 autocast, with decoder dropout 0 and with
both (the demo profile now), plus the structure loss's 31x31 weight map as avg_pool2d vs the separable sum. All
variants live in one process and take their steps in turn (round robin), so that a machine shared with other jobs
slows them alike and the ratios stay readable.

    nbsupport bench prs_med [--image-size 128] [--batch-size 8] [--steps 3] [--out outputs/bench] [--speed]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

VARIANTS = ("image_only", "vlm_4_layers", "vlm_8_layers", "vlm_30_layers", "infer_4_layers")
QUESTION = "Where is the tumour located in this brain CT scan?"
ANSWER = "The tumour is in the top left of the image."


def measure(variant: str, image_size: int, batch_size: int, steps: int) -> dict:
    """One variant, in this process."""
    import torch

    from nbsupport.prs_med.model import ImageOnlySegmenter, PRSMedNet, PRSMedSpec, structure_loss
    from nbsupport.prs_med.config import TrainConfig

    cfg = TrainConfig.from_params({"profile": "demo", "image_size": image_size})
    layers = int(variant.split("_")[1]) if variant.startswith(("vlm", "infer")) else 4
    spec = PRSMedSpec(**{**json.loads(cfg.spec().to_json()), "vlm_num_layers": layers})
    torch.manual_seed(0)
    x = torch.randn(batch_size, 3, image_size, image_size)
    y = (torch.rand(batch_size, 1, image_size, image_size) > 0.7).float()
    if variant == "image_only":
        model = ImageOnlySegmenter(spec, prompt_dim=576)
        step = lambda: structure_loss(model(x), y)
    else:
        model = PRSMedNet(spec)
        enc = model.encode([QUESTION] * batch_size, [ANSWER] * batch_size)

        def step() -> torch.Tensor:
            out = model(x, **enc)
            return structure_loss(out.mask_logits, y) + out.lm_loss
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if variant.startswith("infer"):
        model.eval()
        model.answer_and_segment(x[:2], [QUESTION] * 2, max_new_tokens=12)  # warm-up
        start = time.perf_counter()
        for _ in range(steps):
            model.answer_and_segment(x, [QUESTION] * batch_size, max_new_tokens=12)
        elapsed = time.perf_counter() - start
    else:
        model.train()
        for _ in range(1):  # warm-up: allocator and kernels
            step().backward()
            opt.step()
            opt.zero_grad()
        start = time.perf_counter()
        for _ in range(steps):
            step().backward()
            opt.step()
            opt.zero_grad()
        elapsed = time.perf_counter() - start
    return {"variant": variant, "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
            "trainable_M": sum(p.numel() for p in params) / 1e6, "samples_per_s": steps * batch_size / elapsed,
            "peak_rss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_before_MiB": rss_before / 1024}


SPEED_VARIANTS = (("before", False, 0.1), ("bf16", True, 0.1), ("no_dropout", False, 0.0),
                  ("bf16_no_dropout", True, 0.0))  # (name, bf16 autocast, decoder dropout)


def measure_speed(image_size: int, batch_size: int, steps: int) -> list[dict]:
    """--speed: seconds per training step (forward + backward + AdamW) of each network x variant, round robin."""
    import contextlib

    import torch
    import torch.nn.functional as F

    from nbsupport.prs_med.config import TrainConfig
    from nbsupport.prs_med.model import ImageOnlySegmenter, PRSMedNet, PRSMedSpec, neighbourhood_mean, structure_loss

    cfg = TrainConfig.from_params({"profile": "demo", "image_size": image_size})
    torch.manual_seed(0)
    x = torch.randn(batch_size, 3, image_size, image_size)
    y = (torch.rand(batch_size, 1, image_size, image_size) > 0.7).float()
    runs = []
    for net in ("demo_network", "image_only"):
        for name, bf16, dropout in SPEED_VARIANTS:
            spec = PRSMedSpec(**{**json.loads(cfg.spec().to_json()), "decoder_dropout": dropout})
            if net == "image_only":
                model = ImageOnlySegmenter(spec, prompt_dim=576)
                loss = lambda m=model: structure_loss(m(x), y)
            else:
                model = PRSMedNet(spec)
                enc = model.encode([QUESTION] * batch_size, [ANSWER] * batch_size)
                loss = lambda m=model, e=enc: (lambda o: structure_loss(o.mask_logits, y) + o.lm_loss)(
                    m(x, **e, position_weight=cfg.position_weight))
            opt = torch.optim.AdamW([p for p in model.train().parameters() if p.requires_grad], lr=1e-4)
            runs.append({"variant": f"{net}_{name}", "net": net, "loss": loss, "opt": opt, "seconds": 0.0,
                         "autocast": (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16
                         else contextlib.nullcontext})
    weight_map = {"avg_pool2d": lambda: F.avg_pool2d(y, 31, stride=1, padding=15),
                  "separable": lambda: neighbourhood_mean(y, 31)}
    weight_ms = dict.fromkeys(weight_map, 0.0)
    for step in range(steps + 1):  # step 0 warms up allocator and kernels
        for run in runs + [None]:
            start = time.perf_counter()
            if run is None:
                for name, fn in weight_map.items():
                    start = time.perf_counter()
                    fn()
                    weight_ms[name] += (time.perf_counter() - start) * 1000 * (step > 0)
                continue
            with run["autocast"]():
                loss = run["loss"]()
            loss.backward()
            run["opt"].step()
            run["opt"].zero_grad()
            run["seconds"] += (time.perf_counter() - start) * (step > 0)
    rows = [{"variant": r["variant"], "net": r["net"], "s_per_step": r["seconds"] / steps} for r in runs]
    return rows + [{"variant": "weight_map", "ms": {k: v / steps for k, v in weight_ms.items()}}]


def speed_table(rows: list[dict], args: argparse.Namespace) -> str:
    """Markdown: s per training step of each --speed variant next to the same network before issue 23."""
    import torch

    lines = [(f"# prs_med training step, issue 23 ({time.strftime('%Y-%m-%d')}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, {os.cpu_count()} cores, CPU)"),
             f"input {args.image_size}x{args.image_size}, batch {args.batch_size}, {args.steps} timed steps each, "
             "round robin", "", "| variant | s / step | × before |", "|---|---|---|"]
    before = {r["net"]: r["s_per_step"] for r in rows if r["variant"].endswith("_before")}
    for r in rows:
        if r["variant"] == "weight_map":
            ms = r["ms"]
            lines.append(f"| structure-loss weight map, avg_pool2d → separable (ms) | {ms['avg_pool2d']:.1f} → "
                         f"{ms['separable']:.1f} | {ms['avg_pool2d'] / ms['separable']:.1f} |")
        else:
            lines.append(f"| {r['variant']} | {r['s_per_step']:.3f} | {before[r['net']] / r['s_per_step']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=128, help="model input (the demo profile's)")
    parser.add_argument("--batch-size", type=int, default=8, help="batch (the demo profile's)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    parser.add_argument("--out", default="outputs/bench", help="folder for prs_med.json and prs_med.md")
    parser.add_argument("--speed", action="store_true", help="issue 23: the training-step variants (see above)")
    parser.add_argument("--_one", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.speed:
        print(speed_table(measure_speed(args.image_size, args.batch_size, args.steps), args))
        return 0
    if args._one:
        print(json.dumps(measure(args._one, args.image_size, args.batch_size, args.steps)))
        return 0
    import torch

    from nbsupport.paths import resolve_path

    rows = []
    for variant in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--_one", variant, "--image-size", str(args.image_size),
                              "--batch-size", str(args.batch_size), "--steps", str(args.steps)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"measured {variant}", file=sys.stderr)
    ref = next(r for r in rows if r["variant"] == "vlm_4_layers")
    lines = [(f"# prs_med benchmark ({time.strftime('%Y-%m-%d')}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, {os.cpu_count()} cores, CPU)"),
             f"input {args.image_size}x{args.image_size}, batch {args.batch_size}, {args.steps} timed steps", "",
             "| variant | params (M) | trainable (M) | samples/s | × demo network | peak RSS (MiB) | Δ RSS (MiB) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['params_M']:.1f} | {r['trainable_M']:.2f} | {r['samples_per_s']:.2f} | "
                     f"{r['samples_per_s'] / ref['samples_per_s']:.2f} | {r['peak_rss_MiB']:.0f} | "
                     f"{r['peak_rss_MiB'] - r['rss_before_MiB']:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out_dir = resolve_path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "prs_med.json").write_text(json.dumps(rows, indent=2))
    (out_dir / "prs_med.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
