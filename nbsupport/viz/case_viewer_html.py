"""A self-contained HTML case viewer: one file that a clinician opens in any browser, offline, with no server.

The page holds the image data itself (base64 typed arrays: int16 Hounsfield units for CT so the window/level
presets work, uint8 for MR/X-ray), the masks as a run-length-encoded bit field (one bit per mask), the
attention maps at their own resolution (uint8), and ~250 lines of plain JavaScript that draw the current slice
into a ``<canvas>``: grey levels through the chosen window, the attention heatmap (jet, bilinear upsampling by
the canvas, adjustable opacity), then each visible mask as a translucent fill with a full-colour contour.
Nothing is loaded from the network; the page works from ``file://``, a shared drive or an e-mail attachment.

The cases are the same dicts as :func:`nbsupport.viz.slice_viewer` takes, so a system writes the page with the
cases it already shows in its notebook::

    save_case_viewer_html(cases, run.file("case_viewer.html"), title="seg2d test predictions")

Size is bounded by ``max_cases``, ``max_side`` (in-plane pixels, area-downsampled, spacing rescaled) and
``max_slices`` (every n-th slice kept, slice spacing rescaled).
"""
from __future__ import annotations

import base64
import html
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nbsupport.runs import atomic_write_text
from nbsupport.viz.overlay import display_window, resolve_colors
from nbsupport.viz.viewer import CT_WINDOWS, ViewerCase, as_cases

CT_MODALITIES = ("CT",)


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()).decode()


def _resize_volume(vol: np.ndarray, size: tuple[int, int], nearest: bool) -> np.ndarray:
    import cv2

    interp = cv2.INTER_NEAREST if nearest else cv2.INTER_AREA
    src = vol.astype(np.uint8) if nearest else vol.astype(np.float32)
    return np.stack([cv2.resize(s, (size[1], size[0]), interpolation=interp) for s in src])


def _rle(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs of equal values of a flat array: (value per run, length per run as uint32)."""
    flat = values.ravel()
    if flat.size == 0:
        return flat[:0], np.zeros(0, np.uint32)
    starts = np.flatnonzero(np.r_[True, flat[1:] != flat[:-1]])
    lengths = np.diff(np.r_[starts, flat.size]).astype(np.uint32)
    return flat[starts], lengths


def encode_case(case: ViewerCase, mask_names: Sequence[str], max_side: int = 256, max_slices: int = 96,
                modality: str = "") -> dict[str, Any]:
    """One case as the JSON the page's script reads (see the module docstring for the encoding).

    Args:
        case: a viewer case; its image is (D, H, W), masks bool (D, H, W), attention (d, h, w) or None.
        mask_names: the names of every mask on the page, in bit order (bit i = ``mask_names[i]``).
        max_side: longest in-plane side kept (pixels); larger slices are area-downsampled.
        max_slices: most slices kept; more are subsampled evenly.
        modality: "CT" stores Hounsfield units (int16) and offers the CT window presets; a case with colour
            (modality "RGB") stores its RGB bytes ("rgb8", no window); anything else is
            scaled to uint8 over its 0.5-99.5 percentile range ("auto" window).
    """
    image = case.image.astype(np.float32)
    depth, height, width = image.shape
    row_mm, col_mm = case.spacing if case.spacing is not None else (1.0, 1.0)
    slice_mm = case.slice_mm if case.slice_mm is not None else max(row_mm, col_mm)
    keep = np.arange(depth)
    if depth > max_slices:
        step = math.ceil(depth / max_slices)
        keep = keep[::step]
        slice_mm *= step
    image = image[keep]
    color = case.color[keep] if case.color is not None else None
    masks = {n: m[keep] for n, m in case.masks.items()}
    scale = max(height, width) / max_side
    if scale > 1:
        size = (max(1, round(height / scale)), max(1, round(width / scale)))
        row_mm, col_mm = row_mm * height / size[0], col_mm * width / size[1]
        image = _resize_volume(image, size, nearest=False)
        if color is not None:
            color = _resize_volume(color, size, nearest=False)
        masks = {n: _resize_volume(m, size, nearest=True).astype(bool) for n, m in masks.items()}
    is_ct = modality.upper() in CT_MODALITIES
    if color is not None:  # a colour photograph: RGB bytes, no window
        pixels = np.clip(np.round(color), 0, 255).astype(np.uint8)
        auto = (0.0, 255.0)
        dtype = "rgb8"
    elif is_ct:
        pixels = np.clip(np.round(image), -32768, 32767).astype(np.int16)
        auto = display_window(image, percentiles=(0.5, 99.5))
        dtype = "i16"
    else:
        lo, hi = display_window(image, percentiles=(0.5, 99.5))
        pixels = np.clip(np.round((image - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)
        auto = (0.0, 255.0)
        dtype = "u8"
    if len(mask_names) > 32:
        raise ValueError(f"the case viewer draws at most 32 masks, got {len(mask_names)}: {list(mask_names)}")
    bit_type = np.uint8 if len(mask_names) <= 8 else np.uint16 if len(mask_names) <= 16 else np.uint32
    bits = np.zeros(image.shape, dtype=bit_type)
    for i, name in enumerate(mask_names):
        if name in masks:
            bits |= (masks[name].astype(bit_type) << bit_type(i))
    run_values, run_lengths = _rle(bits)
    encoded: dict[str, Any] = {
        "title": case.title, "text": case.text, "modality": modality or "", "shape": list(image.shape),
        "spacing": [float(slice_mm), float(row_mm), float(col_mm)], "volume": bool(case.is_volume),
        "dtype": dtype, "pixels": _b64(pixels), "auto_window": [float(auto[0]), float(auto[1])],
        "mask_bits": bit_type(0).itemsize * 8, "mask_runs": _b64(run_values), "mask_run_lengths": _b64(run_lengths),
        "masks": [n for n in mask_names if n in masks],
        "mask_area": {n: [int(s) for s in m.reshape(m.shape[0], -1).sum(axis=1)] for n, m in masks.items()},
        "default_slice": int(np.searchsorted(keep, case.default_slice()).clip(0, len(keep) - 1)),
    }
    if case.attention is not None:
        att = case.attention.astype(np.float64)
        if att.shape[0] > 1 and att.shape[0] == depth:
            att = att[keep]
        lo_a, hi_a = float(np.nanmin(att)), float(np.nanmax(att))
        norm = np.zeros_like(att) if hi_a - lo_a <= 1e-12 else (np.nan_to_num(att, nan=lo_a) - lo_a) / (hi_a - lo_a)
        encoded["attention"] = {"shape": list(att.shape), "data": _b64(np.round(norm * 255).astype(np.uint8))}
    return encoded


def _share_repeated(encoded: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Store each distinct image and mask set once: a case whose pixels (or masks) equal an earlier case's names
    that case (``pixels_from`` / ``masks_from``) instead of repeating the data, so one volume shown with many
    heatmaps (one case per layer, token or disease) costs one volume in the page."""
    pixels_seen: dict[tuple[str, str], int] = {}
    masks_seen: dict[tuple[int, str, str], int] = {}
    for i, case in enumerate(encoded):
        key = (case["dtype"], case["pixels"])
        if key in pixels_seen:
            case["pixels"], case["pixels_from"] = "", pixels_seen[key]
        else:
            pixels_seen[key] = i
        mkey = (case["mask_bits"], case["mask_runs"], case["mask_run_lengths"])
        if mkey in masks_seen and case["mask_runs"]:
            case["mask_runs"], case["mask_run_lengths"], case["masks_from"] = "", "", masks_seen[mkey]
        else:
            masks_seen.setdefault(mkey, i)
    return encoded


def save_case_viewer_html(volume_or_cases: Any, path: str | os.PathLike, *, masks: Any = None,
                          class_names: Sequence[str] | None = None, text: str = "", title: str = "Case viewer",
                          spacing: Sequence[float] | None = None, attention: Any = None, modality: str = "",
                          colors: Mapping[str, str] | None = None, max_cases: int = 16, max_side: int = 256,
                          max_slices: int = 96, heatmap_opacity: float = 0.4, mask_opacity: float = 0.35) -> Path:
    """Write the offline HTML case viewer (one self-contained file) and return its path.

    Args:
        volume_or_cases: a (D, H, W) volume or (H, W) image, or a list of case dicts as for
            :func:`nbsupport.viz.slice_viewer`: ``{"image", "masks": {name: bool array}, "title", "text",
            "spacing": (row_mm, col_mm) or (slice_mm, row_mm, col_mm), "attention": (h, w) or (d, h, w),
            "modality": "CT" | "MR" | "XR" | "RGB" | ...}``. Volumes get axial, coronal and sagittal views; an
            "RGB" image is (H, W, 3) uint8 and drawn in colour (endoscopy, dermoscopy).
        path: the HTML file to write (atomically).
        masks, class_names, text, spacing, attention: for a single volume/image, as in ``slice_viewer``.
        title: page title.
        modality: default modality of cases that do not name theirs; "CT" enables the window presets
            (soft tissue, lung, mediastinum, bone); others are shown with an automatic window.
        colors: ``{mask name: colour}``; default: the workbench's fixed class colours.
        max_cases, max_side, max_slices: size bounds (cases kept, in-plane pixels, slices per volume).
        heatmap_opacity, mask_opacity: initial opacities (0..1); the heatmap's has a slider on the page.
    """
    raw = volume_or_cases
    if isinstance(raw, Mapping):
        raw = [raw]
    modalities: list[str] = []
    if isinstance(raw, (list, tuple)) and raw and isinstance(raw[0], Mapping):
        raw = list(raw)[:max_cases]
        modalities = [str(c.get("modality") or modality) for c in raw]
    cases = as_cases(raw, masks, class_names, text, title if not modalities else "", spacing, attention, modality)
    if not modalities:
        modalities = [modality] * len(cases)
    names = list(dict.fromkeys(n for c in cases for n in c.masks))
    palette = resolve_colors(names, colors)
    payload = {
        "title": title,
        "masks": [{"name": n, "color": palette[n]} for n in names],
        "ct_windows": {k: list(v) for k, v in CT_WINDOWS.items()},
        "heatmap_opacity": float(heatmap_opacity), "mask_opacity": float(mask_opacity),
        "cases": _share_repeated([encode_case(c, names, max_side, max_slices, m)
                                  for c, m in zip(cases, modalities)]),
    }
    data = json.dumps(payload, separators=(",", ":")).replace("</", "<\\/")
    page = _PAGE.replace("__TITLE__", html.escape(title)).replace("__DATA__", data)
    return atomic_write_text(Path(path), page)


_PAGE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
body { font: 14px/1.4 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 1em 1.5em; color: #222; }
h1 { font-size: 1.3em; margin: 0 0 .5em; }
.controls { display: flex; flex-wrap: wrap; gap: .4em 1.2em; align-items: center; margin-bottom: .6em; }
.controls label { white-space: nowrap; }
.main { display: flex; gap: 1.2em; align-items: flex-start; flex-wrap: wrap; }
#canvas { background: #000; image-rendering: pixelated; border: 1px solid #999; }
#side { max-width: 42em; min-width: 18em; }
#masks label { display: inline-flex; align-items: center; gap: .25em; margin: 0 .8em .3em 0; }
#masks input[type=color] { width: 1.8em; height: 1.4em; padding: 0; border: none; background: none; }
#text { white-space: pre-wrap; font-size: 13px; background: #f6f7f9; border: 1px solid #e1e4e8; padding: .6em .8em;
        margin-top: .6em; }
.meta { color: #666; font-size: 12px; }
#slice { width: 18em; }
</style>
</head>
<body>
<h1>__TITLE__</h1>
<div class="controls">
  <label>case <select id="case"></select></label>
  <label id="view-label">view <select id="view"><option>axial</option><option>coronal</option>
    <option>sagittal</option></select></label>
  <label id="slice-label">slice <input id="slice" type="range" min="0" max="0" value="0">
    <span id="slice-number"></span></label>
  <label>window <select id="window"></select></label>
  <label id="heat-label"><input id="heat" type="checkbox" checked> attention
    <input id="opacity" type="range" min="0" max="100" value="40"> <span id="opacity-value"></span></label>
</div>
<div class="main">
  <canvas id="canvas" width="1" height="1"></canvas>
  <div id="side">
    <div id="masks"></div>
    <div class="meta" id="meta"></div>
    <div id="text"></div>
  </div>
</div>
<script id="case-data" type="application/json">__DATA__</script>
<script>
"use strict";
(function () {
  const DATA = JSON.parse(document.getElementById("case-data").textContent);
  const $ = (id) => document.getElementById(id);
  const DISPLAY_PX = 560;  // longest displayed side, CSS pixels
  const state = { caseIndex: 0, view: "axial", slice: 0, window: null, heat: true,
                  opacity: DATA.heatmap_opacity, visible: {}, colors: {} };
  DATA.masks.forEach((m) => { state.visible[m.name] = true; state.colors[m.name] = m.color; });
  const decoded = new Array(DATA.cases.length);

  function bytes(b64) {
    const s = atob(b64), out = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
    return out;
  }
  function typed(b64, kind) {
    const buf = bytes(b64).buffer;
    if (kind === "i16") return new Int16Array(buf);
    if (kind === 16) return new Uint16Array(buf);
    if (kind === 32) return new Uint32Array(buf);
    return new Uint8Array(buf);
  }
  function decode(i) {
    if (decoded[i]) return decoded[i];
    const c = DATA.cases[i];
    const n = c.shape[0] * c.shape[1] * c.shape[2];
    const held = c.masks_from === undefined ? c : DATA.cases[c.masks_from];  // the case holding these masks
    const values = typed(held.mask_runs, held.mask_bits), lengths = typed(held.mask_run_lengths, 32);
    const bits = new Uint32Array(n);
    let p = 0;
    for (let r = 0; r < values.length; r++) { bits.fill(values[r], p, p + lengths[r]); p += lengths[r]; }
    const shared = c.pixels_from === undefined ? null : c.pixels_from;  // the first case holding these pixels
    const pixels = shared === null ? typed(c.pixels, c.dtype)
      : decoded[shared] ? decoded[shared].pixels : typed(DATA.cases[shared].pixels, c.dtype);
    const d = { pixels: pixels, bits: bits,
                bitOf: Object.fromEntries(DATA.masks.map((m, k) => [m.name, k])) };
    if (c.attention) d.attention = typed(c.attention.data, 8);
    decoded[i] = d;
    return d;
  }
  function hexRgb(h) { return [1, 3, 5].map((k) => parseInt(h.substr(k, 2), 16)); }
  function jet(v) {  // v in [0, 1] -> [r, g, b] 0..255, matplotlib's "jet"
    const f = (x) => Math.max(0, Math.min(1, x));
    return [f(1.5 - Math.abs(4 * v - 3)), f(1.5 - Math.abs(4 * v - 2)), f(1.5 - Math.abs(4 * v - 1))]
      .map((x) => Math.round(255 * x));
  }

  // The displayed plane: rows x cols and the voxel index of (row, col), plus the physical pixel size.
  function plane(c) {
    const [D, H, W] = c.shape, [sz, sy, sx] = c.spacing, k = state.slice;
    if (state.view === "coronal") return { rows: D, cols: W, h: sz, w: sx,
                                           index: (r, q) => ((D - 1 - r) * H + k) * W + q };
    if (state.view === "sagittal") return { rows: D, cols: H, h: sz, w: sy,
                                            index: (r, q) => ((D - 1 - r) * H + q) * W + k };
    return { rows: H, cols: W, h: sy, w: sx, index: (r, q) => (k * H + r) * W + q };
  }
  function depthOfView(c) {
    return state.view === "coronal" ? c.shape[1] : state.view === "sagittal" ? c.shape[2] : c.shape[0];
  }
  function windowRange(c) {
    if (state.window !== "auto" && DATA.ct_windows[state.window]) {
      const [w, l] = DATA.ct_windows[state.window];
      return [l - w / 2, l + w / 2];
    }
    return c.auto_window;
  }

  // Attention on the displayed plane at the attention grid's own resolution (the canvas upsamples it).
  function heatPlane(c, d) {
    const [ad, ah, aw] = c.attention.shape, [D, H, W] = c.shape, a = d.attention;
    const zi = (z) => Math.min(ad - 1, Math.floor((z + 0.5) * ad / D));
    const yi = (y) => Math.min(ah - 1, Math.floor((y + 0.5) * ah / H));
    const xi = (x) => Math.min(aw - 1, Math.floor((x + 0.5) * aw / W));
    let rows, cols, at;
    if (state.view === "coronal") { rows = ad; cols = aw; const y = yi(state.slice);
      at = (r, q) => a[((ad - 1 - r) * ah + y) * aw + q]; }
    else if (state.view === "sagittal") { rows = ad; cols = ah; const x = xi(state.slice);
      at = (r, q) => a[((ad - 1 - r) * ah + q) * aw + x]; }
    else { rows = ah; cols = aw; const z = zi(state.slice); at = (r, q) => a[(z * ah + r) * aw + q]; }
    const off = document.createElement("canvas");
    off.width = cols; off.height = rows;
    const ctx = off.getContext("2d"), img = ctx.createImageData(cols, rows);
    for (let r = 0; r < rows; r++) for (let q = 0; q < cols; q++) {
      const rgb = jet(at(r, q) / 255), o = 4 * (r * cols + q);
      img.data[o] = rgb[0]; img.data[o + 1] = rgb[1]; img.data[o + 2] = rgb[2]; img.data[o + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
    return off;
  }

  function render() {
    const c = DATA.cases[state.caseIndex], d = decode(state.caseIndex), p = plane(c);
    const canvas = $("canvas");
    canvas.width = p.cols; canvas.height = p.rows;
    const physW = p.cols * p.w, physH = p.rows * p.h, s = DISPLAY_PX / Math.max(physW, physH);
    canvas.style.width = Math.round(physW * s) + "px"; canvas.style.height = Math.round(physH * s) + "px";
    const ctx = canvas.getContext("2d");
    const [lo, hi] = windowRange(c), span = Math.max(hi - lo, 1e-6);
    const gray = ctx.createImageData(p.cols, p.rows);
    const rgb = c.dtype === "rgb8";  // a colour photograph: three bytes per pixel, no window
    for (let r = 0; r < p.rows; r++) for (let q = 0; q < p.cols; q++) {
      const o = 4 * (r * p.cols + q);
      if (rgb) {
        const i = 3 * p.index(r, q);
        gray.data[o] = d.pixels[i]; gray.data[o + 1] = d.pixels[i + 1]; gray.data[o + 2] = d.pixels[i + 2];
      } else {
        const v = Math.max(0, Math.min(255, Math.round((d.pixels[p.index(r, q)] - lo) / span * 255)));
        gray.data[o] = gray.data[o + 1] = gray.data[o + 2] = v;
      }
      gray.data[o + 3] = 255;
    }
    ctx.putImageData(gray, 0, 0);
    const showHeat = state.heat && d.attention;
    if (showHeat) {
      ctx.save(); ctx.globalAlpha = state.opacity; ctx.imageSmoothingEnabled = true;
      ctx.drawImage(heatPlane(c, d), 0, 0, p.cols, p.rows); ctx.restore();
    }
    // masks: translucent fill, opaque 4-neighbour contour
    const layer = ctx.createImageData(p.cols, p.rows), fillA = Math.round(255 * DATA.mask_opacity);
    const drawn = [];
    for (const name of c.masks) {
      if (!state.visible[name]) continue;
      const bit = 1 << d.bitOf[name], rgb = hexRgb(state.colors[name]);
      const has = (r, q) => r >= 0 && q >= 0 && r < p.rows && q < p.cols && (d.bits[p.index(r, q)] & bit) !== 0;
      let any = false;
      for (let r = 0; r < p.rows; r++) for (let q = 0; q < p.cols; q++) {
        if (!has(r, q)) continue;
        any = true;
        const edge = !(has(r - 1, q) && has(r + 1, q) && has(r, q - 1) && has(r, q + 1));
        const o = 4 * (r * p.cols + q);
        layer.data[o] = rgb[0]; layer.data[o + 1] = rgb[1]; layer.data[o + 2] = rgb[2];
        layer.data[o + 3] = edge ? 255 : Math.max(layer.data[o + 3], fillA);
      }
      if (any) drawn.push(name);
    }
    const off = document.createElement("canvas");
    off.width = p.cols; off.height = p.rows;
    off.getContext("2d").putImageData(layer, 0, 0);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(off, 0, 0);

    const nSlices = depthOfView(c);
    $("slice-number").textContent = (state.slice + 1) + " / " + nSlices;
    canvas.dataset.slice = String(state.slice);
    canvas.dataset.view = state.view;
    canvas.dataset.drawnMasks = drawn.join(",");
    $("opacity-value").textContent = Math.round(state.opacity * 100) + "%";
    const [sz, sy, sx] = c.spacing;
    const areas = state.view === "axial" ? c.masks.filter((n) => c.mask_area[n][state.slice] > 0)
      .map((n) => n + ": " + c.mask_area[n][state.slice] + " px").join(" · ") : "";
    $("meta").textContent = (c.modality ? c.modality + " · " : "") + c.shape.slice(1).join("×") +
      (c.volume ? "×" + c.shape[0] : "") + " voxels · " + sy.toFixed(2) + "×" + sx.toFixed(2) +
      (c.volume ? "×" + sz.toFixed(2) : "") + " mm · window " + lo.toFixed(0) + ".." + hi.toFixed(0) +
      (areas ? " · " + areas : "");
    $("text").textContent = c.text || "";
    $("text").style.display = c.text ? "" : "none";
  }

  function enterCase(i) {
    state.caseIndex = i;
    const c = DATA.cases[i];
    if (!c.volume) state.view = "axial";
    $("view").value = state.view;
    $("view-label").style.display = c.volume ? "" : "none";
    const ct = (c.modality || "").toUpperCase() === "CT";
    const options = ["auto"].concat(ct ? Object.keys(DATA.ct_windows) : []);
    $("window").innerHTML = options.map((o) => "<option>" + o + "</option>").join("");
    if (!options.includes(state.window)) state.window = ct ? "soft tissue" : "auto";
    $("window").value = state.window;
    $("heat-label").style.display = c.attention ? "" : "none";
    // mask toggles: only the masks this case has
    $("masks").innerHTML = "";
    for (const name of c.masks) {
      const label = document.createElement("label");
      const box = document.createElement("input");
      box.type = "checkbox"; box.checked = state.visible[name]; box.dataset.mask = name;
      box.addEventListener("change", () => { state.visible[name] = box.checked; render(); });
      const color = document.createElement("input");
      color.type = "color"; color.value = state.colors[name]; color.dataset.mask = name;
      color.addEventListener("input", () => { state.colors[name] = color.value; render(); });
      label.append(box, color, document.createTextNode(name));
      $("masks").append(label);
    }
    setView(state.view, true);
  }
  function setView(view, keepDefault) {
    state.view = view;
    const c = DATA.cases[state.caseIndex], n = depthOfView(c);
    state.slice = view === "axial" && keepDefault ? c.default_slice : Math.floor(n / 2);
    $("slice").max = String(n - 1); $("slice").value = String(state.slice);
    $("slice-label").style.display = n > 1 ? "" : "none";
    render();
  }

  $("case").innerHTML = DATA.cases.map((c, i) =>
    "<option value='" + i + "'>" + (c.title || "case " + (i + 1)).replace(/[<>&']/g, "") + "</option>").join("");
  $("case").addEventListener("change", (e) => enterCase(Number(e.target.value)));
  $("view").addEventListener("change", (e) => setView(e.target.value, true));
  $("slice").addEventListener("input", (e) => { state.slice = Number(e.target.value); render(); });
  $("window").addEventListener("change", (e) => { state.window = e.target.value; render(); });
  $("heat").addEventListener("change", (e) => { state.heat = e.target.checked; render(); });
  $("opacity").value = String(Math.round(state.opacity * 100));
  $("opacity").addEventListener("input", (e) => { state.opacity = Number(e.target.value) / 100; render(); });
  document.addEventListener("keydown", (e) => {
    if (e.key !== "ArrowUp" && e.key !== "ArrowDown") return;
    const s = $("slice"), v = Number(s.value) + (e.key === "ArrowUp" ? 1 : -1);
    if (v >= 0 && v <= Number(s.max)) { s.value = String(v); state.slice = v; render(); e.preventDefault(); }
  });
  window.nbsupportCaseViewer = { state: state, render: render, data: DATA };
  enterCase(0);
})();
</script>
</body>
</html>
"""
