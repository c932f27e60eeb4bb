"""A negation- and uncertainty-aware rule labeler of chest X-ray reports for the 14 CheXpert/CheXbert labels.

It follows the CheXpert labeler's three steps in a compact, readable form:

1. *mention*: each label has phrase patterns (``cardiomegaly``, ``enlarged heart``, ``pleural effusion`` ...);
2. *classification* of each mention within its clause (a sentence cut at "but", "however", ";" and at a new
   "there is/are"): an uncertainty cue before or after it (``possible``, ``cannot be excluded``) makes it
   uncertain (-1), else a negation cue (``no``, ``without``, ``negative for``, ``is not seen``) makes it
   negative (0), else positive (1). Some phrases are negative mentions by themselves ("heart size is normal");
3. *aggregation* over the report: positive beats uncertain beats negative; a label never mentioned is ``None``.
   ``No Finding`` is 1 when no pathology (every label but Support Devices) is positive or uncertain.

It is a stand-in for CheXbert (a BERT model that cannot be downloaded here) with the same output convention
(1 / 0 / -1 / None), used to score generated reports (clinical efficacy) and to label the seed CSV format, which
ships no labels.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np

LABELS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
    "Support Devices",
)
PATHOLOGIES = tuple(label for label in LABELS if label not in ("No Finding", "Support Devices"))

_MENTIONS: dict[str, tuple[str, ...]] = {
    "Enlarged Cardiomediastinum": (
        r"(enlarged|widened|widening of the|prominent) (cardio)?mediastin\w*",
        r"mediastinal (widening|enlargement)",
        r"(cardio)?mediastinal (silhouette|contours?) (is|are) (enlarged|widened)",
        r"(cardio)?mediastinum (is |appears )?(enlarged|widened)"),
    "Cardiomegaly": (
        r"cardiomegaly", r"(enlarged|large|enlargement of the) (heart|cardiac silhouette)",
        r"(heart|cardiac silhouette) (is |appears )?(enlarged|increased in size)", r"cardiac enlargement",
        r"heart size is (enlarged|increased)"),
    "Lung Opacity": (r"opacit(y|ies|ification)", r"infiltrat\w*", r"airspace disease", r"haziness"),
    "Lung Lesion": (r"nodul\w*", r"\bmass(es)?\b", r"\blesions?\b", r"neoplasm", r"tumou?r"),
    "Edema": (r"edema", r"vascular congestion", r"\bchf\b", r"heart failure"),
    "Consolidation": (r"consolidat\w*",),
    "Pneumonia": (r"pneumonia", r"infection"),
    "Atelectasis": (r"atelecta\w*", r"\bcollapse"),
    "Pneumothorax": (r"pneumothora\w*",),
    "Pleural Effusion": (r"(?<!pericardial )effusions?", r"pleural fluid", r"hydrothorax",
                         r"blunting of the (left |right |bilateral )?costophrenic angles?"),
    "Pleural Other": (r"pleural thickening", r"pleural plaques?", r"fibrothorax"),
    "Fracture": (r"fractur\w*",),
    "Support Devices": (
        r"\b(endotracheal|enteric|nasogastric|feeding|chest|tracheostomy|et|ng) tubes?\b", r"\bcatheters?\b",
        r"\b(central venous|picc|midline|internal jugular|subclavian) (line|catheter)s?\b", r"pacemaker",
        r"\bpacer\b", r"\bleads?\b", r"sternotomy wires", r"\bdevices?\b", r"\bport-?a-?cath\b", r"\bstents?\b",
        r"defibrillator"),
}
# Phrases that are themselves a negative statement about a label.
_NEGATIVE_PHRASES: dict[str, tuple[str, ...]] = {
    "Cardiomegaly": (r"heart size (is )?(normal|within normal limits)", r"normal (heart size|cardiac silhouette)",
                     r"cardiac silhouette is (normal|within normal limits|not enlarged)",
                     r"heart is (normal in size|not enlarged)"),
    "Enlarged Cardiomediastinum": (r"normal (cardio)?mediastinal (silhouette|contours?)",
                                   r"(cardio)?mediastinal (silhouette|contours?) (is|are) (normal|unremarkable|"
                                   r"within normal limits)",
                                   r"(cardio)?mediastinum is not (enlarged|widened)"),
}
_UNCERTAIN_BEFORE = (r"possible", r"possibly", r"\bmay\b", r"\bmight\b", r"\bcould\b", r"questionable",
                     r"suspicious for", r"concerning for", r"suggest\w*", r"equivocal", r"probable", r"likely",
                     r"cannot (be )?(excluded|ruled out)", r"can not be excluded", r"differential", r"versus",
                     r"\bvs\b", r"borderline")
_UNCERTAIN_AFTER = (r"cannot be (excluded|ruled out)", r"can not be excluded", r"not (be )?excluded",
                    r"is (possible|questioned|suspected)", r"\bversus\b", r"\bvs\b", r"not ruled out")
_NEGATION_BEFORE = (r"\bno\b", r"\bnot\b", r"\bwithout\b", r"negative for", r"free of", r"clear of",
                    r"resolution of", r"absence of", r"rule out", r"ruled out", r"\bnor\b", r"removal of",
                    r"\bresolved\b")
_NEGATION_AFTER = (r"(is|are|was|were) (not|no longer) (seen|present|identified|visualized|evident|appreciated)",
                   r"(is|are|has|have) (absent|resolved)", r"\bresolved\b", r"not (seen|identified|present)",
                   r"(has|have) been removed")
_CLAUSE_BREAK = re.compile(r"\b(?:but|however|although|though|except|whereas)\b|;|(?=\bthere (?:is|are)\b)")
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|\n+")

_compile = lambda patterns: [re.compile(p) for p in patterns]
_MENTION_RE = {label: _compile(p) for label, p in _MENTIONS.items()}
_NEGATIVE_RE = {label: _compile(p) for label, p in _NEGATIVE_PHRASES.items()}
_UNC_BEFORE_RE = _compile(_UNCERTAIN_BEFORE)
_UNC_AFTER_RE = _compile(_UNCERTAIN_AFTER)
_NEG_BEFORE_RE = _compile(_NEGATION_BEFORE)
_NEG_AFTER_RE = _compile(_NEGATION_AFTER)


def clauses(report: str) -> list[str]:
    """The report lower-cased and cut into sentences, then into clauses (the scope of a cue)."""
    out = []
    for sentence in _SENTENCE_BREAK.split(report.lower()):
        out.extend(part.strip(" ,.") for part in _CLAUSE_BREAK.split(sentence) if part and part.strip(" ,."))
    return out


def _classify(clause: str, start: int, end: int) -> int:
    before, after = clause[:start], clause[end:]
    if any(r.search(before) for r in _UNC_BEFORE_RE) or any(r.search(after) for r in _UNC_AFTER_RE):
        return -1
    if any(r.search(before) for r in _NEG_BEFORE_RE) or any(r.search(after) for r in _NEG_AFTER_RE):
        return 0
    return 1


def _aggregate(values: Iterable[int]) -> int | None:
    values = list(values)
    for v in (1, -1, 0):
        if v in values:
            return v
    return None


def label_report(report: str) -> dict[str, int | None]:
    """The 14 labels of one report: 1 positive, 0 negative, -1 uncertain, None not mentioned."""
    found: dict[str, list[int]] = {label: [] for label in LABELS}
    for clause in clauses(report):
        negative_spans = []
        for label, patterns in _NEGATIVE_RE.items():
            for pattern in patterns:
                for m in pattern.finditer(clause):
                    found[label].append(0)
                    negative_spans.append((m.start(), m.end()))
        for label, patterns in _MENTION_RE.items():
            for pattern in patterns:
                for m in pattern.finditer(clause):
                    if any(s <= m.start() < e for s, e in negative_spans):
                        continue
                    found[label].append(_classify(clause, m.start(), m.end()))
    labels = {label: _aggregate(found[label]) for label in LABELS}
    sick = any(labels[p] in (1, -1) for p in PATHOLOGIES)
    labels["No Finding"] = None if sick else 1
    return labels


def label_reports(reports: Sequence[str]) -> list[dict[str, int | None]]:
    """:func:`label_report` for each report."""
    return [label_report(r) for r in reports]


def positive_matrix(labels: Sequence[dict[str, int | float | None]], uncertain_as: int = 0) -> np.ndarray:
    """(N, 14) int array: 1 where a label is positive (and, with ``uncertain_as=1``, uncertain), else 0."""
    out = np.zeros((len(labels), len(LABELS)), dtype=np.int64)
    for i, row in enumerate(labels):
        for j, label in enumerate(LABELS):
            value = row.get(label)
            if value is None or (isinstance(value, float) and np.isnan(value)):
                continue
            out[i, j] = 1 if value == 1 else (uncertain_as if value == -1 else 0)
    return out
