"""Position phrases parsed from free-text answers, and position accuracy (the '# --- position reasoning' section)."""
from __future__ import annotations

import pytest

from nbsupport.metrics import POSITIONS, most_frequent_position_baseline, parse_position, position_accuracy


@pytest.mark.parametrize("text, expected", [
    ("top left", "top left"),
    ("The tumour is in the top right of the image.", "top right"),
    ("It is located in the upper-left region.", "top left"),
    ("the lesion sits in the lower_right quadrant", "bottom right"),
    ("left lower part of the scan", "bottom left"),
    ("on the right side, towards the top of the image", "top right"),
    ("The polyp appears at the centre of the image.", "center"),
    ("It lies in the middle.", "center"),
    ("top left, close to the center", "top left"),
    ("BOTTOM RIGHT", "bottom right"),
])
def test_parse_position_reads_the_phrase(text: str, expected: str) -> None:
    assert parse_position(text) == expected


@pytest.mark.parametrize("text", ["", "no finding", "the top of the image", "left", None, float("nan")])
def test_parse_position_names_none_when_the_text_gives_no_position(text: object) -> None:
    assert parse_position(text) is None


def test_every_label_parses_to_itself() -> None:
    assert [parse_position(p) for p in POSITIONS] == list(POSITIONS)


def test_position_accuracy_counts_unparsed_answers_as_wrong() -> None:
    result = position_accuracy(["It is in the top left.", "no idea", "centre", "bottom right"],
                               ["top left", "top right", "center", "bottom left"])
    assert result == {"accuracy": 0.5, "n": 4, "n_unparsed": 1}


def test_position_accuracy_refuses_unscorable_input() -> None:
    with pytest.raises(ValueError, match="2 predictions but 1"):
        position_accuracy(["top left", "center"], ["center"])
    with pytest.raises(ValueError, match="names none"):
        position_accuracy(["top left"], ["somewhere"])


def test_most_frequent_position_baseline() -> None:
    result = most_frequent_position_baseline(["center", "top left", "center"], ["center", "top left", "center", "center"])
    assert result == {"position": "center", "accuracy": 0.75, "n": 4}
    # ties go to the first label of POSITIONS, so the baseline does not depend on row order
    assert most_frequent_position_baseline(["bottom right", "top left"], ["top left"])["position"] == "top left"
