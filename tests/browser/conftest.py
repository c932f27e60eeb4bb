"""Pages for the browser tests, made once per session: a case viewer (CT volume + MR slice), bertviz pages, an
executed notebook's HTML export and an index linking them. Screenshots go to ``$NBSUPPORT_SCREENSHOTS`` when set
(``make screenshots`` points it at docs/screenshots), else to a temporary folder."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from chromium import missing_browser, start_chromium


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if Path(str(item.fspath)).parent == Path(__file__).parent:
            item.add_marker(pytest.mark.browser)
            item.add_marker(pytest.mark.slow)  # a browser, a kernel or a JupyterLab server per session


@pytest.fixture(scope="session")
def browser():
    why = missing_browser()
    assert not why, why  # CI installs chromium; a missing browser must not pass silently
    driver = start_chromium()
    yield driver
    driver.quit()


@pytest.fixture(scope="session")
def screenshot_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = os.environ.get("NBSUPPORT_SCREENSHOTS")
    path = Path(target) if target else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def synthetic_ct_case() -> dict:
    """A 40-slice CT-like volume in Hounsfield units: air, a soft-tissue body, lung-density regions, a dense
    'bone' rod and a spherical lesion, with a ground truth and a shifted prediction and an attention volume."""
    z, y, x = np.mgrid[0:40, 0:96, 0:112]
    body = ((y - 48) / 42.0) ** 2 + ((x - 56) / 50.0) ** 2 < 1
    lungs = (((y - 44) / 22.0) ** 2 + ((np.abs(x - 56) - 22) / 14.0) ** 2 < 1) & (z > 8)
    bone = (y - 80) ** 2 + (x - 56) ** 2 < 36
    lesion = (z - 22) ** 2 + ((y - 40) * 0.8) ** 2 + ((x - 34) * 0.8) ** 2 < 7 ** 2
    hu = np.full(z.shape, -1000.0)
    hu[body] = 40.0
    hu[lungs] = -850.0
    hu[bone] = 700.0
    hu[lesion] = 60.0
    hu += np.random.default_rng(0).normal(0, 15, hu.shape)
    attention = np.exp(-(((z[::4, ::8, ::8] - 22) / 8.0) ** 2 + ((y[::4, ::8, ::8] - 40) / 16.0) ** 2
                         + ((x[::4, ::8, ::8] - 34) / 16.0) ** 2))
    return {"image": hu, "masks": {"ground_truth": lesion, "prediction": np.roll(lesion, 2, axis=2)},
            "spacing": (2.5, 0.7, 0.7), "modality": "CT", "attention": attention, "title": "synthetic CT",
            "text": "Findings: a 1 cm soft-tissue nodule in the right upper lobe.\nImpression: nodule, follow-up CT."}


def synthetic_mr_case() -> dict:
    y, x = np.mgrid[0:80, 0:96]
    image = 200 + 600 * np.exp(-(((y - 40) / 25.0) ** 2 + ((x - 48) / 30.0) ** 2))
    stomach = ((y - 30) / 10.0) ** 2 + ((x - 60) / 14.0) ** 2 < 1
    return {"image": image, "masks": {"stomach": stomach}, "spacing": (1.5, 1.2), "modality": "MR",
            "title": "synthetic MR slice", "text": "Prompt: segment the stomach."}


@dataclass
class Pages:
    case_viewer: Path
    bertviz_head: Path
    bertviz_model: Path
    notebook_html: Path
    index: Path


NOTEBOOK_CELLS = [
    """import numpy as np
import torch
from transformers import BertConfig, BertModel
from nbsupport.viz import attention_view, slice_viewer""",
    """image = np.add.outer(np.arange(64.0), np.arange(64.0))
mask = np.zeros((64, 64), bool)
mask[20:40, 24:44] = True
slice_viewer([{'image': image, 'masks': {'lesion': mask}, 'title': 'demo', 'text': 'a square lesion'}])""",
    """config = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=37, attn_implementation='eager')
torch.manual_seed(0)
out = BertModel(config).eval()(torch.tensor([[1, 5, 7, 9, 2]]), output_attentions=True)
attention_view(out.attentions, ['[CLS]', 'no', 'acute', 'findings', '[SEP]'])""",
]


@pytest.fixture(scope="session")
def pages(tmp_path_factory: pytest.TempPathFactory) -> Pages:
    import nbformat
    import papermill
    import torch
    from transformers import BertConfig, BertModel

    from nbsupport.report import export_notebook_html, write_index
    from nbsupport.viz import save_attention_html, save_case_viewer_html

    outputs = tmp_path_factory.mktemp("outputs")
    run = outputs / "runs" / "browser-run" / "viewers"
    run.mkdir(parents=True)
    case_viewer = save_case_viewer_html([synthetic_ct_case(), synthetic_mr_case()], run / "04_case_viewer.html",
                                        title="Synthetic cases")
    config = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37, attn_implementation="eager")
    torch.manual_seed(0)
    out = BertModel(config).eval()(torch.tensor([[1, 5, 7, 9, 11, 2]]), output_attentions=True)
    tokens = ["[CLS]", "small", "left", "pleural", "effusion", "[SEP]"]
    head = save_attention_html(out.attentions, tokens, run / "04_attention_head_view.html", title="head view")
    model = save_attention_html(out.attentions, tokens, run / "04_attention_model_view.html", view="model",
                                title="model view")
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"name": "nbsupport", "display_name": "Python (nbsupport)", "language": "python"},
                   "language_info": {"name": "python"}}
    nb.cells = [nbformat.v4.new_code_cell(src) for src in NOTEBOOK_CELLS]
    source = run / "source.ipynb"
    nbformat.write(nb, source)
    executed = run / "03_viewer_demo.ipynb"
    # the kernel's environment as under `nbsupport run`, without the tests' MPLBACKEND=Agg
    backend = os.environ.pop("MPLBACKEND", None)
    try:
        papermill.execute_notebook(str(source), str(executed), kernel_name="nbsupport", progress_bar=False,
                                   cwd=str(run))
    finally:
        if backend is not None:
            os.environ["MPLBACKEND"] = backend
    source.unlink()
    notebook_html = export_notebook_html(executed)
    (run / "metrics.json").write_text('{"03_viewer_demo": {"dice": 0.5}}')
    index = write_index(outputs)
    return Pages(case_viewer, head, model, notebook_html, index)
