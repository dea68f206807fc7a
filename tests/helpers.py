"""What tests build: the article's tiny net, the rings in loaders, a Keras-style model, a store."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import BinaryAccuracy

from lkflow.datasets import rings
from lkflow.model import LightModel


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
