"""LightModel itself: its default step, predictions, checkpoints of weights only, schedules,
no host reads in the training step, and the errors of a step; the package's exports."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from helpers import ArticleModel, Net, fit_quietly, keras_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader

import lkflow
from lkflow import LightModel, LkflowError


def test_checkpoints_hold_weights_only_and_reload_around_a_given_net(loaders):
    train, valid = loaders
    model = ArticleModel(Net())
    checkpoint = pl.callbacks.ModelCheckpoint(monitor="val_loss", dirpath="ckpt")
    trainer = pl.Trainer(
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[checkpoint],
    )
    trainer.fit(model, train, valid)

    state = torch.load(checkpoint.best_model_path, weights_only=True)
    assert set(state["state_dict"]) == {f"net.{k}" for k in Net().state_dict()}
    clone = ArticleModel.load_from_checkpoint(checkpoint.best_model_path, net=Net())
    assert clone.history == model.history[: len(clone.history)]
    best = Net()
    best.load_state_dict({k.removeprefix("net."): v for k, v in state["state_dict"].items()})
    x = next(iter(valid))[0]
    with torch.no_grad():
        assert torch.equal(clone(x), best(x))
    with pytest.raises(LkflowError, match=re.escape("load_from_checkpoint(path, net=Net())")):
        ArticleModel.load_from_checkpoint(checkpoint.best_model_path)


def test_the_stripped_net_predicts_what_the_model_predicts(loaders, tmp_path: Path):
    train, valid = loaders
    model = keras_model()
    model.fit(train, valid, epochs=1, gpus=0, track=False, verbose=0)
    torch.save(model.net.state_dict(), tmp_path / "net.pt")

    clone = Net()
    clone.load_state_dict(torch.load(tmp_path / "net.pt", weights_only=True))
    predictions = model.predict(valid)
    assert predictions.shape == (250, 1)
    with torch.no_grad():
        assert torch.equal(predictions, clone(valid.dataset.tensors[0]))
    assert torch.equal(model.predict(valid.dataset.tensors[0]), predictions)


@pytest.mark.parametrize(
    ("interval", "expected"),
    [
        ("epoch", [0.1, 0.05, 0.025]),
        ("step", [0.1, 0.1 * 0.5**5, 0.1 * 0.5**10]),  # 5 steps per epoch
    ],
)
def test_lr_schedules_step_as_configured_and_land_in_the_history(loaders, interval, expected):
    train, valid = loaders
    net = Net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    model = LightModel(
        net,
        loss_fn=nn.BCEWithLogitsLoss(),
        optimizer=optimizer,
        lr_scheduler={"scheduler": scheduler, "interval": interval},
    )
    history = model.fit(train, valid, epochs=3, gpus=0, track=False, verbose=0)
    assert history["lr"].tolist() == pytest.approx(expected)


class _ScalarReads(TorchDispatchMode):
    """Counts device-to-host reads of a scalar (`.item()`, `float(t)`, `bool(t)`)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


class _Watched(LightModel):
    reads = _ScalarReads()

    def training_step(self, batch, batch_idx):
        with self.reads:
            return super().training_step(batch, batch_idx)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((logits > 0).float() == y).float().mean()


def test_no_host_synchronisation_inside_the_training_step(loaders):
    # torchmetrics' classification metrics read their inputs on the host to validate them;
    # a plain function metric shows that lkflow's own step reads nothing.
    train, valid = loaders
    model = _Watched(Net(), loss_fn=nn.BCEWithLogitsLoss(), metrics={"acc": accuracy})
    model.fit(train, valid, epochs=2, gpus=0, track=False, verbose=0)
    assert len(model.history) == 2
    assert _Watched.reads.count == 0


# ---- bad input -------------------------------------------------------------------------


def test_a_batch_that_fits_no_layout_names_it_and_the_fixes(loaders):
    x, y = loaders[0].dataset.tensors
    rows = [{"features": x[i], "answer": y[i]} for i in range(len(x))]  # no target key
    with pytest.raises(
        LkflowError,
        match=r"batch dict: features Tensor\(64, 2\) float32, answer .*target.*"
        r"'y'.*Fix: pass target=.*override shared_step",
    ):
        fit_quietly(keras_model(), DataLoader(rows, batch_size=64))


def test_shapes_that_do_not_fit_the_net_name_the_layer():
    x = torch.zeros(64, 3)
    wrong = DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(64, 1)), batch_size=32)
    with pytest.raises(
        LkflowError,
        match=r"layer 'fc1' \(Linear\) failed on input of shape \(32, 3\).*in_features=2",
    ):
        fit_quietly(keras_model(), wrong)


class _NanFromEpochOne(ArticleModel):
    def shared_step(self, batch):
        values = super().shared_step(batch)
        if self.current_epoch >= 1:
            values["loss"] = values["loss"] * torch.log(torch.tensor(-1.0))
        return values


def test_a_nan_loss_stops_the_fit_at_the_end_of_that_epoch(loaders):
    model = _NanFromEpochOne(Net())
    with pytest.raises(FloatingPointError, match=r"loss is nan at epoch 1"):
        fit_quietly(model, *loaders, epochs=5)
    assert len(model.history) == 2
    best = model.trainer.checkpoint_callback.best_model_path
    assert "epoch=0" in best and Path(best).exists()


# ---- the package -----------------------------------------------------------------------


def test_the_package_exports_its_api():
    assert set(lkflow.__all__) >= {"LightModel", "MLflowCallback", "summary", "plot_metric"}
    assert lkflow.LightModel is LightModel


def test_summary_is_the_function_even_after_its_module_was_imported():
    import lkflow.summary_table

    assert callable(lkflow.summary) and lkflow.summary.__name__ == "summary"
