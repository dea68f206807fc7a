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
from lkflow.epoch_values import epoch_number


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


class _NanFromEpochTwo(ArticleModel):
    def shared_step(self, batch):
        values = super().shared_step(batch)
        if epoch_number(self.current_epoch) >= 2:
            values["loss"] = values["loss"] * torch.log(torch.tensor(-1.0))
        return values


def test_a_nan_loss_stops_the_fit_at_the_end_of_that_epoch(loaders):
    model = _NanFromEpochTwo(Net())
    with pytest.raises(FloatingPointError, match=r"loss is nan at epoch 2"):
        fit_quietly(model, *loaders, epochs=5)
    assert len(model.history) == 2
    best = model.trainer.checkpoint_callback.best_model_path
    assert "epoch=1" in best and Path(best).exists()


# ---- the package -----------------------------------------------------------------------


def test_the_package_exports_its_api():
    assert set(lkflow.__all__) >= {"LightModel", "MLflowCallback", "summary", "plot_metric"}
    assert lkflow.LightModel is LightModel


def test_summary_is_the_function_even_after_its_module_was_imported():
    import lkflow.summary_table

    assert callable(lkflow.summary) and lkflow.summary.__name__ == "summary"


# Batch layouts and output structures: each net trains one epoch, so the model keeps the weights
# of that epoch and the history's val_loss can be recomputed from them over every row.


class Tabular(nn.Module):
    """Numeric features and an embedded category, `forward(x_num, x_cat)`, one logit out."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(4, 3)
        self.head = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 1))

    def forward(self, x_num: torch.Tensor, x_cat: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([x_num, self.embed(x_cat)], dim=1)).squeeze(1)


class Text(nn.Module):
    """Hugging Face style: `forward(input_ids, attention_mask)`, masked mean, 3 class logits."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).float()
        return self.out((self.embed(input_ids) * mask).sum(1) / mask.sum(1))


class TwoHeads(nn.Module):
    """One input, two outputs: a tuple `(logit, prob)`, or a dict of them with `as_dict`."""

    def __init__(self, as_dict: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 1)
        self.as_dict = as_dict

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...] | dict[str, torch.Tensor]:
        logit = self.fc(x).squeeze(1)
        outputs = (logit, torch.sigmoid(logit))
        return dict(zip(("logit", "prob"), outputs, strict=True)) if self.as_dict else outputs


def tabular_rows(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x_num, x_cat = torch.randn(rows, 3, generator=g), torch.randint(0, 4, (rows,), generator=g)
    y = ((x_num[:, 0] + (x_cat == 2).float()) > 0.5).float()
    return x_num, x_cat, y


def text_rows(rows: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 20, (rows, 6), generator=g)
    lengths = torch.randint(2, 7, (rows,), generator=g)
    mask = (torch.arange(6) < lengths.unsqueeze(1)).long()
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": ids[:, 0] % 3}


def as_dicts(columns: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Rows of a dict of columns, as a map-style dataset that DataLoader collates into dicts."""
    n = len(next(iter(columns.values())))
    return [{key: column[i] for key, column in columns.items()} for i in range(n)]


def test_a_multi_input_tuple_batch_trains_and_predicts() -> None:
    train = DataLoader(torch.utils.data.TensorDataset(*tabular_rows(96, 1)), batch_size=32)
    x_num, x_cat, y = tabular_rows(70, 2)
    valid = DataLoader(torch.utils.data.TensorDataset(x_num, x_cat, y), batch_size=32)
    model = LightModel(Tabular(), loss_fn=nn.BCEWithLogitsLoss())
    history = fit_quietly(model, train, valid)

    model.net.eval()
    with torch.no_grad():
        expected = model.net(x_num, x_cat)
    loss = nn.functional.binary_cross_entropy_with_logits(expected, y).item()
    assert history["val_loss"].tolist() == pytest.approx([loss], rel=1e-5)
    predicted = model.predict(valid)
    torch.testing.assert_close(predicted, expected)
    assert model.example_input(next(iter(valid)))[1].dtype == torch.int64


def test_a_dict_batch_passes_all_but_y_by_name() -> None:
    class Named(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

    g = torch.Generator().manual_seed(3)
    columns = {"x": torch.randn(90, 2, generator=g), "y": torch.rand(90, 1, generator=g).round()}
    loader = DataLoader(as_dicts(columns), batch_size=40)
    model = LightModel(Named(), loss_fn=nn.BCEWithLogitsLoss())
    history = fit_quietly(model, loader, loader)

    with torch.no_grad():
        logits = model.net(columns["x"])
    loss = nn.functional.binary_cross_entropy_with_logits(logits, columns["y"]).item()
    assert history["val_loss"].tolist() == pytest.approx([loss], rel=1e-5)
    torch.testing.assert_close(model.predict(loader), logits)


def test_a_hugging_face_style_dict_with_an_attention_mask_trains_and_predicts() -> None:
    train = DataLoader(as_dicts(text_rows(64, 4)), batch_size=16)
    columns = text_rows(40, 5)
    valid = DataLoader(as_dicts(columns), batch_size=16)
    model = LightModel(Text(), loss_fn=nn.CrossEntropyLoss(), optimizer=None)
    history = fit_quietly(model, train, valid)

    with torch.no_grad():
        logits = model.net(columns["input_ids"], columns["attention_mask"])
    loss = nn.functional.cross_entropy(logits, columns["labels"]).item()
    assert history["val_loss"].tolist() == pytest.approx([loss], rel=1e-5)
    unlabelled = {k: v for k, v in columns.items() if k != "labels"}
    torch.testing.assert_close(
        model.predict(DataLoader(as_dicts(unlabelled), batch_size=16)), logits
    )


@pytest.mark.parametrize("as_dict", [False, True], ids=["tuple", "dict"])
def test_a_multi_head_output_reaches_the_loss_as_is_and_predict_keeps_its_structure(
    as_dict: bool,
) -> None:
    def loss_fn(outputs, y):  # what the net returns, as is
        logit = outputs["logit"] if as_dict else outputs[0]
        return nn.functional.binary_cross_entropy_with_logits(logit, y)

    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(70, 2, generator=g), torch.rand(70, generator=g).round()
    loader = DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)  # 32, 32, 6
    model = LightModel(TwoHeads(as_dict), loss_fn=loss_fn)
    history = fit_quietly(model, loader, loader)

    with torch.no_grad():
        expected = model.net(x)
    logit = expected["logit"] if as_dict else expected[0]
    loss = nn.functional.binary_cross_entropy_with_logits(logit, y).item()
    assert history["val_loss"].tolist() == pytest.approx([loss], rel=1e-5)
    predicted = model.predict(loader)
    assert type(predicted) is type(expected)
    torch.testing.assert_close(predicted, expected)


def test_predict_leaves_the_wrapper_and_every_module_of_the_net_in_their_modes() -> None:
    model = LightModel(Tabular(), loss_fn=nn.BCEWithLogitsLoss())
    x_num, x_cat, y = tabular_rows(10, 7)
    model.train()
    model.net.eval()
    model.net.head[2].train()  # the dropout alone in train mode
    before = {name: module.training for name, module in model.named_modules()}
    outputs = model.predict([(x_num, x_cat, y)])
    after = {name: module.training for name, module in model.named_modules()}
    assert after == before and model.training and not model.net.training
    model.net.eval()
    torch.testing.assert_close(outputs, model.net(x_num, x_cat).detach())  # predicted in eval


def test_reduce_lr_on_plateau_watches_the_fits_monitor(loaders) -> None:
    train, valid = loaders
    net = Net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    # mode "max" on val_loss: every epoch whose loss falls is a plateau, so the rate halves
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", patience=0)
    model = LightModel(
        net, loss_fn=nn.BCEWithLogitsLoss(), optimizer=optimizer, lr_scheduler=plateau
    )
    history = fit_quietly(model, train, valid, epochs=3)

    replay = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    again = torch.optim.lr_scheduler.ReduceLROnPlateau(replay, mode="max", patience=0)
    lrs = []
    for val_loss in history["val_loss"]:
        lrs.append(replay.param_groups[0]["lr"])
        again.step(val_loss)
    assert history["lr"].tolist() == pytest.approx(lrs)
    assert len(set(lrs)) > 1  # the rate did change


def test_a_layout_of_ones_own_trains_and_comes_back_from_a_checkpoint(loaders) -> None:
    x, y = loaders[0].dataset.tensors
    rows = [{"features": x[i], "answer": y[i]} for i in range(len(x))]  # no default target key
    loader = DataLoader(rows, batch_size=64)
    model = LightModel(Net(), loss_fn=nn.BCEWithLogitsLoss(), inputs="features", target="answer")
    history = fit_quietly(model, loader, loader)

    with torch.no_grad():
        logits = model.net(x)
    loss = nn.functional.binary_cross_entropy_with_logits(logits, y).item()
    assert history["val_loss"].tolist() == pytest.approx([loss], rel=1e-5)
    best = model.trainer.checkpoint_callback.best_model_path
    clone = LightModel.load_from_checkpoint(best, net=Net(), loss_fn=nn.BCEWithLogitsLoss())
    assert (clone.inputs, clone.target) == ("features", "answer")
    torch.testing.assert_close(clone.predict(loader), logits)
