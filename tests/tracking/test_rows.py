"""Epoch rows of a LightningModule that is no LightModel (lkflow/tracking/rows.py): only what was
logged in that epoch, validation's only where it ran, each row once across a resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from helpers import make_loaders, steps
from mlflow import MlflowClient
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.nn import functional as F

from lkflow.tracking import MLflowCallback

BATCHES, VAL_BATCHES = 5, 4  # make_loaders(): 320 and 250 rows in batches of 64


class Sometimes(pl.LightningModule):
    """Logs `loss` each epoch and `loss_per_step` per step; `first_only` in the first epoch's
    `on_train_epoch_end` alone; `val_loss` (and `val_per_step` per step) whenever the Trainer
    validates. No `forward`."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.binary_cross_entropy_with_logits(self.layers(x), y)
        self.log("loss", loss, on_step=False, on_epoch=True)
        self.log("loss_per_step", loss)
        return loss

    def on_train_epoch_end(self) -> None:
        if self.current_epoch == 0:
            self.log("first_only", 1.0)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        loss = F.binary_cross_entropy_with_logits(self.layers(x), y)
        self.log("val_loss", loss)
        self.log("val_per_step", loss, on_step=True, on_epoch=False)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def plain_trainer(tracker: MLflowCallback, epochs: int, *callbacks: pl.Callback, **kwargs: Any):
    return pl.Trainer(
        max_epochs=epochs,
        callbacks=[tracker, *callbacks],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def history_csv(client: MlflowClient, run_id: str) -> pd.DataFrame:
    return pd.read_csv(client.download_artifacts(run_id, "history.csv"))


def test_a_row_holds_what_was_logged_in_its_epoch(tracking_uri: str, tmp_path: Path) -> None:
    tracker = MLflowCallback(registered_model_name="sometimes", step_metrics=False)
    trainer = plain_trainer(tracker, 3, check_val_every_n_epoch=2, log_every_n_steps=1)
    with pytest.warns(UserWarning, match=r"no forward.*MLflowCallback\(net=\.\.\.\).*\['layers'\]"):
        trainer.fit(Sometimes(), *make_loaders())
    client = MlflowClient(tracking_uri)
    run = client.get_run(tracker.run_id_)
    assert run.info.status == "FINISHED"
    assert steps(client, run.info.run_id, "loss") == [1, 2, 3]
    assert steps(client, run.info.run_id, "first_only") == [1]  # not repeated in epochs 2, 3
    assert steps(client, run.info.run_id, "val_loss") == [2]  # validated in epoch 2 alone
    assert {"loss_per_step", "val_per_step"}.isdisjoint(run.data.metrics)  # step_metrics=False
    history = history_csv(client, run.info.run_id)
    assert history["epoch"].tolist() == [1, 2, 3]
    assert history["first_only"].notna().tolist() == [True, False, False]
    assert history["val_loss"].notna().tolist() == [False, True, False]
    # the callback's logger into the run left with the fit; the checkpoints stayed where
    # a Trainer without loggers keeps them
    assert trainer.loggers == []
    assert Path(trainer.checkpoint_callback.best_model_path).parent == tmp_path / "checkpoints"
    assert tracker.model_uri_ is None and tracker.model_version_ is None  # no forward to serve
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"net", "checkpoints"}


def test_a_resumed_fit_logs_each_epoch_once_and_keeps_the_rows_before_it(
    tracking_uri: str, tmp_path: Path
) -> None:
    def checkpoint() -> ModelCheckpoint:
        return ModelCheckpoint(tmp_path / "ckpt", monitor="loss", save_last=True)

    first = MLflowCallback(net="layers", registered_model_name=False)
    plain_trainer(first, 2, checkpoint(), log_every_n_steps=1).fit(Sometimes(), *make_loaders())
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    kept = last["callbacks"][first.state_key]
    assert kept["run_id"] == first.run_id_
    assert [row["epoch"] for row in kept["rows"]] == [1, 2]  # its own epoch's row too
    second = MLflowCallback(net="layers", registered_model_name=False)
    resumed = plain_trainer(second, 3, checkpoint(), log_every_n_steps=1)
    resumed.fit(Sometimes(), *make_loaders(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert second.run_id_ == first.run_id_  # the run the checkpoint names
    client = MlflowClient(tracking_uri)
    assert steps(client, first.run_id_, "loss") == [1, 2, 3]  # each once
    # per step, at the steps Lightning gives its loggers: in training, the global step
    assert steps(client, first.run_id_, "loss_per_step") == list(range(3 * BATCHES))  # each once
    # in validation, Lightning's count of the fit's validation batches: from 0 in each fit
    expected = [*range(2 * VAL_BATCHES), *range(VAL_BATCHES)]
    assert steps(client, first.run_id_, "val_per_step") == sorted(expected)
    history = history_csv(client, first.run_id_)
    assert history["epoch"].tolist() == [1, 2, 3]
    logged = {m.step: m.value for m in client.get_metric_history(first.run_id_, "loss")}
    assert history["loss"].tolist() == pytest.approx([logged[1], logged[2], logged[3]])
    assert client.get_run(first.run_id_).info.status == "FINISHED"
