"""Report-generation text metrics as the literature computes them: BLEU-1..4, METEOR, ROUGE-L and CIDEr-D of
pycocoevalcap 1.2 (the scorer of R2Gen, R2GenGPT and CXPMRG-Bench), one reference report per generated report.

Why not a library: sacrebleu and nltk smooth BLEU or treat hypotheses shorter than n tokens differently, so their
BLEU-3/4 on short reports are far from the published numbers. BLEU, ROUGE-L and CIDEr-D are re-implemented here
(pycocoevalcap is never imported at run time; the tests compare every score with it on hundreds of report pairs),
and METEOR runs the ``meteor-1.5.jar`` that the pycocoevalcap wheel ships, under Java, as pycocoevalcap runs it: the
jar is the metric, so the package is a run-time dependency for its files only.

Tokens: the report-generation papers score reports cleaned by R2Gen's ``clean_report_mimic_cxr`` (R2Gen
modules/tokenizers.py:46-58): lower case, one ``.`` token per sentence, most punctuation deleted; pycocoevalcap then
splits the cleaned string on whitespace. :func:`tokenize_report` does that cleaning, and every scorer here sees its
tokens. Scores are recomputed many times for bootstrap intervals, so per-report and per-pair statistics are cached
and a resampled corpus only re-adds them.
"""
from __future__ import annotations

import atexit
import functools
import importlib.metadata
import math
import re
import shutil
import subprocess
import tempfile
import threading
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

MAX_ORDER = 4  # BLEU-1..4 and CIDEr-D's n-gram orders (pycocoevalcap Bleu(4), Cider(n=4))
ROUGE_BETA = 1.2  # pycocoevalcap rouge/rouge.py:43
CIDER_SIGMA = 6.0  # pycocoevalcap cider/cider.py:18, the Gaussian length penalty of CIDEr-D

# ---------------------------------------------------------------------------------------------- tokens
# R2Gen's sentence cleaner deletes [.,?;*!%^&_+():-\[\]{}] (where ':-\[' is the range ':' .. '[', i.e. also
# ;<=>?@ and upper case, gone after lower-casing) and the characters " / \ ' (tokenizers.py:54-55). Hyphens stay.
_DELETED = re.compile(r"""[.,?;*!%^&_+():;<=>@\[\]{}"/\\']""")
# Numbered-list markers "1. " .. "5. " end a sentence (tokenizers.py:50-52 replace them by ". ").
_LIST_MARKER = re.compile(r"(?:^|(?<=\s))[1-5]\.\s")
_SENTENCE_END = re.compile(r"\.\s+")


@functools.lru_cache(maxsize=65536)
def _tokens(text: str) -> tuple[str, ...]:
    text = re.sub(r"\s+", " ", text.lower())
    text = re.sub(r"\.{2,}", ".", text)
    text = _LIST_MARKER.sub(". ", text)
    tokens: list[str] = []
    for sentence in _SENTENCE_END.split(text):
        words = _DELETED.sub("", sentence).split()
        if words:  # R2Gen keeps an empty sentence as a lone "."; a report without words has no tokens here
            tokens.extend(words + ["."])
    return tuple(tokens)


def tokenize_report(text: Any) -> list[str]:
    """Tokens of a report as the report-generation literature scores it (R2Gen's cleaning, see module doc).

    ``"1. Small left pleural effusion.  2. No pneumothorax"`` -> ``["small", "left", "pleural", "effusion", ".",
    "no", "pneumothorax", "."]``. Decimal points and slashes are deleted, not split on (``"3.5"`` -> ``"35"``), as
    R2Gen does; ``None``/NaN and blank text give no tokens.
    """
    return list(_tokens(_text(text)))


def _text(report: Any) -> str:
    return "" if report is None or (isinstance(report, float) and math.isnan(report)) else str(report)


def _texts(predictions: Sequence[Any], references: Sequence[Any]) -> tuple[list[str], list[str]]:
    """The reports as strings (``None``/NaN: empty), after checking there is one reference per prediction."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references; expected one each")
    if not len(predictions):
        raise ValueError("no reports to score")
    return [_text(p) for p in predictions], [_text(r) for r in references]


def _ngrams(tokens: Sequence[str], max_order: int) -> Counter:
    """Counts of all 1..max_order-grams (pycocoevalcap bleu_scorer.py:23-33 and cider_scorer.py:11: ``precook``)."""
    return Counter(tuple(tokens[i:i + n]) for n in range(1, max_order + 1) for i in range(len(tokens) - n + 1))


@functools.lru_cache(maxsize=65536)
def _report_ngrams(text: str, max_order: int) -> Counter:
    return _ngrams(_tokens(text), max_order)


# ---------------------------------------------------------------------------------------------- BLEU
@functools.lru_cache(maxsize=65536)
def _bleu_pair(hyp: str, ref: str, max_order: int) -> tuple[int, int, tuple[int, ...], tuple[int, ...]]:
    """(hypothesis length, reference length, guessed n-grams per order, clipped correct n-grams per order):
    pycocoevalcap ``cook_test`` (bleu_scorer.py:60-84); with one reference its 'closest' length is that one."""
    h, r = _report_ngrams(hyp, max_order), _report_ngrams(ref, max_order)
    testlen, reflen = len(_tokens(hyp)), len(_tokens(ref))
    guess = tuple(max(0, testlen - k + 1) for k in range(1, max_order + 1))
    correct = [0] * max_order
    for gram, count in h.items():
        correct[len(gram) - 1] += min(r.get(gram, 0), count)
    return testlen, reflen, guess, tuple(correct)


def bleu_scores(predictions: Sequence[str], references: Sequence[str], max_order: int = MAX_ORDER
                ) -> dict[str, float]:
    """Corpus BLEU-1..``max_order`` in [0, 1] exactly as pycocoevalcap's ``Bleu(4)`` (one reference per report).

    Clipped n-gram matches and candidate n-grams are summed over the corpus; BLEU-n is the geometric mean of the
    1..n precisions, each ``(matches + 1e-15) / (candidates + 1e-9)`` (no smoothing: a corpus without a single
    matching 4-gram scores ~0, not sacrebleu's smoothed value), times the brevity penalty ``exp(1 - r / c)`` when
    the summed hypothesis length c is below the summed closest-reference length r (bleu_scorer.py:199-257, the
    ``option='closest'`` of bleu.py:40). Hypotheses shorter than n tokens contribute no n-grams.
    """
    hyps, refs = _texts(predictions, references)
    testlen = reflen = 0
    guess, correct = [0] * max_order, [0] * max_order
    for hyp, ref in zip(hyps, refs):
        t, r, g, c = _bleu_pair(hyp, ref, max_order)
        testlen, reflen = testlen + t, reflen + r
        for k in range(max_order):
            guess[k] += g[k]
            correct[k] += c[k]
    small, tiny = 1e-9, 1e-15  # bleu_scorer.py:201-202
    scores, product = {}, 1.0
    for k in range(max_order):
        product *= (correct[k] + tiny) / (guess[k] + small)
        scores[f"bleu{k + 1}"] = product ** (1.0 / (k + 1))
    ratio = (testlen + tiny) / (reflen + small)  # bleu_scorer.py:254
    if ratio < 1:
        scores = {name: value * math.exp(1 - 1 / ratio) for name, value in scores.items()}
    return scores


# ---------------------------------------------------------------------------------------------- ROUGE-L
def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


@functools.lru_cache(maxsize=65536)
def _rouge_pair(hyp: str, ref: str, beta: float) -> float:
    # pycocoevalcap splits the joined tokens on " " (rouge.py:58, 62): no tokens is one empty token, so two empty
    # reports match (score 1) and an empty one against a non-empty one scores 0
    h, r = _tokens(hyp) or ("",), _tokens(ref) or ("",)
    lcs = _lcs_length(h, r)
    precision, recall = lcs / len(h), lcs / len(r)
    if not (precision and recall):
        return 0.0
    return (1 + beta ** 2) * precision * recall / (recall + beta ** 2 * precision)


def rouge_l(predictions: Sequence[str], references: Sequence[str], beta: float = ROUGE_BETA) -> float:
    """Mean per-report ROUGE-L F-measure in [0, 1] as pycocoevalcap's ``Rouge``: LCS precision P and recall R of
    the tokens combined as ``(1 + beta^2) P R / (R + beta^2 P)`` with ``beta = 1.2`` (rouge.py:43-75)."""
    hyps, refs = _texts(predictions, references)
    return float(np.mean([_rouge_pair(h, r, beta) for h, r in zip(hyps, refs)]))


# ---------------------------------------------------------------------------------------------- CIDEr-D
# Every n-gram scored in this process gets an integer id, so document frequencies and tf-idf sums are numpy
# operations over the corpus instead of dict look-ups (what makes 1000 bootstrap resamples affordable).
_GRAM_IDS: dict[tuple[str, ...], int] = {}


@functools.lru_cache(maxsize=65536)
def _cider_pair(hyp: str, ref: str, max_order: int, sigma: float
                ) -> tuple[float, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """What a (hypothesis, reference) pair contributes whatever the document frequencies: its length penalty, the
    ids of the reference's n-grams (for df), and for every n-gram of either side its id, order - 1 and
    ``(min(h, r) r, h^2, r^2)`` of its counts. With tf-idf weights ``w >= 0``, ``min(h w, r w) r w = min(h, r) r
    w^2``: the clipped dot product and both squared norms are these counts times ``w^2`` (cider_scorer.py:110-159).
    """
    h, r = _report_ngrams(hyp, max_order), _report_ngrams(ref, max_order)
    # pycocoevalcap's "length" counts bigrams, not tokens (cider_scorer.py:128: ``if n == 1``)
    delta = float(sum(c for g, c in h.items() if len(g) == 2) - sum(c for g, c in r.items() if len(g) == 2))
    penalty = math.e ** (-(delta ** 2) / (2 * sigma ** 2))  # cider_scorer.py:158
    grams = list(h) + [g for g in r if g not in h]  # a fixed order: sums come out the same in every process
    ids = np.array([_GRAM_IDS.setdefault(g, len(_GRAM_IDS)) for g in grams], dtype=np.int64)
    orders = np.array([len(g) - 1 for g in grams], dtype=np.int64)
    hc = np.array([h.get(g, 0) for g in grams], dtype=np.float64)
    rc = np.array([r.get(g, 0) for g in grams], dtype=np.float64)
    return penalty, ids[rc > 0], ids, orders, np.stack([np.minimum(hc, rc) * rc, hc * hc, rc * rc])


def cider_d(predictions: Sequence[str], references: Sequence[str], max_order: int = MAX_ORDER,
            sigma: float = CIDER_SIGMA) -> float:
    """Corpus CIDEr-D (Vedantam et al. 2015) exactly as pycocoevalcap's ``Cider``, one reference per report.

    Per n-gram order: tf-idf vectors with ``idf = log(N) - log(max(1, df))`` (N reports in the corpus, df =
    references containing the n-gram: document frequencies come from the references being scored,
    cider_scorer.py:98-103, 120, 162), the clipped similarity ``sum_g min(h_g, r_g) r_g / (|h| |r|)``, times the
    length penalty ``exp(-delta^2 / (2 sigma^2))`` where delta is the difference in bigram counts; the score is
    10 x the mean over orders and reports (cider_scorer.py:173-178). An n-gram in every reference weighs nothing,
    so a single-report corpus scores 0.
    """
    hyps, refs = _texts(predictions, references)
    pairs = Counter(zip(hyps, refs))  # a bootstrap resample repeats pairs: each is prepared once
    times = np.array(list(pairs.values()), dtype=np.float64)
    parts = [_cider_pair(h, r, max_order, sigma) for h, r in pairs]
    ref_ids = np.concatenate([p[1] for p in parts])
    doc_freq = np.bincount(ref_ids, weights=np.repeat(times, [len(p[1]) for p in parts]), minlength=len(_GRAM_IDS))
    weight2 = (math.log(float(len(hyps))) - np.log(np.maximum(1.0, doc_freq))) ** 2
    ids = np.concatenate([p[2] for p in parts])
    cell = np.concatenate([k * max_order + p[3] for k, p in enumerate(parts)])  # (pair, order) of each entry
    values = np.concatenate([p[4] for p in parts], axis=1) * weight2[ids]
    dot, norm_h, norm_r = (np.bincount(cell, v, minlength=len(parts) * max_order) for v in values)
    with np.errstate(divide="ignore", invalid="ignore"):
        similarity = np.where((norm_h != 0) & (norm_r != 0), dot / (np.sqrt(norm_h) * np.sqrt(norm_r)), dot)
    penalties = np.array([p[0] for p in parts])
    per_pair = 10.0 * (similarity.reshape(len(parts), max_order) * penalties[:, None]).mean(axis=1)
    return float((per_pair * times).sum() / len(hyps))


# ---------------------------------------------------------------------------------------------- METEOR
class MeteorUnavailable(RuntimeError):
    """METEOR cannot be computed here (no Java, or no meteor-1.5.jar); it is never estimated instead."""


# pycocoevalcap meteor/meteor.py:18-19: the command, run in the jar's folder (its data/ holds the paraphrase table)
_METEOR_ARGS = ("-jar", "-Xmx2G", "meteor-1.5.jar", "-", "-", "-stdio", "-l", "en", "-norm")


def meteor_jar() -> Path:
    """The ``meteor-1.5.jar`` that the installed pycocoevalcap wheel ships (found from the package's installed file
    list, without importing it), or :class:`MeteorUnavailable` naming what to install."""
    try:
        jar = Path(importlib.metadata.distribution("pycocoevalcap").locate_file("pycocoevalcap/meteor/meteor-1.5.jar"))
    except importlib.metadata.PackageNotFoundError:
        raise MeteorUnavailable("METEOR needs meteor-1.5.jar from the pycocoevalcap package: "
                                "pip install 'pycocoevalcap==1.2'") from None
    if not jar.is_file() or not (jar.parent / "data" / "paraphrase-en.gz").is_file():
        raise MeteorUnavailable(f"METEOR: {jar} or its data/paraphrase-en.gz is missing; reinstall pycocoevalcap")
    return jar


def _java() -> str:
    java = shutil.which("java")
    if java is None:
        raise MeteorUnavailable("METEOR needs Java: no `java` on PATH (Debian: apt-get install default-jre-headless)")
    return java


# A meteor-1.5 statistics line (MeteorStats.toString / MeteorStats(String) in the jar): test and reference length,
# test and reference function words, then per matcher module (exact, stem, synonym, paraphrase) the test-content,
# reference-content, test-function and reference-function matches, then chunks, test and reference word matches.
_STATS_LENGTH = 23
_CHUNKS = 20


def _is_exact_match(stats: np.ndarray) -> np.ndarray:
    """Pairs whose every word matched in one chunk: MeteorStats.addStats (in the jar) adds every statistic of a pair
    to the corpus total except the chunk count of such a pair."""
    test_matches = stats[:, 4:20:4].sum(1) + stats[:, 6:20:4].sum(1)
    ref_matches = stats[:, 5:20:4].sum(1) + stats[:, 7:20:4].sum(1)
    return (test_matches == stats[:, 0]) & (ref_matches == stats[:, 1]) & (stats[:, _CHUNKS] == 1)


class _MeteorProcess:
    """One running meteor-1.5 (``-stdio``) scoring as pycocoevalcap's ``Meteor`` does (meteor.py:28-58): a
    ``SCORE`` line per pair answers its sufficient statistics, an ``EVAL`` line scores statistics. Meteor's corpus
    score is computed from the statistics summed over pairs (MeteorStats.addStats), so they are summed here the same
    way and sent as one ``EVAL`` line: the score comes from meteor's own code, and a resampled corpus (bootstrap)
    costs one line instead of one per pair. Per-pair statistics do not depend on what was scored before: cached."""

    def __init__(self, java: str, jar: Path):
        self._stderr = tempfile.TemporaryFile()
        self._process = subprocess.Popen([java, *_METEOR_ARGS], cwd=jar.parent, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=self._stderr)
        self._stats: dict[tuple[str, str], np.ndarray] = {}
        self._lock = threading.Lock()

    def _line(self, line: str) -> str:
        self._process.stdin.write(f"{line}\n".encode())
        self._process.stdin.flush()
        return self._read()

    def _read(self) -> str:
        out = self._process.stdout.readline()
        if not out:
            self._stderr.seek(0)
            error = self._stderr.read().decode(errors="replace").strip()[-2000:]
            raise RuntimeError(f"meteor-1.5.jar stopped (exit code {self._process.poll()}): {error}")
        return out.decode().strip()

    def _pair_stats(self, hyp: str, ref: str) -> np.ndarray:
        if (hyp, ref) not in self._stats:
            # meteor.py:54-55: "SCORE ||| reference ||| hypothesis", '|||' removed from the hypothesis (and here
            # from the reference too, where it would break the line format)
            clean_h, clean_r = (s.replace("|||", "").replace("  ", " ") for s in (hyp, ref))
            line = self._line(f"SCORE ||| {clean_r} ||| {clean_h}")
            stats = np.array(line.split(), dtype=np.float64)
            if stats.shape != (_STATS_LENGTH,):
                raise RuntimeError(f"meteor-1.5.jar answered {line!r} to SCORE, expected {_STATS_LENGTH} numbers")
            self._stats[hyp, ref] = stats
        return self._stats[hyp, ref]

    def score(self, hyps: Sequence[str], refs: Sequence[str]) -> float:
        with self._lock:
            stats = np.stack([self._pair_stats(h, r) for h, r in zip(hyps, refs)])
            total = stats.sum(0)
            total[_CHUNKS] = stats[~_is_exact_match(stats), _CHUNKS].sum()
            # counts are whole numbers: written without a decimal point, any locale's Scanner reads them
            line = " ".join(f"{v:.0f}" if v.is_integer() else repr(float(v)) for v in total)
            self._line(f"EVAL ||| {line}")  # its answer: the score of this one "segment", then the corpus score
            return float(self._read())

    def exited(self) -> bool:
        return self._process.poll() is not None

    def close(self) -> None:
        if not self.exited():
            self._process.stdin.close()
            self._process.kill()
            self._process.wait()
        self._stderr.close()


_METEOR: dict[Path, _MeteorProcess] = {}
_METEOR_LOCK = threading.Lock()


@atexit.register
def _close_meteor() -> None:
    for process in _METEOR.values():
        process.close()
    _METEOR.clear()


def meteor(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus METEOR in [0, 1] by meteor-1.5 (``-l en -norm``), exactly as pycocoevalcap's ``Meteor``.

    The jar runs under Java as a subprocess that stays up for the session (starting it loads the paraphrase table,
    ~10 s); it sees the :func:`tokenize_report` tokens joined by spaces, like the other scorers. The corpus score is
    meteor's aggregate over all pairs (its last ``EVAL`` answer), not a mean of per-report scores.

    Raises:
        MeteorUnavailable: no ``java`` on PATH or no meteor-1.5.jar (pycocoevalcap not installed).
    """
    hyps, refs = _texts(predictions, references)
    jar, java = meteor_jar(), _java()
    with _METEOR_LOCK:
        if jar not in _METEOR or _METEOR[jar].exited():
            _METEOR[jar] = _MeteorProcess(java, jar)
        process = _METEOR[jar]
    return process.score([" ".join(_tokens(h)) for h in hyps], [" ".join(_tokens(r)) for r in refs])


def meteor_unavailable_reason() -> str | None:
    """Why :func:`meteor` cannot run here (Java or the jar missing), or ``None`` when it can."""
    try:
        _java()
        meteor_jar()
    except MeteorUnavailable as error:
        return str(error)
    return None


def text_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """All report-generation text metrics of pycocoevalcap: ``bleu1``..``bleu4``, ``meteor``, ``rouge_l``,
    ``cider_d``. Where METEOR cannot run, ``meteor`` is ``None`` and ``meteor_unavailable`` says why."""
    scores: dict[str, Any] = dict(bleu_scores(predictions, references))
    reason = meteor_unavailable_reason()
    scores["meteor"] = None if reason else meteor(predictions, references)
    if reason:
        scores["meteor_unavailable"] = reason
    scores["rouge_l"] = rouge_l(predictions, references)
    scores["cider_d"] = cider_d(predictions, references)
    return scores
