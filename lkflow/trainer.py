"""The Trainer that `LightModel.fit` and `evaluate` build, and how they run it.

Lightning's defaults suit a script; a Keras-style call wants less: no logger or layer table,
one MLflow callback, Lightning's start-up chatter silenced, and Ctrl-C or SIGTERM reaching the
caller as what they were.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.plugins import TorchCheckpointIO
from pytorch_lightning.utilities.exceptions import SIGTERMException

from lkflow.checkpoints import CompleteCheckpointIO
from lkflow.errors import LkflowError

if TYPE_CHECKING:
    from lkflow.model import LightModel

_SIGTERM_STATUS = 128 + signal.SIGTERM  # a shell's exit status for a process ended by SIGTERM


def build_trainer(
    epochs: int, verbose: int, callbacks: list[Callback], kwargs: dict[str, Any]
) -> pl.Trainer:
    options: dict[str, Any] = {
        "max_epochs": epochs,
        "logger": False,
        "enable_model_summary": False,
        "enable_progress_bar": verbose == 1,
        "enable_checkpointing": any(isinstance(c, ModelCheckpoint) for c in callbacks),
    }
    trainer = pl.Trainer(**(options | kwargs), callbacks=callbacks)
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not one passed in plugins
        trainer.strategy.checkpoint_io = CompleteCheckpointIO()
    return trainer


def tracker_of(
    track: bool | Callback,
    experiment_name: str | None,
    run_name: str | None,
    registered_model_name: str | Literal[False] | None,
    tracking_uri: str | None,
) -> Callback | None:
    """The MLflow callback of a fit: none, a new one, or the one passed as `track`."""
    from lkflow.tracking import MLflowCallback

    settings = {
        "experiment_name": experiment_name,
        "run_name": run_name,
        "registered_model_name": registered_model_name,
        "tracking_uri": tracking_uri,
    }
    if isinstance(track, MLflowCallback):
        given = [f"{name}={value!r}" for name, value in settings.items() if value is not None]
        if given:
            raise LkflowError(
                f"Received: track=MLflowCallback(...) and {', '.join(given)}. Pass these "
                "settings to the MLflowCallback instead."
            )
        return track
    if track is True:
        return MLflowCallback(**settings)
    if track is False:
        return None
    raise LkflowError(
        f"Received: track={track!r}. Expected True, False or an lkflow.MLflowCallback."
    )


def fit_passing_interrupts(
    trainer: pl.Trainer, model: LightModel, *args: Any, **kwargs: Any
) -> None:
    """`trainer.fit`, except that Ctrl-C reaches the caller as the KeyboardInterrupt it was,
    and SIGTERM ends the process with status 143, as it would without Lightning.

    Lightning ends a fit interrupted by Ctrl-C with `sys.exit(1)` once the callbacks have seen
    the interrupt; that would end a notebook's kernel and hide the interrupt from the caller.
    On SIGTERM its loops stop at the end of the batch with `SIGTERMException`, a `SystemExit`
    with status 0, which tells a scheduler that the job succeeded.
    """
    try:
        trainer.fit(model, *args, **kwargs)
    except SIGTERMException as exit_:
        if exit_.code in (None, 0):
            raise SIGTERMException(_SIGTERM_STATUS) from exit_
        raise
    except SystemExit as exit_:
        if isinstance(exit_.__context__, KeyboardInterrupt):
            raise exit_.__context__ from None
        raise


@contextlib.contextmanager
def quiet(verbose: int) -> Iterator[None]:
    """Silences Lightning's start-up chatter and its data-loader advice unless `verbose == 1`."""
    if verbose == 1:
        yield
        return
    loggers = [logging.getLogger(name) for name in ("pytorch_lightning", "lightning_fabric")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings(
            "ignore", message=".*Checkpoint directory .* exists and is not empty.*"
        )
        warnings.filterwarnings("ignore", message=".*treespec, LeafSpec.*")
        # epoch values are already summed across processes before they are logged
        warnings.filterwarnings("ignore", message=".*when logging on epoch level in distributed.*")
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)
