"""Fixtures of the tracking tests: one tracked fit that several files read."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytorch_lightning as pl
from helpers import STORES, Tracked, fit, fresh_store
from helpers import make_scheduled_model as make_model
from mlflow import MlflowClient
from servers import MIGRATED

EPOCHS = 3


@pytest.fixture(scope="session", params=STORES)
def tracked(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    migrated_store: Path,
) -> Iterator[Tracked]:
    """One tracked fit of the article's task, shared by the checks that only read it: into a
    sqlite file, and into a PostgreSQL database named by its `postgresql://` URI (the
    session's server is emptied for each test, so this store is a database of its own)."""
    folder = tmp_path_factory.mktemp("tracked")
    if request.param == "sqlite":
        uri = fresh_store(folder, migrated_store)
    else:
        uri = request.getfixturevalue("postgres").create("tracked", MIGRATED)
    here = os.getcwd()
    os.chdir(folder)
    try:
        pl.seed_everything(0, verbose=False)
        model = fit(
            make_model(),
            EPOCHS,
            experiment_name="rings",
            registered_model_name="rings-net",
            tracking_uri=uri,
        )
    finally:
        os.chdir(here)
    yield Tracked(model, MlflowClient(uri), model.run_id, uri)
