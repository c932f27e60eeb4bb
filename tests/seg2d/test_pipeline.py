"""seg2d end to end in-process on the smoke profile: the trained model beats no-skill baselines on held-out cases."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from nbsupport import seg2d
from nbsupport.runs import RunFolder
from nbsupport.seg2d import data as seg_data
from nbsupport.seg2d.demo_data import DEMO_SIZES, write_demo_dataset
from nbsupport.seg2d.inference import POSTPROCESS_FILE, TUNED_THRESHOLDS
from nbsupport.seg2d.rle import rle_decode


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("seg2d")
    root = write_demo_dataset(tmp / "data", **DEMO_SIZES["smoke"])
    manifest = str(tmp / "uwmgi.csv")
    run_dir = str(tmp / "runs" / "r1" / "seg2d")
    params = {"profile": "smoke", "manifest": manifest, "run_dir": run_dir}
    cfg = seg2d.PreprocessConfig.from_params({**params, "data_root": str(root)})
    prep = seg2d.preprocess(cfg, RunFolder.for_stage(cfg))
    cfg = seg2d.TrainConfig.from_params(params)
    outcome = seg2d.train(cfg, RunFolder.for_stage(cfg))
    cfg = seg2d.InferConfig.from_params(params)
    inferred = seg2d.predict(cfg, RunFolder.for_stage(cfg))
    return {"root": root, "manifest": prep.manifest, "outcome": outcome, "inferred": inferred, "run_dir": Path(run_dir),
            "params": params}


def test_training_beats_no_skill_baselines_on_held_out_cases(smoke_run: dict) -> None:
    manifest = smoke_run["manifest"]
    test = manifest[manifest.split == "test"]
    assert len(test) and not set(test.case) & set(manifest[manifest.split == "train"].case)
    baselines = seg2d.baseline_scores(test)
    best_baseline = max(b["dice"] for b in baselines.values())
    dice = smoke_run["outcome"].test_metrics["test_dice"]
    # Stated baselines: all background (Dice 0, score 0) and the mean mask of the split (Dice ~0.3, score ~0.3).
    # The smoke model trains for 15 s on 4 cases, so the margins are modest but measured on unseen cases.
    assert baselines["all_background"]["dice"] == 0.0
    assert dice > best_baseline + 0.07, (dice, baselines)
    score = smoke_run["outcome"].test_metrics["test_score"]
    assert score > max(b["score"] for b in baselines.values()) + 0.25, (score, baselines)


def test_run_folder_holds_what_the_stages_promise(smoke_run: dict) -> None:
    run_dir = smoke_run["run_dir"]
    metrics = RunFolder(run_dir).metrics()
    assert {"01_preprocess", "02_train", "03_infer"} <= set(metrics)
    assert (run_dir / "checkpoints" / "best" / "model.safetensors").exists()
    assert (run_dir / "model_spec.json").exists()
    assert list((run_dir / "tensorboard").iterdir())
    for name in ("01_sample_slices", "02_training_curves", "02_test_predictions", "03_predictions"):
        assert (run_dir / "figures" / f"{name}.png").stat().st_size > 10_000


def test_predict_writes_the_case_viewer_itself(smoke_run: dict) -> None:
    """Called from Python (no notebook), 03 still writes the page the run index links, with the cases it returns."""
    inferred = smoke_run["inferred"]
    assert inferred.viewer_path == smoke_run["run_dir"] / "03_case_viewer.html"
    page = inferred.viewer_path.read_text()
    assert len(inferred.viewer_cases) == min(24, len(inferred.evaluation.manifest))
    assert inferred.viewer_cases[0]["title"] in page and "seg2d test predictions" in page


def test_load_trained_model_puts_every_tensor_on_the_device(smoke_run: dict) -> None:
    """On the meta device (no GPU needed) a tensor left on the CPU would make the forward pass fail."""
    import torch

    model = seg2d.load_trained_model(smoke_run["run_dir"] / "checkpoints" / "best", device="meta")
    assert not model.training
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}
    size = model.spec.image_size
    with torch.no_grad():
        logits, attentions = model(torch.zeros(2, 1, size, size, device="meta"), output_attentions=True)
    assert logits.device.type == "meta" and tuple(logits.shape) == (2, 3, size, size)
    assert {a.device.type for a in attentions} == {"meta"}


def test_infer_applies_the_post_processing_chosen_on_val_in_training(smoke_run: dict) -> None:
    metrics = RunFolder(smoke_run["run_dir"]).metrics()
    post = seg2d.PostProcess.from_file(smoke_run["run_dir"] / POSTPROCESS_FILE)
    assert post.source == "val_tuned" and metrics["02_train"]["postprocess"] == post.to_dict()
    assert set(post.thresholds) <= set(TUNED_THRESHOLDS)
    # same checkpoint, same per-class thresholds and areas: 03_infer reproduces 02_train's test scores exactly
    for key in ("test_dice", "test_score"):
        assert metrics["03_infer"][key] == pytest.approx(metrics["02_train"][key], abs=1e-9), key


def test_submission_is_kaggle_format_and_decodes_to_the_predictions(smoke_run: dict) -> None:
    inferred = smoke_run["inferred"]
    sub = pd.read_csv(inferred.submission_path, keep_default_na=False)
    assert list(sub.columns) == ["id", "class", "predicted"]
    test = smoke_run["manifest"][smoke_run["manifest"].split == "test"].reset_index(drop=True)
    assert len(sub) == 3 * len(test)
    assert list(sub["class"][:3]) == list(seg_data.CLASSES)
    ev = inferred.evaluation
    for i, row in test.iterrows():
        for k, c in enumerate(seg_data.CLASSES):
            rle = sub[(sub.id == row.id) & (sub["class"] == c)].predicted.item()
            np.testing.assert_array_equal(rle_decode(rle, row.height, row.width), ev.pred[i][k])


def test_infer_on_a_folder_without_labels(smoke_run: dict, tmp_path: Path) -> None:
    """A Kaggle-style test folder (images only) is predicted; no scores, one submission row per slice and class."""
    import shutil

    src = smoke_run["root"] / "train"
    case_dir = sorted(src.iterdir())[0]
    shutil.copytree(case_dir, tmp_path / "new" / "test" / case_dir.name)
    cfg = seg2d.InferConfig.from_params({**smoke_run["params"], "input_dir": str(tmp_path / "new"),
                                         "run_dir": str(tmp_path / "r" / "seg2d"),
                                         "checkpoint": str(smoke_run["run_dir"] / "checkpoints" / "best")})
    result = seg2d.predict(cfg, RunFolder.for_stage(cfg))
    n_slices = len(list((tmp_path / "new").rglob("*.png")))
    assert len(result.submission) == 3 * n_slices and result.scores == {}


def test_attention_maps_for_a_query_pixel(smoke_run: dict) -> None:
    cfg = seg2d.AttentionConfig.from_params({**smoke_run["params"], "query_point": [0.25, 0.75]})
    att = seg2d.attention_maps(cfg, RunFolder.for_stage(cfg))
    size = att.image.shape[0]
    assert att.query_point == (int(0.25 * (size - 1)), int(0.75 * (size - 1)))
    assert len(att.layer_maps) >= 4 and len(att.head_maps) >= 1
    assert all(np.isfinite(m).all() for _, m in att.layer_maps)
    # the viewer cases: one per layer, the map as heatmap, masks at the model input's size, physical spacing
    cases = seg2d.attention_viewer_cases(att)
    assert [c["title"] for c in cases] == [title for title, _ in att.layer_maps]
    assert all(m.shape == att.image.shape for c in cases for m in c["masks"].values())
    assert sorted(cases[0]["masks"]) == sorted([f"pred {c}" for c in seg_data.CLASSES]
                                               + [f"true {c}" for c in seg_data.CLASSES])
    assert min(att.spacing) > 0 and str(att.query_point[0]) in cases[0]["text"]
    # the verb wrote the same cases into 04_attention_viewer.html
    assert att.viewer_path == smoke_run["run_dir"] / "04_attention_viewer.html"
    assert [c["title"] for c in att.viewer_cases] == [c["title"] for c in cases]
    assert f"seg2d attention: {att.slice_id}" in att.viewer_path.read_text()


# ---------------------------------------------------------------------------------------------- intervals, headline
def test_every_test_metric_has_its_interval_and_the_run_its_headline(smoke_run: dict) -> None:
    """The smoke split has one test case, so the intervals over cases are points; test_scoring checks their
    width on several cases."""
    metrics = RunFolder(smoke_run["run_dir"]).metrics()
    for stage in ("02_train", "03_infer"):
        scored = {k: v for k, v in metrics[stage].items() if k.startswith("test_") and isinstance(v, float)}
        assert {"test_dice", "test_hausdorff", "test_score", "test_dice_stomach"} <= set(scored), stage
        assert metrics[stage]["test_n_cases"] == 1  # the smoke data's one test case
        for key, value in scored.items():
            low, high = metrics[stage][f"{key}_ci95"]
            assert low - 1e-12 <= value <= high + 1e-12, (stage, key, value, low, high)
        best = metrics[stage]["test_best_baseline"]
        baseline = metrics[stage]["test_baselines"][best]
        assert best == max(metrics[stage]["test_baselines"], key=lambda b: metrics[stage]["test_baselines"][b]["dice"])
        assert baseline["dice_ci95"][0] <= baseline["dice"] <= baseline["dice_ci95"][1]
        diff = metrics[stage][f"test_dice_minus_{best}"]
        assert diff["diff"] == pytest.approx(metrics[stage]["test_dice"] - baseline["dice"], abs=1e-9)
        assert diff["ci95"][0] <= diff["diff"] <= diff["ci95"][1]
    headline = json.loads((smoke_run["run_dir"] / "headline.json").read_text())
    assert headline["stage"] == "03_infer" and headline["metric"] == "test Dice"
    assert headline["value"] == metrics["03_infer"]["test_dice"]
    assert headline["ci95"] == metrics["03_infer"]["test_dice_ci95"]
    assert headline["baseline_value"] == metrics["03_infer"]["test_baselines"][best]["dice"]
    assert headline["baseline"] == seg2d.BASELINE_LABELS[best]


def test_notebook_tables_show_intervals(smoke_run: dict) -> None:
    outcome = smoke_run["outcome"]
    assert list(outcome.baselines.index) == ["all_background", "mean_mask", "segformer (this run)"]
    cell = outcome.baselines.loc["segformer (this run)", "dice"]
    assert cell.startswith(f"{outcome.test_metrics['test_dice']:.3f} (") and "–" in cell
    assert all("–" in outcome.per_class.loc[c].item() for c in seg_data.CLASSES)


# ---------------------------------------------------------------------------------------------- predict_files
def _write_mr_dicom(path: Path, pixels: np.ndarray) -> Path:
    """A single-frame MR slice holding ``pixels`` (uint16) as stored values, as a scanner export would."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR image storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.Rows, ds.Columns = "MR", *pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelSpacing = [1.5, 1.5]
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _read_mask(path: Path) -> np.ndarray:
    import cv2

    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED) > 0


def test_nbsupport_predict_on_files_in_no_manifest(smoke_run: dict, tmp_path: Path, capsys) -> None:
    """Kaggle's test layout (a copy of the test case) and a DICOM slice, outside the data root: masks per class and
    submission.csv equal to what 03_infer predicted for the same slices with the run's postprocess.json; a second
    call refuses to overwrite."""
    import shutil

    from nbsupport import cli

    test = smoke_run["manifest"][smoke_run["manifest"].split == "test"].reset_index(drop=True)
    case_day = test.id[0].rsplit("_slice_", 1)[0]
    case = case_day.split("_")[0]
    source = smoke_run["root"] / "train" / case / case_day
    shutil.copytree(source, tmp_path / "kaggle" / "test" / case / case_day)
    first = test.iloc[0]
    (tmp_path / "scanner").mkdir()
    _write_mr_dicom(tmp_path / "scanner" / "IM0001.dcm",
                    seg_data.read_slice(smoke_run["root"] / first.image))
    out = tmp_path / "predicted"
    argv = ["predict", "seg2d", "--run", str(smoke_run["run_dir"]), "-i", str(tmp_path / "kaggle"),
            str(tmp_path / "scanner" / "IM0001.dcm"), "-o", str(out), "--device", "cpu"]
    assert cli.main(argv) == 0

    inferred = {i: p for i, p in zip(smoke_run["inferred"].evaluation.manifest.id, smoke_run["inferred"].evaluation.pred)}
    ids = [i for i in test.id if i.startswith(case_day + "_")]
    for slice_id in ids + ["IM0001"]:
        expected = inferred[first.id if slice_id == "IM0001" else slice_id]
        got = np.stack([_read_mask(out / "masks" / f"{slice_id}_{c}.png") for c in seg_data.CLASSES])
        np.testing.assert_array_equal(got, expected, err_msg=slice_id)
    sub = pd.read_csv(out / "submission.csv", keep_default_na=False)
    assert sorted(set(sub.id)) == sorted(ids + ["IM0001"]) and len(sub) == 3 * (len(ids) + 1)
    row = test.iloc[1]
    for k, c in enumerate(seg_data.CLASSES):
        rle = sub[(sub.id == row.id) & (sub["class"] == c)].predicted.item()
        np.testing.assert_array_equal(rle_decode(rle, row.height, row.width), inferred[row.id][k])

    capsys.readouterr()
    assert cli.main(argv) == 2
    assert "already exist" in capsys.readouterr().err


def test_nbsupport_predict_names_a_bad_file_and_predicts_the_others(smoke_run: dict, tmp_path: Path,
                                                                    capsys) -> None:
    good = smoke_run["root"] / smoke_run["manifest"].image[0]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / good.name).write_bytes(good.read_bytes())
    (tmp_path / "in" / "slice_0009_266_266_1.50_1.50.png").write_bytes(good.read_bytes()[:200])  # truncated
    code = cli_predict(smoke_run, tmp_path / "in", tmp_path / "out")
    printed = capsys.readouterr().out
    assert code == 1 and "FAILED" in printed and "slice_0009_266_266_1.50_1.50.png" in printed
    stem = good.name[:-4]
    assert all((tmp_path / "out" / "masks" / f"{stem}_{c}.png").exists() for c in seg_data.CLASSES)
    assert len(pd.read_csv(tmp_path / "out" / "submission.csv")) == 3


def cli_predict(smoke_run: dict, inputs: Path, out: Path) -> int:
    from nbsupport import cli

    return cli.main(["predict", "seg2d", "--run", str(smoke_run["run_dir"]), "-i", str(inputs), "-o", str(out)])


def test_export_loads_with_auto_model_and_gives_the_workbench_logits(smoke_run: dict) -> None:
    """The acceptance test of the export: ``AutoModelForSemanticSegmentation.from_pretrained(<run>/export)`` on the
    workbench's own input gives the logits of ``load_trained_model`` (before its upsampling), and the model card
    names the run's test Dice with its interval but none of the data's case ids."""
    from transformers import AutoModelForSemanticSegmentation

    from nbsupport.export import EXPORT_DIR

    run_dir = smoke_run["run_dir"]
    export = run_dir / EXPORT_DIR
    exported = AutoModelForSemanticSegmentation.from_pretrained(export).eval()
    workbench = seg2d.load_trained_model(run_dir / "checkpoints" / "best")
    assert exported.config.id2label == dict(enumerate(seg_data.CLASSES))
    size = workbench.spec.image_size
    image = torch.rand(2, 1, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pixel_values = workbench.prepare(image)
        ours = workbench.hf(pixel_values=pixel_values).logits
        theirs = exported(pixel_values=pixel_values).logits
        upsampled = torch.nn.functional.interpolate(theirs, size=(size, size), mode="bilinear", align_corners=False)
        assert torch.allclose(upsampled, workbench(image), atol=1e-5)
    assert ours.abs().max() > 0  # attention kernels may differ (the export loads with the default one): 1e-5
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    card = (export / "README.md").read_text()
    metrics = smoke_run["outcome"].test_metrics
    dice, (low, high) = metrics["test_dice"], metrics["test_dice_ci95"]
    assert f"| test_dice | {dice:.4g} | {low:.4g}–{high:.4g} |" in card
    assert "profile: `smoke`" in card and smoke_run["params"]["manifest"] in card
    ids = [f"case{case}" for case in smoke_run["manifest"]["case"].unique()]  # Kaggle's ids: case123_day20_slice_0001
    assert ids and not [i for i in ids if i in card]
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(f".{EXPORT_DIR}.")]  # no temporary left
