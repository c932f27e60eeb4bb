"""Cached preprocessing: same parameters and inputs reuse the result, any change rebuilds it, a killed build is
never taken for a result."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest

from nbsupport.cache import KEY_FILE, cached_folder, fingerprint
from nbsupport.config import StageConfig, param


@dataclasses.dataclass(frozen=True)
class ResampleConfig(StageConfig):
    SYSTEM = "toy"
    STAGE = "01_preprocess"
    spacing_mm: float = param(1.5, "target spacing")
    window: tuple[float, float] = param((-160.0, 240.0), "HU window")


class Resampler:
    """A real (tiny) preprocessing step: block-average a stored array to ``spacing_mm`` and clip to a window."""

    def __init__(self, source: Path):
        self.source, self.builds = source, 0

    def __call__(self, cfg: ResampleConfig, root: Path) -> Path:
        params = {"spacing_mm": cfg.spacing_mm, "window": cfg.window}  # what the result depends on

        def build(folder: Path) -> None:
            self.builds += 1
            volume = np.load(self.source)
            factor = int(round(cfg.spacing_mm / 0.5))
            h, w = (s // factor * factor for s in volume.shape)
            small = volume[:h, :w].reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))
            np.save(folder / "volume.npy", np.clip(small, *cfg.window))

        return cached_folder("toy-resampled", params, build, inputs=[self.source], version="1", root=root)


@pytest.fixture()
def source(tmp_path: Path) -> Path:
    path = tmp_path / "ct.npy"
    np.save(path, np.random.default_rng(0).normal(0, 300, size=(12, 12)))
    return path


def test_same_parameters_reuse_and_any_change_rebuilds(source: Path, tmp_path: Path) -> None:
    resample, root = Resampler(source), tmp_path / "cache"
    cfg = ResampleConfig.from_params({"profile": "smoke"})
    first = resample(cfg, root)
    assert resample(cfg.replace(run_dir="elsewhere", seed=3), root) == first and resample.builds == 1

    coarser = resample(cfg.replace(spacing_mm=1.0), root)  # a parameter of the result
    assert coarser != first and resample.builds == 2
    assert np.load(coarser / "volume.npy").shape == (6, 6) and np.load(first / "volume.npy").shape == (4, 4)
    narrower = resample(cfg.replace(window=(-100.0, 100.0)), root)
    assert narrower not in (first, coarser) and resample.builds == 3
    assert np.load(narrower / "volume.npy").max() <= 100.0

    np.save(source, np.load(source) + 1.0)  # the input changed on disk
    os.utime(source, ns=(os.stat(source).st_atime_ns, os.stat(source).st_mtime_ns + 10**9))
    assert resample(cfg, root) != first and resample.builds == 4
    code_change = cached_folder("toy-resampled", {"spacing_mm": 1.5, "window": [-160.0, 240.0]},
                                lambda folder: (folder / "x").write_text("v2"), inputs=[source], version="2",
                                root=root)
    assert code_change.name != first.name


def test_a_killed_or_failed_build_is_never_a_cache_entry(source: Path, tmp_path: Path) -> None:
    root = tmp_path / "cache"

    def crash(folder: Path) -> None:
        (folder / "volume.npy").write_bytes(b"half")
        raise MemoryError("killed mid-build")

    with pytest.raises(MemoryError):
        cached_folder("toy", {"a": 1}, crash, inputs=[source], root=root)
    assert list(root.iterdir()) == []  # nothing that a later call could take for a result

    # What SIGKILL leaves (no exception handler ran): a temporary folder, and a folder without key.json.
    entry = cached_folder("toy", {"a": 1}, lambda f: (f / "ok").write_text("1"), inputs=[source], root=root)
    (entry / KEY_FILE).unlink()
    (entry / "ok").write_text("half")
    again = cached_folder("toy", {"a": 1}, lambda f: (f / "ok").write_text("1"), inputs=[source], root=root)
    assert again == entry and (again / "ok").read_text() == "1"


def test_fingerprint_is_order_free_but_type_and_value_sensitive() -> None:
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": (1, 2), "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 1.0}) != fingerprint({"a": "1"})
    cfg = ResampleConfig.from_params({"profile": "smoke"})
    assert fingerprint(cfg) != fingerprint(cfg.replace(spacing_mm=2.0))
    with pytest.raises(TypeError, match="cannot fingerprint a ndarray"):
        fingerprint({"a": np.zeros(2)})
