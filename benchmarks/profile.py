"""Where a contender's training time goes: one run under cProfile, imports off the clock.

Run from the repository root:

    python -m benchmarks.profile wide lkflow_tracked
    python -m benchmarks.profile wide lkflow_untracked --top 30 --match "lkflow/|checkpoint"

The run is set up as in ``benchmarks.run``: a probe run finds the modules the contender imports
lazily, a fresh process imports them, builds the workload and then trains under the profiler.
The table lists functions by cumulative time; ``--match`` keeps the rows whose
``file:line(function)`` matches a regular expression. Profiling slows Python code (not torch's
kernels) by a third or so, so read the table for shares, not for absolute seconds.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.run import (
    CONTENDERS,
    REPO,
    WORKLOADS,
    _names,
    _preload,
    prepared,
    probe_late_imports,
    run_measured,
)


def profile_child(
    workload: str, contender: str, late_imports: list[str], top: int, match: str
) -> None:
    """Train once under cProfile in this process and print the table."""
    import torch

    torch.set_num_threads(1)
    from benchmarks import contenders

    _preload(contender, late_imports)
    w = prepared(workload)
    profiler = cProfile.Profile()
    with tempfile.TemporaryDirectory(prefix="lkflow-profile-") as tmp:
        os.chdir(tmp)
        start = time.perf_counter()
        profiler.runcall(contenders.CONTENDERS[contender], w)
        seconds = time.perf_counter() - start
        os.chdir(REPO)
    print(f"{workload} / {contender}: {seconds:.2f} s under the profiler")
    stats = pstats.Stats(profiler, stream=sys.stdout).sort_stats("cumulative")
    stats.print_stats(*([match] if match else []), top)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workload", help=f"one of {', '.join(WORKLOADS)}.")
    parser.add_argument("contender", help=f"one of {', '.join(CONTENDERS)}.")
    parser.add_argument("--top", type=int, default=40, help="rows to print. Default 40.")
    parser.add_argument("--match", default="", help="keep rows matching this regex.")
    parser.add_argument("--late-imports", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    (workload,) = _names(args.workload, WORKLOADS, "workload")
    (contender,) = _names(args.contender, CONTENDERS, "contender")

    if args.late_imports:  # the profiled child
        late = json.loads(args.late_imports.read_text()).get(contender, [])
        profile_child(workload, contender, late, args.top, args.match)
        return
    settings = argparse.Namespace(threads=1, quiet_wait=30.0, timeout=600.0, contenders=[contender])
    with tempfile.TemporaryDirectory(prefix="lkflow-profile-") as tmp:
        late_file = Path(tmp, "late_imports.json")
        probe_late_imports(settings, late_file)
        child = [sys.executable, "-m", "benchmarks.profile", workload, contender]
        child += ["--top", str(args.top), "--match", args.match, "--late-imports", str(late_file)]
        proc, _, _ = run_measured(child, settings)
    print(proc.stdout if proc else "timed out", end="")
    if proc and proc.returncode:
        print(proc.stderr, file=sys.stderr)


if __name__ == "__main__":
    main()
