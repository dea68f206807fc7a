"""Exact epoch values: over every row, weighted by rows, never a mean of batch means."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torchmetrics
from helpers import ArticleModel, Net, full_pass, keras_model
from torch import nn
from torchmetrics.classification import BinaryAccuracy

from lkflow import LightModel


def test_epoch_values_are_over_all_rows_not_a_mean_of_batch_means(loaders):
    train, valid = loaders
    model = keras_model(lr=0.0)  # weights never move, so every epoch sees the same net
    history = model.fit(train, valid, epochs=2, gpus=0, track=False, verbose=0)

    loss, acc = full_pass(model.net, valid)
    train_loss, train_acc = full_pass(model.net, train)
    assert list(history["epoch"]) == [1, 2]  # the sanity check adds no row
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


def _collection(**kwargs) -> torchmetrics.MetricCollection:
    return torchmetrics.MetricCollection(
        {"acc": BinaryAccuracy(), "auroc": torchmetrics.classification.BinaryAUROC()}, **kwargs
    )


@pytest.mark.parametrize(
    ("metrics", "keys"),
    [
        (lambda: _collection(prefix="m_"), ["m_acc", "m_auroc"]),
        (
            lambda: {"scores": _collection(postfix="@1"), "bacc": BinaryAccuracy()},
            ["acc@1", "auroc@1", "bacc"],
        ),
    ],
    ids=["as-metrics", "inside-the-dict"],
)
def test_a_metric_collection_is_computed_over_all_rows_under_its_own_names(loaders, metrics, keys):
    train, valid = loaders
    net = Net()
    model = LightModel(
        net,
        loss_fn=nn.BCEWithLogitsLoss(),
        metrics=metrics(),
        optimizer=torch.optim.SGD(net.parameters(), lr=0.0),  # one net in every epoch
    )
    history = model.fit(
        train, valid, epochs=2, gpus=0, track=False, verbose=0, monitor=f"val_{keys[0]}", mode="max"
    )

    data = {"": valid.dataset.tensors, "train": train.dataset.tensors}
    with torch.no_grad():
        logits = {stage: net(x) for stage, (x, _) in data.items()}
    targets = {stage: y for stage, (_, y) in data.items()}
    for stage, prefix in (("", "val_"), ("train", "")):
        acc = BinaryAccuracy()(logits[stage], targets[stage]).item()
        auroc = torchmetrics.classification.BinaryAUROC()(logits[stage], targets[stage]).item()
        expected = dict(zip(keys, [acc, auroc, acc][: len(keys)], strict=True))
        for key, value in expected.items():
            assert history[f"{prefix}{key}"].tolist() == pytest.approx([value] * 2, rel=1e-6), key
