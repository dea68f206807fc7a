"""A tracking server that is not there or goes away, and a fit that fails: what the run keeps.

The outage test runs a real `mlflow server` on 127.0.0.1, kills it in the middle of a fit,
starts it again on the same port and store, and checks the run through `MlflowClient` after
`lkflow sync`.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import mlflow
import pytest
import pytorch_lightning as pl
from click.testing import CliRunner
from helpers import fresh_store, make_loaders, make_model
from mlflow import MlflowClient
from servers import Server, free_port, mlflow_server

from lkflow.cli import main
from lkflow.errors import LkflowError
from lkflow.tracking.outbox import Outbox

EPOCHS = 4
KEYS = ("loss", "acc", "val_loss", "val_acc", "lr")


class _KillAtEpochEnd(pl.Callback):
    """Kills the server's process group at the end of `epoch` and waits for it to be gone."""

    def __init__(self, server: Server, epoch: int) -> None:
        self.server, self.epoch = server, epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            os.killpg(self.server.process.pid, signal.SIGKILL)
            self.server.process.wait()


def _run_state(client: MlflowClient, run_id: str) -> tuple:
    """What a sync could change in the run: metric points, artifacts, status, versions."""
    run = client.get_run(run_id)
    points = {key: client.get_metric_history(run_id, key) for key in run.data.metrics}
    return (
        run.info.status,
        run.info.end_time,
        run.data.params,
        run.data.tags,
        {
            key: sorted((m.step, m.timestamp, m.value) for m in found)
            for key, found in points.items()
        },
        sorted(a.path for a in client.list_artifacts(run_id)),
        [(v.name, v.version) for v in client.search_model_versions(f"run_id = '{run_id}'")],
    )


@pytest.mark.slow
def test_a_server_gone_mid_fit_keeps_the_rest_for_lkflow_sync(
    tmp_path: Path, migrated_store: Path
) -> None:
    (tmp_path / "server").mkdir()
    backend = fresh_store(tmp_path / "server", migrated_store)
    port = free_port()
    server = mlflow_server(backend, tmp_path / "served", tmp_path, port)
    with server as url:
        model = make_model()
        with pytest.warns(UserWarning, match="stopped answering") as warned:
            history = model.fit(
                *make_loaders(),
                epochs=EPOCHS,
                gpus=0,
                verbose=0,
                callbacks=[_KillAtEpochEnd(server, epoch=1)],
                experiment_name="offline",
                tracking_uri=url,
            )
    assert list(history["epoch"]) == list(range(EPOCHS))  # the fit went on to its end
    outbox = tmp_path / "mlruns-outbox" / model.run_id
    (message,) = [str(w.message) for w in warned if "lkflow sync" in str(w.message)]
    assert str(outbox) in message and url in message

    with mlflow_server(backend, tmp_path / "served", tmp_path, port):
        synced = CliRunner().invoke(main, ["sync"])
        assert synced.exit_code == 0, synced.output
        (line,) = synced.stdout.splitlines()
        assert line.startswith(f"Run {model.run_id} at {url}: delivered ")
        assert line.endswith("registered as offline version 1, ended FINISHED.")
        assert not outbox.exists()

        client = MlflowClient(url)
        run = client.get_run(model.run_id)
        assert run.info.status == "FINISHED" and run.data.params["epochs"] == str(EPOCHS)
        for key in KEYS:
            steps = [m.step for m in client.get_metric_history(model.run_id, key)]
            assert sorted(steps) == list(range(EPOCHS)), key  # each epoch once
        assert run.data.metrics["best_epoch"] == history["val_loss"].idxmin()
        artifacts = {a.path for a in client.list_artifacts(model.run_id)}
        assert artifacts >= {"checkpoints", "net", "history.csv", "curves.png"}
        assert [a.path for a in client.list_artifacts(model.run_id, "net")] == ["net/state_dict.pt"]
        checkpoints = {
            Path(a.path).name for a in client.list_artifacts(model.run_id, "checkpoints")
        }
        assert checkpoints == {Path(model.trainer.checkpoint_callback.best_model_path).name}
        version = client.get_model_version("offline", "1")
        assert version.run_id == model.run_id
        model_id = version.source.removeprefix("models:/")  # MLflow keeps no version.model_id
        assert client.get_logged_model(model_id).status == "READY"
        with pytest.MonkeyPatch.context() as env:
            env.setenv("MLFLOW_TRACKING_URI", url)
            info = mlflow.models.get_model_info(version.source)
        assert info.model_id == model_id and "python_function" in info.flavors

        before = _run_state(client, model.run_id)
        again = CliRunner().invoke(main, ["sync"])
        assert again.exit_code == 0 and again.output.startswith("Nothing to deliver")
        assert _run_state(client, model.run_id) == before


def test_an_unreachable_server_stops_the_fit_before_training(tmp_path: Path) -> None:
    port = free_port()
    model = make_model()
    uri = f"http://user:secret@127.0.0.1:{port}"
    with pytest.raises(
        LkflowError, match=rf"Cannot reach .* at http://\*\*\*@127\.0\.0\.1:{port}"
    ) as raised:
        model.fit(*make_loaders(), epochs=2, gpus=0, verbose=0, tracking_uri=uri)
    assert "secret" not in str(raised.value) and "tracking_uri=" in str(raised.value)
    assert model.history == [] and list(tmp_path.rglob("*.ckpt")) == []
    assert not (tmp_path / "mlruns-outbox").exists()


class _Boom(pl.Callback):
    def __init__(self) -> None:
        self.error = RuntimeError("boom at the end of epoch 1")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == 1:
            raise self.error


def test_a_failed_fit_leaves_its_error_and_traceback_on_the_run(
    tracking_uri: str, tmp_path: Path
) -> None:
    boom = _Boom()
    with pytest.raises(RuntimeError) as raised:
        make_model().fit(*make_loaders(), epochs=3, gpus=0, verbose=0, callbacks=[boom])
    assert raised.value is boom.error  # unchanged
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs(["0"])
    assert run.info.status == "FAILED"
    assert run.data.tags["lkflow.error"] == "RuntimeError: boom at the end of epoch 1"
    path = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="traceback.txt", dst_path=str(tmp_path / "got")
    )
    lines = Path(path).read_text().splitlines()
    assert 1 < len(lines) <= 40  # the traceback's end
    assert "raise self.error" in lines[-2] and lines[-1] == str(run.data.tags["lkflow.error"])


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
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == [0, 1, 2]


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
