"""A team's tracking server: what tracking costs a fit per epoch, and `lkflow runs` at team size.

Run from the repository root where PostgreSQL 15 is installed (about 5 minutes on 2 cores):

    python -m benchmarks.team --epochs 10 --rounds 5 --out benchmarks/RESULTS-team.md

Per-epoch cost. For each store: an `mlflow server` over PostgreSQL, an `mlflow server` over a
sqlite file (both on 127.0.0.1, artifacts served by them) and a sqlite file without a server,
`tests/team_fits.py` runs one fit alone, then 8 fits at once with a 2-process DDP fit beside
them, `--epochs` each. Each fit times its tracker from the fit's side: the seconds from the end
of an epoch's training to the start of the next epoch's (or to the end of training), which
holds that epoch's logging calls; the end of the fit (model, registration) is shown apart.

Team size. A store of 2000 runs across 20 experiments and 200 versions of one model, on the
PostgreSQL server (one real tracked fit, copied in SQL as tests/test_team.py does): each
`lkflow runs` command is timed as a whole process (`--rounds` times, the median; Python's
start and imports included), and in this process (`CliRunner`, imports done: the command's
own work), as is choosing the best of the 200 versions, which `lkflow serve NAME` does.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
LOADS: list[float] = []  # the 1-minute load average after each measurement
sys.path.insert(0, str(REPO / "tests"))  # the servers and store builders of the tests


def _fits(uri: str, folder: Path, fits: int, ddp: bool, epochs: int) -> list[dict[str, Any]]:
    """tests/team_fits.py against `uri`; every fit's result."""
    folder.mkdir(parents=True)
    settings = {"uri": uri, "fits": fits, "ddp": ddp, "epochs": epochs}
    settings |= {"experiment": "team", "registered": "team-net"}
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    script = REPO / "tests" / "team_fits.py"
    subprocess.run(
        [sys.executable, str(script), json.dumps(settings)], cwd=folder, env=env, check=True
    )
    return [json.loads(path.read_text()) for path in sorted(folder.glob("*/result.json"))]


def _summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"median_ms": 1000 * statistics.median(ordered), "p95_ms": 1000 * p95, "n": len(values)}


def per_epoch(postgres: Any, work: Path, epochs: int) -> dict[str, Any]:
    from servers import MIGRATED, mlflow_server

    results: dict[str, Any] = {}
    sqlite_file = work / "sqlite-file" / "mlflow.db"
    sqlite_file.parent.mkdir()
    stores = {
        "PostgreSQL server": (postgres.create("bench", MIGRATED), True),
        "sqlite server": (f"sqlite:///{work / 'sqlite-server.db'}", True),
        "sqlite file (no server)": (f"sqlite:///{sqlite_file}", False),
    }
    for store, (backend, served) in stores.items():
        folder = work / store.split()[0] / store.split()[1]
        folder.mkdir(parents=True)
        server = mlflow_server(backend, folder / "artifacts", folder) if served else None
        uri = server.__enter__() if server else backend
        try:
            for load, (fits, ddp) in {"alone": (1, False), "9 fits at once": (8, True)}.items():
                found = _fits(uri, folder / load.split()[0], fits, ddp, epochs)
                results[f"{store}, {load}"] = {
                    "epoch": _summary([s for fit in found for s in fit["epoch_s"]]),
                    "end": _summary([fit["end_s"] for fit in found]),
                }
                LOADS.append(os.getloadavg()[0])
                print(store, load, results[f"{store}, {load}"], flush=True)
        finally:
            if server:
                server.stop()
    return results


def team_size(postgres: Any, work: Path, rounds: int) -> dict[str, Any]:
    import pytorch_lightning as pl
    from click.testing import CliRunner
    from helpers import Copy, copy_runs, copy_versions, fit, make_model
    from mlflow import MlflowClient
    from servers import PgServer

    from lkflow.cli import main
    from lkflow.tracking.registry import model_version

    folder = work / "team-size"
    folder.mkdir()
    os.chdir(folder)
    with PgServer(postgres, folder) as server:
        url = server.fresh()
        pl.seed_everything(0, verbose=False)
        model = fit(make_model(), 1, experiment_name="team-00", registered_model_name="team-net",
                    tracking_uri=url)  # fmt: skip
        client = MlflowClient(url)
        run = client.get_run(model.run_id)
        ids = [run.info.experiment_id]
        ids += [client.create_experiment(f"team-{i:02d}") for i in range(1, 20)]
        copies = [
            Copy(f"{i:032x}", f"copy-{i}", ids[i % 20], run.info.start_time + 1000 * i,
                 0.1 + (i * 7919 % 2000) / 2000)
            for i in range(1, 2000)
        ]  # fmt: skip
        copy_runs(server.backend, model.run_id, copies)
        copy_versions(
            server.backend, "team-net", {n: (copies[n].run_id, 0.5) for n in range(2, 201)}
        )
        commands = {
            "lkflow runs": ["runs"],
            "lkflow runs team-07 --sort best": ["runs", "team-07", "--sort", "best"],
            "lkflow runs --sort best (all 2000 runs)": ["runs", "--sort", "best"],
        }
        results: dict[str, Any] = {}
        lkflow = Path(sys.executable).parent / "lkflow"
        for name, args in commands.items():
            whole, inside = [], []
            for _ in range(rounds):
                start = time.perf_counter()
                subprocess.run([str(lkflow), *args, "--tracking-uri", url], check=True,
                               capture_output=True)  # fmt: skip
                whole.append(time.perf_counter() - start)
                start = time.perf_counter()
                done = CliRunner().invoke(main, [*args, "--tracking-uri", url])
                inside.append(time.perf_counter() - start)
                assert done.exit_code == 0, done.output
            results[name] = {
                "process_s": statistics.median(whole),
                "work_s": statistics.median(inside),
            }
            LOADS.append(os.getloadavg()[0])
            print(name, results[name], flush=True)
        chosen = []
        for _ in range(rounds):
            start = time.perf_counter()
            model_version(client, "team-net")
            chosen.append(time.perf_counter() - start)
        results["best of 200 versions (lkflow serve NAME)"] = {"work_s": statistics.median(chosen)}
        return results


def _markdown(results: dict[str, Any], args: argparse.Namespace) -> str:
    import mlflow
    import torch

    lines = [
        "# A team's tracking server: benchmark results",
        "",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical "
        f"cores; Python {platform.python_version()}, torch {torch.__version__}, "
        f"mlflow {mlflow.__version__}, PostgreSQL 15",
        f"- Command: `python -m benchmarks.team --epochs {args.epochs} --rounds {args.rounds}`",
        f"- Load average (1 min), sampled after each measurement: {min(LOADS):.1f} to "
        f"{max(LOADS):.1f} (other work on the machine inflates every figure)",
        "- Fits: the rings, 256 rows in batches of 32, one torch thread each; a 2-process DDP "
        "fit beside 8 one-process fits makes 9 fits at once on 2 cores. Servers: `mlflow server` "
        "with one worker, without MLflow's job runner.",
        "",
        "## Tracking's cost per epoch, from the fit's side",
        "",
        "Milliseconds the tracker spends between an epoch's last training batch and the next "
        "epoch's first (that epoch's logging calls); the end of the fit (artifacts, the model, "
        "its registration) apart.",
        "",
        "| store | fits | per epoch median ms | per epoch p95 ms | epochs | end of fit median s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for key, value in results["per_epoch"].items():
        store, load = key.split(", ")
        epoch, end = value["epoch"], value["end"]
        lines.append(
            f"| {store} | {load} | {epoch['median_ms']:.1f} | {epoch['p95_ms']:.1f} | "
            f"{epoch['n']} | {end['median_ms'] / 1000:.2f} |"
        )
    lines += [
        "",
        "## `lkflow runs` and `lkflow serve` on 2000 runs, 20 experiments, 200 versions",
        "",
        f"PostgreSQL-backed server; medians of {args.rounds} rounds. Whole command: a new "
        "process, Python's start and imports included; work: the command in a process that "
        "has imported lkflow, MLflow and pandas.",
        "",
        "| command | whole command s | work s |",
        "|---|---:|---:|",
    ]
    for name, value in results["team_size"].items():
        whole = f"{value['process_s']:.2f}" if "process_s" in value else ""
        lines.append(f"| {name} | {whole} | {value['work_s']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "RESULTS-team.md")
    args = parser.parse_args()
    from servers import MIGRATED, Postgres, migrate, postgres_missing

    reason = postgres_missing()
    if reason:
        sys.exit(f"Cannot run: {reason}")
    with tempfile.TemporaryDirectory() as tmp, Postgres() as postgres:
        migrate(postgres.create(MIGRATED))
        results = {
            "per_epoch": per_epoch(postgres, Path(tmp), args.epochs),
            "team_size": team_size(postgres, Path(tmp), args.rounds),
        }
    args.out.write_text(_markdown(results, args))
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"Wrote {args.out}")


if __name__ == "__main__":
    main()
