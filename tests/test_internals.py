"""Lightning's and MLflow's unpublished parts that lkflow uses (lkflow/internals.py) still do
what it needs."""

from __future__ import annotations

import copy
import inspect
import os
from pathlib import Path

import mlflow
import pytest
import pytorch_lightning as pl
import torch
from helpers import make_loaders, make_model
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import Logger
from torch.utils.data import DataLoader, SequentialSampler, TensorDataset

from lkflow.checkpoints import BestCheckpoint
from lkflow.internals import (
    epoch_level_names,
    epochs_processed,
    global_tracking_uri,
    last_global_step_saved,
    logging_step_values,
    record_save,
    trains_in_child_processes,
    with_sampler,
)


class _Loader(DataLoader):
    """A DataLoader subclass with an argument of its own, as users write them."""

    def __init__(self, dataset, tag: str, **kwargs) -> None:
        super().__init__(dataset, **kwargs)
        self.tag = tag


def test_a_loader_rebuilt_with_a_sampler_keeps_its_class_and_arguments() -> None:
    data = TensorDataset(torch.arange(10.0))
    loader = _Loader(data, "mine", batch_size=3, drop_last=True, num_workers=0)
    sampler = SequentialSampler(range(4))
    rebuilt = with_sampler(loader, sampler)
    assert type(rebuilt) is _Loader and rebuilt.tag == "mine"
    assert rebuilt.sampler is sampler and rebuilt.dataset is data
    assert rebuilt.batch_size == 3 and rebuilt.drop_last
    assert [batch[0].tolist() for batch in rebuilt] == [[0.0, 1.0, 2.0]]


@pytest.mark.parametrize(
    ("strategy", "children"), [("ddp_spawn", True), ("ddp_notebook", True), ("ddp", False)]
)
def test_spawned_and_forked_fits_train_in_child_processes(strategy: str, children: bool) -> None:
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, logger=False, enable_progress_bar=False
    )
    assert trains_in_child_processes(trainer) is children
    one = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    assert not trains_in_child_processes(one)


@pytest.mark.parametrize("before", [None, "variable", "set", "set, variable gone"])
def test_the_global_tracking_uri_is_the_clients_inside_and_as_it_was_after(
    before: str | None, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inside = f"sqlite:///{tmp_path / 'inside.db'}"
    outside = f"sqlite:///{tmp_path / 'outside.db'}"
    mlflow.set_tracking_uri(None)
    if before == "variable":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", outside)
    elif before is not None and before.startswith("set"):
        mlflow.set_tracking_uri(outside)
    if before == "set, variable gone":
        monkeypatch.delenv("MLFLOW_TRACKING_URI")
    expected = mlflow.get_tracking_uri()
    try:
        with global_tracking_uri(inside):
            assert mlflow.get_tracking_uri() == inside
        assert mlflow.get_tracking_uri() == expected
        # a global URI put back is in the variable too, as mlflow.set_tracking_uri leaves it
        assert os.environ.get("MLFLOW_TRACKING_URI") == (None if before is None else outside)
    finally:
        mlflow.set_tracking_uri(None)


def tiny_fit(*callbacks: pl.Callback, epochs: int = 2) -> pl.Trainer:
    """A real fit of the rings, 2 batches an epoch, with `callbacks`."""
    trainer = pl.Trainer(
        max_epochs=epochs,
        limit_train_batches=2,
        limit_val_batches=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )
    trainer.fit(make_model(), *make_loaders())
    return trainer


class _SavesThrough(ModelCheckpoint):
    """Notes every file Lightning has it save, as lkflow.checkpoints.LastCheckpoint sees them."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.saved: list[str] = []

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        self.saved.append(Path(filepath).name)
        super()._save_checkpoint(trainer, filepath)


def test_every_checkpoint_file_is_saved_through_the_overridden_method() -> None:
    assert list(inspect.signature(ModelCheckpoint._save_checkpoint).parameters) == [
        "self",
        "trainer",
        "filepath",
    ]
    every_epoch = _SavesThrough(dirpath="ckpt", filename="{epoch}", save_top_k=-1)
    tiny_fit(every_epoch)
    assert every_epoch.saved == ["epoch=0.ckpt", "epoch=1.ckpt"]
    assert sorted(path.name for path in Path("ckpt").iterdir()) == every_epoch.saved


def test_a_save_leaves_its_global_step_behind() -> None:
    checkpoint = ModelCheckpoint(dirpath="ckpt")  # no monitor: saves after every epoch
    assert last_global_step_saved(checkpoint) == 0
    trainer = tiny_fit(checkpoint, epochs=3)
    assert trainer.global_step == 6
    assert last_global_step_saved(checkpoint) == 6


def _changed(checkpoint: ModelCheckpoint, before: dict) -> dict:
    return {key: value for key, value in vars(checkpoint).items() if before.get(key) != value}


def test_a_recorded_save_leaves_a_checkpoint_as_lightnings_own_save_does() -> None:
    trainer = tiny_fit()
    written, recorded = ModelCheckpoint(dirpath="ckpt"), ModelCheckpoint(dirpath="ckpt")
    before = dict(vars(written))
    written._save_checkpoint(trainer, "ckpt/written.ckpt")
    record_save(recorded, trainer, "ckpt/written.ckpt")
    assert Path("ckpt/written.ckpt").is_file()
    assert _changed(recorded, before) == _changed(written, before)
    assert last_global_step_saved(recorded) == trainer.global_step == 4


class _RecordsBests(ModelCheckpoint):
    """Notes which attributes each new best changes, as lkflow.checkpoints.BestCheckpoint sees it."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.changed: list[set[str]] = []

    def _update_best_and_save(self, current, trainer, monitor_candidates) -> None:
        before = {key: repr(copy.copy(value)) for key, value in vars(self).items()}
        super()._update_best_and_save(current, trainer, monitor_candidates)
        after = {key: repr(value) for key, value in vars(self).items() if key != "changed"}
        self.changed.append({key for key, value in after.items() if before.get(key) != value})


def test_a_new_best_goes_through_the_overridden_method_and_changes_only_its_best_state() -> None:
    assert list(inspect.signature(ModelCheckpoint._update_best_and_save).parameters) == [
        "self",
        "current",
        "trainer",
        "monitor_candidates",
    ]
    best = _RecordsBests(dirpath="ckpt", monitor="val_loss", save_top_k=-1)  # each epoch is kept
    tiny_fit(best, epochs=3)
    assert len(best.changed) == 3
    assert {"best_model_path", "best_model_score"} <= best.changed[0]
    saving = {"_last_global_step_saved", "_last_checkpoint_saved"}  # set once the file is written
    for changed in best.changed:
        assert changed <= set(BestCheckpoint._BEST_STATE) | saving


class _Logs(pl.LightningModule):
    """Logs a value per step, one per epoch, one both ways, in training and in validation."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        self.log("per_step", loss)  # training_step: on_step=True, on_epoch=False
        self.log("per_epoch", loss, on_step=False, on_epoch=True)
        self.log("both", loss, on_step=True, on_epoch=True)
        return loss

    def on_train_epoch_end(self):
        self.log("at_epoch_end", 1.0)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.log("val", self.layer(batch[0]).mean())  # validation_step: on_epoch=True
        self.log("val_per_step", 1.0, on_step=True, on_epoch=False)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _Seen(Logger):
    """Each `log_metrics` call of the fit: its keys, and whether Lightning was logging a step."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[bool, set[str]]] = []
        self.trainer: pl.Trainer | None = None

    name, version = "seen", 0

    def log_metrics(self, metrics, step=None) -> None:
        self.calls.append((logging_step_values(self.trainer), set(metrics)))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


class _Names(pl.Callback):
    """The names and counts the internals give at the hooks where lkflow reads them."""

    def __init__(self) -> None:
        self.at: dict[str, list] = {}

    def note(self, hook: str, value) -> None:
        self.at.setdefault(hook, []).append(value)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.note("epoch_start", (epochs_processed(trainer), trainer.current_epoch))
        self.note("train_names", sorted(epoch_level_names(trainer, "train")))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.note("epoch_end", (epochs_processed(trainer), trainer.current_epoch))

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.note("val_new", sorted(epoch_level_names(trainer, "validation", since_reset=True)))


def test_what_the_module_logged_per_epoch_and_when_lightning_logs_a_step() -> None:
    names, seen = _Names(), _Seen()
    trainer = pl.Trainer(
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=1,
        log_every_n_steps=1,
        logger=seen,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[names],
    )
    seen.trainer = trainer
    train, valid = make_loaders()
    trainer.fit(_Logs(), train, [valid, valid])  # two validation loaders
    # the second epoch starts with the names the first logged per epoch, under their own names
    assert names.at["train_names"][1] == ["at_epoch_end", "both", "per_epoch"]
    assert names.at["val_new"][0] == ["val/dataloader_idx_0", "val/dataloader_idx_1"]
    assert all(name in trainer.callback_metrics for name in names.at["val_new"][0])
    # an epoch is processed before its on_train_epoch_end hooks, completed after them
    assert names.at["epoch_start"] == [(0, 0), (1, 1)]
    assert names.at["epoch_end"] == [(1, 0), (2, 1)]
    steps = [keys for step, keys in seen.calls if step and "epoch" in keys]
    epochs = [keys for step, keys in seen.calls if not step]
    assert steps and all(keys == {"per_step", "both_step", "epoch"} for keys in steps)
    validation_steps = [keys for step, keys in seen.calls if step and "epoch" not in keys]
    assert {"val_per_step/dataloader_idx_1"} in validation_steps
    assert {"per_epoch", "both_epoch", "at_epoch_end"} in [keys - {"epoch"} for keys in epochs]
