"""Registering a logged model: MLflow's global tracking URI during it, and put back after."""

from __future__ import annotations

import os

import mlflow
import pytest

from lkflow.outbox import _global_tracking_uri


@pytest.mark.parametrize("before", [None, "variable", "set"])
def test_the_global_tracking_uri_is_the_clients_inside_and_as_it_was_after(
    before: str | None, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inside = f"sqlite:///{tmp_path / 'inside.db'}"
    outside = f"sqlite:///{tmp_path / 'outside.db'}"
    if before == "variable":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", outside)
    elif before == "set":
        mlflow.set_tracking_uri(outside)
    expected = mlflow.get_tracking_uri()
    try:
        with _global_tracking_uri(inside):
            assert mlflow.get_tracking_uri() == inside
        assert mlflow.get_tracking_uri() == expected
        assert os.environ.get("MLFLOW_TRACKING_URI") == (None if before is None else outside)
    finally:
        mlflow.set_tracking_uri(None)
