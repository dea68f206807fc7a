"""A tracking server that goes away in the middle of a fit: what the run holds after `lkflow sync`.

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
from lkflow.epoch_values import epoch_number

EPOCHS = 4
KEYS = ("loss", "acc", "val_loss", "val_acc", "lr")


class _KillAtEpochEnd(pl.Callback):
    """Kills the server's process group at the end of `epoch` and waits for it to be gone."""

    def __init__(self, server: Server, epoch: int) -> None:
        self.server, self.epoch = server, epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if epoch_number(trainer.current_epoch) == self.epoch:
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
                callbacks=[_KillAtEpochEnd(server, epoch=2)],
                experiment_name="offline",
                tracking_uri=url,
            )
    assert list(history["epoch"]) == list(range(1, EPOCHS + 1))  # the fit went on to its end
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
            assert sorted(steps) == list(range(1, EPOCHS + 1)), key  # each epoch once
        best = history.loc[history["val_loss"].idxmin()]
        assert run.data.metrics["best_epoch"] == best["epoch"]
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
