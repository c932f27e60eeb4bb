"""The `nbsupport` command line: argument parsing, -p typing, demo-data dispatch, bench, help."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest

import nbsupport
from nbsupport import cli


@pytest.fixture(autouse=True)
def _outputs(tmp_path, monkeypatch):
    monkeypatch.setenv("NBSUPPORT_OUTPUTS", str(tmp_path / "outputs"))


# ---------------------------------------------------------------------------------------------- -p values
@pytest.mark.parametrize("raw, expected", [
    ("3", 3), ("-2", -2), ("010", 10), ("1_000", 1000),
    ("1e-4", 1e-4), ("2.5E3", 2500.0), ("0.5", 0.5), (".5e1", 5.0),
    ("true", True), ("False", False),
    ("[1,2]", [1, 2]), ("[1e-4, 0.1]", [1e-4, 0.1]), ("{a: 1}", {"a": 1}),
    ("", None), ("null", None),
    ("segformer", "segformer"), ("nvidia/mit-b0", "nvidia/mit-b0"), ("yes", "yes"), ("off", "off"),
    ("2024-01-01", "2024-01-01"), ("1:30", "1:30"), ("[unclosed", "[unclosed"), ("e5", "e5"),
])
def test_param_values_are_typed_like_yaml(raw, expected):
    value = cli.parse_value(raw)
    assert value == expected and type(value) is type(expected)


def test_run_arguments_parse_into_systems_profile_and_typed_params():
    args = cli.build_parser().parse_args(
        ["run", "seg2d", "ct_clip", "--profile", "smoke", "-p", "epochs=3", "-p", "lr=1e-4", "--param",
         "checkpoint=", "-p", "name=a=b", "--run-id", "exp-1", "--kernel", "k2", "--verbose"])
    assert args.systems == ["seg2d", "ct_clip"] and args.profile == "smoke"
    assert cli.parse_params(args.param) == {"epochs": 3, "lr": 1e-4, "checkpoint": None, "name": "a=b"}
    assert (args.run_id, args.kernel, args.verbose) == ("exp-1", "k2", True)
    assert cli.build_parser().parse_args(["run", "all"]).profile == "demo"


def test_seeds_parse_as_distinct_integers(capsys):
    args = cli.build_parser().parse_args(["run", "seg2d", "--seeds", "0,1,2", "--profile", "smoke"])
    assert args.seeds == [0, 1, 2]
    assert cli.build_parser().parse_args(["run", "seg2d"]).seeds is None
    for bad in ("0,x", "1,1", ""):
        with pytest.raises(SystemExit) as exc:
            cli.build_parser().parse_args(["run", "seg2d", "--seeds", bad])
        assert exc.value.code == 2
    assert "--seeds names a seed twice" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["epochs", "=3", "1x=2", "a b=1"])
def test_malformed_param_is_a_usage_error(bad, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run", "seg2d", "-p", bad])
    assert exit_.value.code == 2
    assert "name=value" in capsys.readouterr().err


def test_wrong_profile_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run", "seg2d", "--profile", "huge"])
    assert exit_.value.code == 2 and "smoke" in capsys.readouterr().err


def _tiny_system(root: Path) -> Path:
    folder = root / "tiny_sys"
    folder.mkdir(parents=True)
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "nbsupport", "display_name": "Python (nbsupport)", "language": "python"}
    cell = nbformat.v4.new_code_cell('profile = "smoke"\nrun_dir = ""\nepochs = 1')
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell, nbformat.v4.new_code_cell("print(epochs)")]
    nbformat.write(nb, folder / "01_train.ipynb")
    return root


def test_run_with_unknown_or_repeated_param_exits_2_before_running(tmp_path, capsys):
    notebooks = _tiny_system(tmp_path / "nbs")
    code = cli.main(["run", "tiny_sys", "--notebooks-dir", str(notebooks), "--outputs-dir", str(tmp_path / "out"),
                     "-p", "epoch=2"])
    err = capsys.readouterr().err
    assert code == 2 and "unknown parameter(s) 'epoch'" in err and "Allowed parameters: epochs" in err
    code = cli.main(["run", "tiny_sys", "--notebooks-dir", str(notebooks), "-p", "epochs=2", "-p", "epochs=3"])
    assert code == 2 and "given twice" in capsys.readouterr().err
    code = cli.main(["run", "other_sys", "--notebooks-dir", str(notebooks)])
    assert code == 2 and "available: tiny_sys" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- demo-data
def _package_systems(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, demo_data: dict[str, str]) -> Iterator[None]:
    """``nbsupport.<name>.demo_data`` with the given source per name, from a temporary folder added to the
    nbsupport package path (and dropped from ``sys.modules`` afterwards)."""
    pkg_root = tmp_path / "pkg"
    for name, source in demo_data.items():
        (pkg_root / name).mkdir(parents=True)
        (pkg_root / name / "__init__.py").write_text("")
        (pkg_root / name / "demo_data.py").write_text(textwrap.dedent(source))
    monkeypatch.setattr(nbsupport, "__path__", [*nbsupport.__path__, str(pkg_root)])
    yield
    for module in [m for m in sys.modules if m.startswith(tuple(f"nbsupport.{name}" for name in demo_data))]:
        del sys.modules[module]


@pytest.fixture
def fake_system(tmp_path, monkeypatch):
    """``nbsupport.fake_sys.demo_data`` (writes made.json) and ``nbsupport.broken_sys.demo_data`` (no DEMO_SIZES)."""
    yield from _package_systems(tmp_path, monkeypatch, {"fake_sys": '''
        import json
        from pathlib import Path

        DEMO_SIZES = {"smoke": {"n_cases": 2, "image_size": 16}, "demo": {"n_cases": 20, "image_size": 64}}

        def write_demo_dataset(root, n_cases, image_size):
            root = Path(root)
            root.mkdir(parents=True, exist_ok=True)
            (root / "made.json").write_text(json.dumps({"n_cases": n_cases, "image_size": image_size}))
            return root / "made.json"
    ''', "broken_sys": "def write_demo_dataset(root):\n    pass\n"})


@pytest.fixture
def marked_system(tmp_path, monkeypatch):
    """``nbsupport.marked_sys.demo_data``: a generator that marks its folder as the real ones do (nbsupport.demo)."""
    yield from _package_systems(tmp_path, monkeypatch, {"marked_sys": '''
        from pathlib import Path
        from nbsupport.demo import finish_demo_folder, start_demo_folder

        DEMO_SIZES = {"smoke": {"n_cases": 2, "shape": (4, 4)}, "demo": {"n_cases": 5, "shape": (8, 8)}}

        def write_demo_dataset(root, n_cases, shape):
            params = {"n_cases": n_cases, "shape": list(shape), "generator": "marked_sys", "format_version": 1}
            if start_demo_folder(Path(root), params, required=("cases.txt",)):
                return root
            (Path(root) / "cases.txt").write_text("\\n".join(f"case{i}" for i in range(n_cases)))
            finish_demo_folder(Path(root), params)
            return root
    '''})


def test_demo_data_dispatches_to_the_system_data_module(fake_system, tmp_path, capsys):
    assert {"fake_sys", "broken_sys"} <= set(cli.demo_data_systems())
    code = cli.main(["demo-data", "fake_sys", "--root", str(tmp_path / "data"), "--size", "smoke"])
    assert code == 0
    assert json.loads((tmp_path / "data" / "fake_sys" / "made.json").read_text()) == {"n_cases": 2, "image_size": 16}
    assert "n_cases=2" in capsys.readouterr().out


def test_demo_data_defaults_to_nbsupport_data_and_demo_size(fake_system, tmp_path, monkeypatch):
    monkeypatch.setenv("NBSUPPORT_DATA", str(tmp_path / "env-data"))
    assert cli.main(["demo-data", "fake_sys"]) == 0
    made = json.loads((tmp_path / "env-data" / "fake_sys" / "made.json").read_text())
    assert made == {"n_cases": 20, "image_size": 64}


def test_demo_data_rejects_unknown_and_malformed_systems(fake_system, tmp_path, capsys):
    assert cli.main(["demo-data", "no_such_sys", "--root", str(tmp_path)]) == 2
    assert "no module nbsupport.no_such_sys.demo_data" in capsys.readouterr().err
    # Every module is checked before anything is written.
    assert cli.main(["demo-data", "fake_sys", "broken_sys", "--root", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "broken_sys" in err and "data.py" in err and "DEMO_SIZES" in err
    assert not (tmp_path / "d").exists()


def test_ensure_demo_data_writes_what_a_run_would_miss_and_nothing_else(marked_system, tmp_path):
    root, lines = tmp_path / "data", []
    cases = root / "marked_sys" / "cases.txt"
    assert cli.ensure_demo_data("marked_sys", "full", root=root, log=lines.append) is None
    assert not root.exists() and not lines, "the full profile reads the user's data, never the demo"

    assert cli.ensure_demo_data("marked_sys", "smoke", root=root, log=lines.append) == root / "marked_sys"
    assert cases.read_text().split() == ["case0", "case1"]
    assert "demo data missing at" in lines[0] and "nbsupport demo-data marked_sys --size smoke" in lines[0]
    lines.clear()
    assert cli.ensure_demo_data("marked_sys", "smoke", root=root, log=lines.append) is None and not lines

    # The smoke demo is too small for the demo profile: written again at the demo size.
    assert cli.ensure_demo_data("marked_sys", "demo", root=root, log=lines.append) == root / "marked_sys"
    assert len(cases.read_text().split()) == 5 and "of the smoke size" in lines[0]
    lines.clear()
    assert cli.ensure_demo_data("marked_sys", "smoke", root=root, log=lines.append) is None, "demo size serves smoke"

    marker = root / "marked_sys" / "nbsupport_demo.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "complete": False}))
    assert cli.ensure_demo_data("marked_sys", "smoke", root=root, log=lines.append) == root / "marked_sys"
    assert "incomplete" in lines[0] and len(cases.read_text().split()) == 2

    own = tmp_path / "own" / "marked_sys"
    own.mkdir(parents=True)
    (own / "scan.png").write_bytes(b"not a demo")
    assert cli.ensure_demo_data("marked_sys", "smoke", root=tmp_path / "own", log=lines.append) is None
    assert [p.name for p in own.iterdir()] == ["scan.png"], "a folder without the marker is never touched"
    assert cli.ensure_demo_data("no_generator_sys", "smoke", root=root) is None


# ---------------------------------------------------------------------------------------------- bench, index, models
def test_bench_runs_the_system_script_with_passthrough_args(tmp_path, monkeypatch, capfd):
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "bench_demo.py").write_text(
        "import json, sys\nprint(json.dumps({'argv': sys.argv[1:], 'exe': sys.executable}))\nsys.exit(3)\n")
    monkeypatch.setenv("NBSUPPORT_HOME", str(tmp_path))
    assert cli.main(["bench", "demo", "--repeats", "2", "--size", "64"]) == 3
    out = capfd.readouterr().out
    ran = json.loads(out.strip().splitlines()[-1])
    assert ran == {"argv": ["--repeats", "2", "--size", "64"], "exe": sys.executable}
    assert cli.main(["bench", "nosuch"]) == 2
    err = capfd.readouterr().err
    assert "no benchmark" in err and "available: demo" in err


def test_prepare_models_command_skips_complete_folders(tmp_path, capsys):
    from nbsupport.models import COMPLETE_MARKER, MINILM_DIR, SMOLLM2_DIR

    for folder in (MINILM_DIR, SMOLLM2_DIR):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / COMPLETE_MARKER).write_text("{}")
    assert cli.main(["prepare-models", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("already prepared") == 2 and f"smollm2-135m: {tmp_path / SMOLLM2_DIR}" in out


def test_index_command_writes_the_index(tmp_path, capsys):
    assert cli.main(["index", "--outputs-dir", str(tmp_path)]) == 0
    assert (tmp_path / "index.html").is_file() and "index: " in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- help
def _console_script() -> list[str]:
    script = Path(sys.executable).with_name("nbsupport")
    if script.is_file():
        return [str(script)]
    found = shutil.which("nbsupport")
    return [found] if found else [sys.executable, "-m", "nbsupport.cli"]


def test_help_works_as_a_subprocess():
    result = subprocess.run([*_console_script(), "--help"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "COLUMNS": "120"})
    assert result.returncode == 0, result.stderr
    for word in ("run", "demo-data", "prepare-models", "bench", "index", "examples:"):
        assert word in result.stdout


@pytest.mark.parametrize("command, words", [
    ("run", ["--profile", "-p NAME=VALUE", "--run-id", "--kernel", "--verbose", "1e-4 -> float"]),
    ("demo-data", ["--root", "--size", "DEMO_SIZES"]),
    ("prepare-models", ["--cache-dir", "GGUF"]),
    ("bench", ["benchmarks/bench_<system>.py"]),
])
def test_each_subcommand_has_help(command, words, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for word in words:
        assert word in out


def test_no_command_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "usage: nbsupport" in capsys.readouterr().out


def test_params_lists_each_parameter_with_its_value_in_the_profile_and_its_help(capsys):
    from nbsupport.config import find_stage

    assert cli.main(["params", "ct_clip", "train", "--profile", "full"]) == 0
    out = capsys.readouterr().out
    cfg = find_stage("ct_clip", "train").from_params({"profile": "full"})
    for name in ("epochs", "batch_size", "lr", "resume", "num_processes", "grad_accum"):
        line = next(line for line in out.splitlines() if line.strip().startswith(f"{name} "))
        assert f"= {getattr(cfg, name)!r}" in line and len(line.split(")", 1)[1].strip()) > 5, line
    assert "data_manifests/" in next(line for line in out.splitlines() if line.strip().startswith("manifest "))
    assert cli.main(["params", "seg2d", "bogus"]) == 2
    assert "01_preprocess" in capsys.readouterr().err
