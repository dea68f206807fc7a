"""Benchmark lkflow against a hand-written loop, plain Lightning and MLflow's own integrations.

Run from the repository root (about 25 minutes on 2 cores for the full set, plus waits for a
quiet machine):

    python -m benchmarks.run --rounds 5 --workloads rings,wide --out benchmarks/RESULTS.md

Each (workload, contender) pair trains in its own fresh process; the contenders run in
alternating order within each round (the order rotates between rounds), and the table shows
medians over rounds. A child process imports what its contender needs, builds the seeded
workload and warms up lazy imports before its clock starts, then times the training call alone
with ``time.perf_counter`` (and CPU time, its subprocesses included) and reports its peak RSS.
Which modules a contender imports lazily while it trains (MLflow's store, torch.export's
tracer, matplotlib's backend, ...) comes from a probe: one short run per contender before the
rounds. The timed children import those up front, and the table shows the seconds that took,
so training time excludes imports, as start-up time is reported on its own. Ratios to the
hand-written loop are the figures to quote: measured side by side they hold far better than
absolute seconds.

Import time is measured the same way (``import X`` timed in a fresh process each round), and
``lkflow --help`` as the wall time of the whole command. A contender whose imports fail shows
as "n/a"; one that raises shows as "error" with its message.

Every child runs with one torch thread by default (``--threads``, also ``OMP_NUM_THREADS``):
on a small shared machine, two intra-op threads turn the tiny rings steps into spin-waits on a
descheduled worker thread (measured: 2 epochs took 0.6 s with one thread, 10 s with two while
other jobs ran). Before each child the parent waits up to ``--quiet-wait`` seconds for the
machine to go quiet, and the table shows how many cores other processes used during each pair.

Other options: ``--contenders a,b`` picks contenders, ``--import-rounds N`` sets the start-up
rounds (0 skips them), ``--timeout`` bounds each child. ``benchmarks/report.py`` formats the
page and holds the issue's targets; ``workloads.py`` and ``contenders.py`` hold what is timed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.report import fmt, report

REPO = Path(__file__).resolve().parent.parent
MARKER = "BENCH_RESULT "  # prefix of the one stdout line a child reports on
WORKLOADS = ("rings", "wide")
CONTENDERS = (
    "torch_loop",
    "lightning_lean",
    "lightning_idiomatic",
    "lightning_lean_ckpt",
    "lkflow_untracked",
    "lightning_mlflow",
    "autolog",
    "lkflow_tracked",
    "lkflow_tracked_no_system_metrics",
    "lkflow_tracked_system_metrics_1s",
)
# `import lkflow` is lazy; `lkflow.model` is what `lkflow.LightModel` loads, so the target uses it.
IMPORTS = ("torch", "pytorch_lightning", "lkflow", "lkflow.model")


# --- children: one measurement per process -------------------------------------------------


def _emit(result: dict[str, Any]) -> None:
    print(MARKER + json.dumps(result), flush=True)


def _preload(contender: str, late_imports: list[str]) -> float:
    """Import what ``contender`` needs before its clock starts; return the seconds the late
    imports (those a probe saw the contender import while it trained) took."""
    from benchmarks import contenders

    for module in contenders.PRELOAD[contender]:
        importlib.import_module(module)
    start = time.perf_counter()
    for module in late_imports:
        # Some late modules only import in the context their library gives them.
        with contextlib.suppress(Exception):
            importlib.import_module(module)
    return time.perf_counter() - start


def prepared(workload: str) -> Any:
    """The seeded workload, with torch's first-optimizer-step imports (torch._dynamo, about a
    second) already done, ready for the clock."""
    import torch

    from benchmarks import workloads

    w = workloads.build(workload)
    torch.optim.Adam([torch.zeros(1, requires_grad=True)]).step()
    torch.manual_seed(workloads.SEED)
    return w


def child_probe(contender: str, threads: int) -> None:
    """Train ``contender`` on a few rings rows and report the modules it imported on the way."""
    import torch

    torch.set_num_threads(threads)
    from benchmarks import contenders, workloads

    try:
        _preload(contender, [])
    except ImportError as exc:
        _emit({"status": "n/a", "reason": f"{type(exc).__name__}: {exc}"})
        return
    w = workloads.shrink(workloads.build("rings"), rows=500)
    before = set(sys.modules)
    with tempfile.TemporaryDirectory(prefix="lkflow-probe-") as tmp:
        os.chdir(tmp)
        contenders.CONTENDERS[contender](w)
        os.chdir(REPO)
    _emit({"status": "ok", "modules": [name for name in sys.modules if name not in before]})


def child_train(workload: str, contender: str, threads: int, late_imports: list[str]) -> None:
    """Train one contender on one workload in this process and report its cost."""
    import torch

    torch.set_num_threads(threads)
    from benchmarks import contenders

    try:
        late_import_s = _preload(contender, late_imports)
    except ImportError as exc:
        _emit({"status": "n/a", "reason": f"{type(exc).__name__}: {exc}"})
        return
    w = prepared(workload)
    modules_before, rss_before = len(sys.modules), _rss_mb()
    with tempfile.TemporaryDirectory(prefix="lkflow-bench-") as tmp:
        os.chdir(tmp)
        start, cpu_start = time.perf_counter(), _own_seconds()
        contenders.CONTENDERS[contender](w)
        seconds, cpu_seconds = time.perf_counter() - start, _own_seconds() - cpu_start
        os.chdir(REPO)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    _emit(
        {
            "status": "ok",
            "seconds": seconds,
            "cpu_seconds": cpu_seconds,  # all threads, plus subprocesses it waited for
            "peak_mb": peak_mb,
            "start_mb": rss_before,  # imports, data and net, before the clock
            "fit_mb": None if rss_before is None else peak_mb - rss_before,  # the fit's growth
            "late_import_s": late_import_s,
            # Modules still first imported on the clock, which the probe did not see.
            "late_imports": len(sys.modules) - modules_before,
        }
    )


def _rss_mb() -> float | None:
    """Resident memory of this process now, from /proc/self/statm; None where it is absent."""
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    except OSError:
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def child_import(module: str) -> None:
    """Time ``import module`` in this fresh process."""
    start = time.perf_counter()
    try:
        importlib.import_module(module)
    except ImportError as exc:
        _emit({"status": "n/a", "reason": f"{type(exc).__name__}: {exc}"})
        return
    _emit({"status": "ok", "seconds": time.perf_counter() - start})


# --- parent: noise control -------------------------------------------------------------------
# Other people's jobs on a small shared machine swing single runs by 3x or more. Before each
# child the parent waits (bounded) for the machine to go quiet, and it records how many cores
# other processes used while the child ran, so noisy runs show in the table.


def _machine_busy_seconds() -> float | None:
    """CPU seconds used by all processes since boot, from /proc/stat; None where it is absent."""
    try:
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in first[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    """CPU seconds of this process and of the subprocesses it has waited for."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def wait_for_quiet(limit_s: float, max_cores: float = 0.25) -> None:
    """Wait up to ``limit_s`` until other processes use under ``max_cores`` for a second."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        busy, start = _machine_busy_seconds(), time.monotonic()
        if busy is None:
            return
        time.sleep(1.0)
        if (_machine_busy_seconds() - busy) / (time.monotonic() - start) < max_cores:
            return


def run_measured(
    cmd: list[str], args: argparse.Namespace
) -> tuple[subprocess.CompletedProcess[str] | None, float, float | None]:
    """Run ``cmd`` once the machine is quiet; return it (None on timeout), wall seconds, and
    the cores other processes used meanwhile."""
    wait_for_quiet(args.quiet_wait)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    busy, own, start = _machine_busy_seconds(), _own_seconds(), time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout
        )
    except subprocess.TimeoutExpired:
        proc = None
    wall = time.perf_counter() - start
    others = None
    if busy is not None:
        others = max(0.0, (_machine_busy_seconds() - busy - (_own_seconds() - own)) / wall)
    return proc, wall, others


def spawn(child_args: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Run ``python -m benchmarks.run <child_args>``; return its result line plus the noise."""
    cmd = [sys.executable, "-m", "benchmarks.run", *child_args, "--threads", str(args.threads)]
    proc, _, others = run_measured(cmd, args)
    if proc is None:
        return {"status": "error", "reason": f"timed out after {args.timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARKER):
            return {**json.loads(line[len(MARKER) :]), "others": others}
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"status": "error", "reason": f"exit {proc.returncode}: {tail}"}


def time_help(args: argparse.Namespace) -> dict[str, Any]:
    """Wall time of ``lkflow --help`` (the console script, else ``python -m lkflow``)."""
    script = Path(sys.executable).with_name("lkflow")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "lkflow"]
    proc, wall, others = run_measured([*cmd, "--help"], args)
    if proc is None:
        return {"status": "error", "reason": f"timed out after {args.timeout:.0f} s"}
    if proc.returncode != 0:
        return {"status": "n/a", "reason": f"`{' '.join(cmd)} --help` exited {proc.returncode}"}
    return {"status": "ok", "seconds": wall, "others": others}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- parent: the measurements ------------------------------------------------------------------


def probe_late_imports(args: argparse.Namespace, into: Path) -> None:
    """Write to ``into`` the modules each contender imports lazily while it trains, as seen in
    one short run apiece, so that the timed runs can import them before their clocks start."""
    late: dict[str, list[str]] = {}
    for contender in args.contenders:
        res = spawn(["--probe", contender], args)
        late[contender] = res.get("modules", [])
        shown = f"{len(late[contender])} modules" if res["status"] == "ok" else res["reason"]
        _log(f"probe  {contender:20} late imports: {shown}")
    into.write_text(json.dumps(late))


def measure_training(
    args: argparse.Namespace, late_imports: Path
) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Every (workload, contender) once per round, contenders rotated between rounds."""
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    n = len(args.contenders)
    for r in range(args.rounds):
        order = args.contenders[r % n :] + args.contenders[: r % n]
        for workload in args.workloads:
            for contender in order:
                runs = results.setdefault((workload, contender), [])
                if runs and runs[0]["status"] != "ok":
                    continue  # n/a or broken: do not spend more time on it
                child = ["--child", workload, contender, "--late-imports", str(late_imports)]
                res = spawn(child, args)
                runs.append(res)
                shown = res.get("reason", "")
                if res["status"] == "ok":
                    shown = (
                        f"{res['seconds']:6.2f} s wall {res['cpu_seconds']:6.2f} s CPU, "
                        f"others used {fmt(res['others'])} cores"
                    )
                _log(f"round {r + 1}/{args.rounds} {workload:6} {contender:20} {shown}")
    return results


def measure_startup(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """Import times of torch, Lightning and lkflow, and ``lkflow --help``, alternating."""
    results: dict[str, list[dict[str, Any]]] = {}
    for _ in range(args.import_rounds):
        for module in IMPORTS:
            results.setdefault(f"import {module}", []).append(spawn(["--import", module], args))
        results.setdefault("lkflow --help", []).append(time_help(args))
    return results


# --- command line --------------------------------------------------------------------------


def _names(text: str, known: tuple[str, ...], flag: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    bad = [name for name in names if name not in known]
    if bad:
        raise SystemExit(
            f"{flag}: unknown {bad}; expected a comma-separated subset of {list(known)}."
        )
    return names


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every pair. Default 3.")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated.")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated.")
    parser.add_argument("--import-rounds", type=int, default=5, help="0 skips start-up timing.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in every child.")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per child.")
    parser.add_argument(
        "--quiet-wait", type=float, default=30.0, help="most seconds to wait for a quiet machine."
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="write the markdown results here too, and every run's figures beside it (.json).",
    )
    parser.add_argument(
        "--child", nargs=2, metavar=("WORKLOAD", "CONTENDER"), help=argparse.SUPPRESS
    )
    parser.add_argument("--late-imports", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--probe", metavar="CONTENDER", help=argparse.SUPPRESS)
    parser.add_argument("--import", dest="import_module", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        workload, contender = args.child
        late = json.loads(args.late_imports.read_text()) if args.late_imports else {}
        child_train(workload, contender, args.threads, late.get(contender, []))
        return
    if args.probe:
        child_probe(args.probe, threads=args.threads)
        return
    if args.import_module:
        child_import(args.import_module)
        return

    args.workloads = _names(args.workloads, WORKLOADS, "--workloads")
    args.contenders = _names(args.contenders, CONTENDERS, "--contenders")
    with tempfile.TemporaryDirectory(prefix="lkflow-bench-") as tmp:
        late_imports = Path(tmp, "late_imports.json")
        probe_late_imports(args, late_imports)
        results = measure_training(args, late_imports)
    startup = measure_startup(args)
    text = report(args, results, startup)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
        raw = {"training": [[*key, runs] for key, runs in results.items()], "startup": startup}
        args.out.with_suffix(".json").write_text(json.dumps(raw, indent=1) + "\n")
        _log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
