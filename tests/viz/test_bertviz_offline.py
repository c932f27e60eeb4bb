"""bertviz pages carry their libraries: no CDN script tag remains and the vendored files are the ones bertviz asks for."""
from __future__ import annotations

import re

import torch
from transformers import BertConfig, BertModel

from nbsupport.viz.bertviz_offline import VENDOR, VENDORED_SCRIPTS, attention_view, save_attention_html


def tiny_attentions():
    config = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=20, attn_implementation="eager")
    torch.manual_seed(0)
    return BertModel(config).eval()(torch.tensor([[1, 4, 6, 2]]), output_attentions=True).attentions


def test_saved_views_have_no_remote_script_and_inline_d3_jquery(tmp_path):
    attentions = tiny_attentions()
    for view in ("head", "model"):
        page = save_attention_html(attentions, ["[CLS]", "no", "edema", "[SEP]"], tmp_path / f"{view}.html",
                                   view=view).read_text()
        assert not re.search(r"<script[^>]*\bsrc=", page), "a <script src> would need the network"
        assert "cdnjs" not in page.split("require.config")[0], "the CDN is named before bertviz's own config"
        assert "d3 v5.7.0" in page or "https://d3js.org v5.7.0" in page
        assert "jQuery v2.2.4" in page
        assert '"edema"' in page


def test_notebook_display_object_is_offline_too():
    html = attention_view(tiny_attentions(), ["[CLS]", "a", "b", "[SEP]"]).data
    assert not re.search(r"<script[^>]*\bsrc=", html)


def test_vendored_files_ship_with_their_licences():
    for name in VENDORED_SCRIPTS:
        assert (VENDOR / name).stat().st_size > 50_000
    assert "Mike Bostock" in (VENDOR / "LICENSE-d3.txt").read_text()
    assert "jQuery Foundation" in (VENDOR / "LICENSE-jquery.txt").read_text() or \
        "JS Foundation" in (VENDOR / "LICENSE-jquery.txt").read_text()
