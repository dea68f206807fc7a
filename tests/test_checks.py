"""Bad input to LightModel and fit, refused with a message that names it, before any work."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torchmetrics
from helpers import Net, fit_quietly, keras_model, make_model, small_loaders
from mlflow import MlflowClient
from torch import nn
from torch.utils.data import DataLoader

from lkflow import LightModel, LkflowError
from lkflow.datasets import rings


class _NoLoss(LightModel):
    def shared_step(self, batch):
        return {"acc": torch.tensor(1.0)}


def test_shared_step_without_a_loss_key(loaders):
    with pytest.raises(
        LkflowError, match=r"shared_step returned \['acc'\]. Expected a dict with a 'loss' key"
    ):
        fit_quietly(_NoLoss(Net()), *loaders)


def test_a_monitor_never_logged_lists_the_logged_keys(loaders):
    with pytest.raises(
        LkflowError, match="monitor='val_accuracy'.*Logged keys: loss, acc, val_loss, val_acc, lr"
    ):
        fit_quietly(keras_model(), *loaders, monitor="val_accuracy")


def test_an_empty_loader():
    empty = DataLoader(rings(10), batch_size=64, drop_last=True)
    with pytest.raises(LkflowError, match="train_data with no batches"):
        fit_quietly(keras_model(), empty)


@pytest.mark.parametrize("epochs", [0, -1, 2.5, "3"])
def test_bad_epochs(loaders, epochs):
    with pytest.raises(LkflowError, match=re.escape(f"epochs={epochs!r}")):
        fit_quietly(keras_model(), *loaders, epochs=epochs)


def test_a_metrics_dict_with_a_non_metric():
    with pytest.raises(LkflowError, match=r"metrics\['acc'\]='accuracy'.*torchmetrics.Metric"):
        LightModel(Net(), loss_fn=nn.BCEWithLogitsLoss(), metrics={"acc": "accuracy"})
    with pytest.raises(LkflowError, match=r"Pass an instance: BinaryAccuracy\(\)"):
        LightModel(
            Net(),
            loss_fn=nn.BCEWithLogitsLoss(),
            metrics={"acc": torchmetrics.classification.BinaryAccuracy},
        )


def test_no_loss_and_no_shared_step():
    with pytest.raises(LkflowError, match="loss_fn=None and no shared_step"):
        LightModel(Net())


def test_an_unwritable_checkpoint_folder(loaders, tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(LkflowError, match="ckpt_dir=.*cannot be created"):
        fit_quietly(keras_model(), *loaders, ckpt_dir=blocker / "sub")


def _no_file_can_be_created(folder: Path) -> bool:
    probe = folder / "probe"
    try:
        probe.touch()
    except OSError:
        return True
    probe.unlink()
    return False


def _read_only_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    if not _no_file_can_be_created(folder):
        pytest.skip("this user (root) can write to a folder of mode 0o500")
    return folder


def _read_only_file_system(tmp_path: Path) -> Path:
    folder = Path("/sys")  # sysfs: os.access says writable to root, yet no file can be made
    if not folder.is_dir() or not _no_file_can_be_created(folder):
        pytest.skip("needs sysfs at /sys, which refuses new files")
    return folder


@pytest.mark.parametrize("make_folder", [_read_only_folder, _read_only_file_system])
def test_a_checkpoint_folder_no_file_can_be_created_in(
    tracking_uri: str, tmp_path: Path, make_folder: Any
) -> None:
    folder = make_folder(tmp_path)
    model = make_model()
    with pytest.raises(LkflowError, match=re.escape(f"ckpt_dir='{folder}', which is not writable")):
        model.fit(*small_loaders(), epochs=1, gpus=0, verbose=0, ckpt_dir=folder)
    assert model.history == []
    assert MlflowClient(tracking_uri).search_runs(["0"]) == []  # failed before any run
