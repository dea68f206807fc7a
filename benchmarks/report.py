"""The markdown results page: machine, per-workload tables, start-up times, the issue's targets.

``report(args, results, startup)`` turns the raw per-run dicts that ``benchmarks.run`` collects
into the page it prints and writes to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple

REPO = Path(__file__).resolve().parent.parent
BASELINE = "torch_loop"
Runs = list[dict[str, Any]]  # one dict per run: "status", "seconds", "cpu_seconds", ...

# (label, numerator, denominator, limit per workload or None): ratios of median training seconds.
TIME_TARGETS = (
    (
        "lkflow untracked / torch loop",
        "lkflow_untracked",
        "torch_loop",
        {"rings": 1.9, "wide": 1.05},
    ),
    ("lkflow tracked / Lightning + MLFlowLogger", "lkflow_tracked", "lightning_mlflow", 1.0),
    ("lkflow tracked / autolog", "lkflow_tracked", "autolog", 0.6),
    # System metrics sampled in a thread cost the fit nothing it would notice.
    (
        "lkflow tracked / tracked without system metrics",
        "lkflow_tracked",
        "lkflow_tracked_no_system_metrics",
        1.03,
    ),
    (  # not a target: ten times the default rate, for the cost of a sample
        "lkflow tracked, system metrics every 1 s / without",
        "lkflow_tracked_system_metrics_1s",
        "lkflow_tracked_no_system_metrics",
        None,
    ),
    # Not a target: lkflow against the Lightning that keeps the same best checkpoint.
    (
        "lkflow untracked / Lightning lean + checkpoint",
        "lkflow_untracked",
        "lightning_lean_ckpt",
        None,
    ),
)
RSS_LIMIT = 1.10  # peak RSS of lkflow tracked / untracked
IMPORT_LIMIT = 1.1  # import lkflow.model / import pytorch_lightning
HELP_LIMIT_S = 0.5  # wall time of `lkflow --help`


def _median(runs: Runs, key: str) -> float | None:
    """The median of ``key`` over the finished runs that report it (on a machine without
    /proc, the memory figures are None)."""
    known = [run[key] for run in runs if run["status"] == "ok" and run.get(key) is not None]
    return statistics.median(known) if known else None


def _status(runs: Runs) -> str:
    bad = [run for run in runs if run["status"] != "ok"]
    return bad[0]["status"] if bad else "ok"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fmt(value: float | None, spec: str = ".2f") -> str:
    """`value` formatted with `spec`, or "n/a" for None."""
    return "n/a" if value is None else format(value, spec)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine(threads: int) -> list[str]:
    """Markdown bullet lines describing the machine and software versions."""
    cpu = "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = "no commit"
    if shutil.which("git"):
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        )
        commit = out.stdout.strip() or commit
    versions = ", ".join(
        f"{name} {_version(name)}" for name in ("torch", "pytorch-lightning", "mlflow", "lkflow")
    )
    return [
        f"- Machine: {cpu}, {os.cpu_count()} logical cores, {platform.system()} "
        f"{platform.release()}; torch threads = OMP_NUM_THREADS = {threads}",
        f"- Python {platform.python_version()}; {versions}",
        f"- Repository commit: {commit}",
    ]


def _best(runs: Runs, key: str) -> float | None:
    ok = [run[key] for run in runs if run["status"] == "ok"]
    return min(ok) if ok else None


def training_table(
    results: dict[tuple[str, str], Runs], workload: str, names: list[str]
) -> list[str]:
    """Markdown table of one workload: median, best and CPU seconds with their ratios to the
    loop, memory, and how busy the machine was."""
    base = results.get((workload, BASELINE), [])
    base_values = (_median(base, "seconds"), _best(base, "seconds"), _median(base, "cpu_seconds"))
    lines = [
        f"### {workload}",
        "",
        "| contender | median s | x loop | best s | x loop | CPU s | x loop | peak RSS MB "
        "| RSS at start MB | fit growth MB | late import s | imports on the clock "
        "| others' cores (max) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        runs = results.get((workload, name), [])
        status = _status(runs)
        if status != "ok":
            reason = (runs[0].get("reason", "") if runs else "").replace("|", "/")[:120]
            lines.append(f"| {name} | {status} | {reason} |" + " |" * 10)
            continue
        values = (_median(runs, "seconds"), _best(runs, "seconds"), _median(runs, "cpu_seconds"))
        cells = [f"{v:.2f} | {fmt(_ratio(v, b))}" for v, b in zip(values, base_values, strict=True)]
        peak, growth = _median(runs, "peak_mb"), _median(runs, "fit_mb")
        others = max((run["others"] for run in runs if run["others"] is not None), default=None)
        lines.append(
            f"| {name} | {' | '.join(cells)} | {peak:.0f} | "
            f"{fmt(_median(runs, 'start_mb'), '.0f')} | {fmt(growth, '.0f')} | "
            f"{fmt(_median(runs, 'late_import_s'))} | "
            f"{max(run['late_imports'] for run in runs)} | {fmt(others, '.1f')} |"
        )
    return [*lines, ""]


def startup_table(startup: dict[str, Runs]) -> list[str]:
    """Markdown table of import and ``--help`` times."""
    lines = ["| command | median s | others' cores (max) | each run (s) |", "|---|---:|---:|---|"]
    for name, runs in startup.items():
        status = _status(runs)
        if status != "ok":
            lines.append(f"| `{name}` | {status} | | {runs[0].get('reason', '')} |")
            continue
        others = max((run["others"] for run in runs if run["others"] is not None), default=None)
        each = ", ".join(f"{run['seconds']:.3f}" for run in runs)
        lines.append(
            f"| `{name}` | {_median(runs, 'seconds'):.3f} | {fmt(others, '.1f')} | {each} |"
        )
    return [*lines, ""]


class _Row(NamedTuple):
    """One line of the targets table; a row without a limit is there for reference."""

    label: str
    median: float | None  # the ratio of medians: the verdict
    limit: float | None
    paired: float | None = None  # the median of the ratios within each round
    best: float | None = None
    cpu: float | None = None


def _paired(a: Runs, b: Runs, key: str) -> float | None:
    """The median over rounds of ``a``'s value over ``b``'s in the same round."""
    ratios = [
        x[key] / y[key]
        for x, y in zip(a, b, strict=False)
        if x["status"] == y["status"] == "ok" and y[key]
    ]
    return statistics.median(ratios) if ratios else None


def targets_table(
    results: dict[tuple[str, str], Runs], startup: dict[str, Runs], workloads: list[str]
) -> list[str]:
    """The issue's targets: the ratio of medians (the verdict), the median of the ratios within
    each round, best-run and CPU-time ratios (robust to other jobs), the limit, and whether the
    ratio of medians meets it; then memory figures for reference."""
    rows: list[_Row] = []
    for label, num, den, limit in TIME_TARGETS:
        for workload in workloads:
            a, b = results.get((workload, num), []), results.get((workload, den), [])
            rows.append(
                _Row(
                    f"{label} ({workload}), time",
                    _ratio(_median(a, "seconds"), _median(b, "seconds")),
                    limit[workload] if isinstance(limit, dict) else limit,
                    paired=_paired(a, b, "seconds"),
                    best=_ratio(_best(a, "seconds"), _best(b, "seconds")),
                    cpu=_ratio(_median(a, "cpu_seconds"), _median(b, "cpu_seconds")),
                )
            )
    for workload in workloads:
        tracked, untracked, logger = (
            results.get((workload, name), [])
            for name in ("lkflow_tracked", "lkflow_untracked", "lightning_mlflow")
        )
        label = f"lkflow tracked / untracked ({workload})"
        peak = _ratio(_median(tracked, "peak_mb"), _median(untracked, "peak_mb"))
        growth = _ratio(_median(tracked, "fit_mb"), _median(untracked, "fit_mb"))
        beside = _ratio(_median(tracked, "peak_mb"), _median(logger, "peak_mb"))
        rows += [
            _Row(f"{label}, peak RSS", peak, RSS_LIMIT),
            # Where the difference in peak memory comes from:
            _Row(f"{label}, fit growth", growth, None),
            _Row(f"lkflow tracked / Lightning + MLFlowLogger ({workload}), peak RSS", beside, None),
        ]
    if startup:
        lk, pl = startup["import lkflow.model"], startup["import pytorch_lightning"]
        help_runs = startup["lkflow --help"]
        rows += [
            _Row(
                "import lkflow.model / import pytorch_lightning",
                _ratio(_median(lk, "seconds"), _median(pl, "seconds")),
                IMPORT_LIMIT,
                paired=_paired(lk, pl, "seconds"),
                best=_ratio(_best(lk, "seconds"), _best(pl, "seconds")),
            ),
            _Row(
                "`lkflow --help`, seconds",
                _median(help_runs, "seconds"),
                HELP_LIMIT_S,
                best=_best(help_runs, "seconds"),
            ),
        ]
    lines = [
        "| target | median | per round | best | CPU | limit | holds |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        if row.limit is None:
            holds, limit = "(for reference)", ""
        else:
            holds = (
                "n/a" if row.median is None else ("yes" if row.median <= row.limit else "**no**")
            )
            limit = f"{row.limit:g}"
        # Three decimals: a verdict at the limit's second decimal stays readable.
        extra = " | ".join(
            "" if v is None else fmt(v, ".3f") for v in (row.paired, row.best, row.cpu)
        )
        lines.append(f"| {row.label} | {fmt(row.median, '.3f')} | {extra} | {limit} | {holds} |")
    return [*lines, ""]


def report(
    args: argparse.Namespace, results: dict[tuple[str, str], Runs], startup: dict[str, Runs]
) -> str:
    """The whole markdown results page."""
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    command = "python -m benchmarks.run " + " ".join(sys.argv[1:])
    every_run = [run for runs in [*results.values(), *startup.values()] for run in runs]
    noise = max((run.get("others") or 0.0 for run in every_run), default=0.0)
    lines = [
        "# lkflow benchmark results",
        "",
        f"- Date: {now}",
        *machine(args.threads),
        f"- Command: `{command}`",
        f"- {args.rounds} rounds, each run in a fresh process. Training time excludes imports "
        "and data building. Median and best (fastest) wall seconds over the rounds; CPU s: "
        "median CPU time of the training process and its subprocesses. RSS at start: "
        "resident memory when the clock started (libraries, data, net); fit growth: peak RSS "
        "minus that. Late import s: importing, before the clock, the modules a probe run saw "
        "the contender import lazily while training; imports on the clock: modules still "
        "first imported while the clock ran. Others' cores: CPU other processes used while "
        "a run went on.",
    ]
    if noise > 0.5:
        lines.append(
            f"- **Noisy machine**: other processes used up to {noise:.1f} cores during some "
            "runs; trust the best-run and CPU-time ratios over the medians, or rerun when quiet."
        )
    lines += ["", "## Training time (CPU)", ""]
    for workload in args.workloads:
        lines += training_table(results, workload, args.contenders)
    if startup:
        lines += ["## Start-up", "", f"Medians over {args.import_rounds} rounds.", ""]
        lines += startup_table(startup)
    lines += ["## Targets", "", *targets_table(results, startup, args.workloads)]
    return "\n".join(lines)
