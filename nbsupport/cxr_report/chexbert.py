"""Who reads the 14 findings from a report for clinical efficacy: CheXbert where the user has its weights, else the
rule labeler; every CE number names its :class:`ReportLabeler`.

CheXbert (Smit et al., EMNLP 2020; stanfordmlgroup/CheXbert) is the labeler of the report-generation literature:
``bert-base-uncased`` with 14 linear heads on the [CLS] state of the last layer. Its published checkpoint
``chexbert.pth`` holds ``{"model_state_dict": {"module.bert.…", "module.linear_heads.<k>.weight/bias"}}`` (saved
from ``nn.DataParallel``; src/label.py strips ``module.``); it ships no tokenizer or config, which come from
``bert-base-uncased``. Nothing here downloads: ``chexbert_path`` names a folder holding ``chexbert.pth`` and the
``bert-base-uncased`` files ``config.json`` and ``vocab.txt`` (or the ``chexbert.pth`` inside such a folder).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nbsupport.cxr_report.labeler import LABELS, label_reports, positive_matrix
from nbsupport.paths import resolve_path

CHEXBERT_FILE = "chexbert.pth"
# stanfordmlgroup/CheXbert src/constants.py: CONDITIONS, the order of the 14 heads (No Finding last), and
# CLASS_MAPPING {0: Blank, 1: Positive, 2: Negative, 3: Uncertain}; the No Finding head has classes blank / positive.
CHEXBERT_CONDITIONS = ("Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
                       "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                       "Pleural Other", "Fracture", "Support Devices", "No Finding")
CHEXBERT_CLASS_VALUES = (None, 1, 0, -1)  # head class -> our label value (blank, positive, negative, uncertain)
MAX_TOKENS = 512  # src/bert_tokenizer.py: reports are cut at 512 tokens, the last one [SEP]
RULE_LABELER_NAME = "rule (nbsupport.cxr_report.labeler)"


@dataclasses.dataclass(frozen=True)
class ReportLabeler:
    """Reads the 14 labels (1 / 0 / -1 / None) from report texts. ``name`` is what metrics.json (``ce_labeler``) and
    the notebooks cite beside every CE number; ``note`` says why it is not CheXbert, where it is not."""

    name: str
    label: Callable[[Sequence[str]], list[dict[str, int | None]]]
    note: str = ""

    def positives(self, reports: Sequence[str]) -> np.ndarray:
        """(N, 14) 0/1: the positive findings of each report (uncertain counts as not positive)."""
        return positive_matrix(self.label(list(reports)))


RULE_LABELER = ReportLabeler(RULE_LABELER_NAME, label_reports)


class CheXbert(nn.Module):
    """CheXbert's network (stanfordmlgroup/CheXbert src/models/bert_labeler.py, class ``bert_labeler``): BERT,
    dropout 0.1 on the [CLS] state of the last layer, 13 heads of 4 classes and one of 2 (No Finding)."""

    def __init__(self, config: Any):
        from transformers import BertModel

        super().__init__()
        self.bert = BertModel(config)
        self.dropout = nn.Dropout(0.1)
        hidden = config.hidden_size
        self.linear_heads = nn.ModuleList([nn.Linear(hidden, 4) for _ in range(13)] + [nn.Linear(hidden, 2)])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """(B, T) token ids and mask -> 14 logit tensors, (B, 4) x 13 then (B, 2), in ``CHEXBERT_CONDITIONS``."""
        cls = self.dropout(self.bert(input_ids, attention_mask=attention_mask)[0][:, 0])
        return [head(cls) for head in self.linear_heads]


def chexbert_files(chexbert_path: str | Path) -> tuple[Path, Path]:
    """``(chexbert.pth, the folder with bert-base-uncased's config.json and vocab.txt)`` of ``chexbert_path``.

    Raises:
        FileNotFoundError: naming each file that is missing and where to get it.
    """
    path = resolve_path(chexbert_path)
    checkpoint = path / CHEXBERT_FILE if path.is_dir() else path
    folder = checkpoint.parent
    missing = [str(p) for p in (checkpoint, folder / "config.json", folder / "vocab.txt") if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"chexbert_path {chexbert_path!r}: missing {', '.join(missing)}; expected a folder holding CheXbert's "
            f"{CHEXBERT_FILE} (e.g. from the StanfordAIMI/RRG_scorers repository) and bert-base-uncased's config.json "
            "and vocab.txt; or set chexbert_path = '' for the rule labeler")
    return checkpoint, folder


def load_chexbert(chexbert_path: str | Path, device: str | torch.device = "cpu") -> tuple[CheXbert, Any]:
    """CheXbert from its published checkpoint (read without running code: ``weights_only``) and its tokenizer, in
    eval mode on ``device``. Every tensor must fit (one report line); a ``position_ids`` buffer that older
    transformers versions stored is ignored by name."""
    from transformers import AutoTokenizer, BertConfig

    from nbsupport.weights import load_into, read_state_dict

    checkpoint, folder = chexbert_files(chexbert_path)
    config = BertConfig.from_pretrained(str(folder), local_files_only=True)
    model = CheXbert(config)
    state = {k.removeprefix("module."): v for k, v in read_state_dict(checkpoint, key="model_state_dict").items()}
    load_into(model, state, checkpoint, allow_unexpected=("bert.embeddings.position_ids",))
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return model.eval().to(device), tokenizer


@torch.no_grad()
def chexbert_labels(model: CheXbert, tokenizer: Any, reports: Sequence[str], batch_size: int = 16
                    ) -> list[dict[str, int | None]]:
    """The 14 labels of each report as CheXbert's src/label.py gives them: whitespace collapsed, [CLS] text [SEP]
    cut at 512 tokens, each head's arg-max class mapped to 1 / 0 / -1 / None."""
    device = next(model.parameters()).device
    out: list[dict[str, int | None]] = []
    for start in range(0, len(reports), batch_size):
        texts = [" ".join(str(r).split()) for r in reports[start:start + batch_size]]
        batch = tokenizer(texts, truncation=True, max_length=MAX_TOKENS, padding=True, return_tensors="pt")
        logits = model(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        classes = torch.stack([head.argmax(dim=1) for head in logits], dim=1).cpu().tolist()  # (B, 14)
        for row in classes:
            values = {name: CHEXBERT_CLASS_VALUES[c] for name, c in zip(CHEXBERT_CONDITIONS, row)}
            out.append({label: values[label] for label in LABELS})
    return out


def report_labeler(chexbert_path: str, device: str | torch.device = "cpu") -> ReportLabeler:
    """CheXbert from ``chexbert_path`` (its files must be there: a typo must not quietly change the scorer), or the
    rule labeler when ``chexbert_path`` is '' (with the note that says so)."""
    if not chexbert_path:
        return dataclasses.replace(RULE_LABELER, note="CheXbert not available (chexbert_path not set): rule labeler "
                                                      "used, not comparable to published CheXbert CE-F1")
    checkpoint, _ = chexbert_files(chexbert_path)
    model, tokenizer = load_chexbert(chexbert_path, device)
    return ReportLabeler(f"CheXbert ({checkpoint})", lambda reports: chexbert_labels(model, tokenizer, reports))
