"""System metrics of a tracked fit: CPU, memory, disk, network and, with `nvidia-ml-py`, GPU use,
sampled while the run is open and logged to it, as the run's "System metrics" tab shows them.

    interval_s = system_metrics_interval(None)  # MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL, else 10
    monitor = SystemMetrics.start(client, run_id, interval_s, resumed=False)  # None: not sampled
    ...                                                                      # the fit trains
    monitor.stop(server_answers=True)  # before the run ends

MLflow's `SystemMetricsMonitor` samples in a thread of its own and logs `system/...` metrics
every `interval_s` seconds at steps 0, 1, 2, ... (a run that is continued goes on from its last
step), to the fit's store: the client's tracking URI, not MLflow's global one. Only rank zero
samples, so the figures are those of its machine (`pip install "lkflow[gpu]"` adds the GPUs').
A fit shorter than one interval logs no sample.

The training loop never waits for the sampling thread: it reads the machine's counters with
psutil and writes on its own, about 20 ms of CPU a sample, nothing measurable at the default
interval (benchmarks/RESULTS.md, "System metrics"). Its writes go straight to MLflow, not
through the fit's outbox: when the tracking server stops answering, the thread ends on its
first request that fails (one MLflow warning), and the system metrics of the outage are not
kept, unlike the fit's own writes. `stop` waits for the thread only while the server answers,
and at most `STOP_WAIT_S`, so a server gone away never holds up the end of a fit.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from lkflow.errors import LkflowError
from lkflow.tracking.store import bounded_http_retries

if TYPE_CHECKING:
    from mlflow import MlflowClient

DEFAULT_INTERVAL_S = 10.0  # MLflow's own default sampling interval
STOP_WAIT_S = 30.0  # the longest the end of a fit waits for the last samples to be logged
_SWITCH = "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"  # MLflow's switch, read where lkflow's is unset
_INTERVAL = "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"
_MONITOR_LOGGER = "mlflow.system_metrics.system_metrics_monitor"  # says "Started ..." at INFO
_FALSE = ("0", "false", "no", "off")


def system_metrics_on(given: bool | None) -> bool:
    """Whether a fit samples system metrics: as given, else on unless MLflow's switch,
    `MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING`, is set to false.

    Example:
        >>> system_metrics_on(False), system_metrics_on(True)
        (False, True)
    """
    if given is not None:
        return given
    return os.environ.get(_SWITCH, "").strip().lower() not in _FALSE


def system_metrics_interval(given: float | None) -> float:
    """The sampling interval in seconds: as given, else `MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`,
    else 10.

    Raises:
        LkflowError: The interval is not a positive number of seconds.

    Example:
        >>> system_metrics_interval(0.5)
        0.5
    """
    if given is None:
        text = os.environ.get(_INTERVAL)
        if text is None:
            return DEFAULT_INTERVAL_S
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        source = f"{_INTERVAL}={text!r}"
    else:
        value, source = given, f"system_metrics_interval={given!r}"
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0 < value < math.inf):
        raise LkflowError(
            f"Received: {source}. Expected a positive number of seconds between system "
            "metrics samples, such as 10; or system_metrics=False not to sample."
        )
    return float(value)


class SystemMetrics:
    """MLflow's system metrics monitor of one run, started and stopped by lkflow.

    Args:
        monitor: A started `mlflow.system_metrics.system_metrics_monitor.SystemMetricsMonitor`.
    """

    def __init__(self, monitor: Any) -> None:
        self._monitor = monitor

    @classmethod
    def start(
        cls, client: MlflowClient, run_id: str, interval_s: float, resumed: bool
    ) -> SystemMetrics | None:
        """Samples the machine every `interval_s` seconds into `run_id` of the client's store,
        from now until `stop`; continues the run's steps when `resumed`. None, after one
        warning, where MLflow cannot sample (psutil missing, the run unreadable): the fit goes
        on without system metrics."""
        from mlflow.exceptions import MlflowException

        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            with _quiet(), bounded_http_retries():
                monitor = SystemMetricsMonitor(  # type: ignore[no-untyped-call]  # unannotated
                    run_id,
                    sampling_interval=interval_s,
                    resume_logging=resumed,
                    tracking_uri=client.tracking_uri,
                )
                monitor.sampling_interval = interval_s  # also over MLflow's variable
                monitor.start()  # type: ignore[no-untyped-call]
        except (ImportError, MlflowException, OSError) as err:
            warnings.warn(
                f"The run has no system metrics: MLflow cannot sample them here "
                f"({type(err).__name__}: {err}). Install psutil (pip install psutil), or "
                "pass system_metrics=False.",
                stacklevel=3,
            )
            return None
        return cls(monitor)

    def stop(self, server_answers: bool) -> None:
        """Stops sampling and logs what was sampled: waits for it up to `STOP_WAIT_S` while the
        server answers, else not at all (the thread ends on its own)."""
        finisher = threading.Thread(target=self._finish, name="lkflow-system-metrics", daemon=True)
        finisher.start()
        finisher.join(STOP_WAIT_S if server_answers else 0)

    def _finish(self) -> None:
        with _quiet():
            self._monitor.finish()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """MLflow's monitor says at INFO that it starts and stops, and that it skips GPUs: not in
    a fit's output. Its warnings still show."""
    logger = logging.getLogger(_MONITOR_LOGGER)
    level = logger.level
    logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)
