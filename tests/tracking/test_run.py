"""The run a fit logs into: opened by someone else, reopened, resumed, taken over, and ended
FINISHED, FAILED or KILLED with the error and traceback of a failed fit."""

from __future__ import annotations

import math
import os
import random
import re
import signal
from pathlib import Path
from typing import Any

import mlflow
import pytest
import pytorch_lightning as pl
import torch
from click.testing import CliRunner
from helpers import Net, fit, make_loaders, only_run, plain_fit, small_loaders, steps
from helpers import make_model as make_plain_model
from helpers import make_scheduled_model as make_model
from mlflow import MlflowClient
from mlflow.entities import Param, ViewType
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lkflow.cli import main
from lkflow.datasets import rings
from lkflow.epoch_values import epoch_number
from lkflow.errors import LkflowError
from lkflow.model import LightModel
from lkflow.tracking import MLflowCallback
from lkflow.tracking.outbox import Outbox
from lkflow.tracking.run import EXPERIMENT_KIND_TAG, MODEL_TRAINING, find_run, open_run


def test_the_tracking_uri_variable_survives_a_fit(tracking_uri: str) -> None:
    fit(make_model(), 1, registered_model_name="kept")
    assert os.environ["MLFLOW_TRACKING_URI"] == tracking_uri
    assert MlflowClient().get_registered_model("kept").name == "kept"


def test_two_fits_of_one_seed_get_runs_of_two_names_and_the_same_draws(tracking_uri: str) -> None:
    names, draws = [], []
    for _ in range(2):
        pl.seed_everything(7, verbose=False)
        model = fit(make_model(), 1)
        names.append(MlflowClient(tracking_uri).get_run(model.run_id).info.run_name)
        draws.append(random.random())  # where the seeded stream stood after the fit
    pl.seed_everything(7, verbose=False)
    fit(make_model(), 1, track=False)
    assert names[0] != names[1]
    assert draws == [random.random()] * 2  # naming the run drew nothing from it


def test_fit_inside_an_active_run_leaves_it_open(tracking_uri: str) -> None:
    with mlflow.start_run() as run:
        model = fit(make_model())
        assert model.run_id == run.info.run_id
        assert mlflow.active_run().info.run_id == run.info.run_id
        client = MlflowClient(tracking_uri)
        assert client.get_run(run.info.run_id).info.status == "RUNNING"
    assert client.get_run(run.info.run_id).data.params["epochs"] == "2"
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 2
    assert len(client.search_runs(["0"])) == 1  # never a second run
    assert client.get_model_version("Net", "1").run_id == run.info.run_id  # Default: class name


def test_fit_with_mlflow_run_id_like_mlflow_run(
    tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = MlflowClient(tracking_uri)
    run_id = client.create_run("0").info.run_id
    client.log_batch(
        run_id, params=[Param("epochs", "2"), Param("batch_size", "64.0")]
    )  # as -P gives
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    model = fit(make_model(), registered_model_name=False)
    assert model.run_id == run_id
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING"
    assert run.data.params["batch_size"] == "64.0" and run.data.params["net"] == "Net"
    assert client.search_registered_models() == []


def test_a_different_param_value_fails_before_training(
    tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = MlflowClient(tracking_uri)
    run_id = client.create_run("0").info.run_id
    client.log_batch(run_id, params=[Param("epochs", "5")])
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    model = make_model()
    with pytest.raises(LkflowError, match=r"epochs: '5' logged, '2' now.*new run"):
        fit(model)
    assert model.history == []
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING" and run.data.metrics == {}


def test_run_id_of_an_ended_run_is_reopened_and_ended(tracking_uri: str, tmp_path: Path) -> None:
    client = MlflowClient(tracking_uri)
    run_id = client.create_run("0").info.run_id
    client.set_terminated(run_id, "FINISHED")
    plain_fit(MLflowCallback(run_id=run_id, log_model=False), tmp_path)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["epochs"] == "2"
    assert client.search_logged_models(["0"]) == [] and client.search_registered_models() == []


def test_unknown_run_id_names_the_store(
    tracking_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_RUN_ID", "0123456789abcdef")
    with pytest.raises(
        LkflowError, match=rf"MLFLOW_RUN_ID='0123456789abcdef'.*{re.escape(tracking_uri)}"
    ):
        plain_fit(MLflowCallback(), tmp_path)


class _NanAtSecondEpoch(LightModel):
    def shared_step(self, batch: Any) -> dict[str, Any]:
        values = super().shared_step(batch)
        if epoch_number(self.current_epoch) == 2 and self.training:
            values["loss"] = values["loss"] * float("nan")
        return values


def test_failing_fit_ends_the_run_failed_with_what_exists(tracking_uri: str) -> None:
    model = make_model(model_class=_NanAtSecondEpoch)
    with pytest.raises(FloatingPointError, match="loss is nan at epoch 2"):
        fit(model, epochs=3, experiment_name="failing")
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("failing").experiment_id])
    assert run.info.status == "FAILED"
    losses = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
    assert [step for step, _ in losses] == [1, 2] and math.isnan(losses[1][1])
    assert [Path(a.path).name for a in client.list_artifacts(run.info.run_id, "checkpoints")]
    assert client.search_registered_models() == []


class _Boom(pl.Callback):
    def __init__(self, message: str = "boom") -> None:
        self.error = RuntimeError(message)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if epoch_number(trainer.current_epoch) == 2:
            raise self.error


def test_resumed_fit_continues_the_same_run(tracking_uri: str, tmp_path: Path) -> None:
    boom = _Boom()
    with pytest.raises(RuntimeError) as raised:
        plain_fit(MLflowCallback(log_model=False), tmp_path, 3, callbacks=(boom,))
    assert raised.value is boom.error  # unchanged
    client = MlflowClient(tracking_uri)
    (failed,) = client.search_runs(["0"])
    assert failed.info.status == "FAILED"
    tracker = MLflowCallback(log_model=False)
    model = plain_fit(tracker, tmp_path, 3, ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"))
    assert tracker.run_id_ == failed.info.run_id
    assert [row["epoch"] for row in model.history] == [1, 2, 3]
    assert client.get_run(tracker.run_id_).info.status == "FINISHED"
    for key in ("loss", "val_loss"):
        assert sorted(m.step for m in client.get_metric_history(tracker.run_id_, key)) == [1, 2, 3]


def test_a_resumed_fit_may_run_more_epochs(tracking_uri: str, tmp_path: Path) -> None:
    first = MLflowCallback(log_model=False)
    plain_fit(first, tmp_path, 2)
    tracker = MLflowCallback(log_model=False)
    plain_fit(tracker, tmp_path, 4, ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"))
    run = MlflowClient(tracking_uri).get_run(first.run_id_)
    assert tracker.run_id_ == first.run_id_ and run.info.status == "FINISHED"
    assert run.data.params["epochs"] == "2" and run.data.tags["lkflow.resumed_epochs"] == "4"
    history = MlflowClient(tracking_uri).get_metric_history(run.info.run_id, "val_loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]


def test_a_clashing_param_leaves_an_ended_run_as_it_was(tracking_uri: str, tmp_path: Path) -> None:
    client = MlflowClient(tracking_uri)
    run_id = client.create_run("0").info.run_id
    client.log_param(run_id, "epochs", "7")
    client.set_terminated(run_id, "FINISHED")
    with pytest.raises(LkflowError, match="epochs: '7' logged, '2' now"):
        plain_fit(MLflowCallback(run_id=run_id, log_model=False), tmp_path)
    assert client.get_run(run_id).info.status == "FINISHED"


def test_ctrl_c_ends_the_run_killed(tracking_uri: str, tmp_path: Path) -> None:
    class Interrupt(pl.Callback):
        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            raise KeyboardInterrupt

    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # Lightning turns Ctrl-C into exit status 1
            plain_fit(MLflowCallback(log_model=False), tmp_path, callbacks=(Interrupt(),))
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores SIGINT after one
    (run,) = MlflowClient(tracking_uri).search_runs(["0"])
    assert run.info.status == "KILLED"


def test_a_failed_fit_leaves_its_error_and_traceback_on_the_run(
    tracking_uri: str, tmp_path: Path
) -> None:
    boom = _Boom("boom at the end of epoch 1")
    with pytest.raises(RuntimeError) as raised:
        make_plain_model().fit(*make_loaders(), epochs=3, gpus=0, verbose=0, callbacks=[boom])
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


class _FailsInEpochTwo(LightModel):
    """Raises `error` in epoch 2's training step or validation, as `where` says."""

    where = ""
    error: BaseException = RuntimeError()

    def shared_step(self, batch: Any) -> dict[str, Any]:
        stage = "training_step" if self.trainer.training else "validation"
        second = epoch_number(self.current_epoch) == 2
        if second and stage == self.where and not self.trainer.sanity_checking:
            raise self.error
        return super().shared_step(batch)


class _FailsAtEpochEnd(pl.Callback):
    def __init__(self, error: BaseException) -> None:
        self.error = error

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if epoch_number(trainer.current_epoch) == 2:
            raise self.error


class _UnreadableRow(Dataset):
    """The rings, except that row 7 cannot be read once every row has been read once."""

    def __init__(self, error: BaseException) -> None:
        self.rows, self.error, self.reads = rings(192, seed=1), error, 0

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.reads += 1
        if index == 7 and self.reads > len(self.rows):
            raise self.error
        return self.rows[index]


@pytest.mark.parametrize(
    ("where", "error"),
    [
        ("training_step", RuntimeError("bad step")),
        ("validation", ZeroDivisionError("bad validation")),
        ("epoch_end", KeyError("bad epoch end")),
        ("data_loading", OSError("row 7 is unreadable")),
    ],
)
def test_an_exception_in_user_code_reaches_the_caller_and_fails_the_run(
    tracking_uri: str, where: str, error: BaseException
) -> None:
    model = make_plain_model(model_class=_FailsInEpochTwo)
    model.where, model.error = where, error
    callbacks = [_FailsAtEpochEnd(error)] if where == "epoch_end" else []
    loaders = small_loaders(_UnreadableRow(error) if where == "data_loading" else None)
    with pytest.raises(type(error)) as raised:
        model.fit(*loaders, epochs=3, gpus=0, verbose=0, callbacks=callbacks)
    assert raised.value is error  # the very object, unwrapped

    client = MlflowClient(tracking_uri)
    run = only_run(client)
    assert run.info.status == "FAILED"
    epochs = [row["epoch"] for row in model.history]
    assert epochs == [1]  # epoch 2 never ended
    for key in ("loss", "acc", "val_loss", "val_acc", "lr"):
        assert steps(client, run.info.run_id, key) == epochs, key
    logged = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    best = Path(model.trainer.checkpoint_callback.best_model_path).name
    assert logged == {best, "last.ckpt"} and best.startswith("epoch=1-")


def test_a_resumed_fit_that_finishes_moves_the_error_tag_aside(
    tracking_uri: str, tmp_path: Path
) -> None:
    with pytest.raises(RuntimeError):
        plain_fit(MLflowCallback(log_model=False), tmp_path, 3, callbacks=(_Boom(),))
    client = MlflowClient(tracking_uri)
    (failed,) = client.search_runs(["0"])
    assert failed.data.tags["lkflow.error"] == "RuntimeError: boom"
    tracker = MLflowCallback(log_model=False)
    plain_fit(tracker, tmp_path, 3, ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"))
    run = client.get_run(failed.info.run_id)
    assert run.info.status == "FINISHED" and tracker.run_id_ == failed.info.run_id
    assert "lkflow.error" not in run.data.tags
    assert run.data.tags["lkflow.previous_error"] == "RuntimeError: boom"
    assert "traceback.txt" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_a_resumed_fit_into_the_outbox_drops_the_error_tag_at_sync(
    tracking_uri: str, tmp_path: Path
) -> None:
    error = RuntimeError("failed at the end of epoch 1")
    with pytest.raises(RuntimeError):
        make_plain_model().fit(
            *small_loaders(), epochs=3, gpus=0, verbose=0, callbacks=[_FailsAtEpochEnd(error)]
        )
    client = MlflowClient(tracking_uri)
    run_id = only_run(client).info.run_id
    # writes of the run kept earlier: the resumed fit's writes join them in the outbox
    Outbox.open(tmp_path / "mlruns-outbox", run_id, "0", tracking_uri).append(
        {"op": "batch", "tags": {"kept": "yes"}}
    )
    with pytest.warns(UserWarning, match="writes that an earlier fit kept"):
        make_plain_model().fit(*small_loaders(), epochs=3, gpus=0, verbose=0, ckpt_path="last")
    assert client.get_run(run_id).data.tags["lkflow.error"] == f"RuntimeError: {error}"
    synced = CliRunner().invoke(main, ["sync"])
    assert synced.exit_code == 0, synced.output
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and "lkflow.error" not in run.data.tags
    assert run.data.tags["lkflow.previous_error"] == f"RuntimeError: {error}"


# ---- mistakes found before a run exists -------------------------------------------------


def all_runs(uri: str) -> list:
    """Every run of the store, in every experiment, deleted ones too."""
    client = MlflowClient(uri)
    ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    return client.search_runs(ids, run_view_type=ViewType.ALL)


def test_a_monitor_never_logged_fails_before_a_run_exists(tracking_uri: str) -> None:
    checkpoint = ModelCheckpoint(monitor="val_accuracy")
    with pytest.raises(LkflowError, match=r"monitor='val_accuracy'.*Logged keys: loss, acc"):
        fit(make_model(), callbacks=[checkpoint], experiment_name="mistakes")
    assert all_runs(tracking_uri) == []


def test_val_loss_without_validation_data_fails_in_the_argument_checks(
    tracking_uri: str,
) -> None:
    model = make_model()
    with pytest.raises(LkflowError, match=r"monitor='val_loss' and no val_data.*monitor='loss'"):
        model.fit(make_loaders()[0], epochs=1, gpus=0, verbose=0, monitor="val_loss")
    assert all_runs(tracking_uri) == []


def _with_long_labels(data: TensorDataset) -> DataLoader:
    x, y = data.tensors
    return DataLoader(TensorDataset(x, y.long()), batch_size=64)


@pytest.mark.parametrize("validated", [False, True])
def test_long_labels_for_bce_name_the_loss_and_the_fix_before_a_run_exists(
    tracking_uri: str, validated: bool
) -> None:
    net = nn.Sequential(Net(), nn.Sigmoid())
    model = LightModel(net, loss_fn=nn.BCELoss())
    loaders = [_with_long_labels(rings(128, seed=1))]
    if validated:  # the sanity check finds them first
        loaders.append(_with_long_labels(rings(64, seed=2)))
    with pytest.raises(LkflowError) as raised:
        model.fit(*loaders, epochs=1, gpus=0, verbose=0)
    message = str(raised.value)
    assert "labels of dtype torch.int64 for BCELoss" in message
    assert "Expected float labels" in message and "y.float()" in message
    assert isinstance(raised.value.__cause__, RuntimeError)  # torch's own error kept
    assert all_runs(tracking_uri) == []


def test_training_data_of_the_wrong_shape_names_the_layer_before_a_run_exists(
    tracking_uri: str,
) -> None:
    x, y = rings(128, seed=1).tensors
    wide = DataLoader(TensorDataset(torch.cat([x, x[:, :1]], dim=1), y), batch_size=64)
    valid = make_loaders()[1]  # of the right shape: the sanity check passes
    with pytest.raises(LkflowError, match=r"layer 'fc1' \(Linear\).*\(64, 3\).*in_features=2"):
        make_model().fit(wide, valid, epochs=1, gpus=0, verbose=0)
    assert all_runs(tracking_uri) == []


def test_a_mistake_in_the_first_step_leaves_a_given_run_as_it_was(
    tracking_uri: str, tmp_path: Path
) -> None:
    client = MlflowClient(tracking_uri)
    run_id = client.create_run("0").info.run_id
    client.set_terminated(run_id, "FINISHED")
    before = client.get_run(run_id)
    with pytest.raises(LkflowError, match="never logged"):
        plain_fit(MLflowCallback(run_id=run_id), tmp_path, monitor="val_accuracy")
    after = client.get_run(run_id)
    assert after.info.status == "FINISHED" and after.info.end_time == before.info.end_time
    assert after.data.tags == before.data.tags and after.data.params == {}
    assert [run.info.run_id for run in all_runs(tracking_uri)] == [run_id]


def test_the_experiments_a_fit_logs_into_are_tagged_as_model_training(tracking_uri: str) -> None:
    client = MlflowClient(tracking_uri)
    client.create_experiment("given")  # as `mlflow run --experiment-name given` makes it
    client.create_experiment("traces", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    for name in ("new", "given", "traces", None):
        found = find_run(client, run_id=None, experiment_name=name, restored_run_id=None)
        open_run(found, experiment_name=name, run_name=None, tags=None)
    kinds = {e.name: e.tags.get(EXPERIMENT_KIND_TAG) for e in client.search_experiments()}
    assert kinds == {
        "new": MODEL_TRAINING,  # created by the fit
        "given": MODEL_TRAINING,  # had no kind
        "traces": "genai_development",  # a kind set is kept
        "Default": None,  # what names no experiment goes there: left alone
    }
