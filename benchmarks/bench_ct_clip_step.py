"""ct_clip demo: what one training step and one demo volume cost, before and after issue 23's changes, side by side.

Training step (demo TrainConfig: 64 x 64 x 48 input, 3-D ResNet width 16, all-MiniLM-L6-v2 with LoRA r 16 on every
layer's attention, sentence-mean pooling, batch 16 reports from the demo generator, findings + impressions):

* ``text`` forward + backward of the LoRA MiniLM: ``before`` = the batch's distinct sentences in report order in
  chunks of 64 (as :class:`TextEncoder` did), ``sorted`` = sorted by token count in chunks of 16 (as it does now),
  ``sorted+bf16`` = that under bf16 autocast;
* ``image`` forward + backward of the ResNet, float32 and under bf16 autocast;
* ``step`` = text + image + SigLIP loss + AdamW: ``before`` (report-order chunks, float32), ``after`` (sorted
  chunks, both towers under bf16 autocast, the loss in float32: ``bf16``, as :class:`CTClipTrainingTask` does).

Demo volume (``nbsupport demo-data ct_clip``, 0.35 scale): draw it (:func:`_render_demo_volume`), NIfTI bytes, then
gzip: zlib level 6 (before) against :func:`gzip_nifti` (ISA-L level 2), with the compressed sizes.

Each variant runs in turn within a round (so load changes hit all of them); the table has the minimum over rounds.

    OMP_NUM_THREADS=1 python benchmarks/bench_ct_clip_step.py [--rounds 5] [--volumes 8]
"""
from __future__ import annotations

import argparse
import gzip
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nbsupport.ct_clip import demo_data
from nbsupport.ct_clip.config import TrainConfig
from nbsupport.ct_clip.data import report_text
from nbsupport.ct_clip.model import CTClip, contrastive_loss, split_sentences


def demo_reports(n: int) -> list[str]:
    """``n`` demo training reports (findings + impressions), as the demo generator writes them."""
    reports = []
    for k in range(n):
        rng = np.random.default_rng([0, k, 2654435761])
        reports.append(report_text(*demo_data._demo_report(demo_data._demo_case(rng), rng), "findings+impressions"))
    return reports


def text_before(model: CTClip, texts: list[str]) -> torch.Tensor:
    """The sentence-mean text features as computed before: distinct sentences in report order, 64 per chunk."""
    encoder = model.text_encoder
    sentences = [split_sentences(t) for t in texts]
    unique = list(dict.fromkeys(s for group in sentences for s in group))
    position = {s: i for i, s in enumerate(unique)}
    encoded = torch.cat([encoder._mean(unique[i:i + 64]) for i in range(0, len(unique), 64)])
    return torch.stack([encoded[[position[s] for s in group]].mean(0) for group in sentences])


def step_variants(model: CTClip, texts: list[str], images: torch.Tensor) -> dict[str, callable]:
    """The timed training-step pieces, by table row."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def bf16(forward) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return forward().float()

    def step(autocast: bool, text_fn) -> None:
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            image_emb, text_emb = model(images, text_fn())
        contrastive_loss(model, image_emb.float(), text_emb.float()).backward()
        optimizer.step()

    return {"text before": lambda: text_before(model, texts).sum().backward(),
            "text sorted": lambda: model.text_encoder(texts).sum().backward(),
            "text sorted+bf16": lambda: bf16(lambda: model.text_encoder(texts)).sum().backward(),
            "image float32": lambda: model.encode_image(images).sum().backward(),
            "image bf16": lambda: bf16(lambda: model.encode_image(images)).sum().backward(),
            "step before": lambda: step(False, lambda: text_before(model, texts)),
            "step after": lambda: step(True, lambda: model.text_encoder(texts))}


def volume_variants(k: int) -> dict[str, callable]:
    """Writing demo volume ``k``: draw + NIfTI bytes + zlib 6 (before) or gzip_nifti (after); returns the size."""
    import nibabel as nib

    def write(compress) -> int:
        rng = np.random.default_rng([0, k, 2654435761])
        case = demo_data._demo_case(rng)
        n_xy, s_xy, n_z, s_z = demo_data._DEMO_GRIDS[k % len(demo_data._DEMO_GRIDS)]
        scale = demo_data.DEMO_SIZES["demo"]["scale"]
        shape = (round(n_xy * scale), round(n_xy * scale), round(n_z * scale))
        hu = demo_data._render_demo_volume(case, shape, (s_xy / scale, s_xy / scale, s_z / scale), rng)
        image = nib.Nifti1Image(np.round(hu).astype(np.int16), np.eye(4))
        return len(compress(image.to_bytes()))

    return {"volume before (zlib 6)": lambda: write(lambda raw: gzip.compress(raw, compresslevel=6)),
            "volume after (gzip_nifti)": lambda: write(demo_data.gzip_nifti)}


def run_rounds(variants: dict[str, callable], rounds: int) -> dict[str, tuple[float, object]]:
    """(min seconds over rounds, last result) per variant; every variant once per round, in turn."""
    best = {name: (float("inf"), None) for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            out = fn()
            best[name] = (min(best[name][0], time.perf_counter() - start), out)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--volumes", type=int, default=8, help="demo volumes written per variant")
    args = parser.parse_args(argv)
    cfg = TrainConfig.from_params({"profile": "demo"})
    torch.manual_seed(0)
    model = CTClip(cfg.model_spec()).train()
    texts = demo_reports(cfg.batch_size)
    images = torch.rand(cfg.batch_size, 1, *cfg.input_size)
    steps = run_rounds(step_variants(model, texts, images), args.rounds)
    volumes = {name: [0.0, 0] for name in volume_variants(0)}
    for k in range(args.volumes):
        for name, (seconds, size) in run_rounds(volume_variants(k), max(1, args.rounds // 2)).items():
            volumes[name][0] += seconds / args.volumes
            volumes[name][1] += size / args.volumes
    load = os.getloadavg()
    print(f"Run: {time.strftime('%Y-%m-%d %H:%M')}, load average {load[0]:.1f} / {load[1]:.1f}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} thread(s), min over {args.rounds} rounds, batch "
          f"{cfg.batch_size}, input {cfg.input_size}")
    print("| what | seconds |\n|---|---|")
    for name, (seconds, _) in steps.items():
        print(f"| {name} | {seconds:.3f} |")
    for name, (seconds, size) in volumes.items():
        print(f"| {name} (mean of {args.volumes}; {size / 1e6:.2f} MB) | {seconds:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
