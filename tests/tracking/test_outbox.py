"""The outbox: `lkflow sync` delivers what a fit kept, and the outbox has one owner at a time: a
running fit, or one `lkflow sync`.

The fit runs as a real subprocess that waits at epoch ends for the test's word, against a
real `mlflow server` that the test kills and starts again; `lkflow sync` runs as a real
subprocess while the fit still writes the outbox, and again after it.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
from click.testing import CliRunner
from helpers import fresh_store, make_loaders, make_model
from mlflow import MlflowClient
from servers import BIN, bin_path_env, free_port, mlflow_server

from lkflow import MLflowCallback
from lkflow.cli import main
from lkflow.epoch_values import epoch_number
from lkflow.tracking.outbox import Outbox

TESTS = Path(__file__).parents[1]  # helpers.py, for the fit in its own process
EPOCHS = 4
KEYS = ("loss", "acc", "val_loss", "val_acc", "lr")

_FIT = """
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
from helpers import make_loaders, make_model


class Gate(pl.Callback):
    # At the end of epochs 0 and 1, writes `at-<epoch>` and waits for the file `go-<epoch>`.
    def on_train_epoch_end(self, trainer, pl_module):
        epoch = trainer.current_epoch
        if epoch < 2:
            Path(f"at-{epoch}").touch()
            while not Path(f"go-{epoch}").exists():
                time.sleep(0.05)


model = make_model()
while not Path("start").exists():  # imported while the server starts
    time.sleep(0.05)
model.fit(
    *make_loaders(),
    epochs=int(sys.argv[2]),
    gpus=0,
    verbose=0,
    callbacks=[Gate()],
    experiment_name="owned",
    tracking_uri=sys.argv[1],
)
print(model.run_id)
"""


class _Process:
    """A command run in `cwd`, its output in `<name>.out` and `<name>.err` there (a pipe
    nobody reads would stall it)."""

    def __init__(self, name: str, command: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.out, self.err = cwd / f"{name}.out", cwd / f"{name}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=err)

    def wait_for(self, path: Path, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while not path.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                raise AssertionError(f"no {path.name}:\n{self.err.read_text()[-4000:]}")
            time.sleep(0.05)

    def finish(self, timeout_s: float = 120) -> int:
        try:
            return self.process.wait(timeout=timeout_s)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()


def _sync(cwd: Path, name: str) -> _Process:
    """`lkflow sync` in its own process."""
    return _Process(name, [str(BIN / "lkflow"), "sync"], cwd, bin_path_env())


@pytest.mark.slow
def test_sync_beside_a_running_fit_leaves_its_outbox_and_the_run_ends_whole(
    tmp_path: Path, migrated_store: Path
) -> None:
    (tmp_path / "server").mkdir()
    backend = fresh_store(tmp_path / "server", migrated_store)
    port = free_port()
    (tmp_path / "fit.py").write_text(_FIT)
    env = {
        **bin_path_env(),
        "PYTHONPATH": str(TESTS),
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",  # the outage is noticed at once
    }
    url = f"http://127.0.0.1:{port}"
    fit = _Process("fit", [sys.executable, "fit.py", url, str(EPOCHS)], tmp_path, env)
    server = mlflow_server(backend, tmp_path / "served", tmp_path, port)
    with server:
        (tmp_path / "start").touch()
        fit.wait_for(tmp_path / "at-0")
        os.killpg(server.process.pid, signal.SIGKILL)  # epoch 0's row is logged as 1 starts
        server.process.wait()
        (tmp_path / "go-0").touch()
        fit.wait_for(tmp_path / "at-1")
    outbox = tmp_path / "mlruns-outbox"
    (folder,) = outbox.iterdir()
    assert (folder / "journal.jsonl").exists()

    with mlflow_server(backend, tmp_path / "served", tmp_path, port):
        during = _sync(tmp_path, "sync-during")
        assert during.finish() == 1, during.err.read_text()[-4000:]
        message = during.err.read_text()
        assert f"Run {folder.name}: its fit (process {fit.process.pid}) is still running" in message
        assert "Nothing of it was delivered" in message and during.out.read_text() == ""
        assert (folder / "journal.jsonl").exists()

        (tmp_path / "go-1").touch()
        assert fit.finish() == 0, fit.err.read_text()[-4000:]
        run_id = fit.out.read_text().split()[-1]
        assert run_id == folder.name
        after = CliRunner().invoke(main, ["sync"])
        assert after.exit_code == 0, after.output
        assert after.stdout.endswith("registered as owned version 1, ended FINISHED.\n")
        assert not outbox.exists()

        client = MlflowClient(url)
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        for key in KEYS:
            steps = [m.step for m in client.get_metric_history(run_id, key)]
            assert sorted(steps) == list(range(1, EPOCHS + 1)), key  # each epoch once
        versions = client.search_model_versions("name = 'owned'")
        assert [str(v.version) for v in versions] == ["1"]
        (model,) = client.search_logged_models([run.info.experiment_id])
        assert versions[0].source == f"models:/{model.model_id}" and model.status == "READY"
        assert json.loads(model.tags["mlflow.modelVersions"]) == [{"name": "owned", "version": 1}]
        artifacts = {a.path for a in client.list_artifacts(run_id)}
        assert artifacts >= {"checkpoints", "net", "history.csv", "curves.png"}


def _outbox_of_a_whole_fit(uri: str, root: Path) -> str:
    """A fit whose every write, its model and registration too, waits in the outbox: the
    fit continues an outbox its run already had. Returns the run's id."""
    client = MlflowClient(uri)
    run_id = client.create_run("0").info.run_id
    client.set_terminated(run_id)  # the fit reopens it, and ends it
    kept = root / run_id  # as an earlier fit left it (the layout of lkflow/tracking/outbox.py)
    kept.mkdir(parents=True)
    meta = {"run_id": run_id, "experiment_id": "0", "tracking_uri": uri, "has_credentials": False}
    (kept / "run.json").write_text(json.dumps(meta))
    (kept / "journal.jsonl").write_text(json.dumps({"op": "batch", "tags": {"k": "v"}}) + "\n")
    with pytest.warns(UserWarning, match="writes that an earlier fit kept"):
        tracker = MLflowCallback(run_id=run_id)
        make_model().fit(*make_loaders(), epochs=2, gpus=0, verbose=0, track=tracker)
    assert client.search_registered_models() == []
    return run_id


def _owner(folder: Path) -> dict:
    path = folder / "owner.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _journal(folder: Path) -> list[str]:
    path = folder / "journal.jsonl"
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.slow
def test_a_second_sync_finds_the_outbox_busy_and_the_model_is_registered_once(
    tracking_uri: str, tmp_path: Path
) -> None:
    run_id = _outbox_of_a_whole_fit(tracking_uri, tmp_path / "mlruns-outbox")
    folder = tmp_path / "mlruns-outbox" / run_id
    # The test holds the database's write lock: the first sync waits on it, owning the outbox.
    database = sqlite3.connect(tmp_path / "mlflow.db", isolation_level=None)
    database.execute("BEGIN IMMEDIATE")
    try:
        first = _sync(tmp_path, "first")
        deadline = time.monotonic() + 60
        while _owner(folder) != {"pid": first.process.pid, "by": "sync"}:
            assert time.monotonic() < deadline and first.process.poll() is None
            time.sleep(0.05)
        second = CliRunner().invoke(main, ["sync"])
    finally:
        database.rollback()
        database.close()
    assert second.exit_code == 1, second.output
    assert second.stdout == ""
    assert f"Run {run_id}: another `lkflow sync` (process {first.process.pid}) is " in second.stderr
    assert "Nothing of it was delivered" in second.stderr

    assert first.finish() == 0, first.err.read_text()[-4000:]
    assert first.out.read_text().endswith("registered as Net version 1, ended FINISHED.\n")
    client = MlflowClient(tracking_uri)
    assert [str(v.version) for v in client.search_model_versions("name = 'Net'")] == ["1"]
    assert len(client.search_logged_models(["0"])) == 1
    assert client.get_run(run_id).info.status == "FINISHED"
    assert not folder.exists()


_HOLDER = """
import sys
import time

from lkflow.tracking.outbox import Outbox

outbox = Outbox.open("mlruns-outbox", sys.argv[1], "0", sys.argv[2])
outbox.append({"op": "end", "status": "FINISHED", "end_time": int(time.time() * 1000)})
time.sleep(600)
"""


@pytest.mark.slow
def test_the_outbox_of_a_fit_killed_with_sigkill_is_delivered(
    tracking_uri: str, tmp_path: Path
) -> None:
    run_id = MlflowClient(tracking_uri).create_run("0").info.run_id
    holder = _Process(
        "holder", [sys.executable, "-c", _HOLDER, run_id, tracking_uri], tmp_path, {**os.environ}
    )
    folder = tmp_path / "mlruns-outbox" / run_id
    try:
        deadline = time.monotonic() + 60
        # the holder owns the outbox and has written into it (run.json comes after owner.json)
        while _owner(folder) != {"pid": holder.process.pid, "by": "fit"} or not _journal(folder):
            assert time.monotonic() < deadline and holder.process.poll() is None
            time.sleep(0.05)
        busy = CliRunner().invoke(main, ["sync"])
        assert busy.exit_code == 1 and "is still running and owns the outbox" in busy.stderr
    finally:
        holder.process.kill()  # SIGKILL
        holder.finish()
    synced = CliRunner().invoke(main, ["sync"])
    assert synced.exit_code == 0, synced.output
    assert synced.stdout == f"Run {run_id} at {tracking_uri}: delivered ended FINISHED.\n"
    assert MlflowClient(tracking_uri).get_run(run_id).info.status == "FINISHED"


class _Boom(pl.Callback):
    def __init__(self) -> None:
        self.error = RuntimeError("boom at the end of epoch 2")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if epoch_number(trainer.current_epoch) == 2:
            raise self.error


def test_sync_without_an_outbox_delivers_nothing(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["sync"])
    assert result.exit_code == 0
    assert result.output == f"Nothing to deliver: no run kept in {tmp_path / 'mlruns-outbox'}.\n"


def test_a_resumed_fit_adds_its_writes_after_those_kept(tracking_uri: str, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        make_model().fit(*make_loaders(), epochs=3, gpus=0, verbose=0, callbacks=[_Boom()])
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs(["0"])
    kept = Outbox.open(tmp_path / "mlruns-outbox", run.info.run_id, "0", tracking_uri)
    kept.append({"op": "batch", "tags": {"kept": "before the resumed fit"}})
    kept.release()  # as the earlier fit did when it ended
    model = make_model()
    with pytest.warns(UserWarning, match="writes that an earlier fit kept"):
        model.fit(*make_loaders(), epochs=3, gpus=0, verbose=0, ckpt_path="checkpoints/last.ckpt")
    assert model.run_id == run.info.run_id
    assert client.search_registered_models() == []  # the resumed fit's writes wait too

    synced = CliRunner().invoke(main, ["sync"])
    assert synced.exit_code == 0, synced.output
    assert synced.stdout.splitlines()[-1].endswith("registered as Net version 1, ended FINISHED.")
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["kept"] == "before the resumed fit"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == [1, 2, 3]


def test_sync_names_a_server_it_cannot_reach_and_keeps_no_credentials(tmp_path: Path) -> None:
    uri = f"http://user:secret@127.0.0.1:{free_port()}"
    Outbox.open(tmp_path / "mlruns-outbox", "0123abcd", "0", uri).release()
    assert "secret" not in (tmp_path / "mlruns-outbox" / "0123abcd" / "run.json").read_text()
    without = CliRunner().invoke(main, ["sync"])
    assert without.exit_code == 1 and "whose credentials the outbox does not keep" in without.output
    given = CliRunner().invoke(main, ["sync", "--tracking-uri", uri])
    assert given.exit_code == 1
    assert "Cannot reach the MLflow tracking server at http://***@127.0.0.1:" in given.output
    assert "secret" not in given.output + without.output
