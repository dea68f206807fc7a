"""Shared fixtures: a seeded tiny net and data, and a fresh MLflow sqlite store per test."""

from __future__ import annotations

import os
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hypothesis import settings
from hypothesis.database import DirectoryBasedExampleDatabase
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import BinaryAccuracy

from lkflow.datasets import rings
from lkflow.model import LightModel

# Property tests: in CI (CI=true) the same examples every run, no deadline on a busy machine and
# no example database; locally new examples each run, failures remembered in the checkout's
# git-ignored .hypothesis/ (the tests themselves run in temporary folders).
settings.register_profile("ci", derandomize=True, database=None, deadline=None)
settings.register_profile(
    "dev", database=DirectoryBasedExampleDatabase(Path(__file__).parents[1] / ".hypothesis")
)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

_MLFLOW_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_RUN_ID",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_EXPERIMENT_ID",
)


class Net(nn.Module):
    """The article's net, returning logits: Linear(2, 6) - Linear(6, 12) - Linear(12, 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2, 6)
        self.fc2 = nn.Linear(6, 12)
        self.fc3 = nn.Linear(12, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.fixture(autouse=True)
def _seeded_and_isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test runs in its own folder, with a fixed seed and no MLflow settings inherited."""
    monkeypatch.chdir(tmp_path)
    for name in _MLFLOW_ENV:
        monkeypatch.delenv(name, raising=False)
    pl.seed_everything(0, verbose=False)
    yield


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


@pytest.fixture
def loaders() -> tuple[DataLoader, DataLoader]:
    """`make_loaders()`: the rings in a train and a validation loader."""
    return make_loaders()


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


@pytest.fixture(scope="session")
def migrated_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty store with MLflow's schema: migrating takes seconds, copying milliseconds."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("migrated") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def tracking_uri(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, migrated_store: Path
) -> Iterator[str]:
    """A fresh store per test, as MLFLOW_TRACKING_URI, made by copying `migrated_store`."""
    uri = fresh_store(tmp_path, migrated_store)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    yield uri
    import mlflow

    while mlflow.active_run() is not None:
        mlflow.end_run()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


os.environ.setdefault("MPLBACKEND", "Agg")
