"""cxr_report speed and memory of the report generator, with and without 4-bit NF4, side by side in one run.

For each quantization (``nf4``: bitsandbytes 4-bit base weights, QLoRA; ``none``: float32 / bf16 on CUDA) a fresh
subprocess loads the causal LM (default: the packaged SmolLM2-135M of the demo profile), wraps it with LoRA r=8 on
q/k/v/o plus the visual projection exactly as ``02_train`` does, and measures

* training samples/s: forward + backward + AdamW step on batches of 14 visual tokens + ``--text-tokens`` text
  tokens (after warm-up),
* generation tokens/s: beam search (5 beams, no_repeat_ngram_size 2, as ``03_infer``) of exactly ``--new-tokens``
  tokens per report for a batch of ``--gen-batch`` images; tokens/s counts the report tokens produced,
* peak memory: resident set size of the process (CPU) or ``torch.cuda.max_memory_allocated`` (CUDA), and what
  loading the LM added.

Ratios compare ``nf4`` against ``none`` of the same run.

    nbsupport bench cxr_report [--language-model smollm2-135m] [--steps 4] [--out outputs/bench]

``--demo-settings`` (issue 23) instead times the demo profile's report stage and beam search in each setting the
profile went through, one subprocess per setting, on the demo manifest's own prompts and reports (findings prompts
from the report labels, as training builds them; random disease tokens, which cost the same): CPU seconds
(``time.process_time``, one thread: the wall time of an idle core, and less sensitive to a shared machine than
wall time) per training step of batch 4 and per image of 5-beam generation of exactly 64 tokens for 16 test
prompts (8 or 16 images per call).

    nbsupport bench cxr_report -- --demo-settings [--steps 6]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterable

QUANTIZATIONS = ("nf4", "none")


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(language_model: str, quantization: str, batch_size: int, text_tokens: int, steps: int,
            gen_batch: int, new_tokens: int) -> dict:
    """Runs in its own process so that peak memory belongs to one configuration only."""
    import torch

    from nbsupport.cxr_report.model import CxrModelSpec, ReportGenerator, load_language_model, place_on

    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    rss_start = _rss_mib()
    spec = CxrModelSpec(encoder="densenet121", language_model=language_model, quantization=quantization)
    device = torch.device("cuda" if cuda else "cpu")
    lm, tokenizer = load_language_model(spec, device)
    generator = place_on(ReportGenerator(spec, lm, tokenizer), device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rss_loaded = _rss_mib()
    vocab = lm.get_input_embeddings().weight.shape[0]
    tokens = torch.randn(batch_size, 14, spec.feature_dim, device=device)
    ids = torch.randint(0, vocab, (batch_size, text_tokens), device=device)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :10] = -100  # a prompt
    optimizer = torch.optim.AdamW([p for p in generator.parameters() if p.requires_grad], lr=1e-4)
    generator.train()

    def step() -> None:
        generator(tokens, ids, mask, labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()  # warm-up
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    train_s = time.perf_counter() - start
    generator.eval()
    prompt = tokenizer("Describe the findings of this chest X-ray.\n", add_special_tokens=False)["input_ids"]
    gen_tokens = tokens[:1].expand(gen_batch, -1, -1) + 0.1 * torch.randn(gen_batch, 14, spec.feature_dim,
                                                                         device=device)
    with torch.no_grad():
        embeds, attention = generator.prompt_embeddings(gen_tokens, [prompt] * gen_batch)
        start = time.perf_counter()
        out = generator.lm.generate(inputs_embeds=embeds, attention_mask=attention, num_beams=5,
                                    no_repeat_ngram_size=2, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                    pad_token_id=tokenizer.pad_token_id)
        if cuda:
            torch.cuda.synchronize()
        gen_s = time.perf_counter() - start
    produced = int(out.shape[0] * out.shape[1])
    result = {"quantization": quantization, "language_model": language_model,
              "train_samples_per_s": steps * batch_size / train_s, "train_step_s": train_s / steps,
              "gen_tokens_per_s": produced / gen_s, "gen_s_per_report": gen_s / gen_batch,
              "peak_rss_MiB": _rss_mib(), "lm_load_rss_MiB": rss_loaded - rss_start,
              "device": "cuda" if cuda else f"cpu ({torch.get_num_threads()} threads)"}
    if cuda:
        result["peak_cuda_MiB"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return result


# setting: (quantization, train autocast bf16, pack_sequences, LM dtype in generation, images per generate call)
DEMO_SETTINGS = {
    "nf4, float32, padded; generation 8 per call (demo before issue 23)": ("nf4", False, False, "float32", 8),
    "none, float32, padded; 8 per call": ("none", False, False, "float32", 8),
    "none, bf16 autocast, padded; bf16 LM, 8 per call": ("none", True, False, "bfloat16", 8),
    "none, bf16 autocast, packed; bf16 LM, 8 per call (demo now)": ("none", True, True, "bfloat16", 8),
    "none, bf16 autocast, packed; bf16 LM, 16 per call": ("none", True, True, "bfloat16", 16),
}


def measure_demo_setting(name: str, steps: int, manifest: str) -> dict:
    """CPU s per report-stage step (batch 4 of the demo manifest's training examples, in a fixed shuffled order)
    and per generated report, for one of ``DEMO_SETTINGS``."""
    import contextlib

    import numpy as np
    import torch

    from nbsupport.cxr_report.data import CXR_SCHEMA
    from nbsupport.cxr_report.model import (CxrModelSpec, ReportGenerator, encode_example, lm_prompts,
                                            load_language_model, pad_examples, prompt_token_ids)
    from nbsupport.cxr_report.task import prompt_findings, report_parameter_groups
    from nbsupport.manifest import read_manifest

    quantization, autocast, pack, lm_dtype, gen_batch = DEMO_SETTINGS[name]
    torch.manual_seed(0)
    rows, _ = read_manifest(manifest, CXR_SCHEMA, check_files=False)
    rows = rows.reset_index(drop=True)
    spec = CxrModelSpec(encoder="densenet_small", image_size=128, language_model="smollm2-135m",
                        quantization=quantization, findings_prompt=True)
    lm, tokenizer = load_language_model(spec)
    generator = ReportGenerator(spec, lm, tokenizer, pack_sequences=pack)
    prompts = lm_prompts(spec, list(rows["prompt"]), prompt_findings(rows, torch.zeros(len(rows), 14)))
    train = np.flatnonzero((rows.split == "train").to_numpy())
    order = np.random.default_rng(0).permutation(train)
    examples = [encode_example(tokenizer, prompts[i], rows.at[i, "report"], 56) for i in order[:4 * (steps + 1)]]
    optimizer = torch.optim.AdamW(report_parameter_groups(generator, 2e-3, 1e-2, 1e-3))
    precision = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast else contextlib.nullcontext
    generator.train()
    cpu = []
    for k in range(steps + 1):  # the first step warms up
        ids, mask, labels = pad_examples(examples[4 * k:4 * k + 4], tokenizer.pad_token_id)
        start = time.process_time()
        with precision():
            loss = generator(torch.randn(4, 14, spec.feature_dim), ids, mask, labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        cpu.append(time.process_time() - start)
    generator.eval()
    if lm_dtype == "bfloat16":
        generator.to(torch.bfloat16)
    test = np.flatnonzero((rows.split == "test").to_numpy())[:16]
    tokens = torch.randn(len(test), 14, spec.feature_dim)
    start = time.process_time()
    for k in range(0, len(test), gen_batch):  # exactly 64 tokens each: the same work whatever the weights say
        chunk = test[k:k + gen_batch]
        embeds, mask = generator.prompt_embeddings(tokens[k:k + gen_batch],
                                                   [prompt_token_ids(tokenizer, prompts[i]) for i in chunk])
        with torch.no_grad():
            generator.lm.generate(inputs_embeds=embeds, attention_mask=mask, num_beams=5, max_new_tokens=64,
                                  min_new_tokens=64, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    gen_cpu = (time.process_time() - start) / len(test)
    return {"setting": name, "train_cpu_s_per_step": float(np.mean(cpu[1:])), "gen_cpu_s_per_report": gen_cpu,
            "text_tokens_mean": float(np.mean([len(e["input_ids"]) for e in examples]))}


def _measure_each(flag: str, names: Iterable[str], options: list[str]) -> list[dict]:
    """Each of ``names`` measured by this script in a subprocess of its own (``flag NAME options``; so that peak
    memory and the allocator belong to one setting), its last stdout line read back as JSON."""
    rows = []
    for name in names:
        out = subprocess.run([sys.executable, __file__, flag, name, *options], capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"{name} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"measured {name}", file=sys.stderr)
    return rows


def _save_report(stem: str, report: str, rows: list[dict], args: argparse.Namespace) -> None:
    """Print the table and write it with the raw rows to ``<args.out>/<stem>.md`` and ``.json``."""
    from nbsupport.paths import resolve_path

    print(report)
    out_dir = resolve_path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=2))
    (out_dir / f"{stem}.md").write_text(report + "\n")


def demo_settings(args: argparse.Namespace) -> int:
    """``--demo-settings``: every ``DEMO_SETTINGS`` row in its own subprocess, then the table."""
    rows = _measure_each("--_demo_one", DEMO_SETTINGS, ["--steps", str(args.steps), "--manifest", args.manifest])
    ref = rows[0]
    lines = [f"# cxr_report demo settings ({time.strftime('%Y-%m-%d %H:%M')}, CPU seconds, "
             f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, load average "
             f"{os.getloadavg()[0]:.1f})",
             f"report stage: batch 4 of the demo training examples, {args.steps} timed steps; generation: 16 "
             "test prompts x 5 beams x 64 new tokens", "",
             "| setting | train CPU s/step | × before | generation CPU s/report | × before |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['train_cpu_s_per_step']:.2f} | "
                     f"{r['train_cpu_s_per_step'] / ref['train_cpu_s_per_step']:.2f} | "
                     f"{r['gen_cpu_s_per_report']:.2f} | "
                     f"{r['gen_cpu_s_per_report'] / ref['gen_cpu_s_per_report']:.2f} |")
    _save_report("cxr_report_demo_settings", "\n".join(lines), rows, args)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--language-model", default="smollm2-135m", help="causal LM path / alias (demo: SmolLM2)")
    parser.add_argument("--batch-size", type=int, default=8, help="training batch (the demo profile's)")
    parser.add_argument("--text-tokens", type=int, default=56, help="prompt + report tokens per training sample")
    parser.add_argument("--steps", type=int, default=4, help="timed training steps")
    parser.add_argument("--gen-batch", type=int, default=4, help="images per beam-search call")
    parser.add_argument("--new-tokens", type=int, default=32, help="report tokens generated per image")
    parser.add_argument("--out", default="outputs/bench", help="folder for cxr_report.json and cxr_report.md")
    parser.add_argument("--_one", default="", help=argparse.SUPPRESS)  # internal: one quantization, print JSON
    parser.add_argument("--demo-settings", action="store_true", help="issue 23: the demo profile's settings, CPU s")
    parser.add_argument("--manifest", default="data_manifests/chexpert_plus_demo.csv",
                        help="--demo-settings: the demo manifest (01_preprocess writes it)")
    parser.add_argument("--_demo_one", default="", help=argparse.SUPPRESS)  # internal: one demo setting
    args = parser.parse_args(argv)
    if args._demo_one:
        print(json.dumps(measure_demo_setting(args._demo_one, args.steps, args.manifest)))
        return 0
    if args.demo_settings:
        return demo_settings(args)
    sizes = (args.batch_size, args.text_tokens, args.steps, args.gen_batch, args.new_tokens)
    if args._one:
        print(json.dumps(measure(args.language_model, args._one, *sizes)))
        return 0

    rows = _measure_each("--_one", QUANTIZATIONS, [
        "--language-model", args.language_model, "--batch-size", str(args.batch_size), "--text-tokens",
        str(args.text_tokens), "--steps", str(args.steps), "--gen-batch", str(args.gen_batch), "--new-tokens",
        str(args.new_tokens)])
    ref = next(r for r in rows if r["quantization"] == "none")
    memory = "peak_cuda_MiB" if "peak_cuda_MiB" in ref else "peak_rss_MiB"
    lines = [f"# cxr_report benchmark ({time.strftime('%Y-%m-%d')}, {rows[0]['device']}, {os.cpu_count()} cores)",
             f"LM {args.language_model} + LoRA r=8 (q/k/v/o); train batch {args.batch_size} x (14 visual + "
             f"{args.text_tokens} text tokens), {args.steps} timed steps; generation 5 beams, {args.gen_batch} "
             f"images x {args.new_tokens} tokens", "",
             ("| quantization | train samples/s | × none | gen tokens/s | × none | s per report | "
              f"{memory} | × none | LM load Δ RSS (MiB) |"), "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['quantization']} | {r['train_samples_per_s']:.2f} | "
                     f"{r['train_samples_per_s'] / ref['train_samples_per_s']:.2f} | {r['gen_tokens_per_s']:.1f} | "
                     f"{r['gen_tokens_per_s'] / ref['gen_tokens_per_s']:.2f} | {r['gen_s_per_report']:.2f} | "
                     f"{r[memory]:.0f} | {r[memory] / ref[memory]:.2f} | {r['lm_load_rss_MiB']:.0f} |")
    _save_report("cxr_report", "\n".join(lines), rows, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
