"""The synthetic CT-RATE demo: reports state the drawn findings (with negations), findings are drawn where they
are visible, volumes are in Hounsfield units, and a written demo folder is reused or refused safely."""
from __future__ import annotations

import json

import numpy as np
import pytest

from nbsupport.ct_clip import data as ct_data
from nbsupport.ct_clip import demo_data
from nbsupport.demo import DEMO_MARKER


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory):
    return demo_data.write_demo_dataset(tmp_path_factory.mktemp("ctrate") / "data", n_train_patients=5,
                                        n_valid_patients=3, scale=0.2)


def test_demo_reports_state_the_drawn_findings_with_negations(demo_root):
    volumes = ct_data.scan_dataset(demo_root)
    for row in volumes.itertuples():
        text = row.findings.lower()
        negated = "no pleural effusion" in text or "pleural effusion is not observed" in text
        assert negated != bool(getattr(row, "_" + str(list(volumes.columns).index("Pleural effusion") + 1))), text
    assert volumes[list(ct_data.LABELS)].sum().loc[list(set(ct_data.LABELS) - set(demo_data.DEMO_LABELS))].sum() == 0


def test_demo_reports_name_every_finding_by_its_term_present_and_absent():
    """Like CT-RATE's reports, the demo names each finding by its canonical term in some reports where it is present
    and some where it is absent (besides descriptive sentences), and never with a negation when present."""
    named = {name: {True: 0, False: 0} for name in demo_data.DEMO_LABELS}
    for k in range(200):
        rng = np.random.default_rng([7, k])
        case = demo_data._demo_case(rng)
        findings, impressions = demo_data._demo_report(case, rng)
        sentences = findings.split(". ")[1:-1]  # one sentence per demo label, in DEMO_LABELS order
        assert len(sentences) == len(demo_data.DEMO_LABELS), findings
        for name, sentence in zip(demo_data.DEMO_LABELS, sentences):
            present = case["present"][name]
            negated = sentence.lower().startswith("no ") or " not " in sentence or "normal" in sentence
            assert negated != present, (name, present, sentence)
            named[name][present] += name.lower() in sentence.lower()
            assert (name in impressions) == present, (name, impressions)
    assert all(count[True] >= 10 and count[False] >= 10 for count in named.values()), named


def test_demo_nodules_lie_in_aerated_lung():
    """Every nodule centre is lung air in the volume drawn without the nodules (not heart, effusion, consolidation)."""
    shape, spacing = (64, 64, 48), (5.0, 5.0, 8.0)
    checked = 0
    for k in range(40):
        case = demo_data._demo_case(np.random.default_rng([3, k]))
        if not case["present"]["Lung nodule"]:
            continue
        without = {**case, "noise": 0.0, "present": {**case["present"], "Lung nodule": False}}
        hu = demo_data._render_demo_volume(without, shape, spacing, np.random.default_rng(0))
        for x, y, z, _ in case["nodules"]:
            i, j, kk = (round(x / spacing[0] + (shape[0] - 1) / 2), round(y / spacing[1] + (shape[1] - 1) / 2),
                        round(z / spacing[2] + (shape[2] - 1) / 2))
            assert hu[i, j, kk] < -500, (k, x, y, z, hu[i, j, kk])
            checked += 1
    assert checked >= 10


def test_demo_volumes_hold_the_findings_in_hounsfield_units(demo_root):
    volumes = ct_data.scan_dataset(demo_root)
    for row in volumes.itertuples():
        ct = ct_data.read_volume(demo_root, row.volume)
        assert (ct.stored.dtype, ct.slope, ct.intercept) == (np.int16, 1.0, 0.0)  # _fixed: HU stored
        hu = ct.stored.astype(np.float32)
        assert np.percentile(hu, 1) < -900  # air outside the body
        metal = volumes.loc[volumes.volume == row.volume, "Medical material"].item()
        assert (hu.max() > 2000) == bool(metal), row.volume


def test_a_complete_demo_is_reused_and_a_foreign_folder_refused(demo_root, tmp_path):
    marker = json.loads((demo_root / DEMO_MARKER).read_text())
    assert marker["complete"] and marker["n_volumes"] == 8
    assert marker["params"]["generator"] == "nbsupport.ct_clip.data.write_demo_dataset"  # existing demos reused
    stamp = (demo_root / ct_data.REPORT_FILES["train"]).stat().st_mtime_ns
    demo_data.write_demo_dataset(demo_root, n_train_patients=5, n_valid_patients=3, scale=0.2)
    assert (demo_root / ct_data.REPORT_FILES["train"]).stat().st_mtime_ns == stamp
    (tmp_path / "mine.txt").write_text("somebody's data")
    with pytest.raises(FileExistsError, match=DEMO_MARKER):
        demo_data.write_demo_dataset(tmp_path, n_train_patients=1, n_valid_patients=0, scale=0.2)


def test_demo_volumes_are_standard_gzip_streams_that_nibabel_reads(demo_root):
    """The demo writes its .nii.gz with ISA-L (gzip_nifti, not zlib's default level): still one standard gzip
    stream, which Python's zlib inflates to the same NIfTI bytes nibabel decodes (the real data's format)."""
    import gzip

    import nibabel as nib

    row = ct_data.scan_dataset(demo_root).iloc[0]
    path = demo_root / row.nifti
    raw = gzip.decompress(path.read_bytes())
    assert raw[344:348] == b"n+1\x00"  # the NIfTI-1 single-file magic
    assert gzip.decompress(demo_data.gzip_nifti(raw)) == raw
    image = nib.load(str(path))
    assert np.array_equal(np.asanyarray(image.dataobj), ct_data.read_volume(demo_root, row.volume).stored)
