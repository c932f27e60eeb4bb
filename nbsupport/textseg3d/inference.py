"""LLMSeg inference: whole volumes by sliding window, per-case scores of a report variant, their 95 % intervals and
paired differences, the public code's ``result.csv``, NIfTI outputs in the input's voxel order, and the fusion
attention of one volume."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from nbsupport.metrics import bootstrap_ci95, format_ci, paired_bootstrap_diff, segmentation_metrics, with_ci95
from nbsupport.progress import progress
from nbsupport.runs import atomic_path, atomic_write_text
from nbsupport.textseg3d import data as ts_data
from nbsupport.textseg3d.model import LLMSeg
from nbsupport.textseg3d.transforms import eval_transforms

RESULT_COLUMNS = ("no", "ID", "Avr", "Dice", "IoU", "HD", "Report")  # the public code's result.csv
# The text ablation's rows: LLMSeg with each report variant, then the image-only UNet (given the true report's cases)
ABLATION_NAMES = {"true": "LLMSeg, true report", "flipped": "LLMSeg, side flipped", "empty": "LLMSeg, empty report",
                  "image_only": "image-only UNet"}
TABLE_COLUMNS = {"dice": ("Dice", 3), "iou": ("IoU", 3), "hd95": ("HD95 (mm)", 1)}  # column, digits


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
    items = ts_data.case_items(manifest, root, variant)
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


def dice_results(evaluations: Mapping[str, CaseEvaluation], keys: Mapping[str, str], split: str) -> dict[str, Any]:
    """The ``metrics.json`` entries of a scored split: each variant's mean Dice under ``keys[variant]`` with its
    seeded 95 % bootstrap interval over cases (``<key>_ci95``), then the paired bootstrap difference of the true
    report against every other variant on the same cases, ``<split>_dice_true_minus_<variant>: {"diff", "ci95"}``
    (an interval above 0: the true report beats that variant beyond case-sampling noise)."""
    dice = {variant: ev.metrics["dice"].to_numpy(dtype=float) for variant, ev in evaluations.items()}
    means = {keys[v]: float(ev.metrics["dice"].mean()) for v, ev in evaluations.items()}
    out = with_ci95(means, {keys[v]: d for v, d in dice.items()})
    for variant, values in dice.items():
        if variant != "true":
            diff, low, high = paired_bootstrap_diff(dice["true"], values)
            out[f"{split}_dice_true_minus_{variant}"] = {"diff": diff, "ci95": [low, high]}
    return out


def ablation_table(evaluations: Mapping[str, CaseEvaluation]) -> pd.DataFrame:
    """Mean Dice, IoU and HD95 (mm) per model and report, each as ``0.80 (0.74–0.85)`` with its 95 % bootstrap
    interval over cases (HD95: over the cases where both masks are non-empty)."""
    rows = {}
    for variant, ev in evaluations.items():
        cells = {}
        for key, (column, digits) in TABLE_COLUMNS.items():
            values = ev.metrics[key].to_numpy(dtype=float) if len(ev.metrics) else np.array([])
            defined = values[~np.isnan(values)]
            cells[column] = (format_ci(float(defined.mean()), bootstrap_ci95(values), digits) if defined.size
                             else "n/a")
        rows[ABLATION_NAMES[variant]] = cells
    return pd.DataFrame(rows).T


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
    _, affine = ts_data.read_volume(image_path, "data")
    return write_mask_nifti(ts_data.from_canonical(pred_canonical.astype(np.uint8), affine), affine, out_path)


def write_mask_nifti(stored: np.ndarray, affine: np.ndarray, out_path: Path, overwrite: bool = True) -> Path:
    """Write a mask already in the input's voxel order as uint8 NIfTI with ``affine``; the file appears atomically
    (with ``overwrite=False`` an existing file is an error)."""
    import nibabel as nib

    with atomic_path(out_path, overwrite=overwrite) as tmp:
        target = tmp.with_name(tmp.name + ".nii.gz")
        nib.save(nib.Nifti1Image(stored.astype(np.uint8), affine), str(target))
        target.replace(tmp)
    return out_path


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
            padded = _pad_to_multiple(image.to(model.out.weight.device), 32)  # on the model's device
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
