"""A sweep's cost beside the same trials as plain `lkflow train` runs: what Optuna, the parent
run and the child runs add per trial.

Run from the repository root (a few minutes at the default size on 2 cores):

    python -m benchmarks.sweep --rounds 3 --trials 4 --epochs 3 --out benchmarks/sweep.md

The trials are N fixed hyperparameter sets of the rings task (lr and the net's width), the
same for every contender, so that each trains the same nets. Each contender runs in a fresh
process per round, in alternating order; in-process contenders import what they need and run
one small warm-up fit (MLflow's model saving, torch.export and matplotlib load then) before
their clock starts:
- `train`: N `run_task` calls, as N `lkflow train` commands run them (each registers its net);
- `sweep + trial versions`: `run_sweep` of the same N trials (enqueued in its study), no pruner,
  every trial's net registered: the same fits and registrations, plus Optuna, the parent run,
  the child runs, the figures and the champion alias;
- `sweep`: the same sweep as it runs by default: only the champion is registered;
- `N x lkflow train` and `lkflow sweep`: the commands themselves, start-up included.
The figures to quote are the ratios to `train`, measured side by side in the same rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.report import fmt
from benchmarks.run import MARKER, REPO, run_measured, wait_for_quiet

TARGET = f"{REPO}/examples/rings.py:task"
LRS = (0.01, 0.02, 0.005, 0.03, 0.015, 0.008, 0.025, 0.012)
HIDDEN = (12, 16, 8, 24, 12, 16, 8, 24)
IN_PROCESS = ("train", "sweep_registering", "sweep")
COMMANDS = ("train_commands", "sweep_command")
LABELS = {
    "train": "train (N run_task)",
    "sweep_registering": "sweep + trial versions",
    "sweep": "sweep (champion only)",
    "train_commands": "N x `lkflow train`",
    "sweep_command": "`lkflow sweep`",
}


def _store(folder: Path) -> str:
    """A migrated sqlite store in `folder`, made before any clock starts."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()
    return uri


def _enqueue(folder: Path, trials: int) -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{folder / 'sweep.db'}"
    study = optuna.create_study(study_name="bench", storage=storage, direction="minimize")
    for lr, hidden in zip(LRS[:trials], HIDDEN[:trials], strict=True):
        study.enqueue_trial({"lr": lr, "hidden": hidden})


def _sweep_settings(args: argparse.Namespace, uri: str, register: bool) -> Any:
    from lkflow.sweep import SweepSettings
    from lkflow.tasks import TaskOptions

    return SweepSettings(
        target=TARGET,
        trials=args.trials,
        space=(f"lr=uniform({min(LRS)},{max(LRS)})", f"hidden=int({min(HIDDEN)},{max(HIDDEN)})"),
        epochs=args.epochs,
        gpus=0,
        options=TaskOptions(seed=0, params={"rows": str(args.rows)}),
        pruner="none",
        study="bench",
        experiment_name="bench",
        registered_model_name="bench-net",
        register_trials=register,
        tracking_uri=uri,
    )


def child(contender: str, args: argparse.Namespace) -> None:
    """One in-process contender in this fresh process; prints its seconds."""
    import torch

    torch.set_num_threads(args.threads)
    import optuna.visualization.matplotlib  # noqa: F401  (the sweep's figures, off the clock)

    from lkflow.sweep import run_sweep
    from lkflow.tasks import TaskOptions, run_task

    with tempfile.TemporaryDirectory(prefix="lkflow-sweep-bench-") as tmp:
        folder = Path(tmp)
        os.chdir(folder)
        uri = _store(folder)
        warm = TaskOptions(seed=0, params={"rows": "200"})
        run_task(TARGET, warm, epochs=1, gpus=0, experiment_name="warm-up", tracking_uri=uri)
        if contender != "train":
            _enqueue(folder, args.trials)
        start, cpu_start = time.perf_counter(), time.process_time()
        if contender == "train":
            for lr, hidden in zip(LRS[: args.trials], HIDDEN[: args.trials], strict=True):
                params = {"rows": str(args.rows), "hidden": str(hidden)}
                options = TaskOptions(lr=lr, seed=0, params=params)
                run_task(
                    TARGET,
                    options,
                    epochs=args.epochs,
                    gpus=0,
                    experiment_name="bench",
                    registered_model_name="bench-net",
                    tracking_uri=uri,
                )
        else:
            run_sweep(_sweep_settings(args, uri, register=contender == "sweep_registering"))
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    print(MARKER + json.dumps({"status": "ok", "seconds": seconds, "cpu": cpu}), flush=True)


def commands(contender: str, args: argparse.Namespace, migrated: Path) -> dict[str, Any]:
    """The commands themselves, start-up included, in a fresh folder with a migrated store."""
    lkflow = str(Path(sys.executable).with_name("lkflow"))
    with tempfile.TemporaryDirectory(prefix="lkflow-sweep-bench-") as tmp:
        folder = Path(tmp)
        shutil.copy(migrated, folder / "mlflow.db")
        common = ["--epochs", str(args.epochs), "--gpus", "0", "--seed", "0"]
        common += ["--param", f"rows={args.rows}", "--experiment-name", "bench"]
        common += ["--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}"]
        if contender == "sweep_command":
            _enqueue(folder, args.trials)
            space = _sweep_settings(args, "", register=False).space
            spaces = [x for spec in space for x in ("--space", spec)]
            sweep = [lkflow, "sweep", TARGET, "--trials", str(args.trials), "--study", "bench"]
            runs = [[*sweep, "--pruner", "none", *common, *spaces]]
        else:
            runs = [
                [lkflow, "train", TARGET, "--lr", str(lr), "--param", f"hidden={hidden}", *common]
                for lr, hidden in zip(LRS[: args.trials], HIDDEN[: args.trials], strict=True)
            ]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        wait_for_quiet(args.quiet_wait)
        start = time.perf_counter()
        for command in runs:
            done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                return {"status": "error", "reason": done.stderr.strip().splitlines()[-1]}
        return {"status": "ok", "seconds": time.perf_counter() - start}


def spawn(contender: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.sweep", "--child", contender]
    command += ["--trials", str(args.trials), "--epochs", str(args.epochs)]
    command += ["--rows", str(args.rows), "--threads", str(args.threads)]
    proc, _, _ = run_measured(command, args)
    if proc is None:
        return {"status": "error", "reason": "timed out"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARKER):
            return dict(json.loads(line[len(MARKER) :]))
    return {"status": "error", "reason": (proc.stderr.strip().splitlines() or ["?"])[-1]}


def table(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> str:
    def median(name: str, key: str) -> float | None:
        known = [r[key] for r in results[name] if r["status"] == "ok" and key in r]
        return statistics.median(known) if known else None

    lines = [
        f"{args.trials} trials of the rings task ({args.rows} rows, {args.epochs} epochs, "
        f"1 job, no pruner), {args.rounds} rounds; medians, and ratios of medians to train "
        "(the commands: to N x `lkflow train`). CPU: the process's CPU seconds, less swayed "
        "by other processes than wall time.",
        "",
        "| contender | wall s | each round (s) | x train | + per trial s | CPU s | x train |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for name, runs in results.items():
        base = "train" if name in IN_PROCESS else "train_commands"
        wall, base_wall = median(name, "seconds"), median(base, "seconds")
        cpu, base_cpu = median(name, "cpu"), median(base, "cpu")
        ratio = None if wall is None or not base_wall else wall / base_wall
        extra = None if wall is None or base_wall is None else (wall - base_wall) / args.trials
        cpu_ratio = None if cpu is None or not base_cpu else cpu / base_cpu
        each = ", ".join(fmt(r.get("seconds")) if r["status"] == "ok" else "error" for r in runs)
        lines.append(
            f"| {LABELS[name]} | {fmt(wall)} | {each} | {fmt(ratio, '.3f')} | "
            f"{fmt(extra, '+.2f')} | {fmt(cpu)} | {fmt(cpu_ratio, '.3f')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=4, choices=range(1, len(LRS) + 1))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rows", type=int, default=4000, help="the rings task's points")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--quiet-wait", type=float, default=30.0)
    parser.add_argument("--commands", action="store_true", help="also time the commands")
    parser.add_argument("--out", type=Path, help="write the table here too")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args)
        return
    names = [*IN_PROCESS, *(COMMANDS if args.commands else ())]
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="lkflow-sweep-bench-") as tmp:
        migrated = Path(tmp) / "mlflow.db"
        _store(Path(tmp))
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                res = spawn(name, args) if name in IN_PROCESS else commands(name, args, migrated)
                results[name].append(res)
                shown = f"{res['seconds']:.2f} s" if res["status"] == "ok" else res["reason"]
                print(f"round {r + 1}/{args.rounds} {name:18} {shown}", file=sys.stderr)
    text = table(results, args)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
