"""The Trainer's logger of a tracked fit: what Lightning callbacks log goes into the fit's run.

    trainer = pl.Trainer(logger=RunLogger(tracker), callbacks=[tracker, LearningRateMonitor()])

Callbacks such as `LearningRateMonitor` and `DeviceStatsMonitor` need a logger; `LightModel.fit`
gives its Trainer this one when it tracks the fit (Lightning's `DummyLogger` when not). Each
`log_metrics` call becomes one metrics write of the fit's run at the step the caller logs at
(the global step for `LearningRateMonitor(logging_interval="step")`), sent through the
callback's writer: into the run once it is open (writes before the first batch wait for it),
into its outbox while the tracking server is away. Rank zero only; params are the callback's,
so `log_hyperparams` logs nothing.

What the module logs with `self.log` is not logged here: the callback logs the module's epoch
rows itself, at `step=epoch`, from its `history`. Lightning passes those values on with the
key "epoch" it adds (at the global step), which tells them from a callback's own calls.
"""

from __future__ import annotations

import time
from argparse import Namespace
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pytorch_lightning.loggers import Logger
from pytorch_lightning.utilities import rank_zero_only
from typing_extensions import override

from lkflow.tracking.params import sanitize_key

if TYPE_CHECKING:
    from lkflow.tracking.callback import MLflowCallback


class RunLogger(Logger):
    """A Lightning logger that writes metrics into the run of an `MLflowCallback`'s fit.

    Args:
        tracker: The fit's MLflow callback, whose writer (made when the fit starts) takes the
            metrics.

    Example:
        >>> tracker = MLflowCallback(experiment_name="rings")
        >>> trainer = pl.Trainer(logger=RunLogger(tracker), callbacks=[tracker])  # doctest: +SKIP
    """

    def __init__(self, tracker: MLflowCallback) -> None:
        super().__init__()
        self._tracker = tracker

    @property
    @override
    def name(self) -> str:
        return "mlflow-run"

    @property
    @override
    def version(self) -> str:
        return self._tracker.run_id_ or ""

    @override
    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        writer = self._tracker.writer_
        if writer is None or not metrics or "epoch" in metrics:
            return  # no fit under way, or the module's `self.log` values: the history's
        now = int(time.time() * 1000)
        at = step or 0
        points = [(sanitize_key(key), float(value), now, at) for key, value in metrics.items()]
        writer.send({"op": "batch", "metrics": points, "to_model": False})

    @override
    @rank_zero_only
    def log_hyperparams(
        self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any
    ) -> None:
        """Nothing: the callback logs the fit's params."""
