"""Seed series: the same run once per seed, and the spread of its results over the seeds.

``nbsupport run <system> --seeds 0,1,2`` (:func:`run_seeds`) runs the whole series once per seed, each seed as an
ordinary run of its own, ``outputs/runs/<series>-seed<k>/<system>/``, whose notebooks get ``seed=k``. Then it
writes ``outputs/seeds/<series>/seeds_summary.json``: per system, for every number in the ``02_train`` and
``03_infer`` entries of its ``metrics.json`` (``*_ci95`` intervals left out: they are a spread of their own), the
mean, the sample standard deviation (ddof=1), min, max and n over the seeds; and the same for its headline result
(``headline.json``). The run index shows each system's headline as ``0.81 ± 0.02 (0.79–0.83, n=3)``.

A seed whose run fails stops the series; the summary then covers the seeds that finished, and says so.
"""
from __future__ import annotations

import html
import os
import statistics
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nbsupport.report import flatten_metrics
from nbsupport.runs import HEADLINE_FILE, RunExistsError, atomic_write_json, new_run_id, read_json, runs_root

SEEDS_DIR = "seeds"  # <outputs>/seeds/<series>/seeds_summary.json
SEEDS_SUMMARY_FILE = "seeds_summary.json"
SUMMARY_STAGES = ("02_train", "03_infer")  # the stages whose metrics.json entries are test/validation results
INTERVAL_SUFFIX = "_ci95"


@dataclass
class SeedSeries:
    """What ``run_seeds`` did: one ``RunSummary`` per seed that ran, and the summary it wrote."""

    series_id: str
    seeds: list[int]
    runs: list[Any] = field(default_factory=list)  # runner.RunSummary, in seed order
    summary_path: Path | None = None
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return len(self.runs) == len(self.seeds) and all(run.ok for run in self.runs)


# ---------------------------------------------------------------------------------------------- statistics
def spread(values: Sequence[float]) -> dict[str, Any]:
    """``mean``, ``sd`` (sample, ddof=1; None for one value), ``min``, ``max`` and ``n`` of ``values``."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("spread of no values")
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values), "n": len(values)}


def format_spread(stats: Mapping[str, Any]) -> str:
    """``0.81 ± 0.02 (0.79–0.83, n=3)``; with one seed ``0.81 (n=1)``."""
    if stats.get("sd") is None:
        return f"{stats['mean']:.3g} (n={stats['n']})"
    return f"{stats['mean']:.3g} \u00b1 {stats['sd']:.2g} ({stats['min']:.3g}\u2013{stats['max']:.3g}, n={stats['n']})"


def seed_metrics(run_dir: str | os.PathLike) -> dict[str, float]:
    """The numbers of one system run's ``metrics.json`` in :data:`SUMMARY_STAGES`, as ``stage.name`` -> value;
    ``*_ci95`` entries (and anything under them) left out."""
    metrics = read_json(Path(run_dir) / "metrics.json", {}) or {}
    chosen = {stage: metrics[stage] for stage in SUMMARY_STAGES if isinstance(metrics.get(stage), Mapping)}
    return {name: value for name, value in flatten_metrics(chosen)
            if not any(part.endswith(INTERVAL_SUFFIX) for part in name.split("."))}


def summarize_system(run_dirs: Mapping[int, str | os.PathLike]) -> dict[str, Any]:
    """One system's spread over seeds, from its run folder per seed (seed -> ``outputs/runs/<id>/<system>``).

    Returns:
        ``{"seeds": [...], "metrics": {name: spread + {"values": {seed: value}}}, "headline": ... | None}``. A
        metric missing from some seeds has a smaller n. The headline is the metric most seeds' ``headline.json``
        name (a system may choose another one when a baseline is missing), with its baseline's spread.
    """
    per_seed = {seed: seed_metrics(path) for seed, path in run_dirs.items()}
    names = list(dict.fromkeys(name for values in per_seed.values() for name in values))
    metrics = {}
    for name in names:
        values = {seed: values[name] for seed, values in per_seed.items() if name in values}
        metrics[name] = {**spread(list(values.values())), "values": {str(s): v for s, v in values.items()}}
    return {"seeds": list(run_dirs), "metrics": metrics, "headline": _headline_spread(run_dirs)}


def _headline_spread(run_dirs: Mapping[int, str | os.PathLike]) -> dict[str, Any] | None:
    headlines = {seed: read_json(Path(path) / HEADLINE_FILE) for seed, path in run_dirs.items()}
    headlines = {seed: h for seed, h in headlines.items() if isinstance(h, Mapping) and "metric" in h}
    if not headlines:
        return None
    metric = Counter(h["metric"] for h in headlines.values()).most_common(1)[0][0]
    same = {seed: h for seed, h in headlines.items() if h["metric"] == metric}
    last = same[max(same)]
    return {"metric": metric, "stage": last.get("stage"), "seeds": list(same),
            "value": spread([h["value"] for h in same.values()]), "baseline": last.get("baseline"),
            "baseline_value": spread([h["baseline_value"] for h in same.values()])}


# ---------------------------------------------------------------------------------------------- running
def run_seeds(systems: Sequence[str], profile: str, seeds: Sequence[int], params: Mapping[str, Any] | None = None,
              run_id: str | None = None, outputs_dir: str | os.PathLike | None = None, log: Any = print,
              **run_options: Any) -> SeedSeries:
    """Run ``systems`` once per seed (notebook parameter ``seed``), then write the seeds summary and the index.

    Args:
        seeds: distinct integers, in the order they run.
        run_id: the series id (default: a fresh one); seed k runs as ``<series>-seed<k>``.
        run_options: the other arguments of :func:`nbsupport.runner.run_systems` (kernel, notebooks_dir, ...).

    Raises:
        RunnerError: before anything runs: no seeds, repeated seeds, ``seed`` also given in ``params``, or what
            ``run_systems`` checks.
        RunExistsError: the series or one of its seed runs exists.
    """
    from nbsupport.report import write_index
    from nbsupport.runner import RunnerError, check_run, format_duration, run_systems

    params = dict(params or {})
    if not seeds or len(set(seeds)) != len(seeds):
        raise RunnerError(f"--seeds needs distinct integers, got {list(seeds)}")
    if "seed" in params:
        raise RunnerError("-p seed and --seeds together: --seeds sets each run's seed")
    check_run(systems, profile, {**params, "seed": seeds[0]}, run_options.get("kernel", "nbsupport"),
              run_options.get("notebooks_dir"))
    outputs_dir = (Path(outputs_dir) if outputs_dir is not None else runs_root().parent).resolve()
    series = SeedSeries(_claim_series(outputs_dir, run_id, seeds), list(seeds))
    started = time.monotonic()
    for k, seed in enumerate(seeds, start=1):
        log(f"series {series.series_id}: seed {seed} ({k}/{len(seeds)})")
        run = run_systems(systems, profile, {**params, "seed": seed}, run_id=f"{series.series_id}-seed{seed}",
                          outputs_dir=outputs_dir, log=log, **run_options)
        series.runs.append(run)
        if not run.ok:
            log(f"series {series.series_id}: seed {seed} failed; later seeds not run")
            break
    series.summary = summarize_series(series, profile, params, outputs_dir)
    series.summary_path = atomic_write_json(outputs_dir / SEEDS_DIR / series.series_id / SEEDS_SUMMARY_FILE,
                                            series.summary)
    write_index(outputs_dir)
    log(f"series {series.series_id} ({profile}, seeds {', '.join(map(str, seeds))}): {series.summary_path}")
    for system, entry in series.summary["systems"].items():
        headline = entry["headline"]
        shown = f"{headline['metric']} {format_spread(headline['value'])}" if headline else "no headline.json"
        log(f"  {system}  {shown}")
    log(f"series total {format_duration(time.monotonic() - started)}")
    return series


def _claim_series(outputs_dir: Path, series_id: str | None, seeds: Sequence[int]) -> str:
    """Create ``<outputs>/seeds/<series>/`` (one mkdir: two series never share it); a given id that exists, or
    whose seed runs exist, is an error."""
    from nbsupport.runner import RunnerError

    if series_id is not None and (not series_id or "/" in series_id or series_id.startswith(".")):
        raise RunnerError(f"--run-id {series_id!r} must be a plain folder name")
    for _ in range(1 if series_id else 100):
        candidate = series_id or new_run_id()
        taken = [outputs_dir / "runs" / f"{candidate}-seed{s}" for s in seeds]
        taken = [str(p) for p in taken if p.exists()]
        if taken and series_id:
            raise RunExistsError(f"run(s) {', '.join(taken)} exist and are never overwritten; choose another --run-id")
        if taken:
            continue
        try:
            (outputs_dir / SEEDS_DIR).mkdir(parents=True, exist_ok=True)
            (outputs_dir / SEEDS_DIR / candidate).mkdir()
            return candidate
        except FileExistsError:
            if series_id:
                raise RunExistsError(f"seed series {outputs_dir / SEEDS_DIR / series_id} already exists; "
                                     "choose another --run-id") from None
    raise RunExistsError(f"could not draw a free series id under {outputs_dir / SEEDS_DIR}")  # pragma: no cover


def summarize_series(series: SeedSeries, profile: str, params: Mapping[str, Any], outputs_dir: Path
                     ) -> dict[str, Any]:
    """The ``seeds_summary.json`` document: the series' settings and, per system, :func:`summarize_system` over
    the seeds whose run of that system finished ok."""
    done: dict[str, dict[int, Path]] = {}
    for seed, run in zip(series.seeds, series.runs):
        for result in run.systems:
            if result.status == "ok":
                done.setdefault(result.system, {})[seed] = result.run_dir
    return {
        "series": series.series_id, "profile": profile, "params": dict(params), "seeds": series.seeds,
        "complete": series.ok,
        "runs": {str(seed): os.path.relpath(outputs_dir / "runs" / run.run_id, outputs_dir)
                 for seed, run in zip(series.seeds, series.runs)},
        "systems": {system: summarize_system(run_dirs) for system, run_dirs in done.items()},
    }


# ---------------------------------------------------------------------------------------------- index section
def read_seed_series(outputs_dir: str | os.PathLike) -> list[tuple[Path, dict[str, Any]]]:
    """Every ``<outputs>/seeds/*/seeds_summary.json``, newest first, with its path; unreadable ones left out."""
    found = []
    for path in Path(outputs_dir).glob(f"{SEEDS_DIR}/*/{SEEDS_SUMMARY_FILE}"):
        try:
            found.append((path.stat().st_mtime, path, read_json(path)))
        except (OSError, ValueError):  # a half-copied or hand-edited file must not break the index
            continue
    return [(path, doc) for _, path, doc in sorted(found, key=lambda item: item[0], reverse=True)
            if isinstance(doc, Mapping)]


def seed_series_section(outputs_dir: str | os.PathLike) -> str:
    """The run index's "Seed series" table: per series and system, the headline as mean ± sd (min–max, n) next to
    its baseline's mean, linking ``seeds_summary.json``; empty when there is no series."""
    rows = []
    for path, doc in read_seed_series(outputs_dir):
        href = html.escape(Path(os.path.relpath(path, outputs_dir)).as_posix(), quote=True)
        seeds = ", ".join(str(s) for s in doc.get("seeds", []))
        for system, entry in (doc.get("systems") or {}).items():
            rows.append(f"<tr><td><code>{html.escape(str(doc.get('series', '')))}</code></td>"
                        f"<td><b>{html.escape(system)}</b></td><td>{html.escape(str(doc.get('profile', '')))}</td>"
                        f"<td>{html.escape(seeds)}</td><td>{_headline_cell(entry.get('headline'))}</td>"
                        f'<td><a href="{href}">{SEEDS_SUMMARY_FILE}</a></td></tr>')
    if not rows:
        return ""
    return ("<h2>Seed series</h2>\n<table>\n<thead><tr><th>series</th><th>system</th><th>profile</th><th>seeds</th>"
            "<th>headline: mean \u00b1 sd (min\u2013max, n)</th><th>all metrics</th></tr></thead>\n<tbody>\n"
            + "\n".join(rows) + "\n</tbody>\n</table>\n<h2>Runs</h2>\n")


def _headline_cell(headline: Any) -> str:
    try:
        return (f'<span class="metric">{html.escape(str(headline["metric"]))} '
                f'<b>{html.escape(format_spread(headline["value"]))}</b></span><br><small>vs '
                f'{html.escape(str(headline["baseline"]))} {headline["baseline_value"]["mean"]:.3g}</small>')
    except (KeyError, TypeError, ValueError):  # no headline.json in the runs, or a hand-edited summary
        return "&ndash;"
