"""What LightModel.fit assembles: the best weights kept, early stopping, resuming, the Trainer's
arguments, the line per epoch, tracking settings, and Ctrl-C or SIGTERM reaching the caller."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from helpers import (
    SQLITE_ONLY,
    Worker,
    fit_quietly,
    full_pass,
    keras_model,
    only_run,
    steps,
    wait_for,
)
from mlflow import MlflowClient

import lkflow
from lkflow import LkflowError


def test_fit_keeps_the_best_epoch_and_returns_the_history(loaders):
    train, valid = loaders
    model = keras_model(lr=0.5)
    history = model.fit(train, valid, epochs=6, gpus=0, track=False, verbose=0)

    assert isinstance(history, pd.DataFrame) and len(history) == 6
    best = history["val_loss"].min()
    assert model.evaluate(valid)["loss"] == pytest.approx(best, rel=1e-5)
    assert full_pass(model.net, valid)[0] == pytest.approx(best, rel=1e-5)


def test_patience_stops_early(loaders):
    train, valid = loaders
    model = keras_model(lr=0.1)
    history = model.fit(
        train,
        valid,
        epochs=10,
        gpus=0,
        track=False,
        verbose=0,
        monitor="val_loss",
        mode="max",
        patience=1,
    )
    assert len(history) == 2  # val_loss falls, so "max" never improves after epoch 0


def test_resume_continues_the_epochs_and_the_history(loaders):
    train, valid = loaders
    first = keras_model()
    first.fit(train, valid, epochs=2, gpus=0, track=False, verbose=0)
    resumed = keras_model()
    history = resumed.fit(train, valid, epochs=4, gpus=0, track=False, verbose=0, ckpt_path="last")
    assert history["epoch"].tolist() == [1, 2, 3, 4]
    assert history.iloc[:2].equals(first.history_frame())


def test_trainer_arguments_pass_through(loaders):
    train, valid = loaders
    model = keras_model()
    model.fit(
        train,
        valid,
        epochs=1,
        gpus=0,
        track=False,
        verbose=0,
        precision="bf16-mixed",
        gradient_clip_val=1.0,
        accumulate_grad_batches=2,
    )
    assert model.trainer.precision == "bf16-mixed"
    assert model.trainer.accumulate_grad_batches == 2


def test_verbose_prints_one_line_per_epoch_or_nothing(loaders, capsys):
    train, valid = loaders
    keras_model().fit(train, valid, epochs=2, gpus=0, track=False, verbose=2)
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(" - ")[0] for line in lines] == ["Epoch 1/2", "Epoch 2/2"]
    assert "val_acc: " in lines[-1] and "lr: 0.0100" in lines[-1]

    keras_model().fit(train, valid, epochs=1, gpus=0, track=False, verbose=0)
    assert capsys.readouterr().out == ""


class _Batches:
    """Batches made beforehand (a plain list would be read by Lightning as several loaders)."""

    def __init__(self, loader):
        self.batches = list(loader)

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def test_any_iterable_of_batches_trains(loaders):
    history = fit_quietly(keras_model(), *map(_Batches, loaders), epochs=2)
    assert len(history) == 2 and history["val_loss"].notna().all()


def test_track_takes_a_callback_but_not_two_sets_of_settings(loaders):
    with pytest.raises(
        LkflowError, match=r"experiment_name='x'. Pass these settings to the MLflowCallback"
    ):
        fit_quietly(keras_model(), *loaders, track=lkflow.MLflowCallback(), experiment_name="x")
    with pytest.raises(
        LkflowError, match=r"track='yes'. Expected True, False or an lkflow.MLflowCallback"
    ):
        fit_quietly(keras_model(), *loaders, track="yes")


# ---- interrupts --------------------------------------------------------------------------


class _Interrupt(pl.Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        raise KeyboardInterrupt


def test_ctrl_c_reaches_the_caller_as_a_keyboard_interrupt(loaders):
    model = keras_model()
    with pytest.raises(KeyboardInterrupt):
        fit_quietly(model, *loaders, epochs=3, callbacks=[_Interrupt()])
    assert model.trainer.interrupted


@pytest.mark.slow
@SQLITE_ONLY
def test_sigterm_ends_the_run_killed_and_the_process_promptly_non_zero(
    tracking_uri: str, worker: Worker, tmp_path: Path, processes: list[subprocess.Popen]
) -> None:
    folder = tmp_path / "fit"
    fit = worker.start(folder, uri=tracking_uri, epochs=50, batch_s=0.05, stall_epoch=2)
    processes.append(fit)
    wait_for(folder / "marker", fit)
    sent = time.monotonic()
    fit.send_signal(signal.SIGTERM)  # as a scheduler does
    fit.wait(timeout=60)
    assert time.monotonic() - sent < 10, "the fit did not stop promptly"
    assert fit.returncode == 128 + signal.SIGTERM, (folder / "err.txt").read_text()[-4000:]

    client = MlflowClient(tracking_uri)
    run = only_run(client)
    assert run.info.status == "KILLED"
    last = client.download_artifacts(run.info.run_id, "checkpoints/last.ckpt", str(tmp_path))
    saved = [row["epoch"] for row in torch.load(last, weights_only=True)["lkflow_history"]]
    assert len(saved) >= 2 and saved == list(range(1, len(saved) + 1))
    for key in ("loss", "val_loss", "lr"):
        assert steps(client, run.info.run_id, key) == saved, key


# ---- a second fit, and names that are no file names ----------------------------------------


def test_a_second_fit_starts_a_history_and_a_run_of_its_own(loaders, tracking_uri):
    train, valid = loaders
    model = keras_model()
    first = model.fit(train, valid, epochs=2, gpus=0, verbose=0, registered_model_name=False)
    first_run = model.run_id
    second = model.fit(train, valid, epochs=2, gpus=0, verbose=0, registered_model_name=False)

    assert list(first["epoch"]) == [1, 2] and list(second["epoch"]) == [1, 2]
    assert second.equals(model.history_frame())
    loss, _ = full_pass(model.net, valid)  # the best epoch's weights, restored
    assert min(second["val_loss"]) == pytest.approx(loss, rel=1e-5)
    client = MlflowClient(tracking_uri)
    assert model.run_id != first_run
    for run_id, history in ((first_run, first), (model.run_id, second)):
        assert steps(client, run_id, "val_loss") == [1, 2]
        logged = sorted(client.get_metric_history(run_id, "val_loss"), key=lambda m: m.step)
        assert [m.value for m in logged] == pytest.approx(history["val_loss"].tolist())


@pytest.mark.parametrize(
    ("name", "safe"), [("f1/macro", "val_f1_macro"), ("acc@1", "val_acc_1")], ids=["slash", "at"]
)
def test_a_monitor_with_a_slash_or_at_names_a_checkpoint_file_with_its_epoch(loaders, name, safe):
    def accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((logits > 0).float() == y).float().mean()

    train, valid = loaders
    model = lkflow.LightModel(
        keras_model().net, loss_fn=torch.nn.BCEWithLogitsLoss(), metrics={name: accuracy}
    )
    history = fit_quietly(model, train, valid, epochs=2, monitor=f"val_{name}", mode="max")

    files = sorted(p.relative_to("checkpoints").as_posix() for p in Path("checkpoints").rglob("*"))
    best = history.loc[history[f"val_{name}"].idxmax()]
    value = best[f"val_{name}"]
    assert files == sorted([f"epoch={best['epoch']:.0f}-{safe}={value:.4f}.ckpt", "last.ckpt"])
