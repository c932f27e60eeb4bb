"""The verbs the textseg3d notebooks call: preprocess, train, predict (with the text ablation), attention maps.

Each verb takes the stage's frozen config and its run folder, does one thing, records what it measured in
``metrics.json`` and returns a small result object with the tables and figures a notebook shows.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from nbsupport.config import StageConfig, param
from nbsupport.device import resolve_device
from nbsupport.manifest import read_manifest, write_manifest
from nbsupport.metrics import segmentation_metrics
from nbsupport.paths import demo_data_root, resolve_path
from nbsupport.progress import progress
from nbsupport.runs import RunFolder, atomic_path, atomic_write_text, find_checkpoint
from nbsupport.textseg3d import data as ts_data
from nbsupport.textseg3d.model import LLMSeg, LLMSegSpec, build_llmseg, count_parameters
from nbsupport.textseg3d.transforms import collate_cases, eval_transforms, train_transforms
from nbsupport.checkpoints import load_weights
from nbsupport.launch import launch
from nbsupport.train import TrainSettings

SYSTEM = "textseg3d"
DEFAULT_MANIFEST = "data_manifests/textseg3d_demo.csv"
REPORT_VARIANTS = ("true", "flipped", "empty")
RESULT_COLUMNS = ("no", "ID", "Avr", "Dice", "IoU", "HD", "Report")


def _demo_root() -> str:
    return str(demo_data_root() / SYSTEM)


# ============================================================================================ configs
@dataclasses.dataclass(frozen=True)
class PreprocessConfig(StageConfig):
    """01_preprocess: read case folders (npz or NIfTI) and the report table; write the case manifest."""

    SYSTEM = SYSTEM
    STAGE = "01_preprocess"

    data_root: str = param("", "folder of <case>/data.(npz|nii.gz) + label.* and <site>_report.(xlsx|csv); '' = demo")
    manifest: str = param(DEFAULT_MANIFEST, "where to write the case manifest (CSV, paths relative to data_root)")
    report_table: str = param("", "report table (.xlsx or .csv); '' = <data_root>/*_report.xlsx or .csv")
    val_fraction: float = param(0.1, "per side group, fraction of cases (after the training ones) for validation")
    test_fraction: float = param(0.2, "per side group, the last fraction of cases held out for testing")
    n_examples: int = param(3, "cases shown with orthogonal slices and their prompt")

    def __post_init__(self) -> None:
        if not 0 <= self.val_fraction < 1 or not 0 <= self.test_fraction < 1 or self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction and test_fraction must be in [0, 1) and sum to less than 1")


@dataclasses.dataclass(frozen=True)
class _ManifestStage(StageConfig):
    SYSTEM = SYSTEM

    data_root: str = param("", "dataset root; '' = the root recorded in the manifest")
    manifest: str = param(DEFAULT_MANIFEST, "case manifest written by 01_preprocess")


@dataclasses.dataclass(frozen=True)
class TrainConfig(_ManifestStage):
    """02_train: LLMSeg (text-guided 3-D UNet) and, optionally, the image-only UNet with the same budget."""

    STAGE = "02_train"
    PROFILES = {
        "smoke": {"text_encoder": "tiny_sentence", "feature_size": 8, "roi": (32, 32, 64), "epochs": 2,
                  "batch_size": 2, "lr": 3e-3, "weight_decay": 1e-5, "warmup_epochs": 0, "n_prompts": 2,
                  "context_length": 4},
        # 32x32x64 volumes at 8x12x6 mm, MiniLM frozen; sized for minutes on 2 CPU cores. 40 epochs = 640 steps:
        # the side is learnt in a jump of the validation Dice while the lr is high; 320 steps missed it on 1 seed
        # of 3 and 480 on 1 of 4 (benchmarks/RESULTS.md, textseg3d third round)
        "demo": {"text_encoder": "sentence", "text_encoder_path": "all-minilm-l6-v2", "feature_size": 8,
                 "roi": (32, 32, 64), "epochs": 40, "batch_size": 2, "lr": 1e-2, "weight_decay": 1e-5,
                 "warmup_epochs": 1, "image_pe": "random", "text_readout": "tokens", "side_mirror_prob": 0.5,
                 "foreground_prior_bias": True},
        "full": {},
    }

    text_encoder: Literal["causal", "sentence", "tiny_causal", "tiny_sentence"] = param(
        "causal", "frozen report encoder: causal LLM (<SEG> feature), sentence encoder (mean-pooled), or tiny random-init")
    text_encoder_path: str = param("./model/llama2/Llama-2-7b-chat-hf",
                                   "local folder of the encoder weights (public code --llama_rep); aliases "
                                   "'all-minilm-l6-v2' and 'smollm2-135m' name the packaged ones")
    feature_size: int = param(48, "UNet feature size fs (channels fs, fs, 2fs, 4fs, 8fs)")
    n_prompts: int = param(2, "learnable context prompts (public code --n_prompts)")
    context_length: int = param(8, "embeddings per context prompt (public code --context_length)")
    num_heads: int = param(8, "attention heads of the fusion blocks (fewer where the width does not divide)")
    center_text: bool = param(False, "subtract the empty report's text tokens (our addition, not in the public code)")
    image_pe: Literal["zeros", "random"] = param("zeros", "voxel positional encoding in the fusion: zeros (public "
                                                          "code) or SAM's random Fourier features (our addition)")
    text_readout: Literal["mean", "last_word", "tokens"] = param(
        "mean", "sentence encoders: report feature = mean of the hidden states, or the hidden state of the report's "
                "last word, where the public code's causal <SEG> feature sits, or 'tokens': every report token's "
                "hidden state is a fusion token, padding masked (our additions)")
    roi: tuple[int, int, int] = param((64, 352, 352), "(D, H, W) training crop and sliding-window patch; "
                                                       "multiples of 32 (seed's command; our D-first reading)")
    epochs: int = param(101, "training epochs (public code max_epochs)")
    max_steps: int | None = param(None, "stop after this many optimizer steps (None: epochs decide)")
    batch_size: int = param(2, "global batch of random crops")
    lr: float = param(1e-4, "AdamW peak learning rate")
    weight_decay: float = param(1e-5, "AdamW weight decay")
    warmup_epochs: int = param(10, "linear warm-up epochs before the cosine decay")
    grad_clip: float | None = param(None, "gradient norm clipping (None: off)")
    neg_ratio: float = param(0.1, "RandCropByPosNegLabeld neg (pos = 1)")
    side_mirror_prob: float = param(0.0, "probability of mirroring a training crop left-right with the report's side "
                                         "swapped (our addition; 0 = public code)")
    foreground_prior_bias: bool = param(False, "initialise the output layer's bias so that the untrained network "
                                               "predicts the training crops' foreground fraction (our addition; "
                                               "False = PyTorch's default init, as the public code)")
    image_only_baseline: bool = param(True, "also train the same UNet without text, same budget (the ablation)")
    num_processes: int = param(1, "processes for data-parallel training (accelerate launch)")
    num_workers: int = param(0, "data-loader worker processes")
    resume: bool = param(False, "continue from the last checkpoint in run_dir")

    def __post_init__(self) -> None:
        if any(r % 32 for r in self.roi):
            raise ValueError(f"roi {self.roi} must be divisible by 32 in every dimension")
        if max(self.roi) < 64:
            raise ValueError(f"roi {self.roi}: at least one side must be >= 64 (the 1/32 scale needs > 1 voxel)")
        if not 0 <= self.side_mirror_prob <= 1:
            raise ValueError(f"side_mirror_prob must be in [0, 1], got {self.side_mirror_prob}")
        if self.text_readout == "tokens" and self.center_text:
            raise ValueError("text_readout='tokens' gives one fusion token per report word; center_text (subtracting "
                             "the empty report's single token per prompt) does not apply: set center_text=False")


@dataclasses.dataclass(frozen=True)
class _TrainedModelStage(_ManifestStage):
    checkpoint: str = param("", "checkpoint folder; '' = best checkpoint of run_dir, else of the newest run")
    split: Literal["train", "val", "test"] = param("test", "manifest split to use")


@dataclasses.dataclass(frozen=True)
class InferConfig(_TrainedModelStage):
    """03_infer: sliding-window inference, NIfTI outputs, result.csv, and the true/flipped/empty-report ablation."""

    STAGE = "03_infer"

    input_image: str = param("", "a new case's image (data.npz or data.nii.gz) to segment instead of a split")
    input_report: str = param("", "the new case's report text (a prompt like 'N0, cT2, ..., left side')")
    overlap: float = param(0.5, "sliding-window overlap (Gaussian weighting)")
    sw_batch_size: int = param(1, "windows per forward pass")
    n_examples: int = param(2, "cases shown with the three predictions")


@dataclasses.dataclass(frozen=True)
class AttentionConfig(_TrainedModelStage):
    """04_attention: the report's self-attention in the text encoder, and the fusion attention over voxels."""

    STAGE = "04_attention"

    case: str = param("", "case id; '' = the split's first case")
    scale: int = param(-1, "fusion scale (0 = 1/2 resolution ... 4 = 1/32) shown per text token; -1: all scales "
                           "(token readout: the 1/8 scale, one row per report word of the first prompt)")


# ============================================================================================ 01 preprocess
@dataclasses.dataclass
class PreprocessResult:
    manifest: pd.DataFrame
    manifest_path: Path
    excluded: pd.DataFrame  # cases left out (e.g. bilateral) with the reason
    summary: pd.DataFrame
    figure: Any


def preprocess(cfg: PreprocessConfig, run: RunFolder) -> PreprocessResult:
    """Read the dataset at ``cfg.data_root``, write the manifest, summarise and show a few cases."""
    root = resolve_path(cfg.data_root or _demo_root())
    table = ts_data.build_manifest(root, cfg.report_table or None, cfg.val_fraction, cfg.test_fraction)
    manifest_path = resolve_path(cfg.manifest)
    write_manifest(table.manifest, manifest_path, ts_data.TEXTSEG3D_SCHEMA, root)
    summary = summarise_manifest(table.manifest)
    atomic_write_text(run.file("manifest_summary.csv"), summary.to_csv())
    if len(table.excluded):
        atomic_write_text(run.file("excluded_cases.csv"), table.excluded.to_csv(index=False))
    run.write_metrics(cfg.STAGE, {"cases": len(table.manifest), "excluded": len(table.excluded),
                                  "layouts": sorted(set(table.manifest["layout"])),
                                  "report_table": table.report_path.name})
    examples = table.manifest.groupby("side").head(max(1, cfg.n_examples // 2)).head(cfg.n_examples)
    fig = case_figure([ts_data.load_case(root / r.image, root / r.label if r.label else None)
                       for r in examples.itertuples()], list(examples["case"]), list(examples["prompt"]))
    run.save_figure(fig, "01_cases")
    return PreprocessResult(table.manifest, manifest_path, table.excluded, summary, fig)


def summarise_manifest(manifest: pd.DataFrame) -> pd.DataFrame:
    """Cases per split and side, and how many reports name each surgery type and N+."""
    out = manifest.assign(
        surgery=manifest["prompt"].str.extract(r"(breast conserving|total mastectomy|unknown type)")[0],
        node_positive=~manifest["prompt"].str.startswith("N0"))
    return out.groupby(["split", "side"]).agg(cases=("case", "count"), mastectomy=(
        "surgery", lambda s: int((s == "total mastectomy").sum())), node_positive=("node_positive", "sum"))


def _orthogonal_slices(volume: np.ndarray, mask: np.ndarray | None) -> tuple[int, int, int]:
    """(axial, coronal, sagittal) indices through the mask's centre (or the volume's)."""
    if mask is not None and mask.any():
        return tuple(int(round(c)) for c in np.argwhere(mask).mean(0))  # type: ignore[return-value]
    return tuple(s // 2 for s in volume.shape)  # type: ignore[return-value]


def case_figure(cases: Sequence[dict[str, Any]], titles: Sequence[str], prompts: Sequence[str],
                predictions: Sequence[dict[str, np.ndarray]] | None = None) -> Any:
    """Per case one row: axial, coronal and sagittal slices through the target with the label (and predictions)
    drawn, and the prompt text beside them."""
    import matplotlib.pyplot as plt

    from nbsupport.textseg3d.transforms import window_hu
    from nbsupport.viz import overlay_masks

    n = max(1, len(cases))
    fig = plt.figure(figsize=(13, 3.4 * n), layout="constrained")
    axes = np.atleast_2d(fig.subplots(n, 4, gridspec_kw={"width_ratios": [1, 1, 1, 0.9]}))
    for row, (case, title, prompt) in enumerate(zip(cases, titles, prompts)):
        image, label, (sd, sh, sw) = case["image"], case["label"], case["spacing"]
        k, j, i = _orthogonal_slices(image, label)
        views = [("axial", (slice(k, k + 1), slice(None), slice(None)), (sh, sw)),
                 ("coronal", (slice(None), slice(j, j + 1), slice(None)), (sd, sw)),
                 ("sagittal", (slice(None), slice(None), slice(i, i + 1)), (sd, sh))]
        for ax, (name, index, spacing) in zip(axes[row, :3], views):
            masks = {}
            if label is not None:
                masks["target"] = np.squeeze(label[index]).astype(bool)
            for pname, pred in (predictions[row] if predictions else {}).items():
                masks[pname] = np.squeeze(pred[index]).astype(bool)
            overlay_masks(np.squeeze(window_hu(image[index])), masks or None, ax=ax, spacing=spacing,
                          vmin=0.35, vmax=0.65, legend=(name == "axial"), title=f"{title} {name}")
            ax.set_xticks([])
            ax.set_yticks([])
        text_ax = axes[row, 3]
        text_ax.set_axis_off()
        text_ax.text(0.0, 0.5, "report prompt:\n\n" + "\n".join(prompt.split(", ")), fontsize=11, va="center",
                     family="monospace")
    return fig


# ============================================================================================ 02 train
def load_manifest(cfg: Any) -> tuple[pd.DataFrame, Path]:
    """The validated case manifest named by ``cfg.manifest`` and its data root."""
    return read_manifest(resolve_path(cfg.manifest), ts_data.TEXTSEG3D_SCHEMA,
                         data_root=resolve_path(cfg.data_root) if cfg.data_root else None)


def case_items(manifest: pd.DataFrame, root: Path, prompt_variant: str = "true") -> list[dict[str, Any]]:
    """MONAI data-list dicts (``image``, ``label``, ``prompt``, ``case``) for the manifest's rows."""
    return [{"image": str(root / r.image), "label": str(root / r.label) if r.label else "",
             "prompt": report_variant(r.prompt, prompt_variant), "case": r.case} for r in manifest.itertuples()]


def report_variant(prompt: str, variant: str) -> str:
    """The prompt for the ablation: ``true`` as written, ``flipped`` with left/right swapped, ``empty``."""
    if variant == "true":
        return prompt
    if variant == "flipped":
        return ts_data.flip_side(prompt)
    if variant == "empty":
        return ""
    raise ValueError(f"report variant must be one of {REPORT_VARIANTS}, got {variant!r}")


def model_spec(cfg: TrainConfig, use_text: bool = True) -> LLMSegSpec:
    return LLMSegSpec(feature_size=cfg.feature_size, n_prompts=cfg.n_prompts, context_length=cfg.context_length,
                      num_heads=cfg.num_heads, use_text=use_text, center_text=cfg.center_text,
                      image_pe=cfg.image_pe,
                      text_readout=cfg.text_readout if "sentence" in cfg.text_encoder else "mean",
                      text_encoder=cfg.text_encoder,
                      text_encoder_path=cfg.text_encoder_path if cfg.text_encoder in ("causal", "sentence") else "",
                      roi=tuple(cfg.roi))


class TextSeg3DTrainingTask:
    """What the shared trainer needs from textseg3d (see ``nbsupport.train.TrainingTask``)."""

    def __init__(self, config: dict[str, Any], manifest: str, data_root: str, spec_json: str):
        from monai.losses import DiceCELoss

        self.cfg = TrainConfig.from_params(config)
        frame, root = read_manifest(Path(manifest), ts_data.TEXTSEG3D_SCHEMA, data_root=Path(data_root),
                                    check_files=False)
        self.manifest, self.root = frame, root
        self.spec = LLMSegSpec.from_json(spec_json)
        self.loss = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True)
        self._train_dataset: Any = None

    def build_model(self) -> LLMSeg:
        model = build_llmseg(self.spec, self.cfg.seed)
        if self.cfg.foreground_prior_bias:
            set_foreground_prior_bias(model, foreground_fraction(self.train_dataset()))
        return model

    def train_dataset(self) -> Any:
        from monai.data import CacheDataset

        if self._train_dataset is None:
            items = case_items(self.manifest[self.manifest.split == "train"], self.root)
            # caches everything up to the first random transform (the crop), once per process
            self._train_dataset = CacheDataset(
                items, train_transforms(self.spec.roi, self.cfg.neg_ratio, self.cfg.side_mirror_prob),
                cache_rate=1.0, num_workers=0, progress=False)
        return self._train_dataset

    def val_dataset(self) -> Any:
        from monai.data import CacheDataset

        part = self.manifest[self.manifest.split == "val"]
        if not len(part):
            return None
        return CacheDataset(case_items(part, self.root), eval_transforms(), cache_rate=1.0, num_workers=0,
                            progress=False)

    def collate(self, items: Sequence[Any]) -> dict[str, Any]:
        return collate_cases(items)

    def training_step(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        return self.loss(model(batch["image"], batch["prompt"]), batch["label"])

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, loader: Any, device: torch.device) -> dict[str, float]:
        """Mean foreground Dice of whole validation volumes (sliding window), one case at a time."""
        dices = []
        for item in loader.dataset:
            prob = predict_volume(model, item["image"][None], item["prompt"], self.spec.roi, device=device)
            pred, truth = prob.argmax(0) == 1, torch.as_tensor(item["label"])[0] > 0.5
            inter, size = float((pred & truth).sum()), float(pred.sum() + truth.sum())
            dices.append(2 * inter / size if size else 1.0)
        return {"dice": float(np.mean(dices))}


def foreground_fraction(dataset: Any) -> float:
    """Mean fraction of target voxels in one random training crop per case (the dataset's own transforms)."""
    fractions = []
    for i in range(len(dataset)):
        item = dataset[i]
        for crop in item if isinstance(item, list) else [item]:
            fractions.append(float(np.asarray(crop["label"]).mean()))
    return float(np.mean(fractions))


def set_foreground_prior_bias(model: LLMSeg, prior: float) -> None:
    """Output bias (0, log(p / (1 - p))): the untrained network's softmax gives p(target) ~= ``prior`` everywhere.

    With PyTorch's default init the network starts at p ~= 0.5, the cross-entropy term then drives it to predict no
    target at all for a while (the demo's "slow start"); starting at the prior avoids that collapse.
    """
    prior = min(max(prior, 1e-4), 0.5)
    with torch.no_grad():
        model.out.bias.copy_(torch.tensor([0.0, math.log(prior / (1 - prior))], dtype=model.out.bias.dtype))


def training_task(config: dict[str, Any], manifest: str, data_root: str, spec_json: str) -> TextSeg3DTrainingTask:
    """Factory named in ``launch`` so that every accelerate process rebuilds the same task."""
    return TextSeg3DTrainingTask(config, manifest, data_root, spec_json)


@dataclasses.dataclass
class TrainOutcome:
    history: list[dict[str, Any]]
    checkpoint: Path
    image_only_checkpoint: Path | None
    test_split: str
    scores: pd.DataFrame  # model x report variant -> mean Dice on the test split
    curves: Any


def _train_one(cfg: TrainConfig, run: RunFolder, spec: LLMSegSpec, out_dir: Path, root: Path,
               manifest: pd.DataFrame) -> tuple[Any, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "model_spec.json", spec.to_json())
    n_train = int((manifest.split == "train").sum())
    steps_per_epoch = max(1, n_train // cfg.batch_size)
    settings = TrainSettings(
        epochs=cfg.epochs, max_steps=cfg.max_steps, batch_size=cfg.batch_size, lr=cfg.lr,
        weight_decay=cfg.weight_decay, optimizer="adamw", scheduler="warmup_cosine",
        warmup_steps=cfg.warmup_epochs * steps_per_epoch, grad_clip=cfg.grad_clip,
        monitor="val_dice" if (manifest.split == "val").any() else "train_loss",
        monitor_mode="max" if (manifest.split == "val").any() else "min", resume=cfg.resume,
        num_processes=cfg.num_processes, num_workers=cfg.num_workers, seed=cfg.seed, log_every=5,
        save_trainable_only=True,  # the frozen text encoder is rebuilt from its path, not copied per checkpoint
    )
    result = launch("nbsupport.textseg3d.pipeline:training_task",
                    {"config": cfg.to_dict(), "manifest": str(resolve_path(cfg.manifest)), "data_root": str(root),
                     "spec_json": spec.to_json()},
                    settings, out_dir, config_hash=spec.fingerprint())
    return result, Path(result.best_checkpoint or result.last_checkpoint)


def train(cfg: TrainConfig, run: RunFolder) -> TrainOutcome:
    """Train LLMSeg (and the image-only UNet) on the train split; report test Dice with true/flipped/empty reports."""
    from nbsupport.viz import plot_training_curves

    manifest, root = load_manifest(cfg)
    spec = model_spec(cfg, use_text=True)
    counts = count_parameters(build_llmseg(spec, cfg.seed))
    print(f"LLMSeg: {counts['trainable'] / 1e6:.2f} M trainable, {counts['frozen'] / 1e6:.1f} M frozen (text "
          f"encoder {cfg.text_encoder}), roi {cfg.roi}")
    result, best = _train_one(cfg, run, spec, run.path, root, manifest)
    image_only_best = None
    histories = {"LLMSeg": result.history}
    if cfg.image_only_baseline:
        print("image-only UNet, same budget:")
        base_result, image_only_best = _train_one(cfg, run, model_spec(cfg, use_text=False), run.path / "image_only",
                                                  root, manifest)
        histories["image only"] = base_result.history
    test_split = "test" if (manifest.split == "test").any() else "val"
    part = manifest[manifest.split == test_split]
    device = resolve_device(cfg.device)
    model = load_trained_model(best)
    rows = {}
    for variant in REPORT_VARIANTS:
        ev = evaluate_cases(model, part, root, variant, device)
        rows[f"LLMSeg, {variant} report"] = ev.metrics[["dice", "iou", "hd95"]].mean()
    if image_only_best is not None:
        ev = evaluate_cases(load_trained_model(image_only_best), part, root, "true", device)
        rows["image-only UNet"] = ev.metrics[["dice", "iou", "hd95"]].mean()
    scores = pd.DataFrame(rows).T
    metrics = {f"{test_split}_dice_{name.replace(', ', '_').replace(' ', '_').replace('-', '_')}": float(v["dice"])
               for name, v in scores.iterrows()}
    metrics.update({"steps": result.steps, "best_val": result.best_metric, **counts})
    run.write_metrics(cfg.STAGE, metrics)
    curves = plot_training_curves(_merge_histories(histories))
    run.save_figure(curves, "02_training_curves")
    return TrainOutcome(result.history, best, image_only_best, test_split, scores, curves)


def _merge_histories(histories: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One history with keys prefixed per model, so both curves share one figure."""
    if len(histories) == 1:
        return next(iter(histories.values()))
    merged: list[dict[str, Any]] = []
    for name, history in histories.items():
        tag = "" if name == "LLMSeg" else "image_only_"
        merged += [{("step" if k == "step" else "epoch" if k == "epoch" else tag + k): v for k, v in e.items()}
                   for e in history]
    return merged


# ============================================================================================ inference
@torch.no_grad()
def predict_volume(model: LLMSeg, image: torch.Tensor, prompt: str, roi: Sequence[int], overlap: float = 0.5,
                   sw_batch_size: int = 1, device: torch.device | str = "cpu",
                   stitch_device: torch.device | str | None = None) -> torch.Tensor:
    """Class probabilities ``(2, D, H, W)`` of a whole volume ``(1, 1, D, H, W)`` (0..1 windowed) by Gaussian
    sliding-window inference; the report is encoded once and shared by every window.

    Args:
        stitch_device: where windows are accumulated (``"cpu"`` for volumes too large for the GPU); default: the
            image's device.
    """
    from monai.inferers import sliding_window_inference

    model.eval()
    image = torch.as_tensor(image).as_subclass(torch.Tensor).to(device)
    text = model.encode_reports([prompt]) if model.text_encoder is not None else None
    logits = sliding_window_inference(image, tuple(roi), sw_batch_size, lambda x: model.segment(x, text),
                                      overlap=overlap, mode="gaussian", sw_device=device,
                                      device=stitch_device or device)
    return torch.softmax(logits.float(), dim=1)[0].cpu()


def load_trained_model(checkpoint_dir: Path) -> LLMSeg:
    """Rebuild the network from ``model_spec.json`` next to ``checkpoints/`` and load the trained weights (the
    frozen text encoder comes from its own path)."""
    spec_path = checkpoint_dir.parent.parent / "model_spec.json"
    if not spec_path.exists():
        raise FileNotFoundError(f"{spec_path} is missing: {checkpoint_dir} is not a textseg3d checkpoint")
    spec = LLMSegSpec.from_json(spec_path.read_text())
    model = build_llmseg(spec)
    load_weights(model, checkpoint_dir, expected_config_hash=spec.fingerprint())
    return model.eval()


@dataclasses.dataclass
class CaseEvaluation:
    """Per-case predictions (canonical orientation) and metrics for one report variant."""

    variant: str
    cases: list[str]
    prompts: list[str]
    predictions: list[np.ndarray]  # (D, H, W) uint8
    metrics: pd.DataFrame  # case, dice, iou, hd95 (mm)


def evaluate_cases(model: LLMSeg, manifest: pd.DataFrame, root: Path, variant: str = "true",
                   device: torch.device | str = "cpu", overlap: float = 0.5, sw_batch_size: int = 1) -> CaseEvaluation:
    """Predict every case of ``manifest`` with the ``variant`` of its report and score Dice, IoU and HD95 (mm)."""
    transform = eval_transforms()
    items = case_items(manifest, root, variant)
    preds, rows = [], []
    for item, row in progress(list(zip(items, manifest.itertuples())), desc=f"predict ({variant} report)"):
        data = transform(item)
        prob = predict_volume(model, data["image"][None], item["prompt"], model.spec.roi, overlap, sw_batch_size,
                              device)
        pred = (prob.argmax(0) == 1).numpy().astype(np.uint8)
        preds.append(pred)
        truth = np.asarray(data["label"])[0] > 0.5
        m = segmentation_metrics(pred[None, None], truth[None, None],
                                 spacing=(row.spacing_d, row.spacing_h, row.spacing_w)).iloc[0]
        rows.append({"case": row.case, "dice": float(np.nan_to_num(m["dice"], nan=1.0)),
                     "iou": float(np.nan_to_num(m["iou"], nan=1.0)), "hd95": float(m["hd95"])})
    return CaseEvaluation(variant, list(manifest["case"]), [i["prompt"] for i in items], preds, pd.DataFrame(rows))


def result_table(evaluation: CaseEvaluation) -> pd.DataFrame:
    """The public code's ``result.csv``: ``no,ID,Avr,Dice,IoU,HD,Report`` per case, then ``Avr`` and ``Std`` rows.

    Avr is the mean foreground Dice of a case (one target class here, so equal to Dice); HD is HD95 in mm.
    """
    m = evaluation.metrics
    rows = [{"no": i, "ID": c, "Avr": d, "Dice": d, "IoU": iou, "HD": hd, "Report": p}
            for i, (c, d, iou, hd, p) in enumerate(zip(m["case"], m["dice"], m["iou"], m["hd95"],
                                                       evaluation.prompts))]
    for name, fn in (("Avr", np.nanmean), ("Std", np.nanstd)):
        stats = {k: float(fn(m[k])) if len(m) else float("nan") for k in ("dice", "iou", "hd95")}
        rows.append({"no": name, "ID": "", "Avr": stats["dice"], "Dice": stats["dice"], "IoU": stats["iou"],
                     "HD": stats["hd95"], "Report": ""})
    return pd.DataFrame(rows, columns=list(RESULT_COLUMNS))


def write_result_csv(table: pd.DataFrame, path: Path) -> Path:
    """Write ``result.csv`` atomically with 3-decimal numbers, as the public code prints them."""
    atomic_write_text(path, table.to_csv(index=False, float_format="%.3f", lineterminator="\n"))
    return path


def save_prediction_nifti(pred_canonical: np.ndarray, image_path: Path, out_path: Path) -> Path:
    """Write a canonical-orientation mask as NIfTI in the input's voxel order with the input's affine."""
    import nibabel as nib

    _, affine = ts_data.read_volume(image_path, "data")
    stored = ts_data.from_canonical(pred_canonical.astype(np.uint8), affine)
    with atomic_path(out_path) as tmp:
        target = tmp.with_name(tmp.name + ".nii.gz")
        nib.save(nib.Nifti1Image(stored, affine), str(target))
        target.replace(tmp)
    return out_path


@dataclasses.dataclass
class InferResult:
    result: pd.DataFrame  # result.csv of the true report
    result_path: Path
    ablation: pd.DataFrame  # model/report -> Dice, IoU, HD95
    figure: Any
    evaluations: dict[str, CaseEvaluation]


def predict(cfg: InferConfig, run: RunFolder) -> InferResult:
    """Predict a split with the true, flipped and empty reports (and the image-only model when trained); write
    ``<case>.nii.gz`` (true report), ``result.csv`` per variant and the ablation table."""
    device = resolve_device(cfg.device)
    model = load_trained_model(find_checkpoint(cfg.checkpoint, run, SYSTEM))
    if cfg.input_image:
        return predict_new_case(cfg, run, model, device)
    manifest, root = load_manifest(cfg)
    part = manifest[manifest.split == cfg.split].reset_index(drop=True)
    evaluations = {v: evaluate_cases(model, part, root, v, device, cfg.overlap, cfg.sw_batch_size)
                   for v in REPORT_VARIANTS}
    try:
        image_only = load_trained_model(find_checkpoint(cfg.checkpoint, run, SYSTEM, "image_only"))
        evaluations["image_only"] = evaluate_cases(image_only, part, root, "true", device, cfg.overlap,
                                                   cfg.sw_batch_size)
    except FileNotFoundError:
        print("no image-only checkpoint next to the LLMSeg one: ablation without it")
    out_dir = run.file("predictions/.keep").parent
    for case, pred, rel in zip(evaluations["true"].cases, evaluations["true"].predictions, part["image"]):
        save_prediction_nifti(pred, root / rel, out_dir / f"{case}.nii.gz")
    tables = {name: result_table(ev) for name, ev in evaluations.items()}
    result_path = write_result_csv(tables["true"], run.file("result.csv"))
    for name, table in tables.items():
        if name != "true":
            write_result_csv(table, run.file(f"result_{name}.csv"))
    names = {"true": "LLMSeg, true report", "flipped": "LLMSeg, side flipped", "empty": "LLMSeg, empty report",
             "image_only": "image-only UNet"}
    ablation = pd.DataFrame({names[k]: ev.metrics[["dice", "iou", "hd95"]].mean() for k, ev in evaluations.items()}).T
    run.write_metrics(cfg.STAGE, {f"{cfg.split}_dice_{k}": float(ev.metrics["dice"].mean())
                                  for k, ev in evaluations.items()})
    atomic_write_text(run.file("ablation.csv"), ablation.to_csv())
    fig = ablation_figure(part, root, evaluations, cfg.n_examples)
    run.save_figure(fig, "03_ablation")
    return InferResult(tables["true"], result_path, ablation, fig, evaluations)


def ablation_figure(part: pd.DataFrame, root: Path, evaluations: dict[str, CaseEvaluation], n: int) -> Any:
    """Per case: the target and the predictions with the true, flipped and empty report on orthogonal slices."""
    rows = list(range(min(n, len(part))))
    cases = [ts_data.load_case(root / part.loc[i, "image"], root / part.loc[i, "label"] if part.loc[i, "label"]
                               else None) for i in rows]
    preds = [{f"pred ({v})": evaluations[v].predictions[i] for v in REPORT_VARIANTS} for i in rows]
    titles = [f"{part.loc[i, 'case']} Dice " + "/".join(f"{evaluations[v].metrics.loc[i, 'dice']:.2f}"
                                                          for v in REPORT_VARIANTS) for i in rows]
    return case_figure(cases, titles, [part.loc[i, "prompt"] for i in rows], preds)


def predict_new_case(cfg: InferConfig, run: RunFolder, model: LLMSeg, device: torch.device) -> InferResult:
    """Segment one image file given only its report text; writes ``<case>.nii.gz`` with the input's affine."""
    image_path = resolve_path(cfg.input_image)
    case_id = image_path.parent.name
    data = eval_transforms(with_label=False)({"image": str(image_path)})
    prob = predict_volume(model, data["image"][None], cfg.input_report, model.spec.roi, cfg.overlap,
                          cfg.sw_batch_size, device)
    pred = (prob.argmax(0) == 1).numpy().astype(np.uint8)
    out = save_prediction_nifti(pred, image_path, run.file(f"predictions/{case_id}.nii.gz"))
    loaded = ts_data.load_case(image_path)
    fig = case_figure([loaded], [case_id], [cfg.input_report or "(empty report)"], [{"prediction": pred}])
    run.save_figure(fig, "03_new_case")
    table = pd.DataFrame([{"case": case_id, "voxels": int(pred.sum()), "prediction": str(out)}])
    ev = CaseEvaluation("true", [case_id], [cfg.input_report], [pred], pd.DataFrame())
    return InferResult(table, out, pd.DataFrame(), fig, {"true": ev})


def _superior_first(volume: np.ndarray) -> np.ndarray:
    """Canonical IPL volumes run from superior to inferior along D; the viewer's coronal and sagittal planes put the
    last slice at the top, so its volumes run inferior -> superior."""
    return np.ascontiguousarray(np.asarray(volume)[::-1])


def viewer_cases(result: InferResult, cfg: InferConfig, limit: int = 8) -> list[dict[str, Any]]:
    """Cases for ``viz.slice_viewer`` / ``viz.save_case_viewer_html``: per case of the split (at most ``limit``)
    the CT in Hounsfield units with the ground truth and the predictions with the true, the side-flipped and the
    empty report (and the image-only UNet's when it ran), the report prompt and the Dice of each as text."""
    true = result.evaluations["true"]
    if cfg.input_image:
        sources = {true.cases[0]: (resolve_path(cfg.input_image), None)}
    else:
        manifest, root = load_manifest(cfg)
        rows = manifest[manifest.split == cfg.split].set_index("case")
        sources = {c: (root / rows.at[c, "image"], root / rows.at[c, "label"] if rows.at[c, "label"] else None)
                   for c in true.cases[:limit]}
    names = {"true": "pred (true report)", "flipped": "pred (flipped report)", "empty": "pred (empty report)",
             "image_only": "pred (image-only UNet)"}
    cases = []
    for i, case in enumerate(true.cases[:limit]):
        image_path, label_path = sources[case]
        loaded = ts_data.load_case(image_path, label_path)
        masks = {}
        if loaded["label"] is not None:
            masks["ground truth"] = _superior_first(loaded["label"] > 0)
        for variant, ev in result.evaluations.items():
            if i < len(ev.predictions):
                if ev.predictions[i].shape != loaded["image"].shape:
                    raise ValueError(f"{image_path}: prediction ({variant} report) has shape "
                                     f"{ev.predictions[i].shape}, expected the image's {loaded['image'].shape}")
                masks[names.get(variant, f"pred ({variant})")] = _superior_first(ev.predictions[i] > 0)
        dice = [f"{v.replace('_', '-')} {ev.metrics.loc[i, 'dice']:.3f}" for v, ev in result.evaluations.items()
                if len(ev.metrics) > i and "dice" in ev.metrics]
        text = "report prompt: " + (true.prompts[i] or "(empty report)")
        if "flipped" in result.evaluations:
            text += "\nside-flipped prompt: " + result.evaluations["flipped"].prompts[i]
        if dice:
            text += "\n\nDice: " + " · ".join(dice)
        cases.append({"image": _superior_first(loaded["image"]), "masks": masks, "title": str(case), "text": text,
                      "spacing": tuple(float(s) for s in loaded["spacing"]), "modality": "CT"})
    return cases


# ============================================================================================ 04 attention
@dataclasses.dataclass
class AttentionResult:
    case: str
    prompt: str
    tokens: list[str]
    bertviz_html: Path | None
    token_figure: Any  # encoder self-attention, per layer (mean over heads), static
    fusion_figure: Any  # per text token and scale: attention over voxels on axial / coronal slices
    # for attention_viewer_cases: the case in HU (canonical IPL), its target and prediction, the fusion maps
    image_hu: np.ndarray | None = None  # (D, H, W)
    label: np.ndarray | None = None  # (D, H, W) bool
    pred: np.ndarray | None = None  # (D, H, W) bool
    fusion_maps: list[np.ndarray] | None = None  # per scale (n_prompts, d, h, w), over the volume padded to 32
    spacing: tuple[float, float, float] | None = None  # (D, H, W) mm


TOKEN_READOUT_SCALE = 2  # 04_attention, token readout, scale -1: one row per report word at the 1/8 scale


def fusion_attention(model: LLMSeg, image: torch.Tensor, prompt: str) -> tuple[list[np.ndarray], np.ndarray]:
    """The final token->voxel attention of every fusion scale for one whole volume (one forward pass).

    Returns:
        (maps, probabilities): maps[i] is ``(n_prompts, d_i, h_i, w_i)`` (mean over heads, each token's weights
        summing to 1 over the voxels of scale i); probabilities ``(2, D, H, W)``.
    """
    if model.text_encoder is None:
        raise ValueError("the image-only model has no fusion attention")
    captured: dict[int, torch.Tensor] = {}
    shapes: dict[int, tuple[int, ...]] = {}
    hooks = []
    for i, block in enumerate(model.fusion):
        attn = block.final_attn_token_to_image

        def hook(module: Any, args: Any, kwargs: dict[str, Any], output: Any, i: int = i) -> None:
            q, k = module.q_proj(kwargs["q"]), module.k_proj(kwargs["k"])
            heads = module.num_heads
            q = q.reshape(q.shape[0], q.shape[1], heads, -1).transpose(1, 2)
            k = k.reshape(k.shape[0], k.shape[1], heads, -1).transpose(1, 2)
            weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)  # (B, heads, P, N)
            captured[i] = weights.mean(1)[0].detach()

        hooks.append(attn.register_forward_hook(hook, with_kwargs=True))
        hooks.append(model.encoders[i].register_forward_hook(
            lambda m, a, out, i=i: shapes.__setitem__(i, tuple(out.shape[2:]))))
    try:
        with torch.no_grad():
            padded = _pad_to_multiple(image, 32)
            text = model.encode_reports([prompt])
            logits = model.segment(padded, text)
    finally:
        for h in hooks:
            h.remove()
    d, h, w = image.shape[2:]
    probs = torch.softmax(logits, 1)[0, :, :d, :h, :w].cpu().numpy()
    maps = [captured[i].reshape(-1, *shapes[i]).cpu().numpy() for i in range(len(model.fusion))]
    return maps, probs


def _pad_to_multiple(image: torch.Tensor, multiple: int) -> torch.Tensor:
    pads = []
    for s in reversed(image.shape[2:]):
        pads += [0, (-s) % multiple]
    return torch.nn.functional.pad(image, pads)


def attention_maps(cfg: AttentionConfig, run: RunFolder) -> AttentionResult:
    """bertviz head view of the report in the frozen text encoder, a static per-layer token map, and the fusion
    attention of each text token over the voxels at each scale, on axial and coronal slices next to the mask."""
    model = load_trained_model(find_checkpoint(cfg.checkpoint, run, SYSTEM))
    if model.text_encoder is None:
        raise ValueError("the checkpoint is an image-only model; 04_attention needs LLMSeg")
    manifest, root = load_manifest(cfg)
    part = manifest[manifest.split == cfg.split].reset_index(drop=True)
    if cfg.case:
        if cfg.case not in set(part["case"]):
            raise ValueError(f"case {cfg.case!r} is not in the {cfg.split} split of {cfg.manifest}")
        row = part[part["case"] == cfg.case].iloc[0]
    else:
        row = part.iloc[0]
    tokens, attentions = model.text_encoder.encoder_attentions(row["prompt"])
    html_path = _bertviz_html(attentions, tokens, run)
    token_fig = token_attention_figure(tokens, attentions)
    run.save_figure(token_fig, "04_report_token_attention")
    data = eval_transforms()(case_items(part[part["case"] == row["case"]], root)[0])
    maps, probs = fusion_attention(model, torch.as_tensor(data["image"]).as_subclass(torch.Tensor)[None],
                                   row["prompt"])
    image = np.asarray(data["image"])[0]
    label = np.asarray(data["label"])[0] > 0.5
    scales = range(len(maps)) if cfg.scale < 0 else [cfg.scale]
    names = None
    if model.spec.text_readout == "tokens":
        # one fusion token per report token and prompt: show the first prompt's report tokens, by word, at one scale
        ids, _ = model.text_encoder._token_ids([row["prompt"]])
        names = model.text_encoder.tokenizer.convert_ids_to_tokens(ids[0].tolist())
        maps = [m[:len(names)] for m in maps]
        scales = [TOKEN_READOUT_SCALE] if cfg.scale < 0 else [cfg.scale]
    fusion_fig = fusion_attention_figure(image, label, probs[1] > 0.5, maps, list(scales), row["prompt"], names)
    run.save_figure(fusion_fig, "04_fusion_attention")
    loaded = ts_data.load_case(root / row["image"])
    return AttentionResult(str(row["case"]), str(row["prompt"]), tokens, html_path, token_fig, fusion_fig,
                           loaded["image"], label, probs[1] > 0.5, maps, loaded["spacing"])


def attention_viewer_cases(att: AttentionResult, scales: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Cases for ``viz.slice_viewer`` / ``viz.save_case_viewer_html``: the CT (HU) once per fusion scale and text
    prompt token, that token's attention over the voxels as the heatmap (a 3-D map: axial, coronal and sagittal),
    with the ground truth and the prediction, and the report as text."""
    if att.image_hu is None or att.fusion_maps is None:
        raise ValueError("the attention result carries no volume or fusion maps (made by an older attention_maps)")
    shape = att.image_hu.shape
    padded = [s + (-s) % 32 for s in shape]  # fusion_attention pads the volume to a multiple of 32
    masks = {}
    if att.label is not None:
        masks["ground truth"] = _superior_first(att.label)
    if att.pred is not None:
        masks["prediction"] = _superior_first(att.pred)
    image = _superior_first(att.image_hu)
    cases = []
    for s in (range(len(att.fusion_maps)) if scales is None else scales):
        maps = att.fusion_maps[s]
        # the part of the map over the unpadded volume
        keep = tuple(max(1, round(n * m / p)) for n, m, p in zip(shape, maps.shape[1:], padded))
        for t in range(maps.shape[0]):
            amap = _superior_first(maps[t, :keep[0], :keep[1], :keep[2]])
            cases.append({"image": image, "masks": masks, "attention": amap, "spacing": att.spacing,
                          "modality": "CT", "title": f"scale 1/{2 ** (s + 1)}, prompt token {t + 1}",
                          "text": f"{att.case}\nreport prompt: {att.prompt}\n\nfusion attention of text prompt token "
                                  f"{t + 1} over the voxels at scale 1/{2 ** (s + 1)} (grid "
                                  f"{'x'.join(map(str, amap.shape))}, mean of heads)"})
    return cases


def _bertviz_html(attentions: tuple[torch.Tensor, ...], tokens: list[str], run: RunFolder) -> Path | None:
    """bertviz head view saved as a standalone HTML file that renders offline (d3/jQuery inlined, no CDN)."""
    try:
        import bertviz  # noqa: F401
    except ImportError:
        return None
    from nbsupport.viz import save_attention_html

    return save_attention_html(list(attentions), tokens, run.file("04_bertviz_head_view.html"),
                               title="report self-attention in the text encoder (bertviz head view)")


def token_attention_figure(tokens: list[str], attentions: tuple[torch.Tensor, ...]) -> Any:
    """Token x token self-attention of the report in every encoder layer (mean over heads)."""
    import matplotlib.pyplot as plt

    n = len(attentions)
    cols = min(n, 3)
    rows = -(-n // cols)
    size = max(3.0, 0.22 * len(tokens))
    fig = plt.figure(figsize=(size * cols, size * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for layer, (ax, att) in enumerate(zip(axes, attentions)):
        ax.imshow(att[0].mean(0).float().numpy(), cmap="viridis")
        ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=7)
        ax.set_yticks(range(len(tokens)), tokens, fontsize=7)
        ax.set_title(f"layer {layer + 1} (mean of heads)")
    for ax in axes[n:]:
        ax.set_axis_off()
    return fig


def fusion_attention_figure(image: np.ndarray, label: np.ndarray, pred: np.ndarray, maps: list[np.ndarray],
                            scales: list[int], prompt: str, token_names: list[str] | None = None) -> Any:
    """Rows: (scale, text token); columns: axial and coronal attention heatmaps through the target's centre,
    then the same slices with the target and the prediction. ``token_names``: the report word of each text token
    (token readout), else the tokens are numbered prompt tokens."""
    import matplotlib.pyplot as plt

    from nbsupport.viz import attention_overlay, overlay_masks

    k, j, _ = _orthogonal_slices(image, label)
    rows = [(s, t) for s in scales for t in range(maps[s].shape[0])]
    fig = plt.figure(figsize=(13, 3.0 * len(rows)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(rows), 4))
    for r, (s, t) in enumerate(rows):
        amap = maps[s][t]
        ks, js = min(k * amap.shape[0] // image.shape[0], amap.shape[0] - 1), \
            min(j * amap.shape[1] // image.shape[1], amap.shape[1] - 1)
        attention_overlay(image[k], amap[ks], ax=axes[r, 0], colorbar=False,
                          title=f"scale 1/{2 ** (s + 1)}, " + (f"report token {token_names[t]!r}" if token_names
                                                                   else f"prompt token {t + 1}") + ": axial")
        attention_overlay(image[:, j], amap[:, js], ax=axes[r, 1], colorbar=False, title="coronal")
        masks = {"target": label[k], "prediction": pred[k]}
        overlay_masks(image[k], masks, ax=axes[r, 2], legend=r == 0, title="axial: target vs prediction")
        overlay_masks(image[:, j], {"target": label[:, j], "prediction": pred[:, j]}, ax=axes[r, 3], legend=False,
                      title="coronal")
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"fusion attention of the text tokens over voxels — report: {prompt}")
    return fig
