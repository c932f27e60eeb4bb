"""``nbsupport predict prs_med``: a trained smoke run answers a question about images that are in no manifest and
in another folder, writes the answer and the mask (at each image's own size) per image, names a file it cannot
read without stopping the others, and refuses to overwrite its outputs."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import cv2
import pandas as pd
import pytest

from nbsupport import cli
from nbsupport.prs_med import pipeline

QUESTION = "Where is the polyp in this image?"


def _own_images(smoke_run: Any, folder: Path) -> list[Path]:
    """Two of the run's test images, copied under new names (one in a sub-folder) into ``folder``."""
    images = sorted((smoke_run.data_root).rglob("test_images/*.png"))[:2]
    targets = [folder / "first.png", folder / "more" / "second.png"]
    for source, target in zip(images, targets):
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
    return targets


@pytest.mark.slow
def test_predict_answers_and_segments_new_files_and_never_overwrites(
        smoke_run: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    own = _own_images(smoke_run, tmp_path / "own")
    out = tmp_path / "answers"
    argv = ["predict", "prs_med", "--run", str(smoke_run.run.path), "-i", str(tmp_path / "own"), "-o", str(out),
            "--question", QUESTION, "--device", "cpu"]
    assert cli.main(argv) == 0
    table = pd.read_csv(out / pipeline.ANSWERS_TABLE)
    assert list(table["image"]) == [str(p) for p in own] and set(table["question"]) == {QUESTION}
    for image in own:
        mask = cv2.imread(str(out / f"{image.stem}_mask.png"), cv2.IMREAD_UNCHANGED)
        assert mask.shape == cv2.imread(str(image)).shape[:2] and set(mask.ravel()) <= {0, 255}
        answer = json.loads((out / f"{image.stem}_answer.json").read_text())
        assert answer["question"] == QUESTION and isinstance(answer["answer"], str)
        assert answer["mask"] == f"{image.stem}_mask.png"
    before = (out / "first_mask.png").stat().st_mtime_ns

    capsys.readouterr()
    assert cli.main(argv) == cli.EXIT_USAGE
    assert "already exist" in capsys.readouterr().err
    assert (out / "first_mask.png").stat().st_mtime_ns == before


@pytest.mark.slow
def test_predict_names_an_unreadable_image_and_answers_the_others(smoke_run: Any, tmp_path: Path) -> None:
    own = _own_images(smoke_run, tmp_path / "own")
    (tmp_path / "own" / "broken.png").write_bytes(b"not a png")
    summary = pipeline.predict_files(smoke_run.run.path, [tmp_path / "own"], tmp_path / "out", device="cpu",
                                     question=QUESTION)
    assert [(p.name, "not a readable image" in why) for p, why in summary.failed] == [("broken.png", True)]
    assert {p.name for p in summary.written} == {f"{p.stem}_{kind}" for p in own
                                                  for kind in ("mask.png", "answer.json")} | {"answers.csv"}


def test_predict_needs_a_question() -> None:
    with pytest.raises(pipeline.PredictError, match="--question"):
        pipeline.predict_files("unused", ["unused"], "unused", question=" ")
