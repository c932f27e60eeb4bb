"""BLEU-1..4, ROUGE-L, CIDEr-D and METEOR against pycocoevalcap 1.2 itself on 240 synthetic report pairs.

pycocoevalcap is fed what the report-generation papers feed it: ``{id: [cleaned report]}`` dicts of space-joined
tokens (R2Gen modules/metrics.py), here our ``tokenize_report`` tokens. The corpus mixes exact copies, edited
copies, unrelated reports, hypotheses shorter than 4 tokens and empty ones; corpus-level scores are also compared
on sub-corpora (a single pair, only short or empty hypotheses, a resample with repeated pairs).
"""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nbsupport.metrics import (
    MeteorUnavailable, bleu_scores, cider_d, meteor, rouge_l, text_scores, tokenize_report,
)

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-6

FINDINGS = ["heart size is normal", "the heart is mildly enlarged", "no pleural effusion",
            "small left pleural effusion", "no pneumothorax", "right lower lobe consolidation", "lungs are clear",
            "stable cardiomediastinal silhouette", "mild pulmonary edema", "left-sided picc tip in the svc",
            "degenerative changes of the spine", "no acute cardiopulmonary process", "bibasilar atelectasis",
            "a 3.5 cm nodule in the right upper lobe"]


def _report(rng: random.Random) -> str:
    sentences = rng.sample(FINDINGS, rng.randint(1, 4))
    return " ".join(s.capitalize() + rng.choice([".", ".", ",", ";"]) for s in sentences)


def _edited(rng: random.Random, text: str) -> str:
    words = text.split()
    for _ in range(rng.randint(1, 4)):
        op = rng.choice(["drop", "swap", "insert", "repeat"])
        i = rng.randrange(len(words)) if words else 0
        if op == "drop" and words:
            words.pop(i)
        elif op == "swap" and len(words) > 1:
            j = rng.randrange(len(words))
            words[i], words[j] = words[j], words[i]
        elif op == "insert":
            words.insert(i, rng.choice(["no", "small", "effusion", "the", "stable", "."]))
        elif words:
            words.insert(i, words[i])  # a repeated word: clipped counts
    return " ".join(words)


def _corpus(n: int = 240, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    hyps, refs = [], []
    for i in range(n):
        ref = _report(rng)
        kind = i % 8
        hyp = {0: ref, 1: "", 2: rng.choice(["Normal.", "No effusion", "Stable"]), 3: _report(rng)}.get(
            kind, _edited(rng, ref))
        hyps.append(hyp)
        refs.append(ref)
    return hyps, refs


HYPS, REFS = _corpus()
_rng = random.Random(1)
_RESAMPLE = [_rng.randrange(len(HYPS)) for _ in range(len(HYPS))]
SUBCORPORA = {
    "all 240": (HYPS, REFS),
    "one pair": (HYPS[4:5], REFS[4:5]),
    "short and empty hypotheses": ([h for i, h in enumerate(HYPS) if i % 8 in (1, 2)],
                                   [r for i, r in enumerate(REFS) if i % 8 in (1, 2)]),
    "resample with repeats": ([HYPS[i] for i in _RESAMPLE], [REFS[i] for i in _RESAMPLE]),
    "exact copies": ([r for i, r in enumerate(REFS) if i % 8 == 0], [r for i, r in enumerate(REFS) if i % 8 == 0]),
}


def _coco(hyps: list[str], refs: list[str]) -> tuple[dict, dict]:
    gts = {i: [" ".join(tokenize_report(r))] for i, r in enumerate(refs)}
    res = {i: [" ".join(tokenize_report(h))] for i, h in enumerate(hyps)}
    return gts, res


def test_corpus_has_the_hard_cases() -> None:
    lengths = [len(tokenize_report(h)) for h in HYPS]
    assert len(HYPS) >= 200
    assert lengths.count(0) >= 25 and sum(0 < n < 4 for n in lengths) >= 25
    assert sum(h == r for h, r in zip(HYPS, REFS)) >= 25


@pytest.mark.parametrize("name", SUBCORPORA)
def test_bleu_matches_pycocoevalcap(name: str) -> None:
    from pycocoevalcap.bleu.bleu import Bleu

    hyps, refs = SUBCORPORA[name]
    theirs, _ = Bleu(4).compute_score(*_coco(hyps, refs), verbose=0)
    ours = bleu_scores(hyps, refs)
    assert [ours[f"bleu{n}"] for n in range(1, 5)] == pytest.approx(theirs, abs=TOL)


@pytest.mark.parametrize("name", SUBCORPORA)
def test_rouge_l_matches_pycocoevalcap(name: str) -> None:
    from pycocoevalcap.rouge.rouge import Rouge

    hyps, refs = SUBCORPORA[name]
    theirs, _ = Rouge().compute_score(*_coco(hyps, refs))
    assert rouge_l(hyps, refs) == pytest.approx(float(theirs), abs=TOL)


@pytest.mark.parametrize("name", SUBCORPORA)
def test_cider_d_matches_pycocoevalcap(name: str) -> None:
    from pycocoevalcap.cider.cider import Cider

    hyps, refs = SUBCORPORA[name]
    theirs, _ = Cider().compute_score(*_coco(hyps, refs))
    assert cider_d(hyps, refs) == pytest.approx(float(theirs), abs=TOL)


def test_both_empty_reports_follow_pycocoevalcap() -> None:
    from pycocoevalcap.rouge.rouge import Rouge

    # pycocoevalcap splits "" into one empty token, so two empty reports have ROUGE-L 1
    assert rouge_l(["", "No effusion."], ["", "Effusion."]) == pytest.approx(
        Rouge().compute_score({0: [""], 1: ["effusion ."]}, {0: [""], 1: ["no effusion ."]})[0])
    assert bleu_scores([""], ["Heart is normal."])["bleu1"] == pytest.approx(0.0, abs=1e-12)


def _need_java() -> None:
    # METEOR runs wherever Java is installed (CI installs Debian's default-jre-headless): there it must pass; a
    # developer machine without Java skips, and CI fails instead of skipping
    if shutil.which("java") is None:
        message = "METEOR needs Java: apt-get install default-jre-headless"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def coco_meteor():
    _need_java()
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    yield scorer
    del scorer


@pytest.mark.slow
def test_meteor_matches_pycocoevalcap(coco_meteor) -> None:
    for name, (hyps, refs) in SUBCORPORA.items():
        theirs, _ = coco_meteor.compute_score(*_coco(hyps, refs))
        assert meteor(hyps, refs) == pytest.approx(theirs, abs=TOL), name


@pytest.mark.slow
def test_text_scores_has_every_metric(coco_meteor) -> None:
    scores = text_scores(HYPS, REFS)
    assert list(scores) == ["bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider_d"]
    assert scores["meteor"] == pytest.approx(meteor(HYPS, REFS))
    assert scores["cider_d"] == cider_d(HYPS, REFS)


def test_meteor_without_java_is_unavailable_not_estimated(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH with no java on it
    with pytest.raises(MeteorUnavailable, match="no `java` on PATH.*default-jre-headless"):
        meteor(HYPS[:3], REFS[:3])
    scores = text_scores(HYPS[:3], REFS[:3])
    assert scores["meteor"] is None and "default-jre-headless" in scores["meteor_unavailable"]
    assert scores["bleu1"] == bleu_scores(HYPS[:3], REFS[:3])["bleu1"]


def test_scoring_does_not_import_pycocoevalcap() -> None:
    # pycocoevalcap is only where meteor-1.5.jar is found (from its installed file list); scoring never imports it
    code = ("import sys; from nbsupport import text_metrics as t; h, r = ['No effusion.'] * 2, ['Effusion.'] * 2; "
            "t.bleu_scores(h, r); t.rouge_l(h, r); t.cider_d(h, r); assert t.meteor_jar().is_file(); "
            "assert not [m for m in sys.modules if m.startswith('pycocoevalcap')], 'imported'")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
