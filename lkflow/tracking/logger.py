"""The Trainer's logger of a tracked fit: what Lightning callbacks log goes into the fit's run.

    trainer = pl.Trainer(logger=RunLogger(tracker), callbacks=[tracker, LearningRateMonitor()])

Callbacks such as `LearningRateMonitor` and `DeviceStatsMonitor` need a logger; `LightModel.fit`
gives its Trainer this one when it tracks the fit (Lightning's `DummyLogger` when not), and
`MLflowCallback` adds one to any other Trainer for the time of the fit, after the Trainer's own
loggers (`RunLogger.join`, `RunLogger.leave`). Each `log_metrics` call becomes one metrics
write of the fit's run at the step the caller logs at (the global step for
`LearningRateMonitor(logging_interval="step")`), sent through the callback's writer: into the
run once it is open (writes before the first batch wait for it), into its outbox while the
tracking server is away. Rank zero only; params are the callback's, so `log_hyperparams`
logs nothing.

What the module logs with `self.log` reaches this logger too: in training with the key "epoch"
that Lightning adds, in validation's steps without it. Its epoch values are not logged here: the
callback logs them as the epoch's row, at `step=epoch` (lkflow/tracking/rows.py). Its values of
a step (`on_step=True`), which Lightning hands its loggers every `log_every_n_steps` already read
to the host, are logged at the step Lightning gives (the global step; in validation, its count
of the fit's validation batches) under the names Lightning gives them (`train_loss`, or
`train_loss_step` beside an epoch value), unless the callback was made with
`step_metrics=False`.
"""

from __future__ import annotations

import time
from argparse import Namespace
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pytorch_lightning.loggers import Logger
from pytorch_lightning.utilities import rank_zero_only
from typing_extensions import override

from lkflow.internals import logging_step_values
from lkflow.tracking.params import sanitize_key

if TYPE_CHECKING:
    import pytorch_lightning as pl

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
    def tracker(self) -> MLflowCallback:
        """The MLflow callback whose run this logger writes into."""
        return self._tracker

    @staticmethod
    def join(trainer: pl.Trainer, tracker: MLflowCallback) -> RunLogger | None:
        """Adds a logger into `tracker`'s run after the Trainer's own loggers, unless it has
        one; the one added, else None.

        Made when the fit starts, after `ModelCheckpoint` took its folder from the Trainer's
        first logger (a Trainer without loggers keeps its `checkpoints/` folder).
        """
        if any(isinstance(lg, RunLogger) and lg.tracker is tracker for lg in trainer.loggers):
            return None
        logger = RunLogger(tracker)
        trainer.loggers = [*trainer.loggers, logger]
        return logger

    @staticmethod
    def leave(trainer: pl.Trainer, logger: RunLogger | None) -> None:
        """Takes `logger` (one `join` added) out of the Trainer's loggers, as the fit ends."""
        if logger is not None:
            trainer.loggers = [lg for lg in trainer.loggers if lg is not logger]

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
        tracker = self._tracker
        writer = tracker.writer_
        if writer is None or not metrics:
            return  # no fit under way
        trainer = tracker.trainer_
        in_step = trainer is not None and logging_step_values(trainer)
        if "epoch" in metrics or (in_step and trainer is not None and trainer.validating):
            if not (in_step and tracker.step_metrics):  # the module's `self.log` values
                return  # an epoch's values, the epoch's row; or step values not wanted
            metrics = {key: value for key, value in metrics.items() if key != "epoch"}
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
