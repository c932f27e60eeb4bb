"""The ct_clip stage configs: what each of the four notebooks can be asked, with its profiles.

The shared fields (manifest, data root, the optimisation fields, checkpoint and split) come from
:mod:`nbsupport.stages`; a field is redefined here only to give the seed's (CT-Data's) default or ct_clip's help.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

from nbsupport.config import param
from nbsupport.ct_clip import preprocessing as ct_pre
from nbsupport.ct_clip.data import CT_CLIP_SCHEMA, LABELS
from nbsupport.ct_clip.i3resnet import RESNET152_BLOCKS
from nbsupport.ct_clip.model import CTClipSpec
from nbsupport.stages import (AttentionStage, InferStage, PreprocessStage, TrainStage, check_split_fractions,
                              system_stage)

SYSTEM = "ct_clip"
PROMPT_PRESENT = "{} is present."
PROMPT_ABSENT = "{} is not present."
# `full`'s pretrained parts, as CT-Data names them (training/main.py:189-202, run.sh --text-base / --model-pth): a hub
# id is looked up in the local Hugging Face cache; the files are where the README's "ct_clip full" section puts them.
LLM2CLIP_TEXT_ENCODER = "microsoft/LLM2CLIP-Llama-3.2-1B-Instruct-CC-Finetuned"
LLM2VEC4CXR_WEIGHTS = "weights/llm2vec4cxr/pytorch_model.bin"
MERLIN_WEIGHTS = "weights/merlin/i3_resnet_clinical_longformer_best_clip_04-02-2024_23-21-36_epoch_99.pt"
SEED_BATCH_PER_GPU = 10  # run.sh --batch-size=10


def visible_gpus() -> int:
    """CUDA devices this process can use (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


CTRateStage = system_stage(SYSTEM, CT_CLIP_SCHEMA, "data_manifests/ct_rate_demo.csv")


@dataclasses.dataclass(frozen=True)
class PreprocessConfig(CTRateStage, PreprocessStage):
    """01_preprocess: CT-RATE volumes -> HU, RAS, resampled, windowed, padded/cropped float16 npz + manifest."""

    PROFILES = {
        "smoke": {"spacing": (5.0, 5.0, 8.0), "shape": (64, 64, 48), "workers": 1},
        # the demo volumes' field of view (320 x 320 x 384 mm, as CT-Data's) at twice CT-Data's voxel size
        # findings + impressions: the impression names the present findings (CT-RATE's reports have both fields);
        # report->volume R@5 0.21 -> 0.60 on the demo test split
        "demo": {"spacing": (2.5, 2.5, 4.0), "shape": (128, 128, 96), "workers": 2,
                 "report_fields": "findings+impressions"},
        "full": {"workers": 8},
    }

    data_root: str = param("", "CT-RATE repository root or its dataset/ folder (train_fixed/ or train/, ...); '' = demo")
    output_dir: str = param("", "npz folder relative to data_root; '' = 'preprocessed/<fingerprint of the settings>' "
                                "(volumes made with other settings are never reused)")
    spacing: tuple[float, float, float] = param(ct_pre.TARGET_SPACING, "output voxel size (R, A, S) in mm")
    shape: tuple[int, int, int] = param(ct_pre.TARGET_SHAPE, "output size (R, A, S) after pad / centre crop")
    hu_min: float = param(ct_pre.HU_WINDOW[0], "HU mapped to 0")
    hu_max: float = param(ct_pre.HU_WINDOW[1], "HU mapped to 1 (values outside are clipped)")
    compress: bool = param(False, "np.savez_compressed (CT-Data) instead of np.savez: ~3x smaller, slower")
    workers: int = param(8, "processes preprocessing volumes in parallel")
    redo: bool = param(False, "preprocess volumes whose npz exists again")
    limit: int | None = param(None, "only the first N volumes of each CT-RATE split (a quick look)")
    val_fraction: float = param(0.1, "fraction of CT-RATE train patients held out for validation")
    report_fields: Literal["findings", "impressions", "findings+impressions"] = param(
        "findings", "report text the model reads (CT-Data trains on findings)")
    real_ct: str = param("", "a real CT shown through the same preprocessing: .nii(.gz), DICOM file or folder; "
                             "'' = pydicom's packaged CT_small.dcm; 'none' = skip")
    n_examples: int = param(4, "volumes in the before/after figure")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.spec()  # checks the geometry and the window
        check_split_fractions(val_fraction=self.val_fraction)

    def spec(self) -> ct_pre.PreprocessSpec:
        return ct_pre.PreprocessSpec(self.spacing, self.shape, self.hu_min, self.hu_max, self.compress)


@dataclasses.dataclass(frozen=True)
class TrainConfig(CTRateStage, TrainStage):
    """02_train: contrastive pretraining of a 3-D image encoder against report embeddings."""

    PROFILES = {
        "smoke": {"input_size": (32, 32, 24), "image_width": 8, "image_blocks": (1, 1, 1, 1),
                  "text_encoder": "tiny", "text_pooling": "sentence_mean", "text_tuning": "lora", "lora_r": 4,
                  "embed_dim": 32, "epochs": 3,
                  "batch_size": 4, "lr": 2e-3, "warmup_steps": 0},
        # ~5 min on a 2-core CPU: packaged MiniLM with LoRA (r 16) on every layer's attention, as CT-CLIP trains
        # its text encoder (a frozen MiniLM caps zero-shot AUROC at ~0.66: negation is one label-independent
        # direction in its space; text_tuning="frozen" keeps that setting), small 3-D ResNet. float32: bf16 autocast
        # (`mixed_precision="bf16_native"`) halves the step's CPU time but is not reproducible run to run on the CPU
        # and turned the loss into NaN at step 152 of 160 at seed 2 (benchmarks/RESULTS.md, "make demo")
        "demo": {"input_size": (64, 64, 48), "image_width": 16, "image_blocks": (1, 1, 1, 1),
                 "text_encoder": "all-minilm-l6-v2", "text_pooling": "sentence_mean", "text_tuning": "lora",
                 "lora_r": 16, "embed_dim": 128,
                 "epochs": 20, "batch_size": 16, "lr": 2e-3, "weight_decay": 0.05, "warmup_steps": 20,
                 "augment": True},
        # CT-Data (training/main.py:189-239, run.sh): Merlin's I3ResNet-152 with its weights; LLM2Vec on LLM2CLIP's
        # Llama-3.2-1B with llm2vec4cxr's weights, latent-attention pooling, 512 tokens, LoRA r 32; projections to 1280;
        # 10 epochs, lr 1e-4, wd 0.05, warmup 1000, grad clip 5, batch 10 per GPU on every visible GPU, ZeRO-1, bf16
        "full": {"image_arch": "i3resnet", "image_blocks": RESNET152_BLOCKS, "image_weights": MERLIN_WEIGHTS,
                 "text_encoder": LLM2CLIP_TEXT_ENCODER, "text_encoder_weights": LLM2VEC4CXR_WEIGHTS,
                 "text_pooling": "latent_attention", "text_tuning": "lora", "max_text_length": 512,
                 "embed_dim": 1280, "num_processes": 0, "batch_size": 0, "num_workers": 4},
    }

    input_size: tuple[int, int, int] = param((224, 224, 160), "model input (R, A, S) voxels (CT-Data resizes to "
                                                              "224 x 224 x 160)")
    image_arch: Literal["i3resnet", "resnet", "vit"] = param(
        "resnet", "3-D image encoder: Merlin's I3ResNet (the seed's), a small I3ResNet-like CNN, or a CT-ViT-like ViT")
    image_width: int = param(64, "resnet / i3resnet: channels of the first stage")
    image_blocks: tuple[int, ...] = param((3, 4, 6, 3), "resnet / i3resnet: residual blocks per stage "
                                                        "(I3ResNet-152: 3, 8, 36, 3)")
    image_weights: str = param("", "i3resnet: Merlin's published checkpoint (.pt, as downloaded); '' = random init")
    vit_patch: tuple[int, int, int] = param((16, 16, 16), "vit: patch size in voxels")
    vit_dim: int = param(512, "vit: token width")
    vit_depth: int = param(6, "vit: transformer layers")
    vit_heads: int = param(8, "vit: attention heads")
    text_encoder: str = param("all-minilm-l6-v2", "text model: folder, cached hub id, 'all-minilm-l6-v2' or 'tiny'; "
                                                  "a Llama folder runs as LLM2Vec (bidirectional)")
    text_encoder_weights: str = param("", "LLM2Vec text_encoder: llm2vec4cxr's pytorch_model.bin (every tensor must "
                                          "fit); '' = the base model's weights only")
    text_pooling: Literal["mean", "sentence_mean", "latent_attention"] = param(
        "mean", "report embedding: token mean, mean of sentence embeddings, or LLM2Vec latent attention")
    text_tuning: Literal["frozen", "lora", "full"] = param("frozen", "text tower: frozen (cached), LoRA, or all")
    lora_r: int = param(32, "LoRA rank (seed: 32)")
    max_text_length: int = param(256, "report tokens kept (seed: 512 for the LLM)")
    embed_dim: int = param(512, "shared embedding size (seed: 1280)")
    loss: Literal["siglip", "clip"] = param("siglip", "SigLIP sigmoid loss (seed) or CLIP softmax loss (CT-CLIP)")
    epochs: int = param(10, "training epochs (seed: 10)")
    batch_size: int = param(10, "global batch, split across processes; 0 = 10 per process (the seed's 10 per GPU)")
    lr: float = param(1e-4, "peak learning rate (seed: 1e-4)")
    weight_decay: float = param(0.05, "AdamW weight decay (seed: 0.05)")
    warmup_steps: int = param(1000, "linear warm-up steps before the cosine decay (seed: 1000)")
    grad_clip: float | None = param(5.0, "gradient norm clip (seed: 5.0)")
    augment: bool = param(False, "CT-Data's intensity shift and Gaussian noise")
    sentence_keep: float = param(1.0, "text augmentation: each training report keeps each sentence with this "
                                      "probability (at least one); 1 = whole reports")
    select_checkpoint_by: Literal["r5", "mean_rank"] = param(
        "mean_rank", "best checkpoint by validation report->volume mean rank (lower is better) or R@5; R@5 of a "
                     "small validation split saturates at 1.0 early (15 demo volumes: step 72 of 160)")
    num_processes: int = param(1, "processes: DDP (gloo on CPU), DeepSpeed ZeRO-1 via accelerate on CUDA; 0 = one "
                                  "per visible GPU (1 without CUDA)")

    def __post_init__(self) -> None:
        if self.num_processes == 0:  # resolved here, so that config.json and every launched process see the number
            object.__setattr__(self, "num_processes", visible_gpus() or 1)
        if self.batch_size == 0:
            object.__setattr__(self, "batch_size", SEED_BATCH_PER_GPU * self.num_processes)
        super().__post_init__()
        if not 0 < self.sentence_keep <= 1:
            raise ValueError(f"sentence_keep must be in (0, 1], got {self.sentence_keep}")

    def model_spec(self) -> CTClipSpec:
        names = {f.name for f in dataclasses.fields(CTClipSpec)} - {"lora_alpha", "lora_dropout"}
        return CTClipSpec(**{name: getattr(self, name) for name in names}, lora_alpha=self.lora_r)


@dataclasses.dataclass(frozen=True)
class InferConfig(CTRateStage, InferStage):
    """03_infer: retrieval both ways, zero-shot classification of the 18 labels, features of one CT file."""

    batch_size: int = param(8, "volumes per forward pass")
    prompt_present: str = param(PROMPT_PRESENT, "zero-shot prompt for a present finding ({} = label)")
    prompt_absent: str = param(PROMPT_ABSENT, "zero-shot prompt for an absent finding")
    linear_probe: bool = param(True, "also fit a text-free linear probe on train image features (upper bound)")
    input_file: str = param("", "a .nii(.gz) CT to extract features from; '' = the split's first volume")


@dataclasses.dataclass(frozen=True)
class AttentionConfig(CTRateStage, AttentionStage):
    """04_attention: similarity matrix of a batch, top reports for a volume, relevance of a label prompt."""

    batch_size: int = param(8, "volumes per forward pass")
    label: str = param("Pleural effusion", "finding whose 'X is present.' prompt is explained")
    volume: str = param("", "volume to explain; '' = the split's first volume with the label")
    n_batch: int = param(12, "volumes (and their reports) in the similarity matrix")
    top_k: int = param(5, "retrieved reports shown for the volume")
    n_slices: int = param(8, "axial slices in the relevance figure")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.label not in LABELS:
            raise ValueError(f"label must be one of the 18 CT-RATE labels {list(LABELS)}, got {self.label!r}")
