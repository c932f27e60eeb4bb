"""The four stage configs of cxr_report, one per notebook, on the shared stage bases (:mod:`nbsupport.stages`).

Defaults are the seed's (charangajjala/MedGen_AI ``multimodal_final.ipynb``: Llama-2-7b in 4-bit NF4, LoRA r=8,
alpha=8, dropout 0.1 on q/k/v/o, 20 epochs of batch 1 at a constant 5e-4, weight decay 0.001, max_grad_norm 0.3,
paged AdamW, gradient_accumulation_steps 1, 5 beams without a repeated bigram); the ``demo`` and ``smoke`` profiles
are CPU-sized.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from nbsupport.config import param
from nbsupport.cxr_report.data import CXR_SCHEMA, DEFAULT_PROMPT
from nbsupport.cxr_report.model import LORA_TARGETS
from nbsupport.optim import MixedPrecision
from nbsupport.paths import resolve_path
from nbsupport.runs import RunFolder, find_checkpoint
from nbsupport.stages import (AttentionStage, HeldOutSplits, InferStage, PreprocessStage, TrainedModelStage,
                              TrainStage, system_stage)

SYSTEM = "cxr_report"
# torchvision's ImageNet DenseNet-121, as published: https://download.pytorch.org/models/densenet121-a639ec97.pth
DENSENET121_IMAGENET = "weights/densenet121-a639ec97.pth"


_CxrReport = system_stage(SYSTEM, CXR_SCHEMA, "data_manifests/chexpert_plus_demo.csv")


@dataclasses.dataclass(frozen=True)
class PreprocessConfig(_CxrReport, HeldOutSplits, PreprocessStage):
    """01_preprocess: read CheXpert Plus (or the seed CSV), resize to RGB, write the manifest."""

    PROFILES = {"smoke": {"image_size": 64}, "demo": {"image_size": 128}, "full": {"image_size": 224}}

    data_root: str = param("", "dataset root (CheXpert Plus CSV + chexbert_labels, or the seed CSV); '' = demo data")
    report_section: Literal["findings", "impression", "findings+impression"] = param(
        "findings", "CheXpert Plus section(s) that form the target report")
    prompt: str = param(DEFAULT_PROMPT, "diagnostic prompt put before every report")
    image_size: int = param(224, "side of the resized RGB images (pixels); 224 gives DenseNet-121 its 7x7 patches")
    frontal_only: bool = param(True, "keep frontal views only (the synthetic and the seed data are frontal)")
    test_fraction: float = param(0.2, "fraction of patients held out for test when the data ship no valid split")
    n_examples: int = param(6, "images shown with their reports")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.image_size % 32 or self.image_size < 32:
            raise ValueError(f"image_size must be a multiple of 32 (DenseNet stride), got {self.image_size}")


@dataclasses.dataclass(frozen=True)
class TrainConfig(_CxrReport, TrainStage):
    """02_train: the vision model on the 14 labels, then the QLoRA report generator on its disease tokens.

    The shared optimisation fields (``epochs``, ``batch_size``, ``lr``, ``grad_accum``...) are the report stage's,
    the seed's LM fine-tuning; the vision stage has its own ``vision_*`` fields. ``resume``, ``num_processes`` and
    ``seed`` apply to both stages.
    """

    PROFILES = {
        "smoke": {"encoder": "densenet_tiny", "image_size": 64, "language_model": "tiny", "vision_epochs": 2,
                  "vision_batch_size": 8, "vision_lr": 3e-3, "epochs": 1, "batch_size": 4, "max_steps": 4,
                  "max_report_tokens": 24, "optimizer": "adamw", "findings_prompt": True},
        # the demo dataset (~420 training images) on one CPU thread: vision ~50 s, report stage 160 steps of
        # batch 4 at ~1.1 CPU s (benchmarks/RESULTS.md, "issue 23"). Our additions, off in `full`: the findings in
        # the prompt (the classifier's; each training report's own labels in training), a 5x faster rate for the
        # visual projection than for LoRA. For CPU speed (issue 23) the demo's LM is not quantized (NF4 is no
        # faster than float32 on the CPU and slower than bf16) and runs under bf16 autocast (AVX512-BF16) on
        # padding-free packed batches: 2.2x cheaper per step; `full` keeps the seed's NF4.
        "demo": {"encoder": "densenet_small", "image_size": 128, "language_model": "smollm2-135m",
                 "quantization": "none", "mixed_precision": "bf16_native", "pack_sequences": True,
                 "vision_epochs": 12, "vision_batch_size": 16, "vision_lr": 3e-3, "epochs": 3, "batch_size": 4,
                 "max_steps": 160, "lr": 2e-3, "projection_lr": 1e-2, "max_report_tokens": 56, "optimizer": "adamw",
                 "findings_prompt": True},
        # the seed's encoder (multimodal_final.ipynb, DenseNet121WithAttention): torchvision's
        # densenet121(weights=DenseNet121_Weights.IMAGENET1K_V1), whose file is densenet121-a639ec97.pth
        "full": {"encoder": "densenet121", "encoder_weights": DENSENET121_IMAGENET, "image_size": 224,
                 "language_model": "meta-llama/Llama-2-7b-hf", "vision_epochs": 50, "epochs": 20, "batch_size": 1,
                 "optimizer": "paged_adamw", "num_workers": 4},
    }

    encoder: Literal["densenet121", "densenet_small", "densenet_tiny"] = param(
        "densenet121", "image encoder: the seed's DenseNet-121, or smaller DenseNets for CPU profiles")
    encoder_weights: str = param("", "ImageNet weights of the encoder: torchvision's published DenseNet-121 file "
                                 "(densenet121-a639ec97.pth, read as it is) or a safetensors state_dict of the "
                                 "encoder's features; '' = random init")
    image_size: int = param(224, "model input side (pixels); patches = (image_size / 32)^2")
    language_model: str = param("meta-llama/Llama-2-7b-hf", "causal LM: local folder, hub id in the local cache, "
                                "'smollm2-135m' (packaged) or 'tiny' (random-init Llama, smoke)")
    quantization: Literal["nf4", "none"] = param("nf4", "nf4: 4-bit NormalFloat base weights (QLoRA); none: full")
    lora_r: int = param(8, "LoRA rank (seed lora_r)")
    lora_alpha: int = param(8, "LoRA scaling alpha (seed lora_alpha)")
    lora_dropout: float = param(0.1, "LoRA dropout (seed lora_dropout)")
    lora_targets: tuple[str, ...] = param(LORA_TARGETS, "modules of every decoder layer that get LoRA adapters (seed: "
                                          "q/k/v/o; QLoRA's paper adapts all linear layers)")
    vision_epochs: int = param(50, "epochs of the vision model on the 14 labels (seed: dense_net_121_d_e50)")
    vision_batch_size: int = param(16, "batch size of the vision stage")
    vision_lr: float = param(1e-3, "learning rate of the vision stage (AdamW, warm-up + cosine)")
    epochs: int = param(20, "epochs of the report stage (seed num_train_epochs)")
    max_steps: int | None = param(None, "stop the report stage after this many optimizer steps (None: epochs)")
    batch_size: int = param(1, "report-stage batch size (seed per_device_train_batch_size)")
    # seed: gradient_accumulation_steps = 1 in the QLoRA-parameters cell of multimodal_final.ipynb
    grad_accum: int = param(1, "report-stage batches per optimizer step (seed gradient_accumulation_steps); "
                               "effective batch = batch_size * grad_accum")
    lr: float = param(5e-4, "report-stage learning rate, constant (seed)")
    projection_lr: float | None = param(None, "learning rate of the visual projection (it feeds the frozen LM's "
                                        "input, like prompt tuning); None: lr (seed)")
    weight_decay: float = param(0.001, "report-stage weight decay (seed)")
    grad_clip: float | None = param(0.3, "report-stage max gradient norm (seed max_grad_norm)")
    optimizer: Literal["adamw", "paged_adamw"] = param("paged_adamw", "paged_adamw (seed; CUDA) or adamw")
    max_report_tokens: int = param(256, "report tokens kept for training (longer reports are cut)")
    pack_sequences: bool = param(False, "our addition: run each report-stage batch as one padding-free row "
                                 "(the same loss up to float rounding, without the padding's compute)")
    mixed_precision: MixedPrecision = param(  # the shared field, redefined: the vision stage keeps 'auto'
        "auto", "report stage: auto = bf16 autocast on CUDA, float32 on the CPU; bf16_native = bf16 where the GPU or "
        "CPU computes it natively (AVX-512 BF16, AMX), float32 elsewhere; the vision stage always uses auto")
    findings_prompt: bool = param(False, "our addition (PromptMRG-style): append the auxiliary classifier's positive "
                                  "labels to the diagnostic prompt; False = the seed's prompt alone")
    findings_threshold: float = param(0.5, "classifier probability from which a label is named in the prompt")
    num_workers: int = param(0, "data-loader worker processes (vision stage; the report stage reads cached tokens)")
    resume: bool = param(False, "continue the run in run_dir: a finished vision stage is reloaded, not retrained, "
                                "and the report stage continues from its last complete checkpoint")


@dataclasses.dataclass(frozen=True)
class _TrainedStage(_CxrReport, TrainedModelStage):
    """03 and 04: a trained model, i.e. a 02_train run folder (``model_spec.json``, ``vision/``, ``report/``)."""

    checkpoint: str = param("", "training run folder (holding model_spec.json); '' = run_dir, else the newest run")

    def find_checkpoint(self, run: RunFolder, model: str = "") -> Path:
        """The training run folder to load: ``checkpoint``, else this run, else the newest cxr_report run with a
        trained report generator. (A cxr_report model is two checkpoints, so its "checkpoint" is the run folder.)"""
        if self.checkpoint:
            path = resolve_path(self.checkpoint)
            if not (path / "model_spec.json").is_file():
                raise FileNotFoundError(f"{path} is not a cxr_report training run (no model_spec.json); the "
                                        "`checkpoint` parameter names the 02_train run folder")
            return path
        return find_checkpoint("", run, self.SYSTEM, "report").parent.parent.parent  # <run>/report/checkpoints/best


@dataclasses.dataclass(frozen=True)
class _ReportingStage(_TrainedStage):
    """03 and 04 write reports: the seed's beam search (``multimodal_final.ipynb``, ``Model_PreCarDiv.generate``:
    ``num_beams=5, early_stopping=True, no_repeat_ngram_size=2, max_length=512``) and which finished beam is kept."""

    num_beams: int = param(5, "beam width (seed)")
    no_repeat_ngram_size: int = param(2, "no n-gram of this size is generated twice (seed: 2; 0: off)")
    max_new_tokens: int = param(512, "longest generated report in tokens (seed max_length 512)")
    beam_choice: Literal["score", "findings"] = param(
        "score", "report kept from the finished beams: the best beam score (seed), or the first whose labeled "
        "findings differ least from the classifier's (a findings-prompt model)")
    lm_dtype: Literal["float32", "bfloat16"] = param(
        "float32", "dtype of a quantization='none' LM (LoRA included) when writing reports: bfloat16 is ~1.3x as "
        "fast as float32 on CPUs with AVX512-BF16 (an NF4 LM keeps bitsandbytes' own compute dtype)")


@dataclasses.dataclass(frozen=True)
class InferConfig(_ReportingStage, InferStage):
    """03_infer: beam-search reports for a split (scored against the references and two baselines), an image
    file or DICOM, and the real radiograph shipped by pydicom-data."""
    # demo: 40 test images keep 5-beam generation with SmolLM2 on 2 CPU cores within a few minutes; 64 new tokens
    # cover the longest demo reports (p99 54 SmolLM2 tokens). No n-gram blocking: 57 % of the demo references
    # repeat a bigram ("is present", ". There"), which no_repeat_ngram_size=2 forbids (benchmarks/RESULTS.md);
    # the seed's 2 stays the default and `full`. The bf16 LM (a quantization="none" model, as the demo trains) is
    # for CPU speed (issue 23); 8 images per generate call, as before: all 40 in one call was 11 % faster but
    # peaked at 12 GB of memory (transformers' prefill logits of 200 beams) against 3 GB.
    PROFILES = {"smoke": {"max_new_tokens": 12, "max_reports": 8, "beam_choice": "findings"},
                "demo": {"max_new_tokens": 64, "max_reports": 40, "no_repeat_ngram_size": 0,
                         "beam_choice": "findings", "lm_dtype": "bfloat16"},
                "full": {"max_new_tokens": 512}}

    input_image: str = param("", "an image file or DICOM to write a report for, besides the split")
    chexbert_path: str = param("", "folder with CheXbert's chexbert.pth and bert-base-uncased's config.json + "
                               "vocab.txt: it labels the generated reports for clinical efficacy; '' = the rule "
                               "labeler (named beside every CE number)")
    real_dicom: bool = param(True, "also report on the real chest radiograph RG1_UNCR.dcm from pydicom-data")
    batch_size: int = param(8, "images per generate call")
    max_reports: int = param(0, "score only the first N images of the split (0: all)")
    n_examples: int = param(4, "images shown with generated and reference reports")


@dataclasses.dataclass(frozen=True)
class AttentionConfig(_ReportingStage, AttentionStage):
    """04_attention: the 14 disease attention maps on an X-ray beside the generated sentences, and the LM's
    token-level attention over the visual and text tokens."""
    PROFILES = {"smoke": {"max_new_tokens": 8, "beam_choice": "findings"},
                "demo": {"max_new_tokens": 64, "no_repeat_ngram_size": 0, "beam_choice": "findings",
                         "lm_dtype": "bfloat16"},
                "full": {"max_new_tokens": 256}}

    image_id: str = param("", "manifest id of the image; '' = the split's image with most positive labels")
    input_image: str = param("", "an image file or DICOM to use instead of a manifest image")
    max_new_tokens: int = param(256, "longest generated report in tokens")
    layer: int = param(-1, "LM layer whose attention is drawn (-1: last)")
