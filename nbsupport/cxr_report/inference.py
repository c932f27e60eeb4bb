"""Applying a trained cxr_report model: disease tokens and evidence maps of the vision model, beam-search reports,
the choice among the beams, the scores against references and the two baselines, and the LM's token attention.

The verbs in :mod:`.pipeline` chain these; each works on a :class:`TrainedModel` (from
``pipeline.load_trained_model``) or on its vision part alone.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from nbsupport.checkpoints import META_FILE, SPEC_FILE, load_weights
from nbsupport.cxr_report.data import DEFAULT_PROMPT, ReportImageDataset, load_encoder_input, read_xray
from nbsupport.cxr_report.labeler import LABELS, label_report, label_reports, positive_matrix
from nbsupport.cxr_report.model import (
    REPORTING_ORDER,
    CxrModelSpec,
    ReportGenerator,
    VisionModel,
    lm_prompts,
    prompt_token_ids,
)
from nbsupport.metrics import bleu_scores, cider_d, clinical_efficacy, rouge_l
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


def score_reports(generated: list[str], references: list[str]) -> dict[str, float]:
    """BLEU-1..4, ROUGE-L, CIDEr-D and clinical efficacy (rule labeler on both sides, positives only)."""
    scores: dict[str, float] = {**bleu_scores(generated, references), "rouge_l": rouge_l(generated, references),
                                "cider_d": cider_d(generated, references)}
    ce = clinical_efficacy(positive_matrix(label_reports(generated)), positive_matrix(label_reports(references)),
                           LABELS)
    scores.update({f"ce_{k}": v for k, v in ce.items() if k != "per_label"})
    return scores


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
