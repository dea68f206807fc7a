"""Fixtures only: every test seeded in a folder of its own, the rings' loaders, a fresh MLflow
sqlite store per test, and fits in processes of their own (what they build is in helpers.py)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from helpers import FIT_WORKER, Worker, fresh_store, make_loaders
from hypothesis import settings
from hypothesis.database import DirectoryBasedExampleDatabase
from torch.utils.data import DataLoader

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


@pytest.fixture(autouse=True)
def _seeded_and_isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test runs in its own folder, with a fixed seed and no MLflow settings inherited."""
    monkeypatch.chdir(tmp_path)
    for name in _MLFLOW_ENV:
        monkeypatch.delenv(name, raising=False)
    pl.seed_everything(0, verbose=False)
    yield


@pytest.fixture
def loaders() -> tuple[DataLoader, DataLoader]:
    """`make_loaders()`: the rings in a train and a validation loader."""
    return make_loaders()


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


@pytest.fixture
def worker(tmp_path: Path) -> Worker:
    script = tmp_path / "fit_worker.py"
    script.write_text(FIT_WORKER)
    return Worker(script)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen]]:
    """Processes a test starts; any still running at its end are killed (only those)."""
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


os.environ.setdefault("MPLBACKEND", "Agg")
