"""The verbs the ct_clip notebooks call: preprocess, train, evaluate (retrieval + zero-shot), features, relevance.

Each verb takes the stage's frozen config and its run folder, does one thing, records what it measured in
``metrics.json`` and returns a small result object with the tables and figures a notebook shows.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from nbsupport.config import StageConfig, param
from nbsupport.ct_clip import data as ct_data
from nbsupport.ct_clip import preprocessing as ct_pre
from nbsupport.ct_clip.model import CTClip, CTClipSpec, contrastive_loss, count_parameters, split_sentences
from nbsupport.device import resolve_device
from nbsupport.manifest import read_manifest
from nbsupport.metrics import RETRIEVAL_KS, auroc, binary_classification_metrics, retrieval_metrics
from nbsupport.paths import demo_data_root, resolve_path
from nbsupport.progress import progress
from nbsupport.runs import RunFolder, atomic_write_text, find_checkpoint
from nbsupport.checkpoints import load_weights
from nbsupport.launch import launch
from nbsupport.train import TrainSettings

SYSTEM = "ct_clip"
LABELS = ct_data.LABELS
DEFAULT_MANIFEST = "data_manifests/ct_rate_demo.csv"
PROMPT_PRESENT = "{} is present."
PROMPT_ABSENT = "{} is not present."
ACCELERATE_ZERO1 = Path(__file__).with_name("accelerate_zero1.yaml")


def _demo_root() -> str:
    return str(demo_data_root() / SYSTEM)


# ============================================================================================ configs
@dataclasses.dataclass(frozen=True)
class PreprocessConfig(StageConfig):
    """01_preprocess: CT-RATE volumes -> HU, RAS, resampled, windowed, padded/cropped float16 npz + manifest."""

    SYSTEM = SYSTEM
    STAGE = "01_preprocess"
    PROFILES = {
        "smoke": {"spacing": (5.0, 5.0, 8.0), "shape": (64, 64, 48), "workers": 1},
        # the demo volumes' field of view (320 x 320 x 384 mm, as CT-Data's) at twice CT-Data's voxel size
        # findings + impressions: the impression names the present findings (CT-RATE's reports have both fields);
        # report->volume R@5 0.21 -> 0.60 on the demo test split
        "demo": {"spacing": (2.5, 2.5, 4.0), "shape": (128, 128, 96), "workers": 2,
                 "report_fields": "findings+impressions"},
        "full": {"workers": 8},
    }

    data_root: str = param("", "CT-RATE 'dataset' folder (train_fixed/, radiology_text_reports/, ...); '' = demo")
    manifest: str = param(DEFAULT_MANIFEST, "manifest CSV to write (paths relative to data_root)")
    output_dir: str = param("", "npz folder relative to data_root; '' = 'preprocessed'")
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
        ct_pre.PreprocessSpec(self.spacing, self.shape, self.hu_min, self.hu_max, self.compress)
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")

    def spec(self) -> ct_pre.PreprocessSpec:
        return ct_pre.PreprocessSpec(self.spacing, self.shape, self.hu_min, self.hu_max, self.compress)


@dataclasses.dataclass(frozen=True)
class _ManifestStage(StageConfig):
    SYSTEM = SYSTEM

    data_root: str = param("", "data root; '' = the root recorded in the manifest")
    manifest: str = param(DEFAULT_MANIFEST, "manifest written by 01_preprocess")


@dataclasses.dataclass(frozen=True)
class _TrainedModelStage(_ManifestStage):
    checkpoint: str = param("", "checkpoint folder; '' = best checkpoint of run_dir, else of the newest run")
    split: Literal["train", "val", "test"] = param("test", "manifest split to evaluate")
    batch_size: int = param(8, "volumes per forward pass")


@dataclasses.dataclass(frozen=True)
class TrainConfig(_ManifestStage):
    """02_train: contrastive pretraining of a 3-D image encoder against report embeddings."""

    STAGE = "02_train"
    PROFILES = {
        "smoke": {"input_size": (32, 32, 24), "image_width": 8, "image_blocks": (1, 1, 1, 1),
                  "text_encoder": "tiny", "text_pooling": "sentence_mean", "text_tuning": "lora", "lora_r": 4,
                  "embed_dim": 32, "epochs": 3,
                  "batch_size": 4, "lr": 2e-3, "warmup_steps": 0},
        # ~5 min on a 2-core CPU: packaged MiniLM with LoRA (r 16) on every layer's attention, as CT-CLIP trains
        # its text encoder (a frozen MiniLM caps zero-shot AUROC at ~0.66: negation is one label-independent
        # direction in its space; text_tuning="frozen" keeps that setting), small 3-D ResNet
        "demo": {"input_size": (64, 64, 48), "image_width": 16, "image_blocks": (1, 1, 1, 1),
                 "text_encoder": "all-minilm-l6-v2", "text_pooling": "sentence_mean", "text_tuning": "lora",
                 "lora_r": 16, "embed_dim": 128,
                 "epochs": 20, "batch_size": 16, "lr": 2e-3, "weight_decay": 0.05, "warmup_steps": 20,
                 "augment": True},
        # CT-Data run.sh: 10 epochs, lr 1e-4, wd 0.05, warmup 1000, grad clip 5, batch 10 per GPU, ZeRO-1, bf16
        "full": {"text_pooling": "latent_attention", "text_tuning": "lora", "num_processes": 6,
                 "batch_size": 60, "num_workers": 4},
    }

    input_size: tuple[int, int, int] = param((224, 224, 160), "model input (R, A, S) voxels (CT-Data resizes to "
                                                              "224 x 224 x 160)")
    image_arch: Literal["resnet", "vit"] = param("resnet", "3-D image encoder: I3ResNet-like CNN or CT-ViT-like ViT")
    image_width: int = param(64, "resnet: channels of the first stage")
    image_blocks: tuple[int, ...] = param((3, 4, 6, 3), "resnet: residual blocks per stage")
    vit_patch: tuple[int, int, int] = param((16, 16, 16), "vit: patch size in voxels")
    vit_dim: int = param(512, "vit: token width")
    vit_depth: int = param(6, "vit: transformer layers")
    vit_heads: int = param(8, "vit: attention heads")
    text_encoder: str = param("all-minilm-l6-v2", "text model: folder, cached hub id, 'all-minilm-l6-v2' or 'tiny'")
    text_pooling: Literal["mean", "sentence_mean", "latent_attention"] = param(
        "mean", "report embedding: token mean, mean of sentence embeddings, or LLM2Vec latent attention")
    text_tuning: Literal["frozen", "lora", "full"] = param("frozen", "text tower: frozen (cached), LoRA, or all")
    lora_r: int = param(32, "LoRA rank (seed: 32)")
    max_text_length: int = param(256, "report tokens kept (seed: 512 for the LLM)")
    embed_dim: int = param(512, "shared embedding size (seed: 1280)")
    loss: Literal["siglip", "clip"] = param("siglip", "SigLIP sigmoid loss (seed) or CLIP softmax loss (CT-CLIP)")
    epochs: int = param(10, "training epochs (seed: 10)")
    max_steps: int | None = param(None, "stop after this many optimizer steps")
    batch_size: int = param(10, "global batch (seed: 10 per GPU)")
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
    num_processes: int = param(1, "processes: DDP (gloo on CPU), DeepSpeed ZeRO-1 via accelerate on CUDA")
    num_workers: int = param(0, "data-loader worker processes")
    resume: bool = param(False, "continue from the last checkpoint in run_dir")

    def __post_init__(self) -> None:
        if not 0 < self.sentence_keep <= 1:
            raise ValueError(f"sentence_keep must be in (0, 1], got {self.sentence_keep}")

    def model_spec(self) -> CTClipSpec:
        return CTClipSpec(input_size=self.input_size, image_arch=self.image_arch, image_width=self.image_width,
                          image_blocks=self.image_blocks, vit_patch=self.vit_patch, vit_dim=self.vit_dim,
                          vit_depth=self.vit_depth, vit_heads=self.vit_heads, text_encoder=self.text_encoder,
                          text_pooling=self.text_pooling, text_tuning=self.text_tuning, lora_r=self.lora_r,
                          lora_alpha=self.lora_r, max_text_length=self.max_text_length, embed_dim=self.embed_dim,
                          loss=self.loss)


@dataclasses.dataclass(frozen=True)
class InferConfig(_TrainedModelStage):
    """03_infer: retrieval both ways, zero-shot classification of the 18 labels, features of one CT file."""

    STAGE = "03_infer"

    prompt_present: str = param(PROMPT_PRESENT, "zero-shot prompt for a present finding ({} = label)")
    prompt_absent: str = param(PROMPT_ABSENT, "zero-shot prompt for an absent finding")
    linear_probe: bool = param(True, "also fit a text-free linear probe on train image features (upper bound)")
    input_file: str = param("", "a .nii(.gz) CT to extract features from; '' = the split's first volume")


@dataclasses.dataclass(frozen=True)
class AttentionConfig(_TrainedModelStage):
    """04_attention: similarity matrix of a batch, top reports for a volume, relevance of a label prompt."""

    STAGE = "04_attention"

    label: str = param("Pleural effusion", "finding whose 'X is present.' prompt is explained")
    volume: str = param("", "volume to explain; '' = the split's first volume with the label")
    n_batch: int = param(12, "volumes (and their reports) in the similarity matrix")
    top_k: int = param(5, "retrieved reports shown for the volume")
    n_slices: int = param(8, "axial slices in the relevance figure")

    def __post_init__(self) -> None:
        if self.label not in LABELS:
            raise ValueError(f"label must be one of the 18 CT-RATE labels {list(LABELS)}, got {self.label!r}")


# ============================================================================================ 01 preprocess
@dataclasses.dataclass
class PreprocessResult:
    manifest: pd.DataFrame
    manifest_path: Path
    status: pd.DataFrame  # one row per volume: done / skipped / failed (+ reason), seconds, shapes
    summary: pd.DataFrame  # volumes and label prevalence per split
    figure: Any  # before/after slices
    real_ct: dict[str, Any] | None  # {"source", "hu_range", "figure"} for the packaged real CT


def preprocess(cfg: PreprocessConfig, run: RunFolder) -> PreprocessResult:
    """Preprocess every volume (in parallel, skipping done ones), write the manifest, show before/after."""
    root = resolve_path(cfg.data_root or _demo_root())
    manifest, status = ct_pre.preprocess_dataset(root, cfg.manifest, cfg.output_dir, cfg.spec(), cfg.workers,
                                                 cfg.redo, cfg.val_fraction, cfg.report_fields, cfg.seed, cfg.limit)
    manifest_path = resolve_path(cfg.manifest)
    atomic_write_text(run.file("preprocessing_status.csv"), status.to_csv(index=False))
    summary = summarise_manifest(manifest)
    counts = status.status.value_counts().to_dict()
    run.write_metrics(cfg.STAGE, {"volumes": len(manifest), **{f"volumes_{k}": int(v) for k, v in counts.items()},
                                  "seconds_per_volume": float(status.loc[status.status == "done", "seconds"].mean())
                                  if (status.status == "done").any() else None})
    failed = status[status.status == "failed"]
    for row in failed.itertuples():
        print(f"FAILED {row.volume}: {row.reason}")
    if not len(manifest):
        raise RuntimeError(f"all {len(status)} volumes failed; first reason: {failed.reason.iloc[0]}")
    fig = before_after_figure(manifest.head(cfg.n_examples), root)
    run.save_figure(fig, "01_before_after")
    real = None
    if cfg.real_ct.lower() != "none":
        real = preprocess_real_ct(cfg.real_ct, cfg.spec())
        run.save_figure(real["figure"], "01_real_ct")
        run.write_metrics(cfg.STAGE, {"real_ct_hu_min": real["hu_range"][0], "real_ct_hu_max": real["hu_range"][1]})
    return PreprocessResult(manifest, manifest_path, status, summary, fig, real)


def summarise_manifest(manifest: pd.DataFrame) -> pd.DataFrame:
    """Per split: volumes, patients and the prevalence of each label that occurs."""
    present = [n for n in LABELS if manifest[n].astype(int).any()]
    rows = {}
    for split, part in manifest.groupby("split"):
        row: dict[str, Any] = {"volumes": len(part), "patients": part["patient"].nunique()}
        row.update({n: round(float(part[n].astype(int).mean()), 3) for n in present})
        rows[split] = row
    return pd.DataFrame.from_dict(rows, orient="index")


def _axial(volume: np.ndarray, k: int | None = None) -> np.ndarray:
    """Axial slice of a (R, A, S) volume as radiologists view it: anterior at the top, the patient's right on the
    image's left (RAS indices grow towards the patient's right and front, hence both flips)."""
    k = volume.shape[2] // 2 if k is None else k
    return volume[::-1, ::-1, k].T


def before_after_figure(rows: pd.DataFrame, root: Path) -> Any:
    """Mid axial slice of each source volume (HU, -1000..1500) next to its preprocessed slice (0..1)."""
    from nbsupport.viz import image_grid

    images, titles, spacings = [], [], []
    for r in rows.itertuples():
        ct = ct_pre.load_ct(root / r.nifti)
        hu = ct.stored.astype(np.float32) * ct.slope + ct.intercept
        import nibabel as nib

        ornt = np.array([[a, -1 if f else 1] for a, f in zip(ct.ras_axis, ct.flipped)], dtype=float)
        hu = nib.orientations.apply_orientation(hu, ornt)
        images.append(np.clip((_axial(hu) + 1000) / 2500, 0, 1))
        shape = "x".join(map(str, ct.stored.shape))
        titles.append(f"{r.volume}: {shape}\n{ct.spacing[0]:.2f} x {ct.spacing[2]:.2f} mm")
        spacings.append((ct.spacing[1], ct.spacing[0]))
        after = ct_data.read_preprocessed(root / r.image)[0].astype(np.float32)
        images.append(_axial(after))
        titles.append(f"preprocessed {'x'.join(map(str, after.shape))}\n{r.spacing_x:.2f} x {r.spacing_z:.2f} mm")
        spacings.append((r.spacing_y, r.spacing_x))
    return image_grid(images, titles=titles, ncols=4, spacing=spacings,
                      suptitle="before (HU) / after (0..1 = -1000..1500 HU, RAS, resampled, padded/cropped)")


def packaged_real_ct() -> list[Path]:
    """Real CT DICOM slices that installed packages ship: pydicom's CT_small.dcm (a GE CT slice, 128 x 128)."""
    from pydicom.data import get_testdata_file

    return [Path(get_testdata_file("CT_small.dcm"))]


def dicom_to_ct(paths: list[Path]) -> ct_pre.CTVolume:
    """Stack CT DICOM slices (sorted along the slice normal) into a :class:`CTVolume` in DICOM LPS order.

    Only geometry and pixel values are read; no patient identifier is kept or printed.
    """
    import pydicom

    slices = [pydicom.dcmread(str(p)) for p in paths]
    for p, s in zip(paths, slices):
        if "PixelData" not in s:
            raise ValueError(f"{p}: no pixel data")
    orientation = np.array(slices[0].get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    slices.sort(key=lambda s: float(np.dot(normal, np.array(s.get("ImagePositionPatient", [0, 0, 0]), float))))
    # DICOM pixel arrays are (rows, columns); stored axis 0 = columns (x), axis 1 = rows (y), axis 2 = slices.
    stored = np.stack([s.pixel_array.T for s in slices], axis=-1)
    row_mm, col_mm = (float(v) for v in slices[0].PixelSpacing)
    if len(slices) > 1:
        positions = [float(np.dot(normal, np.array(s.ImagePositionPatient, float))) for s in slices]
        z = float(np.median(np.diff(positions)))
    else:
        z = float(slices[0].get("SliceThickness", 1.0) or 1.0)
    # Axial DICOM is LPS: x towards the patient's left, y towards posterior -> both flipped against RAS.
    return ct_pre.CTVolume(stored=stored, slope=float(slices[0].get("RescaleSlope", 1)),
                           intercept=float(slices[0].get("RescaleIntercept", 0)), spacing=(col_mm, row_mm, z),
                           ras_axis=(0, 1, 2), flipped=(True, True, False))


def preprocess_real_ct(source: str, spec: ct_pre.PreprocessSpec) -> dict[str, Any]:
    """Run a real CT through :func:`preprocess_volume`; returns source, HU range, output and a figure."""
    from nbsupport.viz import image_grid

    if not source:
        ct, name = dicom_to_ct(packaged_real_ct()), "pydicom CT_small.dcm"
    else:
        path = resolve_path(source)
        if path.is_dir():
            ct, name = dicom_to_ct(sorted(p for p in path.iterdir() if p.is_file())), path.name
        elif path.name.endswith((".nii", ".nii.gz")):
            ct, name = ct_pre.load_ct(path), path.name
        else:
            ct, name = dicom_to_ct([path]), path.name
    hu = ct.stored.astype(np.float32) * ct.slope + ct.intercept
    out, spacing = ct_pre.preprocess_volume(ct, spec)
    k = int(np.argmax(out[0].reshape(-1, out.shape[-1]).astype(np.float32).sum(0)))  # the slice with most tissue
    before = np.clip((hu[:, :, hu.shape[2] // 2].T + 1000) / 2500, 0, 1)  # DICOM LPS order is already radiological
    fig = image_grid([before, _axial(out[0].astype(np.float32), k)],
                     titles=[f"{name}: {'x'.join(map(str, hu.shape))}, HU {hu.min():.0f}..{hu.max():.0f}",
                             f"preprocessed slice {k}: {spacing[0]:.2f} mm"],
                     spacing=[(ct.spacing[1], ct.spacing[0]), (spacing[1], spacing[0])], ncols=2,
                     suptitle="a real CT through the same preprocessing")
    return {"source": name, "hu_range": (float(hu.min()), float(hu.max())), "image": out, "spacing": spacing,
            "figure": fig}


# ============================================================================================ 02 train
def load_manifest(cfg: Any, check_files: bool = True) -> tuple[pd.DataFrame, Path]:
    """The validated manifest named by ``cfg.manifest`` and its data root."""
    return read_manifest(resolve_path(cfg.manifest), ct_data.CT_CLIP_SCHEMA,
                         data_root=resolve_path(cfg.data_root) if cfg.data_root else None, check_files=check_files)


def report_features(model: CTClip, reports: list[str]) -> torch.Tensor:
    """(N, hidden) pooled text features of ``reports``, computed once per unique text (no gradient)."""
    unique = list(dict.fromkeys(reports))
    with torch.no_grad():
        feats = model.text_encoder(unique)
    index = {t: i for i, t in enumerate(unique)}
    return feats[torch.tensor([index[t] for t in reports])]


class CTClipTrainingTask:
    """What the shared trainer needs from ct_clip (see ``nbsupport.train.TrainingTask``)."""

    def __init__(self, config: dict[str, Any], manifest: str, data_root: str, spec_json: str):
        self.cfg = TrainConfig.from_params(config)
        frame, root = read_manifest(Path(manifest), ct_data.CT_CLIP_SCHEMA, data_root=Path(data_root),
                                    check_files=False)
        self.manifest, self.root = frame, root
        self.spec = CTClipSpec.from_json(spec_json)
        self._text_cache: dict[str, torch.Tensor] = {}
        self._sentence_cache: list[torch.Tensor] = []  # train reports' per-sentence features (frozen tower)
        self._generator = torch.Generator().manual_seed(self.cfg.seed)

    def build_model(self) -> CTClip:
        torch.manual_seed(self.cfg.seed)
        model = CTClip(self.spec, seed=self.cfg.seed)
        if model.text_encoder.frozen:  # the frozen tower's outputs never change: embed every report once
            for split in ("train", "val"):
                part = self.manifest[self.manifest.split == split]
                if len(part):
                    self._text_cache[split] = report_features(model, list(part.report))
            if self.cfg.sentence_keep < 1 and self.spec.text_pooling == "sentence_mean":
                sentences = [split_sentences(r) for r in self.manifest[self.manifest.split == "train"].report]
                flat = report_features(model, [s for group in sentences for s in group])
                self._sentence_cache = list(torch.split(flat, [len(group) for group in sentences]))
        return model

    def _keep_mask(self, n: int) -> torch.Tensor:
        """Which of ``n`` sentences a sampled training report keeps (each with ``sentence_keep``, at least one)."""
        keep = torch.rand(n, generator=self._generator) < self.cfg.sentence_keep
        if not keep.any():
            keep[torch.randint(n, (), generator=self._generator)] = True
        return keep

    def _dataset(self, split: str, augment: bool) -> ct_data.CTVolumeDataset | None:
        part = self.manifest[self.manifest.split == split]
        if not len(part):
            return None
        return ct_data.CTVolumeDataset(part, self.root, self.cfg.input_size, augment=augment)

    def train_dataset(self) -> ct_data.CTVolumeDataset:
        dataset = self._dataset("train", self.cfg.augment)
        if dataset is None:
            raise ValueError(f"{self.cfg.manifest} has no train rows")
        self._train = dataset
        return dataset

    def val_dataset(self) -> ct_data.CTVolumeDataset | None:
        self._val = self._dataset("val", False)
        return self._val

    def trainable_parameters(self, model: torch.nn.Module) -> list[dict[str, Any]]:
        """AdamW groups: no weight decay on norms, biases, logit scale/bias (as open_clip)."""
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 and "logit" not in name else no_decay).append(p)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    def _text(self, model: torch.nn.Module, split: str, indices: torch.Tensor) -> torch.Tensor:
        bare = getattr(model, "module", model)
        device = next(bare.parameters()).device
        sample = split == "train" and self.cfg.sentence_keep < 1 and bare.training
        if sample and self._sentence_cache:  # a sentence-mean report of the kept sentences, from cached features
            rows = [self._sentence_cache[int(i)] for i in indices.cpu()]
            return torch.stack([r[self._keep_mask(len(r))].mean(0) for r in rows]).to(device)
        if split in self._text_cache and not sample:
            return self._text_cache[split][indices.cpu()].to(device)
        part = self.manifest[self.manifest.split == split].reset_index(drop=True)
        texts = [part.report[int(i)] for i in indices]
        if sample:
            texts = [" ".join(s for s, k in zip(group, self._keep_mask(len(group))) if k)
                     for group in map(split_sentences, texts)]
        return bare.text_encoder(texts)

    def training_step(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        bare = getattr(model, "module", model)
        image_emb, text_emb = model(batch["image"], self._text(model, "train", batch["report_index"]))
        return contrastive_loss(bare, image_emb, text_emb)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, loader: Any, device: torch.device) -> dict[str, float]:
        """Report->volume and volume->report R@5 and mean rank over the whole validation split."""
        images, texts = [], []
        for batch in loader:
            img, txt = model(batch["image"].to(device), self._text(model, "val", batch["report_index"]))
            images.append(img.float().cpu())
            texts.append(txt.float().cpu())
        sim = torch.cat(texts) @ torch.cat(images).T  # reports x volumes
        t2i = retrieval_metrics(sim, ks=(1, 5))
        i2t = retrieval_metrics(sim.T, ks=(1, 5))
        return {"r5_report_to_volume": t2i.get("R@5", t2i["R@1"]), "r5_volume_to_report": i2t.get("R@5", i2t["R@1"]),
                "mean_rank_report_to_volume": t2i["mean_rank"]}


def training_task(config: dict[str, Any], manifest: str, data_root: str, spec_json: str) -> CTClipTrainingTask:
    """Factory named in ``launch`` so that every accelerate process rebuilds the same task."""
    return CTClipTrainingTask(config, manifest, data_root, spec_json)


@dataclasses.dataclass
class TrainOutcome:
    history: list[dict[str, Any]]
    checkpoint: Path
    evaluation: Evaluation
    curves: Any
    n_params: int
    n_trainable: int


def distributed_config(num_processes: int, cuda: bool | None = None) -> Path | None:
    """The accelerate config for ``num_processes``: DeepSpeed ZeRO-1 (the seed's) on CUDA, None (DDP) otherwise."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    return ACCELERATE_ZERO1 if num_processes > 1 and cuda else None


def _monitor(select_checkpoint_by: str) -> str:
    """The validation metric (``CTClipTrainingTask.evaluate``'s key, ``val_`` prefixed) that picks the best
    checkpoint."""
    return {"r5": "val_r5_report_to_volume", "mean_rank": "val_mean_rank_report_to_volume"}[select_checkpoint_by]


def train(cfg: TrainConfig, run: RunFolder) -> TrainOutcome:
    """Train on the train split, keep the best checkpoint by validation report->volume mean rank (or R@5),
    evaluate it on the test split."""
    from nbsupport.viz import plot_training_curves

    manifest, root = load_manifest(cfg)
    spec = cfg.model_spec()
    atomic_write_text(run.file("model_spec.json"), spec.to_json())
    has_val = (manifest.split == "val").any()
    settings = TrainSettings(
        epochs=cfg.epochs, max_steps=cfg.max_steps, batch_size=cfg.batch_size, lr=cfg.lr,
        weight_decay=cfg.weight_decay, optimizer="adamw", scheduler="warmup_cosine", warmup_steps=cfg.warmup_steps,
        grad_clip=cfg.grad_clip, monitor=_monitor(cfg.select_checkpoint_by) if has_val else "train_loss",
        monitor_mode="max" if has_val and cfg.select_checkpoint_by == "r5" else "min", resume=cfg.resume,
        num_processes=cfg.num_processes,
        num_workers=cfg.num_workers, seed=cfg.seed, log_every=5, save_trainable_only=True)
    result = launch("nbsupport.ct_clip.pipeline:training_task",
                    {"config": cfg.to_dict(), "manifest": str(resolve_path(cfg.manifest)), "data_root": str(root),
                     "spec_json": spec.to_json()},
                    settings, run.path, config_hash=spec.fingerprint(),
                    accelerate_config=distributed_config(cfg.num_processes))
    best = Path(result.best_checkpoint or result.last_checkpoint)
    model = load_trained_model(best)
    n_params, n_trainable = count_parameters(model), count_parameters(model, trainable_only=True)
    print(f"{spec.image_arch} image encoder + {spec.text_encoder} ({spec.text_tuning}): {n_params / 1e6:.1f} M "
          f"parameters, {n_trainable / 1e6:.2f} M trained")
    test_split = "test" if (manifest.split == "test").any() else "val"
    evaluation = evaluate_split(model, manifest, root, test_split, resolve_device(cfg.device), cfg.batch_size)
    metrics = {"steps": result.steps, "best_val": result.best_metric, "n_params": n_params,
               "n_trainable": n_trainable, **{f"{test_split}_{k}": v for k, v in evaluation.headline().items()}}
    run.write_metrics(cfg.STAGE, metrics)
    curves = plot_training_curves(result.history)
    run.save_figure(curves, "02_training_curves")
    return TrainOutcome(result.history, best, evaluation, curves, n_params, n_trainable)


# ============================================================================================ evaluation
def load_trained_model(checkpoint_dir: Path) -> CTClip:
    """Rebuild the model from ``<run>/model_spec.json`` (frozen text tower from its path) and load the weights."""
    spec_path = checkpoint_dir.parent.parent / "model_spec.json"
    if not spec_path.exists():
        raise FileNotFoundError(f"{spec_path} is missing: {checkpoint_dir} is not a ct_clip checkpoint")
    spec = CTClipSpec.from_json(spec_path.read_text())
    model = CTClip(spec)
    load_weights(model, checkpoint_dir, expected_config_hash=spec.fingerprint())
    return model.eval()


@torch.no_grad()
def encode_volumes(model: CTClip, dataset: ct_data.CTVolumeDataset, device: torch.device,
                   batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(image embeddings [N, D], pooled encoder features [N, C]) of every volume of ``dataset``."""
    model.eval().to(device)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    embeddings, features = [], []
    encoder = model.image_encoder
    for batch in progress(loader, desc="encoding volumes"):
        pooled = encoder.pool(encoder.feature_map(batch["image"].to(device)))
        features.append(pooled.float().cpu())
        embeddings.append(torch.nn.functional.normalize(model.image_projection(pooled), dim=-1).float().cpu())
    return torch.cat(embeddings), torch.cat(features)


@torch.no_grad()
def zero_shot_scores(model: CTClip, image_emb: torch.Tensor, labels: tuple[str, ...] = LABELS,
                     present: str = PROMPT_PRESENT, absent: str = PROMPT_ABSENT) -> np.ndarray:
    """[N, L] probability that each label is present: softmax over the ("X is present.", "X is not present.")
    prompt pair, as CT-CLIP scores zero-shot classification."""
    prompts = [t.format(name) for name in labels for t in (present, absent)]
    text = model.encode_text(prompts).cpu()  # [2L, D]
    logits = model.logit_scale.exp().cpu() * image_emb @ text.T  # the bias cancels in the softmax
    pair = logits.view(len(image_emb), len(labels), 2)
    return pair.softmax(-1)[..., 0].numpy()


@dataclasses.dataclass
class Evaluation:
    """Retrieval and zero-shot results on one split."""

    split: str
    manifest: pd.DataFrame
    similarity: torch.Tensor  # [reports, volumes] cosine similarities
    image_emb: torch.Tensor
    retrieval: pd.DataFrame  # rows report->volume / volume->report (+ chance); columns R@k, mean/median rank
    zero_shot: pd.DataFrame  # per label present in the split: AUROC, F1, accuracy, precision, recall, positives
    scores: np.ndarray  # [N, 18] zero-shot probabilities

    def headline(self) -> dict[str, float]:
        t2i = self.retrieval.loc["report->volume"]
        out = {f"report_to_volume_{k}": float(t2i[k]) for k in t2i.index if k.startswith("R@")}
        out["report_to_volume_chance_R@5"] = float(self.retrieval.loc["chance", "R@5"]) \
            if "R@5" in self.retrieval.columns else None
        out["zero_shot_mean_auroc"] = float(self.zero_shot.loc["mean", "auroc"]) if len(self.zero_shot) else None
        return out


def evaluate_split(model: CTClip, manifest: pd.DataFrame, root: Path, split: str, device: torch.device,
                   batch_size: int = 8, present: str = PROMPT_PRESENT, absent: str = PROMPT_ABSENT) -> Evaluation:
    """Retrieval both ways (R@1/5/10/50/100, mean/median rank) and zero-shot AUROC/F1/accuracy on ``split``."""
    part = manifest[manifest.split == split].reset_index(drop=True)
    if not len(part):
        raise ValueError(f"the manifest has no {split!r} rows")
    dataset = ct_data.CTVolumeDataset(part, root, model.spec.input_size)
    image_emb, _ = encode_volumes(model, dataset, device, batch_size)
    text_emb = model.project_text(report_features(model, list(part.report))).cpu()
    similarity = text_emb @ image_emb.T
    ks = [k for k in RETRIEVAL_KS if k <= len(part)]
    t2i = retrieval_metrics(similarity, ks=ks)
    i2t = retrieval_metrics(similarity.T, ks=ks)
    cols = [f"R@{k}" for k in ks] + ["mean_rank", "median_rank"]
    chance = {f"R@{k}": k / len(part) for k in ks}
    chance.update({"mean_rank": (len(part) + 1) / 2, "median_rank": (len(part) + 1) / 2})
    retrieval = pd.DataFrame([{c: t2i[c] for c in cols}, {c: i2t[c] for c in cols}, chance],
                             index=["report->volume", "volume->report", "chance"])
    scores = zero_shot_scores(model, image_emb, LABELS, present, absent)
    truth = ct_data.label_matrix(part)
    rows = {}
    for j, name in enumerate(LABELS):
        if 0 < truth[:, j].sum() < len(truth):
            m = binary_classification_metrics(truth[:, j], scores[:, j], threshold=0.5)
            rows[name] = {k: m[k] for k in ("auroc", "f1", "accuracy", "precision", "recall", "n_positive")}
    zero_shot = pd.DataFrame.from_dict(rows, orient="index")
    if len(zero_shot):
        zero_shot.loc["mean"] = zero_shot.mean(numeric_only=True)
        zero_shot.loc["mean", "n_positive"] = np.nan
    return Evaluation(split, part, similarity, image_emb, retrieval, zero_shot, scores)


def linear_probe(model: CTClip, manifest: pd.DataFrame, root: Path, split: str, device: torch.device,
                 batch_size: int = 8, epochs: int = 300) -> pd.DataFrame:
    """Text-free upper bound: logistic regression per label on frozen image-encoder features (train split) ->
    AUROC on ``split``."""
    train = manifest[manifest.split == "train"].reset_index(drop=True)
    test = manifest[manifest.split == split].reset_index(drop=True)
    _, x_train = encode_volumes(model, ct_data.CTVolumeDataset(train, root, model.spec.input_size), device,
                                batch_size)
    _, x_test = encode_volumes(model, ct_data.CTVolumeDataset(test, root, model.spec.input_size), device, batch_size)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    y_train = torch.from_numpy(ct_data.label_matrix(train).astype(np.float32))
    y_test = ct_data.label_matrix(test)
    torch.manual_seed(0)
    probe = torch.nn.Linear(x_train.shape[1], len(LABELS))
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=1e-3)
    with torch.enable_grad():
        for _ in range(epochs):
            optimizer.zero_grad()
            torch.nn.functional.binary_cross_entropy_with_logits(probe(x_train), y_train).backward()
            optimizer.step()
    with torch.no_grad():
        scores = probe(x_test).sigmoid().numpy()
    rows = {name: {"auroc": auroc(y_test[:, j], scores[:, j])} for j, name in enumerate(LABELS)
            if 0 < y_test[:, j].sum() < len(y_test) and 0 < y_train[:, j].sum() < len(y_train)}
    table = pd.DataFrame.from_dict(rows, orient="index")
    if len(table):
        table.loc["mean"] = table.mean()
    return table


# ============================================================================================ 03 infer
@dataclasses.dataclass
class InferResult:
    evaluation: Evaluation
    retrieval: pd.DataFrame
    zero_shot: pd.DataFrame  # per label: zero-shot metrics (+ linear-probe AUROC when computed)
    features: dict[str, Any]  # {"file", "embedding" (D,), "path" of the saved .npy}
    figure: Any  # AUROC per label bar chart


def extract_features(model: CTClip, nifti: str | Path, spec: ct_pre.PreprocessSpec | None = None,
                     slope: float | None = None, intercept: float | None = None) -> np.ndarray:
    """Embedding (D,) of one CT file: preprocess it like the training data, resize, encode, project.

    Args:
        nifti: a ``.nii(.gz)``; HU from the header's scaling unless ``slope``/``intercept`` are given.
        spec: preprocessing geometry; default CT-Data's (1.25 x 1.25 x 2 mm, 256 x 256 x 192).
    """
    ct = ct_pre.load_ct(nifti, slope, intercept)
    image, _ = ct_pre.preprocess_volume(ct, spec or ct_pre.PreprocessSpec())
    tensor = ct_data.resize_volume(torch.from_numpy(image.astype(np.float32)), model.spec.input_size)
    with torch.no_grad():
        return model.eval().encode_image(tensor[None].to(next(model.parameters()).device))[0].cpu().numpy()


def predict(cfg: InferConfig, run: RunFolder) -> InferResult:
    """Evaluate the checkpoint on ``cfg.split`` and extract the features of one CT file."""
    checkpoint = find_checkpoint(cfg.checkpoint, run, SYSTEM)
    model = load_trained_model(checkpoint)
    manifest, root = load_manifest(cfg)
    device = resolve_device(cfg.device)
    evaluation = evaluate_split(model, manifest, root, cfg.split, device, cfg.batch_size, cfg.prompt_present,
                                cfg.prompt_absent)
    zero_shot = evaluation.zero_shot.copy()
    if cfg.linear_probe and (manifest.split == "train").any():
        probe = linear_probe(model, manifest, root, cfg.split, device, cfg.batch_size)
        zero_shot["linear_probe_auroc"] = probe["auroc"].reindex(zero_shot.index)
    atomic_write_text(run.file("retrieval.csv"), evaluation.retrieval.to_csv())
    atomic_write_text(run.file("zero_shot.csv"), zero_shot.to_csv())
    metrics = {f"{cfg.split}_{k}": v for k, v in evaluation.headline().items()}
    metrics.update({f"{cfg.split}_volume_to_report_{k}": float(v)
                    for k, v in evaluation.retrieval.loc["volume->report"].items()})
    if "linear_probe_auroc" in zero_shot:
        metrics[f"{cfg.split}_linear_probe_mean_auroc"] = float(zero_shot.loc["mean", "linear_probe_auroc"])
    run.write_metrics(cfg.STAGE, metrics)
    # Feature extraction for one file, as a user would do it on a new CT.
    if cfg.input_file:
        source, slope, intercept = resolve_path(cfg.input_file), None, None
    else:
        meta = ct_data.scan_dataset(root)
        row = meta[meta.volume == evaluation.manifest.volume.iloc[0]].iloc[0]
        source, slope, intercept = root / row.nifti, row.rescale_slope, row.rescale_intercept
    embedding = extract_features(model, source, slope=slope, intercept=intercept)
    feature_path = run.file(f"features/{Path(source).name.split('.')[0]}.npy")
    np.save(feature_path, embedding)
    fig = _auroc_figure(zero_shot)
    run.save_figure(fig, "03_zero_shot_auroc")
    return InferResult(evaluation, evaluation.retrieval, zero_shot,
                       {"file": str(source), "embedding": embedding, "path": str(feature_path)}, fig)


def viewer_volume(preprocessed: np.ndarray, spacing_xyz: Sequence[float]) -> tuple[np.ndarray, tuple[float, ...]]:
    """A preprocessed ``(1, X, Y, Z)`` RAS volume (0..1 over ``ct_pre.HU_WINDOW``) as the viewer's (D, H, W) in
    Hounsfield units: axial slices from inferior to superior, anterior at the top and the patient's right on the
    left (radiological convention); and its (D, H, W) voxel size in mm. Values at the window's ends are clipped."""
    lo, hi = ct_pre.HU_WINDOW
    volume = np.asarray(preprocessed, dtype=np.float32)[0]
    return (np.ascontiguousarray(volume.transpose(2, 1, 0)[:, ::-1, ::-1] * (hi - lo) + lo),
            (float(spacing_xyz[2]), float(spacing_xyz[1]), float(spacing_xyz[0])))


def viewer_attention(volume_map: np.ndarray) -> np.ndarray:
    """An (X, Y, Z) map over the model input (RAS) in the viewer's (D, H, W) orientation (see ``viewer_volume``)."""
    return np.ascontiguousarray(np.asarray(volume_map, dtype=np.float32).transpose(2, 1, 0)[:, ::-1, ::-1])


def viewer_cases(result: InferResult, cfg: InferConfig, limit: int = 4, top_k: int = 3) -> list[dict[str, Any]]:
    """Cases for ``viz.slice_viewer`` / ``viz.save_case_viewer_html``: the first ``limit`` volumes of the split as
    preprocessed (Hounsfield units, CT window presets, axial/coronal/sagittal), with their report, the ``top_k``
    reports the model retrieves for them (similarity, and whether it is the volume's own) and the zero-shot
    probabilities of the labels the volume has, as text. No heatmap: 04's ``attention_viewer_cases`` has the
    relevance of a label prompt."""
    ev = result.evaluation
    _, root = load_manifest(cfg, check_files=False)
    part = ev.manifest
    similarity = ev.similarity.detach().numpy()  # [reports, volumes]
    cases = []
    for i in range(min(limit, len(part))):
        row = part.iloc[i]
        image, spacing = viewer_volume(ct_data.read_preprocessed(root / row["image"]),
                                       (row.spacing_x, row.spacing_y, row.spacing_z))
        ranked = np.argsort(-similarity[:, i])[:top_k]
        retrieved = "\n".join(f"{r + 1}. {similarity[j, i]:.3f} report of {part.volume.iloc[j]}"
                              f"{' (its own)' if j == i else ''}: {part.report.iloc[j]}"
                              for r, j in enumerate(ranked))
        present = [(name, float(ev.scores[i, k])) for k, name in enumerate(LABELS) if int(row[name]) == 1]
        zero_shot = ", ".join(f"{name} {p:.2f}" for name, p in present) or "none of the 18 labels"
        cases.append({"image": image, "spacing": spacing, "modality": "CT", "masks": {},
                      "title": str(row["volume"]),
                      "text": f"report:\n{row['report']}\n\nzero-shot p of its labels: {zero_shot}"
                              f"\n\ntop {len(ranked)} retrieved reports (cosine similarity):\n{retrieved}"})
    return cases


def _auroc_figure(zero_shot: pd.DataFrame) -> Any:
    from matplotlib.figure import Figure

    table = zero_shot.drop(index="mean", errors="ignore")
    fig = Figure(figsize=(7, 0.45 * len(table) + 1.2))
    ax = fig.subplots()
    y = np.arange(len(table))
    ax.barh(y - 0.2, table["auroc"], height=0.4, label="zero-shot")
    if "linear_probe_auroc" in table:
        ax.barh(y + 0.2, table["linear_probe_auroc"], height=0.4, label="linear probe (text-free)")
    ax.axvline(0.5, color="gray", linestyle="--", label="chance")
    ax.set_yticks(y, table.index)
    ax.set_xlim(0, 1)
    ax.set_xlabel("AUROC")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


# ============================================================================================ 04 attention
@dataclasses.dataclass
class AttentionResult:
    volume: str
    similarity_figure: Any
    top_reports: pd.DataFrame
    relevance_figure: Any
    relevance: np.ndarray  # (X, Y, Z) at model input size, 0..1
    # for attention_viewer_cases: the preprocessed volume explained, its voxel size, the prompt and the report
    preprocessed: Path | None = None  # npz (1, X, Y, Z) RAS, 0..1
    spacing: tuple[float, float, float] | None = None  # (X, Y, Z) mm of the preprocessed voxels
    prompt: str = ""
    report: str = ""


def relevance_map(model: CTClip, image: torch.Tensor, prompt: str) -> np.ndarray:
    """Grad-CAM of the prompt's similarity over the image encoder's last feature map, upsampled to the input.

    Args:
        image: (1, X, Y, Z) model input.

    Returns:
        (X, Y, Z) float array, 0..1: where the evidence for ``prompt`` is (ReLU of gradient-weighted channels).
    """
    model.eval()
    text = model.encode_text([prompt]).detach()
    encoder = model.image_encoder
    with torch.enable_grad():
        features = encoder.feature_map(image[None])
        features.retain_grad()
        emb = torch.nn.functional.normalize(model.image_projection(encoder.pool(features)), dim=-1)
        (emb @ text.T).sum().backward()
    weights = features.grad.mean(dim=(2, 3, 4), keepdim=True)
    cam = torch.relu((weights * features).sum(1, keepdim=True)).detach()
    cam = torch.nn.functional.interpolate(cam, size=tuple(image.shape[1:]), mode="trilinear", align_corners=False)
    cam = cam[0, 0].numpy()
    return cam / cam.max() if cam.max() > 0 else cam


def attention_viewer_cases(att: AttentionResult) -> list[dict[str, Any]]:
    """One case for ``viz.slice_viewer`` / ``viz.save_case_viewer_html``: the explained volume as preprocessed (HU,
    CT window presets, three planes) with the Grad-CAM relevance of the label prompt as a 3-D heatmap, and the
    prompt, the volume's report and the reports the model retrieves for it as text."""
    if att.preprocessed is None or att.spacing is None:
        raise ValueError("the attention result names no preprocessed volume (made by an older attention_maps)")
    image, spacing = viewer_volume(ct_data.read_preprocessed(att.preprocessed), att.spacing)
    top = "\n".join(f"{r['rank']}. {r['similarity']:.3f} report of {r['report of']}"
                    f"{' (its own)' if r['is its own report'] else ''}: {r['report']}"
                    for _, r in att.top_reports.iterrows())
    return [{"image": image, "spacing": spacing, "modality": "CT", "masks": {},
             "attention": viewer_attention(att.relevance), "title": f"{att.volume}: {att.prompt}",
             "text": f"heatmap: Grad-CAM relevance of the prompt \u201c{att.prompt}\u201d (grid "
                     f"{'x'.join(map(str, att.relevance.shape))})\n\nreport:\n{att.report}"
                     f"\n\nretrieved reports (cosine similarity):\n{top}"}]


def attention_maps(cfg: AttentionConfig, run: RunFolder) -> AttentionResult:
    """Similarity matrix of a batch, the top-k reports for one volume, and the relevance of a label prompt."""
    from matplotlib.figure import Figure

    from nbsupport.viz import attention_grid

    checkpoint = find_checkpoint(cfg.checkpoint, run, SYSTEM)
    model = load_trained_model(checkpoint)
    manifest, root = load_manifest(cfg)
    part = manifest[manifest.split == cfg.split].reset_index(drop=True)
    if cfg.volume:
        if cfg.volume not in set(part.volume):
            raise ValueError(f"volume {cfg.volume!r} is not in the {cfg.split} split of {cfg.manifest}")
        index = int(np.flatnonzero(part.volume == cfg.volume)[0])
    else:
        positives = np.flatnonzero(part[cfg.label].astype(int).to_numpy() == 1)
        index = int(positives[0]) if len(positives) else 0
    batch = part.iloc[sorted({*range(min(cfg.n_batch, len(part))), index})].reset_index(drop=True)
    dataset = ct_data.CTVolumeDataset(batch, root, model.spec.input_size)
    image_emb, _ = encode_volumes(model, dataset, torch.device("cpu"), cfg.batch_size)
    text_emb = model.project_text(report_features(model, list(batch.report))).detach()
    sim = (text_emb @ image_emb.T).numpy()
    fig = Figure(figsize=(6.5, 5.5))
    ax = fig.subplots()
    shown = ax.imshow(sim, cmap="viridis")
    ax.set_xticks(range(len(batch)), batch.volume, rotation=90, fontsize=7)
    ax.set_yticks(range(len(batch)), [f"report of {v}" for v in batch.volume], fontsize=7)
    ax.set_xlabel("volume")
    ax.set_title("cosine similarity (matched pairs on the diagonal)")
    fig.colorbar(shown, ax=ax, shrink=0.8)
    fig.tight_layout()
    run.save_figure(fig, "04_similarity_matrix")
    # Top reports of the whole split for the chosen volume.
    row = int(np.flatnonzero(batch.volume == part.volume[index])[0])
    all_text = model.project_text(report_features(model, list(part.report))).detach()
    scores = (all_text @ image_emb[row]).numpy()
    order = np.argsort(-scores)[:cfg.top_k]
    top = pd.DataFrame({"rank": np.arange(1, len(order) + 1), "report of": part.volume.to_numpy()[order],
                        "similarity": scores[order].round(3), "is its own report": order == index,
                        "report": part.report.to_numpy()[order]})
    image = dataset[row]["image"]
    relevance = relevance_map(model, image, PROMPT_PRESENT.format(cfg.label))
    volume = image[0].numpy()
    depth = volume.shape[2]
    slices = np.linspace(depth * 0.15, depth * 0.85, cfg.n_slices).round().astype(int)
    maps = [(f"slice {k}", relevance[:, :, k].T) for k in slices]
    # attention_grid draws one background image; the per-slice panels need their own, so draw each slice's CT.
    fig2 = attention_grid(volume[:, :, depth // 2].T, maps, ncols=4,
                          suptitle=f"{part.volume[index]}: relevance of '{PROMPT_PRESENT.format(cfg.label)}'")
    for ax_, k in zip(fig2.axes, slices):
        if ax_.images:
            ax_.images[0].set_data(volume[:, :, k].T)
    run.save_figure(fig2, "04_relevance")
    chosen = part.iloc[index]
    return AttentionResult(str(part.volume[index]), fig, top, fig2, relevance, root / chosen["image"],
                           (float(chosen.spacing_x), float(chosen.spacing_y), float(chosen.spacing_z)),
                           PROMPT_PRESENT.format(cfg.label), str(chosen.report))
