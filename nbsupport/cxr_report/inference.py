"""Applying a trained cxr_report model: disease tokens and evidence maps of the vision model, beam-search reports,
the choice among the beams, the scores against references and the two baselines, and the LM's token attention.

The verbs in :mod:`.pipeline` chain these; each works on a :class:`TrainedModel` (from
``pipeline.load_trained_model``) or on its vision part alone.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from nbsupport.checkpoints import META_FILE, SPEC_FILE, load_weights
from nbsupport.cxr_report.chexbert import ReportLabeler
from nbsupport.cxr_report.data import (
    CHEXBERT,
    DEFAULT_PROMPT,
    ReportImageDataset,
    label_matrix,
    load_encoder_input,
    read_xray,
)
from nbsupport.cxr_report.labeler import LABELS, label_report, label_reports, positive_matrix
from nbsupport.cxr_report.model import (
    REPORTING_ORDER,
    CxrModelSpec,
    ReportGenerator,
    VisionModel,
    lm_prompts,
    prompt_token_ids,
)
from nbsupport.metrics import (
    bleu_scores,
    cider_d,
    clinical_efficacy,
    format_with_ci,
    paired_bootstrap_diff,
    rouge_l,
    with_ci95,
)
from nbsupport.progress import progress


@dataclasses.dataclass
class TrainedModel:
    """Both stages of a trained model: the vision model and the report generator (with its tokenizer)."""

    spec: CxrModelSpec
    vision: VisionModel
    generator: ReportGenerator
    tokenizer: Any

    @property
    def device(self) -> torch.device:
        """Where the vision model (and the report projection) run."""
        return next(self.vision.parameters()).device

    def with_lm_dtype(self, lm_dtype: str) -> "TrainedModel":
        """This model with its report generator (LM, LoRA, projection) in ``lm_dtype`` (03/04's field):
        ``"bfloat16"`` casts a ``quantization="none"`` generator (~1.3x as fast on CPUs with AVX-512 BF16); a 4-bit
        LM is left as bitsandbytes computes it; ``"float32"`` leaves everything as loaded."""
        if lm_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"lm_dtype must be 'float32' or 'bfloat16', got {lm_dtype!r}")
        if lm_dtype == "bfloat16" and self.spec.quantization == "none":
            self.generator.to(torch.bfloat16)
        return self


# ---------------------------------------------------------------------------------------------- vision model
def read_spec(training_run: Path) -> CxrModelSpec:
    """The ``model_spec.json`` of a 02_train run folder."""
    path = Path(training_run) / SPEC_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {training_run} is not a cxr_report training run (expected the "
                                f"02_train run folder holding {SPEC_FILE}, vision/ and report/)")
    return CxrModelSpec.from_json(path.read_text())


def best_checkpoint(stage_dir: Path) -> Path:
    """``<stage>/checkpoints/best``, else ``last`` (a stage without a completed evaluation)."""
    best = stage_dir / "checkpoints" / "best"
    return best if (best / META_FILE).is_file() else stage_dir / "checkpoints" / "last"


def load_vision_model(training_run: Path, device: str | torch.device = "cpu") -> VisionModel:
    """Stage 1 of a training run (its best checkpoint), in eval mode on ``device``."""
    spec = read_spec(training_run)
    vision = VisionModel(spec)
    load_weights(vision, best_checkpoint(Path(training_run) / "vision"),
                 expected_config_hash=spec.fingerprint("vision"))
    return vision.eval().to(device)


@torch.no_grad()
def disease_tokens(vision: VisionModel, manifest: pd.DataFrame, root: Path, device: torch.device,
                   batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 14, C) disease tokens and (N, 14) classifier probabilities of the manifest's rows, in order (on the CPU)."""
    dataset = ReportImageDataset(manifest, root, vision.spec.image_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    vision.eval().to(device)
    tokens, probs = [], []
    for batch in progress(loader, desc="disease tokens"):
        t, logits, _ = vision(batch["image"].to(device))
        tokens.append(t.float().cpu())
        probs.append(logits.sigmoid().float().cpu())
    return torch.cat(tokens), torch.cat(probs)


def disease_evidence(vision: VisionModel, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """One encoder input (1, 3, S, S) -> (each disease's image-specific evidence over the patch grid, clipped at 0:
    (14, side, side); the classifier's probabilities (14,)), as ``views.disease_maps_figure`` draws them."""
    device = next(vision.parameters()).device
    with torch.no_grad():
        evidence = vision.patch_evidence(x.to(device))[0].float().cpu().numpy()  # (14, P)
        probs = vision(x.to(device))[1].sigmoid()[0].float().cpu().numpy()
    side = int(round(evidence.shape[1] ** 0.5))
    return np.clip(evidence, 0, None).reshape(len(evidence), side, side), probs


def most_probable_finding(probabilities: np.ndarray) -> int:
    """Index of the most probable label other than "No Finding" (the map a reader looks at first)."""
    order = np.argsort(-probabilities)
    return int(next((k for k in order if LABELS[k] != "No Finding"), order[0]))


# ---------------------------------------------------------------------------------------------- reports
def generate_reports(model: TrainedModel, tokens: torch.Tensor, prompts: list[str], num_beams: int,
                     no_repeat_ngram_size: int, max_new_tokens: int, batch_size: int,
                     probabilities: torch.Tensor | None = None) -> list[list[str]]:
    """Beam search for (N, 14, C) disease tokens, ``batch_size`` images per generate call: per image its
    ``num_beams`` finished beams, best beam score first. With a ``findings_prompt`` model the (N, 14) classifier
    ``probabilities`` complete the prompts."""
    if model.spec.findings_prompt:
        if probabilities is None:
            raise ValueError("this model reads the classifier's findings in its prompt: pass probabilities")
        prompts = lm_prompts(model.spec, prompts, probabilities)
    out: list[list[str]] = []
    for start in progress(range(0, len(prompts), batch_size), desc="generate reports"):
        chunk = slice(start, start + batch_size)
        ids = [prompt_token_ids(model.tokenizer, p) for p in prompts[chunk]]
        beams = model.generator.generate(tokens[chunk], ids, num_beams, no_repeat_ngram_size, max_new_tokens,
                                         num_return_sequences=num_beams)
        out.extend(beams[k:k + num_beams] for k in range(0, len(beams), num_beams))
    return out


def choose_reports(beams: list[list[str]], beam_choice: str, probabilities: torch.Tensor | None = None,
                   threshold: float = 0.5) -> list[str]:
    """One report per image from its beams (best beam score first): ``score`` keeps the first; ``findings`` the
    first whose rule-labeled positive findings differ in the fewest labels from the classifier's decisions
    (``probabilities >= threshold``) on the labels a findings prompt can name (``REPORTING_ORDER``), i.e. the beam
    that best states what the prompt named."""
    if beam_choice == "score":
        return [b[0] for b in beams]
    if beam_choice != "findings":
        raise ValueError(f"beam_choice must be 'score' or 'findings', got {beam_choice!r}")
    if probabilities is None:
        raise ValueError("beam_choice='findings' needs the classifier's probabilities")
    named = [LABELS.index(label) for label in REPORTING_ORDER]
    decided = (probabilities.numpy() >= threshold)[:, named]
    chosen = []
    for candidates, wanted in zip(beams, decided):
        stated = positive_matrix(label_reports(candidates))[:, named].astype(bool)
        chosen.append(candidates[int(np.argmin((stated != wanted).sum(axis=1)))])
    return chosen


@dataclasses.dataclass
class ImageReport:
    """The report on one image file and what it rests on: the X-ray, the classifier and the evidence maps."""

    image: np.ndarray  # uint8 (H, W)
    report: str
    probabilities: np.ndarray  # (14,)
    evidence: np.ndarray  # (14, side, side), >= 0


def report_on_image(model: TrainedModel, path: Path, cfg: Any, prompt: str = DEFAULT_PROMPT) -> ImageReport:
    """Report and per-disease evidence for one image file or DICOM (never reads DICOM identifiers), with the
    beam settings of ``cfg`` (``num_beams``, ``no_repeat_ngram_size``, ``max_new_tokens``, ``beam_choice``)."""
    x = load_encoder_input(path, model.spec.image_size)[None]
    with torch.no_grad():
        tokens, logits, _ = model.vision(x.to(model.device))
    probabilities = logits.sigmoid().cpu()
    beams = generate_reports(model, tokens.cpu(), [prompt], cfg.num_beams, cfg.no_repeat_ngram_size,
                             cfg.max_new_tokens, 1, probabilities)
    report = choose_reports(beams, cfg.beam_choice, probabilities, model.spec.findings_threshold)[0]
    evidence, probs = disease_evidence(model.vision, x)
    return ImageReport(read_xray(path), report, probs, evidence)


def score_reports(generated: Sequence[str], references: Sequence[str], generated_positives: np.ndarray,
                  reference_positives: np.ndarray) -> dict[str, float]:
    """BLEU-1..4, ROUGE-L and CIDEr-D of the texts, and clinical efficacy (``ce_*``: precision, recall, F1, micro
    and macro) of the (N, 14) positive findings, read from the generated reports by a ``ReportLabeler`` and from
    :func:`reference_positives`. The four arguments are aligned per case, so that
    ``with_ci95(scores, score_reports, *cases)`` resamples them together."""
    scores: dict[str, float] = {**bleu_scores(list(generated), list(references)),
                                "rouge_l": rouge_l(list(generated), list(references)),
                                "cider_d": cider_d(list(generated), list(references))}
    ce = clinical_efficacy(generated_positives, reference_positives, LABELS)
    scores.update({f"ce_{k}": v for k, v in ce.items() if k != "per_label"})
    return scores


def ce_micro_f1(generated_positives: np.ndarray, reference_positives: np.ndarray) -> float:
    """The headline clinical-efficacy number: micro-F1 of the positive findings over the 14 labels."""
    return clinical_efficacy(generated_positives, reference_positives, LABELS)["micro_f1"]


def ce_per_label_f1(generated_positives: np.ndarray, reference_positives: np.ndarray) -> dict[str, float]:
    """F1 of each label's positive findings (the per-label table, bootstrapped label by label)."""
    per_label = clinical_efficacy(generated_positives, reference_positives, LABELS)["per_label"]
    return {label: entry["f1"] for label, entry in per_label.items()}


def reference_positives(part: pd.DataFrame, labeler: ReportLabeler) -> tuple[np.ndarray, str]:
    """(N, 14) positive findings of the reference reports and what they come from: the dataset's own CheXbert
    labels where a manifest row carries them (``label_source == "chexbert"``, CheXpert Plus), else ``labeler``
    reading the reference text."""
    positives = labeler.positives(list(part["report"]))
    shipped = (part["label_source"] == CHEXBERT).to_numpy() if "label_source" in part.columns else \
        np.zeros(len(part), dtype=bool)
    positives[shipped] = (np.nan_to_num(label_matrix(part[shipped]), nan=0.0) == 1).astype(positives.dtype)
    n, k = len(part), int(shipped.sum())
    if k == n:
        return positives, f"dataset CheXbert labels (label_source 'chexbert', all {n} references)"
    if k:
        return positives, f"dataset CheXbert labels for {k} of {n} references, {labeler.name} on the others' text"
    return positives, f"{labeler.name} on the reference text (the dataset ships no CheXbert labels for them)"


SYSTEM_KEYS = {"model (this run)": "model", "model, best-scoring beam": "model_top_beam",
               "nearest-neighbour report": "baseline_nn", "most common report": "baseline_common"}
HEADLINE_BASELINE = "nearest-neighbour report"


@dataclasses.dataclass
class SplitScores:
    """Every system's scores on one split, with 95 % bootstrap intervals over the reports."""

    metrics: dict[str, Any]  # metrics.json: <system>_<metric> and _ci95, the paired differences, the labelers
    values: pd.DataFrame  # system x metric, numbers
    table: pd.DataFrame  # system x metric, "0.80 (0.74–0.85)"
    per_label: pd.DataFrame  # the model's precision / recall / F1 (with interval) / support per label
    comparisons: pd.DataFrame  # paired CE micro-F1 differences against the nearest-neighbour report


def score_systems(systems: dict[str, list[str]], references: list[str], reference_pos: np.ndarray,
                  labeler: ReportLabeler) -> SplitScores:
    """Score each system's reports (keys of ``SYSTEM_KEYS``) against the references: every metric with its
    ``_ci95`` (the same seeded resamples of the reports for every system), and for each model row the paired
    bootstrap difference of CE micro-F1 against the nearest-neighbour report,
    ``<system>_minus_baseline_nn_ce_micro_f1: {"diff", "ci95"}``."""
    positives = {name: labeler.positives(reports) for name, reports in systems.items()}
    metrics: dict[str, Any] = {}
    values, table, comparisons = {}, {}, {}
    for name, reports in systems.items():
        cases = (reports, references, positives[name], reference_pos)
        scores = with_ci95(score_reports(*cases), score_reports, *cases)
        metrics.update({f"{SYSTEM_KEYS[name]}_{k}": v for k, v in scores.items()})
        values[name] = {k: v for k, v in scores.items() if not k.endswith("_ci95")}
        table[name] = format_with_ci(scores, digits=3)
    for name in systems:
        if SYSTEM_KEYS[name].startswith("model") and HEADLINE_BASELINE in systems:
            diff, low, high = paired_bootstrap_diff((positives[name], reference_pos),
                                                    (positives[HEADLINE_BASELINE], reference_pos), ce_micro_f1)
            metrics[f"{SYSTEM_KEYS[name]}_minus_baseline_nn_ce_micro_f1"] = {"diff": diff, "ci95": [low, high]}
            comparisons[f"{name} − {HEADLINE_BASELINE}"] = {"CE micro-F1 difference": diff, "ci95 low": low,
                                                             "ci95 high": high}
    model = "model (this run)"
    per_label = pd.DataFrame(clinical_efficacy(positives[model], reference_pos, LABELS)["per_label"]).T
    f1 = with_ci95(per_label["f1"].to_dict(), ce_per_label_f1, positives[model], reference_pos)
    per_label["f1 (95% CI)"] = pd.Series(format_with_ci(f1, digits=3))
    return SplitScores(metrics, pd.DataFrame(values).T, pd.DataFrame(table).T, per_label.rename_axis("label"),
                       pd.DataFrame(comparisons).T)


def baseline_reports(train_tokens: torch.Tensor, train_reports: list[str], query_tokens: torch.Tensor
                     ) -> dict[str, list[str]]:
    """Two baselines per query image: the training report of the nearest training image (cosine similarity of
    the flattened disease tokens of the trained vision model) and the most common training report."""
    a = torch.nn.functional.normalize(train_tokens.flatten(1).float(), dim=1)
    b = torch.nn.functional.normalize(query_tokens.flatten(1).float(), dim=1)
    nearest = (b @ a.T).argmax(dim=1).tolist()
    common = pd.Series(train_reports).value_counts().index[0]
    return {"nearest-neighbour report": [train_reports[i] for i in nearest],
            "most common report": [common] * len(query_tokens)}


def finding_sentences(report: str) -> dict[str, str]:
    """Label -> the first sentence of ``report`` that mentions it (positive, negative or uncertain)."""
    out: dict[str, str] = {}
    for sentence in re.split(r"(?<=[.!?])\s+", report.strip()):
        for label, value in label_report(sentence).items():
            if value is not None and label not in out and (label != "No Finding" or len(out) == 0):
                out[label] = sentence
    return out


# ---------------------------------------------------------------------------------------------- LM attention
def lm_token_attention(model: TrainedModel, tokens: torch.Tensor, prompt_ids: list[int], report: str
                       ) -> tuple[tuple[torch.Tensor, ...], list[str]]:
    """The LM's attention over [14 visual | prompt | report] tokens for one image: per layer (1, heads, T, T),
    float32 on the CPU, and the T token names (``V:<label>`` for the visual tokens)."""
    report_ids = model.tokenizer(report, add_special_tokens=False)["input_ids"] or [model.tokenizer.eos_token_id]
    lm = model.generator.lm
    embedding = lm.get_input_embeddings()
    ids = torch.tensor([prompt_ids + report_ids], device=embedding.weight.device)
    base = lm.get_base_model()
    previous = base.config._attn_implementation
    base.config._attn_implementation = "eager"  # sdpa returns no attention weights
    try:
        with torch.no_grad():
            visual = model.generator.visual_embeddings(tokens)
            out = lm(inputs_embeds=torch.cat([visual, embedding(ids)], dim=1), output_attentions=True)
    finally:
        base.config._attn_implementation = previous
    names = [f"V:{label}" for label in LABELS] + model.tokenizer.convert_ids_to_tokens(prompt_ids + report_ids)
    names = [n.replace("\u0120", " ").replace("\u010a", "\\n") for n in names]
    return tuple(a.float().cpu() for a in out.attentions), names
