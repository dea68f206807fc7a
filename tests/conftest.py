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
from helpers import FIT_WORKER, STORES, Worker, fresh_store, make_loaders
from hypothesis import settings
from hypothesis.database import DirectoryBasedExampleDatabase
from servers import MIGRATED, PgServer, Postgres, migrate, postgres_missing
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


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A PostgreSQL cluster for the session (one per xdist worker) holding the database
    `migrated`: an empty MLflow store that `postgres.create(name, MIGRATED)` copies in
    milliseconds. Skipped, saying what is missing, where PostgreSQL cannot run (failed
    instead where LKFLOW_TESTS_NEED_POSTGRES is set, as CI sets it)."""
    reason = postgres_missing()
    if reason is not None:
        if os.environ.get("LKFLOW_TESTS_NEED_POSTGRES"):
            pytest.fail(reason)
        pytest.skip(reason)
    with Postgres() as cluster:
        migrate(cluster.create(MIGRATED))
        yield cluster


@pytest.fixture(scope="session")
def pg_server(postgres: Postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgServer]:
    """One `mlflow server` over a PostgreSQL database for the session; `fresh()` empties it."""
    folder = tmp_path_factory.mktemp("pg-server")
    server = PgServer(postgres, folder)
    with server:
        yield server


@pytest.fixture(params=STORES)
def tracking_uri(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    migrated_store: Path,
) -> Iterator[str]:
    """A fresh, empty store per test, as MLFLOW_TRACKING_URI: a sqlite file copied from
    `migrated_store`, and then the session's PostgreSQL-backed `mlflow server`, its database
    made anew (`@pytest.mark.parametrize("tracking_uri", ["sqlite"], indirect=True)` keeps a
    test on sqlite)."""
    if request.param == "sqlite":
        uri = fresh_store(tmp_path, migrated_store)
    else:
        uri = request.getfixturevalue("pg_server").fresh()
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


# A test's rough cost in seconds by its marks: test files run longest first, so that the workers
# (one per file at a time) end together rather than one waiting on a long file it took last.
COST = {"network": 90.0, "ddp": 5.0, "slow": 5.0}


def _cost(item: pytest.Item) -> float:
    return max((cost for mark, cost in COST.items() if mark in item.keywords), default=0.2)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    file_cost: dict[Path, float] = {}
    for item in items:
        file_cost[item.path] = file_cost.get(item.path, 0.0) + _cost(item)
    items.sort(key=lambda item: -file_cost[item.path])  # stable: a file's own order stays
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


os.environ.setdefault("MPLBACKEND", "Agg")
