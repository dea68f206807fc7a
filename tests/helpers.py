"""What tests build: the article's tiny net, the rings in loaders, a Keras-style model, a store,
and tracked fits of it."""

from __future__ import annotations

import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import BinaryAccuracy

from lkflow.datasets import rings
from lkflow.model import LightModel

if TYPE_CHECKING:
    from mlflow import MlflowClient


class Net(nn.Module):
    """The article's net, returning logits: Linear(2, 6) - Linear(6, 12) - Linear(12, 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2, 6)
        self.fc2 = nn.Linear(6, 12)
        self.fc3 = nn.Linear(12, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def make_loaders() -> tuple[DataLoader, DataLoader]:
    """Train (320 rows) and validation (250 rows, a short last batch) loaders of the rings."""
    train = DataLoader(rings(320, seed=1), batch_size=64, shuffle=True)
    valid = DataLoader(rings(250, seed=2), batch_size=64)
    return train, valid


def make_model(
    net: nn.Module | None = None,
    model_class: type[LightModel] = LightModel,
    scheduled: bool = False,
) -> LightModel:
    """A Keras-style LightModel of `Net`: BCE on logits, accuracy, SGD with momentum, and with
    `scheduled` a StepLR halving the lr every 2 epochs."""
    net = net or Net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 2, gamma=0.5) if scheduled else None
    return model_class(
        net,
        loss_fn=nn.BCEWithLogitsLoss(),
        metrics={"acc": BinaryAccuracy()},
        optimizer=optimizer,
        lr_scheduler=scheduler,
    )


def fresh_store(folder: Path, migrated: Path) -> str:
    """A new, empty sqlite store in `folder`, copied from `migrated` (no schema migrations)."""
    shutil.copy(migrated, folder / "mlflow.db")
    with sqlite3.connect(folder / "mlflow.db") as connection:  # Default's artifacts in `folder`
        connection.execute(
            "UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
            (str(folder / "mlruns" / "0"),),
        )
    connection.close()
    return f"sqlite:///{folder / 'mlflow.db'}"


# ---- tracked fits ------------------------------------------------------------------------


def make_scheduled_model(
    net: nn.Module | None = None, model_class: type[LightModel] = LightModel
) -> LightModel:
    """`make_model` with a StepLR, so that the scheduler's params are logged too."""
    return make_model(net, model_class, scheduled=True)


def fit(model: LightModel, epochs: int = 2, **kwargs: Any) -> LightModel:
    """`model.fit` on `make_loaders()` on the CPU, quiet, with `kwargs` (tracking's too)."""
    model.fit(*make_loaders(), epochs=epochs, gpus=0, verbose=0, **kwargs)
    return model


def plain_fit(
    tracker: pl.Callback,
    folder: Path,
    epochs: int = 2,
    callbacks: tuple[pl.Callback, ...] = (),
    ckpt_path: str | None = None,
    monitor: str | None = "val_loss",
) -> LightModel:
    """A fit with a plain `pl.Trainer`, its checkpoints (best `monitor`, last) in `folder`."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    checkpoint = ModelCheckpoint(folder / "checkpoints", monitor=monitor, save_last=True)
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[tracker, checkpoint, *callbacks],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = make_scheduled_model()
    trainer.fit(model, *make_loaders(), ckpt_path=ckpt_path)
    return model


@dataclass
class Tracked:
    """One tracked fit: its model, a client of its store, its run, the store's URI."""

    model: LightModel
    client: MlflowClient
    run_id: str
    uri: str
