"""LightModel trains for real on tiny data; every number is checked against a recomputation."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
import torchmetrics
from helpers import Net
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader

import lkflow
from lkflow import LightModel, LkflowError
from lkflow.datasets import rings


class ArticleModel(LightModel):
    """The article's subclass: shared_step returns the loss and a functional accuracy."""

    def shared_step(self, batch):
        x, y = batch
        logits = self(x)
        acc = torchmetrics.functional.accuracy((logits > 0).float(), y, task="binary")
        return {"loss": nn.functional.binary_cross_entropy_with_logits(logits, y), "acc": acc}

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def keras_model(lr: float = 1e-2, **kwargs) -> LightModel:
    net = Net()
    return LightModel(
        net,
        loss_fn=nn.BCEWithLogitsLoss(),
        metrics={"acc": torchmetrics.classification.BinaryAccuracy()},
        optimizer=torch.optim.SGD(net.parameters(), lr=lr),
        **kwargs,
    )


def full_pass(net: nn.Module, loader: DataLoader) -> tuple[float, float]:
    """Loss and accuracy over every row at once: the independent recomputation."""
    x, y = loader.dataset.tensors
    with torch.no_grad():
        logits = net(x)
    loss = nn.functional.binary_cross_entropy_with_logits(logits, y).item()
    return loss, ((logits > 0).float() == y).float().mean().item()


def test_epoch_values_are_over_all_rows_not_a_mean_of_batch_means(loaders):
    train, valid = loaders
    model = keras_model(lr=0.0)  # weights never move, so every epoch sees the same net
    history = model.fit(train, valid, epochs=2, gpus=0, track=False, verbose=0)

    loss, acc = full_pass(model.net, valid)
    train_loss, train_acc = full_pass(model.net, train)
    assert list(history["epoch"]) == [0, 1]  # the sanity check adds no row
    assert history["val_loss"].tolist() == pytest.approx([loss, loss], rel=1e-5)
    assert history["val_acc"].tolist() == pytest.approx([acc, acc], rel=1e-6)
    assert history["loss"].tolist() == pytest.approx([train_loss] * 2, rel=1e-5)
    assert history["acc"].tolist() == pytest.approx([train_acc] * 2, rel=1e-6)
    batch_means = [
        nn.functional.binary_cross_entropy_with_logits(model.net(x), y).item() for x, y in valid
    ]
    assert abs(sum(batch_means) / len(batch_means) - loss) > 1e-4  # the short batch matters


def test_functional_metrics_of_a_subclass_are_weighted_by_rows(loaders):
    train, valid = loaders
    model = ArticleModel(Net())
    trainer = pl.Trainer(
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, train, valid)

    loss, acc = full_pass(model.net, valid)
    assert model.history[-1]["val_loss"] == pytest.approx(loss, rel=1e-5)
    assert model.history[-1]["val_acc"] == pytest.approx(acc, rel=1e-6)
    assert set(model.history[0]) == {"epoch", "loss", "acc", "val_loss", "val_acc", "lr"}
    (results,) = trainer.test(model, dataloaders=valid, verbose=False)
    assert results == pytest.approx({"test_loss": loss, "test_acc": acc}, rel=1e-5)


def test_fit_keeps_the_best_epoch_and_returns_the_history(loaders):
    train, valid = loaders
    model = keras_model(lr=0.5)
    history = model.fit(train, valid, epochs=6, gpus=0, track=False, verbose=0)

    assert isinstance(history, pd.DataFrame) and len(history) == 6
    best = history["val_loss"].min()
    assert model.evaluate(valid)["loss"] == pytest.approx(best, rel=1e-5)
    assert full_pass(model.net, valid)[0] == pytest.approx(best, rel=1e-5)


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


def test_resume_continues_the_epochs_and_the_history(loaders):
    train, valid = loaders
    first = keras_model()
    first.fit(train, valid, epochs=2, gpus=0, track=False, verbose=0)
    resumed = keras_model()
    history = resumed.fit(train, valid, epochs=4, gpus=0, track=False, verbose=0, ckpt_path="last")
    assert history["epoch"].tolist() == [0, 1, 2, 3]
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


class _NoLoss(LightModel):
    def shared_step(self, batch):
        return {"acc": torch.tensor(1.0)}


def fit_quietly(model, train, valid=None, **kwargs):
    settings = {"epochs": 1, "gpus": 0, "track": False, **kwargs}
    return model.fit(train, valid, verbose=0, **settings)


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


def test_a_batch_that_is_not_x_y(loaders):
    x = loaders[0].dataset.tensors[0]
    triples = DataLoader(torch.utils.data.TensorDataset(x, x, x), batch_size=64)
    with pytest.raises(
        LkflowError, match=r"batch of type list of 3 items.*\(x, y\) pairs.*override shared_step"
    ):
        fit_quietly(keras_model(), triples)


def test_an_empty_loader():
    empty = DataLoader(rings(10), batch_size=64, drop_last=True)
    with pytest.raises(LkflowError, match="train_data with no batches"):
        fit_quietly(keras_model(), empty)


@pytest.mark.parametrize("epochs", [0, -1, 2.5, "3"])
def test_bad_epochs(loaders, epochs):
    with pytest.raises(LkflowError, match=re.escape(f"epochs={epochs!r}")):
        fit_quietly(keras_model(), *loaders, epochs=epochs)


@pytest.mark.parametrize("gpus", ["x", -2, 1.5, [0, 0], "0,a", True])
def test_unknown_gpus_forms(loaders, gpus):
    with pytest.raises(LkflowError, match=re.escape(f"gpus={gpus!r}")):
        fit_quietly(keras_model(), *loaders, gpus=gpus)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where CUDA is absent")
def test_asking_for_a_gpu_without_cuda_says_how_to_run_on_the_cpu(loaders):
    with pytest.raises(LkflowError, match="CUDA is not available.*Run on the CPU with gpus=0"):
        keras_model().fit(*loaders, epochs=1, gpus=1, track=False, verbose=0)


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


def test_the_package_exports_its_api():
    assert set(lkflow.__all__) >= {"LightModel", "MLflowCallback", "summary", "plot_metric"}
    assert lkflow.LightModel is LightModel


def test_shapes_that_do_not_fit_the_net_name_the_layer():
    x = torch.zeros(64, 3)
    wrong = DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(64, 1)), batch_size=32)
    with pytest.raises(
        LkflowError,
        match=r"layer 'fc1' \(Linear\) failed on input of shape \(32, 3\).*in_features=2",
    ):
        fit_quietly(keras_model(), wrong)


class _Interrupt(pl.Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        raise KeyboardInterrupt


def test_ctrl_c_reaches_the_caller_as_a_keyboard_interrupt(loaders):
    model = keras_model()
    with pytest.raises(KeyboardInterrupt):
        fit_quietly(model, *loaders, epochs=3, callbacks=[_Interrupt()])
    assert model.trainer.interrupted


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


def test_summary_is_the_function_even_after_its_module_was_imported():
    import lkflow.summary_table

    assert callable(lkflow.summary) and lkflow.summary.__name__ == "summary"


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
