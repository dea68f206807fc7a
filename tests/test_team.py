"""A team's tracking server for real: `mlflow server` over PostgreSQL, with many fits at once
(and a restart in the middle), and `lkflow runs` and `lkflow serve` on a store of team size.

The fits are `team_fits.py`: 8 one-process fits and a 2-process DDP fit, each in a process and a
folder of its own, forked from one process once the imports are done. `lkflow runs` and
`lkflow compare` poll the server meanwhile. Everything is checked through `MlflowClient`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import Copy, copy_runs, copy_versions, fit, make_model
from mlflow import MlflowClient
from servers import PgServer

from lkflow.cli import main
from lkflow.tracking.registry import model_version

pytestmark = pytest.mark.slow

TESTS = Path(__file__).parent
FITS, EPOCHS = 8, 2
NAMES = [*(f"fit-{i}" for i in range(FITS)), "ddp"]
KEYS = ("loss", "val_loss", "lr")
MODEL = "team-net"


def _launch(folder: Path, url: str, gates: list[int]) -> subprocess.Popen[bytes]:
    """`team_fits.py` in `folder`: the 9 fits, tracked at `url`, waiting at `gates`."""
    settings = {"uri": url, "fits": FITS, "ddp": True, "epochs": EPOCHS}
    settings |= {"experiment": "team", "registered": MODEL, "gates": gates}
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent), "OMP_NUM_THREADS": "1"}
    with open(folder / "launcher.txt", "wb") as log:
        return subprocess.Popen(
            [sys.executable, str(TESTS / "team_fits.py"), json.dumps(settings)],
            cwd=folder,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def _finished(launcher: subprocess.Popen[bytes], folder: Path) -> dict[str, dict]:
    """Each fit's result.json, once the launcher has ended well."""
    launcher.wait(timeout=300)
    logs = "\n".join(
        f"--- {name}\n{(folder / name / 'log.txt').read_text()[-3000:]}"
        for name in NAMES
        if (folder / name / "log.txt").exists()
    )
    assert launcher.returncode == 0, (folder / "launcher.txt").read_text() + logs
    return {name: json.loads((folder / name / "result.json").read_text()) for name in NAMES}


def _poll(
    url: str, folder: Path, launcher: subprocess.Popen[bytes], until: Path | None = None
) -> int:
    """`lkflow runs` (and every third time `lkflow compare` of the two newest runs) again and
    again until the launcher ends, or until every fit has written `until`'s name; each must
    answer. Returns the number of rounds."""
    rounds = 0
    while until is None or not _all_at(until):
        if launcher.poll() is not None:
            assert until is None, (folder / "launcher.txt").read_text()  # it ended too soon
            break
        listed = CliRunner().invoke(main, ["runs", "--csv", "--max", "50", "--tracking-uri", url])
        assert listed.exit_code == 0, listed.output
        ids = [] if listed.stdout.startswith("No runs") else _ids(listed.stdout)
        if len(ids) >= 2 and rounds % 3 == 0:  # a figure is seconds of work on a busy machine
            args = ["compare", *ids[:2], "--metric", "loss", "--out", str(folder / "cmp.png")]
            compared = CliRunner().invoke(main, [*args, "--tracking-uri", url])
            # a run that has not logged its first epoch yet has no curve
            assert compared.exit_code == 0 or "did not log" in compared.output, compared.output
        rounds += 1
        time.sleep(1.0)
    return rounds


def _ids(table: str) -> list[str]:
    return [row["id"] for row in csv.DictReader(io.StringIO(table))]


def _all_at(marker: Path) -> bool:
    """Whether every fit's folder holds `marker`'s name (a gate it waits at)."""
    return all((marker.parent / name / marker.name).exists() for name in NAMES)


def _assert_one_whole_run_and_version_per_fit(url: str, results: dict[str, dict]) -> None:
    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("team")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(run.info.run_id for run in runs) == sorted(r["run_id"] for r in results.values())
    for run in runs:
        assert run.info.status == "FINISHED", run.info.run_id
    for name, result in results.items():
        epochs = [row["epoch"] for row in result["history"]]
        assert len(epochs) == EPOCHS, name
        for key in KEYS:
            logged = sorted(m.step for m in client.get_metric_history(result["run_id"], key))
            assert logged == epochs, (name, key)  # every epoch, once
    versions = client.search_model_versions(f"name = '{MODEL}'")
    assert sorted(int(v.version) for v in versions) == list(range(1, len(NAMES) + 1))
    assert sorted(v.run_id for v in versions) == sorted(r["run_id"] for r in results.values())


@pytest.mark.ddp
def test_nine_fits_at_once_make_one_whole_run_and_one_version_each(
    pg_server: PgServer, tmp_path: Path
) -> None:
    url = pg_server.fresh()
    launcher = _launch(tmp_path, url, gates=[])
    assert _poll(url, tmp_path, launcher) > 0
    results = _finished(launcher, tmp_path)
    _assert_one_whole_run_and_version_per_fit(url, results)
    assert not list(tmp_path.glob("*/mlruns-outbox"))  # nothing was held back


@pytest.mark.ddp
def test_a_server_restarted_under_nine_fits_loses_nothing_after_lkflow_sync(
    pg_server: PgServer, tmp_path: Path
) -> None:
    url = pg_server.fresh()
    launcher = _launch(tmp_path, url, gates=[0, 1])
    try:
        _poll(url, tmp_path, launcher, until=tmp_path / "at-0")  # every fit trained epoch 0
        pg_server.kill()
        (tmp_path / "go-0").touch()
        while not _all_at(tmp_path / "at-1"):  # every fit has found the server gone
            assert launcher.poll() is None, (tmp_path / "launcher.txt").read_text()
            time.sleep(0.1)
    finally:
        pg_server.start()
    (tmp_path / "go-1").touch()
    results = _finished(launcher, tmp_path)
    for name in NAMES:
        outbox = tmp_path / name / "mlruns-outbox"
        synced = CliRunner().invoke(main, ["sync", "--outbox", str(outbox)])
        assert synced.exit_code == 0, synced.output
        (line,) = synced.stdout.splitlines()
        assert line.startswith(f"Run {results[name]['run_id']} at {url}: delivered ")
        assert line.endswith("ended FINISHED.") and f"registered as {MODEL} version" in line
        assert not (outbox / results[name]["run_id"]).exists()
    _assert_one_whole_run_and_version_per_fit(url, results)


# ---- a store of team size -----------------------------------------------------------------

RUNS, EXPERIMENTS, VERSIONS = 2000, 20, 200


def _requests(server: PgServer, since: int) -> list[str]:
    """The API paths the server was asked for after its log's first `since` lines."""
    lines = "\n".join(server.server.output().splitlines()[since:])
    return [path.split("?")[0] for path in re.findall(r'"[A-Z]+ (\S+) HTTP/[\d.]+"', lines)]


def _runs_csv(*args: str) -> list[dict[str, str]]:
    listed = CliRunner().invoke(main, ["runs", "--csv", *args])
    assert listed.exit_code == 0, listed.output
    return list(csv.DictReader(io.StringIO(listed.stdout)))


def test_runs_and_serve_read_pages_of_a_store_of_2000_runs_never_histories(
    pg_server: PgServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = pg_server.fresh()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    model = fit(make_model(), epochs=1, experiment_name="team-00", registered_model_name=MODEL)
    client = MlflowClient(url)
    run = client.get_run(model.run_id)
    ids = [run.info.experiment_id]
    ids += [client.create_experiment(f"team-{i:02d}") for i in range(1, EXPERIMENTS)]
    copies = [
        Copy(
            run_id=f"{i:032x}",
            name=f"copy-{i}",
            experiment_id=ids[i % EXPERIMENTS],
            start_ms=run.info.start_time + 1000 * i,
            best=0.1 + (i * 7919 % RUNS) / RUNS,  # every value once, in no order
        )
        for i in range(1, RUNS)
    ]
    copy_runs(pg_server.backend, model.run_id, copies)
    versions = {n: (copies[n].run_id, copies[n].best) for n in range(2, VERSIONS + 1)}
    copy_versions(pg_server.backend, MODEL, versions)
    original = Copy(run.info.run_id, run.info.run_name, ids[0], run.info.start_time, 0.0)
    original.best = run.data.metrics["best_val_loss"]
    everyone = [original, *copies]

    logged = len(pg_server.server.output().splitlines())
    newest = _runs_csv()
    assert [row["run"] for row in newest] == [c.name for c in copies[::-1][:20]]
    seventh = sorted((c for c in everyone if c.experiment_id == ids[7]), key=lambda c: c.best)
    best_of_seventh = _runs_csv("team-07", "--sort", "best")
    assert [row["run"] for row in best_of_seventh] == [c.name for c in seventh[:20]]
    best_of_all = _runs_csv("--sort", "best", "--max", "5")
    assert [row["run"] for row in best_of_all] == [
        c.name for c in sorted(everyone, key=lambda c: c.best)[:5]
    ]
    asked = _requests(pg_server, logged)
    # one page of the newest 20, one page of team-07's 100 runs, two pages of all 2000
    assert asked.count("/api/2.0/mlflow/runs/search") == 4, asked
    assert not [path for path in asked if "get-history" in path or path.endswith("runs/get")]

    logged = len(pg_server.server.output().splitlines())
    version, why = model_version(client, MODEL)
    best = min((1, run.data.metrics["best_val_loss"]), *((n, v[1]) for n, v in versions.items()),
               key=lambda item: item[1])  # fmt: skip
    assert version.version == str(best[0]) and f"of {VERSIONS} versions" in why
    asked = _requests(pg_server, logged)
    assert asked == ["/api/2.0/mlflow/model-versions/search"], asked
