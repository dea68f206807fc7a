"""Lightning callbacks that need a logger work inside `LightModel.fit`, and what they log goes
into the fit's run at the step they log at; the module's own values stay the history's."""

from __future__ import annotations

import pytest
from helpers import fit, make_loaders
from helpers import make_scheduled_model as make_model
from mlflow import MlflowClient
from pytorch_lightning.callbacks import LearningRateMonitor

BATCHES = 5  # 320 training rows in batches of 64


def history_of(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_learning_rate_monitor_logs_into_the_run_at_its_steps(tracking_uri: str) -> None:
    model = fit(make_model(), epochs=3, callbacks=[LearningRateMonitor("epoch")])
    client = MlflowClient(tracking_uri)
    assert client.get_run(model.run_id).info.status == "FINISHED"
    # StepLR halves the lr of 0.05 every 2 epochs; each epoch logs at its first global step
    expected = [(0, 0.05), (BATCHES, 0.05), (2 * BATCHES, 0.025)]
    assert history_of(client, model.run_id, "lr-SGD") == [
        (step, pytest.approx(lr)) for step, lr in expected
    ]
    # the module's values reach the run once an epoch, at step=epoch, as the history holds them
    val_loss = history_of(client, model.run_id, "val_loss")
    assert val_loss == [(row["epoch"], pytest.approx(row["val_loss"])) for row in model.history]


def test_learning_rate_monitor_logs_every_step_it_is_asked_to(tracking_uri: str) -> None:
    model = fit(
        make_model(), epochs=1, callbacks=[LearningRateMonitor("step")], log_every_n_steps=2
    )
    client = MlflowClient(tracking_uri)
    steps = [step for step, _ in history_of(client, model.run_id, "lr-SGD")]
    assert steps == [1, 3]  # Lightning logs after every 2nd step: batches 1 and 3 of 0..4


def test_an_untracked_fit_runs_callbacks_that_need_a_logger() -> None:
    model = make_model()
    model.fit(
        *make_loaders(),
        epochs=1,
        gpus=0,
        verbose=0,
        track=False,
        callbacks=[LearningRateMonitor("epoch")],
    )
    assert len(model.history) == 1 and model.run_id is None
