"""System metrics: sampled into the run while it is open unless turned off, the interval checked
before any work, and the end of a fit never held up by a server that stopped answering."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest
from helpers import fit, make_model
from mlflow import MlflowClient

from lkflow.errors import LkflowError
from lkflow.tracking import MLflowCallback
from lkflow.tracking.system_metrics import SystemMetrics


@pytest.mark.parametrize("tracking_uri", ["sqlite"], indirect=True)  # the server's: UI tests
@pytest.mark.parametrize(
    ("system_metrics", "switch", "sampled"),
    [(None, None, True), (False, None, False), (None, "false", False)],
    ids=["by-default", "system_metrics=False", "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false"],
)
def test_system_metrics_are_sampled_unless_turned_off(
    tracking_uri: str,
    monkeypatch: pytest.MonkeyPatch,
    system_metrics: bool | None,
    switch: str | None,
    sampled: bool,
) -> None:
    if switch is not None:
        monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", switch)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.05")
    tracker = MLflowCallback(system_metrics=system_metrics, registered_model_name=False)
    model = fit(make_model(), epochs=1, track=tracker)
    client = MlflowClient(tracking_uri)
    logged = client.get_run(model.run_id).data.metrics
    system = sorted(key for key in logged if key.startswith("system/"))
    assert "val_loss" in logged
    if sampled:
        assert "system/cpu_utilization_percentage" in system, system
        points = client.get_metric_history(model.run_id, "system/cpu_utilization_percentage")
        assert sorted(point.step for point in points) == list(range(len(points)))  # from 0
    else:
        assert system == []


@pytest.mark.parametrize(
    ("interval", "variable", "shown"),
    [
        (0, None, "system_metrics_interval=0"),
        (-1.0, None, "system_metrics_interval=-1.0"),
        (float("inf"), None, "system_metrics_interval=inf"),
        (None, "ten", "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL='ten'"),
    ],
)
def test_a_bad_interval_fails_before_any_work(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    interval: float | None,
    variable: str | None,
    shown: str,
) -> None:
    if variable is not None:
        monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", variable)
    model = make_model()
    with pytest.raises(LkflowError, match=f"Received: {shown}.*positive number of seconds"):
        fit(model, track=MLflowCallback(system_metrics_interval=interval))
    assert model.history == [] and not (tmp_path / "mlflow.db").exists()


def test_stopping_never_waits_on_a_server_that_stopped_answering(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the sampler's one request
    with socket.socket() as hung:  # takes connections and never answers
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)
        client = MlflowClient(f"http://127.0.0.1:{hung.getsockname()[1]}")
        before = set(threading.enumerate())
        monitor = SystemMetrics.start(client, "0" * 32, 0.01, resumed=False)
        assert monitor is not None
        started = set(threading.enumerate()) - before
        (sampler,) = [thread for thread in started if thread.name == "SystemMetricsMonitor"]
        monitor.stop(server_answers=False)
        assert sampler.is_alive()  # still waiting for the server: the fit is not
    sampler.join(timeout=120)  # the server is gone now: its request fails, and it ends
    assert not sampler.is_alive()
