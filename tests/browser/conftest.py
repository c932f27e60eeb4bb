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


# ---------------------------------------------------------------------------------------------- one page per system
def _system_cases(folder: Path) -> dict[str, list[dict]]:
    """Each system's attention-viewer cases, made by the system's own ``attention_viewer_cases`` from a small
    synthetic attention result (no model, no data set): the same dicts the 04 notebooks write to their pages."""
    import pandas as pd

    from nbsupport import ct_clip, cxr_report, prs_med, seg2d, textseg3d

    rng = np.random.default_rng(0)
    ct = synthetic_ct_case()
    hu, lesion = ct["image"].astype(np.float32), ct["masks"]["ground_truth"]
    cases: dict[str, list[dict]] = {}

    y, x = np.mgrid[0:64, 0:64]
    organs = np.stack([(y - 20) ** 2 + (x - 20) ** 2 < 64, (y - 40) ** 2 + (x - 44) ** 2 < 81,
                       (y - 48) ** 2 + (x - 16) ** 2 < 49])
    layer_maps = [(f"layer {i + 1}", rng.random((8, 8))) for i in range(3)]
    cases["seg2d"] = seg2d.attention_viewer_cases(seg2d.pipeline.AttentionResult(
        "case1_day0_slice_0060", (20, 20), layer_maps, [], 400 + 300 * np.sin(x / 9.0) * np.cos(y / 7.0), None,
        None, None, np.roll(organs, 2, axis=2), organs, (1.5, 1.5)))

    # textseg3d: IPL volumes (slice 0 superior); maps over the volume padded to 32 (40x96x112 -> 64x96x128)
    fusion = [rng.random((2, 32, 48, 64)).astype(np.float32), rng.random((2, 16, 24, 32)).astype(np.float32)]
    cases["textseg3d"] = textseg3d.attention_viewer_cases(textseg3d.pipeline.AttentionResult(
        "BC007", "N1, cT2, total mastectomy surgery, left side", ["a"], None, None, None, hu[::-1].copy(),
        lesion[::-1].copy(), np.roll(lesion, 2, axis=2)[::-1].copy(), fusion, (2.5, 0.7, 0.7)), scales=[1])

    xray = (120 + 80 * np.exp(-(((y - 32) / 20.0) ** 2 + ((x - 32) / 14.0) ** 2))).astype(np.uint8)
    cases["cxr_report"] = cxr_report.attention_viewer_cases(cxr_report.pipeline.AttentionResult(
        "patient00011/study2/view1_frontal", "The heart is enlarged. Small left pleural effusion.", None, None, None,
        None, xray, rng.random((14, 7, 7)).astype(np.float32), rng.random(14), "Cardiomegaly. Left effusion."))

    photo = np.stack([xray, xray // 2, xray // 3], axis=-1)
    finding = (y - 18) ** 2 + (x - 16) ** 2 < 60
    cases["prs_med"] = prs_med.attention_viewer_cases(prs_med.pipeline.AttentionResult(
        "polyp_endoscopy:3", "Where is the polyp?", "The polyp is in the top left.", "The polyp is in the top left.",
        [("question (mean)", rng.random((8, 8))), ("'left'", rng.random((8, 8)))], [], photo, None, None, None,
        np.roll(finding, 3, axis=1), finding, "polyp_endoscopy"))

    # ct_clip: a preprocessed (1, X=R, Y=A, Z=S) volume, 0..1 over -1000..1500 HU
    lo, hi = -1000.0, 1500.0
    ras = np.clip((hu[::-1, ::-1, ::-1].transpose(2, 1, 0) - lo) / (hi - lo), 0, 1)[None].astype(np.float16)
    npz = folder / "valid_1_a_1.npz"
    np.savez(npz, image=ras)
    top = pd.DataFrame({"rank": [1, 2], "report of": ["valid_1_a_1", "valid_2_a_1"], "similarity": [0.41, 0.22],
                        "is its own report": [True, False],
                        "report": ["Right upper lobe nodule. No effusion.", "Bilateral pleural effusion."]})
    cases["ct_clip"] = ct_clip.attention_viewer_cases(ct_clip.pipeline.AttentionResult(
        "valid_1_a_1", None, top, None, rng.random((28, 24, 10)).astype(np.float32), npz, (0.7, 0.7, 2.5),
        "Lung nodule is present.", "Right upper lobe nodule. No effusion."))
    return cases


SYSTEM_TEXT = {"seg2d": "attention of the query pixel", "textseg3d": "report prompt: N1, cT2",
               "cxr_report": "generated report:", "prs_med": "Q: Where is the polyp?",
               "ct_clip": "Grad-CAM relevance of the prompt"}


@pytest.fixture(scope="session")
def system_pages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``{system: 04_attention_viewer.html}`` for all five systems, written by ``save_case_viewer_html``."""
    from nbsupport.viz import save_case_viewer_html

    folder = tmp_path_factory.mktemp("system_pages")
    cases = _system_cases(folder)
    return {system: save_case_viewer_html(c, folder / f"{system}_04_attention_viewer.html",
                                          title=f"{system} attention") for system, c in cases.items()}
