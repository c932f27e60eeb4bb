"""CheXbert from a checkpoint in the published layout (a tiny BERT here), and the labeler choice for CE."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nbsupport.cxr_report.chexbert import (
    CHEXBERT_CONDITIONS,
    RULE_LABELER,
    CheXbert,
    chexbert_labels,
    load_chexbert,
    report_labeler,
)
from nbsupport.cxr_report.labeler import LABELS

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "there", "is", "no", "card", "##iomegaly", "edema", "."]


def _head(condition: str) -> int:
    return CHEXBERT_CONDITIONS.index(condition)


@pytest.fixture(scope="module")
def chexbert_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``chexbert.pth`` as stanfordmlgroup/CheXbert saves it (``{"model_state_dict": {"module.…"}, "epoch": …}``,
    from nn.DataParallel, with the ``position_ids`` buffer older transformers stored) for a 1-layer BERT, beside its
    config.json and vocab.txt. Every head's weights are 0 and its bias picks one class: Cardiomegaly positive (1),
    Edema negative (2), Pneumothorax uncertain (3), No Finding positive (1), the rest blank (0)."""
    from transformers import BertConfig

    folder = tmp_path_factory.mktemp("chexbert")
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64)
    config.save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    torch.manual_seed(0)
    model = CheXbert(config)
    with torch.no_grad():
        for head in model.linear_heads:
            head.weight.zero_()
            head.bias.copy_(torch.eye(head.bias.numel())[0] * 5)  # blank
        for condition, cls in (("Cardiomegaly", 1), ("Edema", 2), ("Pneumothorax", 3), ("No Finding", 1)):
            bias = model.linear_heads[_head(condition)].bias
            bias.copy_(torch.eye(bias.numel())[cls] * 5)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    state["module.bert.embeddings.position_ids"] = torch.arange(64)[None]
    torch.save({"model_state_dict": state, "epoch": 3}, folder / "chexbert.pth")
    return folder


def test_published_checkpoint_layout_loads_strictly_and_labels(chexbert_folder: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    model, tokenizer = load_chexbert(chexbert_folder)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    n = len(model.state_dict())
    assert line.startswith(f"{chexbert_folder / 'chexbert.pth'}: loaded {n} of {n} tensors (0 missing, 1 unexpected)")
    assert line.endswith("allowed unexpected: bert.embeddings.position_ids")
    labels = chexbert_labels(model, tokenizer, ["There is cardiomegaly.", "No edema.\n\n", ""])
    expected = {label: None for label in LABELS}
    expected.update({"Cardiomegaly": 1, "Edema": 0, "Pneumothorax": -1, "No Finding": 1})
    assert labels == [expected] * 3
    assert list(labels[0]) == list(LABELS)  # our label order, whatever the head order


def test_the_labeler_is_chexbert_where_its_files_are_and_the_rule_labeler_where_none_is_named(
        chexbert_folder: Path, tmp_path: Path) -> None:
    labeler = report_labeler(str(chexbert_folder / "chexbert.pth"))
    assert labeler.name == f"CheXbert ({chexbert_folder / 'chexbert.pth'})" and not labeler.note
    assert labeler.positives(["anything"]).tolist() == [[int(label in ("Cardiomegaly", "No Finding"))
                                                         for label in LABELS]]
    rule = report_labeler("")
    assert rule.name == RULE_LABELER.name and "chexbert_path not set" in rule.note
    (tmp_path / "chexbert.pth").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"missing .*config\.json, .*vocab\.txt"):
        report_labeler(str(tmp_path))
