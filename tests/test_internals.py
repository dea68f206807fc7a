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
from torch.utils.data import DataLoader, SequentialSampler, TensorDataset

from lkflow.checkpoints import BestCheckpoint
from lkflow.internals import (
    global_tracking_uri,
    last_global_step_saved,
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
