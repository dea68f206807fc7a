"""What `LightModel.fit`, `evaluate` and `predict` assemble and run around the model.

    tracker = tracker_of(track, experiment_name, run_name, registered_model_name, tracking_uri)
    every = fit_callbacks(ckpt_dir, monitor, mode, patience, verbose, callbacks, tracker)
    fit_model(model, train_data, val_data, epochs, verbose, ckpt_path, every, trainer_kwargs)

A fit's callbacks are the best checkpoint by `monitor`, `last.ckpt` after every epoch, the
user's, early stopping, the line per epoch and the MLflow callback. Lightning's Trainer defaults
suit a script; a Keras-style call wants less: a logger only into the MLflow run, no layer table,
checkpoint files whole or absent, Lightning's start-up chatter silenced, and Ctrl-C or SIGTERM
reaching the caller as what they were. After a fit, what spawned or forked workers kept comes
back into this process, and the best epoch's weights into the model.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, EarlyStopping, ModelCheckpoint
from pytorch_lightning.loggers import Logger
from pytorch_lightning.loggers.logger import DummyLogger
from pytorch_lightning.plugins import TorchCheckpointIO
from pytorch_lightning.utilities.exceptions import SIGTERMException

from lkflow.batches import call_net, concat, to_device
from lkflow.checkpoints import BestCheckpoint, CompleteCheckpointIO, LastCheckpoint
from lkflow.checks import check_loader
from lkflow.devices import Gpus, trainer_device_kwargs
from lkflow.epoch_values import each_row_once
from lkflow.errors import LkflowError
from lkflow.internals import trains_in_child_processes
from lkflow.progress import EpochLogger

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

    from lkflow.model import LightModel
    from lkflow.tracking import MLflowCallback

_SIGTERM_STATUS = 128 + signal.SIGTERM  # a shell's exit status for a process ended by SIGTERM


@dataclass(frozen=True)
class FitCallbacks:
    """A fit's callbacks in the Trainer's order, and the two the fit reads once it has ended."""

    all: list[Callback]
    best: ModelCheckpoint
    tracker: MLflowCallback | None
    logger: Logger  # into the tracker's run, else nowhere: for callbacks that need a logger


def fit_callbacks(
    ckpt_dir: str | os.PathLike[str],
    monitor: str,
    mode: Literal["min", "max"],
    patience: int | None,
    verbose: int,
    callbacks: Iterable[Callback],
    tracker: MLflowCallback | None,
) -> FitCallbacks:
    """The best checkpoint by `monitor` and `last.ckpt`, the user's `callbacks`, early stopping
    with `patience`, the line per epoch with `verbose=2`, and the MLflow callback last; the
    Trainer's logger writes into the tracker's run (lkflow/tracking/logger.py), or nowhere."""
    best = BestCheckpoint(
        dirpath=os.fspath(ckpt_dir),
        filename=checkpoint_filename(monitor),
        monitor=monitor,
        mode=mode,
        save_top_k=1,
        auto_insert_metric_name=False,
    )
    every: list[Callback] = [best, LastCheckpoint(best), *callbacks]
    if patience is not None:
        every.append(EarlyStopping(monitor=monitor, mode=mode, patience=patience))
    if verbose == 2:
        every.append(EpochLogger())
    logger: Logger = DummyLogger()
    if tracker is not None:
        from lkflow.tracking.logger import RunLogger

        every.append(tracker)
        logger = RunLogger(tracker)
    return FitCallbacks(every, best, tracker, logger)


def checkpoint_filename(monitor: str) -> str:
    """The best checkpoint's file name pattern, such as `epoch={epoch}-val_f1_macro={...:.4f}`:
    the monitor's name made safe for a file name (`val_f1/macro`, `acc@1`), its value as logged.

    Example:
        >>> checkpoint_filename("val_f1/macro")
        'epoch={epoch}-val_f1_macro={val_f1/macro:.4f}'
    """
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", monitor)
    return f"epoch={{epoch}}-{safe}={{{monitor}:.4f}}"


def fit_model(
    model: LightModel,
    train_data: DataLoader[Any],
    val_data: DataLoader[Any] | None,
    epochs: int,
    verbose: int,
    ckpt_path: str | os.PathLike[str] | None,
    callbacks: FitCallbacks,
    trainer_kwargs: dict[str, Any],
) -> None:
    """Trains `model` with checked arguments, then leaves in it the history, the MLflow run id
    and the best epoch's weights (on every rank). Without `ckpt_path` the history starts empty."""
    if ckpt_path is None:
        model.history = []
    with quiet(verbose):
        trainer = build_trainer(epochs, verbose, callbacks.all, trainer_kwargs, callbacks.logger)
        if val_data is not None:
            val_data = each_row_once("val_data", val_data, trainer, trainer_kwargs)
        fit_passing_interrupts(trainer, model, train_data, val_data, ckpt_path=ckpt_path)
    if callbacks.tracker is not None:
        model.run_id = callbacks.tracker.run_id_
    if trains_in_child_processes(trainer):
        _take_back_from_workers(model, callbacks.best, callbacks.tracker)
    _restore_best(model, trainer, callbacks.best.best_model_path)


def _take_back_from_workers(
    model: LightModel, best: ModelCheckpoint, tracker: MLflowCallback | None
) -> None:
    """The history and run id that forked or spawned processes (`ddp_notebook`) kept.

    Lightning sends only the weights and the best checkpoint's path back to this process;
    the newest last checkpoint holds the rest.
    """
    if best.dirpath is None:
        return
    lasts = sorted(Path(best.dirpath).glob("last*.ckpt"), key=os.path.getmtime)
    if not lasts:
        return
    saved = torch.load(lasts[-1], map_location="cpu", weights_only=True)
    model.history = [dict(row) for row in saved.get("lkflow_history", [])]
    if tracker is not None:
        model.run_id = saved.get("callbacks", {}).get(tracker.state_key, {}).get("run_id")


def _restore_best(model: LightModel, trainer: pl.Trainer, best_model_path: str) -> None:
    """Loads the best checkpoint's weights into `model`. Under DDP, Lightning writes the file
    on rank zero's node alone: rank zero loads it and sends the weights to every other rank,
    so that nodes without a shared file system end with the same weights."""
    if not best_model_path:
        return
    from pytorch_lightning.strategies import DDPStrategy

    ranks = isinstance(trainer.strategy, DDPStrategy) and trainer.world_size > 1
    if not ranks or trainer.is_global_zero:
        state = torch.load(best_model_path, map_location=model.device, weights_only=True)
        model.load_state_dict(state["state_dict"])
    if ranks and torch.distributed.is_initialized():
        for tensor in model.state_dict().values():  # the same order on every rank
            torch.distributed.broadcast(tensor, src=0)


def evaluate_model(
    model: LightModel, data: DataLoader[Any], gpus: Gpus, trainer_kwargs: dict[str, Any]
) -> dict[str, float]:
    """`model.evaluate(...)`: the loss and metrics over every row of `data`, once."""
    check_loader("data", data)
    device_kwargs = trainer_device_kwargs(gpus, trainer_kwargs)
    with quiet(0):
        trainer = build_trainer(1, 0, [], {**trainer_kwargs, **device_kwargs})
        data = each_row_once("data", data, trainer, trainer_kwargs)
        (results,) = trainer.test(model, dataloaders=data, verbose=False)
    return {key.removeprefix("test_"): value for key, value in results.items()}


def predict_outputs(model: LightModel, data: DataLoader[Any] | Iterable[Any] | torch.Tensor) -> Any:
    """`model.predict(data)`: the net's outputs in eval mode, without gradients, on the CPU,
    in the structure the net returns; every module is left in the mode it was in."""
    batches = [data] if isinstance(data, torch.Tensor) else data
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            outputs = [
                call_net(model.net, to_device(model.example_input(b), model.device))
                for b in batches
            ]
    finally:
        for module, training in modes:
            module.training = training
    if not outputs:
        raise LkflowError("Received: data with no batches. Pass a non-empty DataLoader.")
    return to_device(concat(outputs), "cpu")


def optimizers_of(model: LightModel) -> Any:
    """What `configure_optimizers` returns: the optimizer (Adam with lr 1e-3 where the model has
    none), or it and Lightning's scheduler dict, where `ReduceLROnPlateau` without a monitor
    watches the fit's `monitor`."""
    if model.optimizer is None:
        model.optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    optimizer, scheduler = model.optimizer, model.lr_scheduler
    if scheduler is None:
        return optimizer
    scheduler = dict(scheduler) if isinstance(scheduler, Mapping) else {"scheduler": scheduler}
    plateau = isinstance(scheduler.get("scheduler"), torch.optim.lr_scheduler.ReduceLROnPlateau)
    trainer = model._trainer  # None outside a Trainer
    if plateau and "monitor" not in scheduler and trainer is not None:
        best = [c for c in trainer.checkpoint_callbacks if isinstance(c, BestCheckpoint)]
        if best:
            scheduler["monitor"] = best[0].monitor
    return {"optimizer": optimizer, "lr_scheduler": scheduler}


def build_trainer(
    epochs: int,
    verbose: int,
    callbacks: list[Callback],
    kwargs: dict[str, Any],
    logger: Logger | Literal[False] = False,
) -> pl.Trainer:
    options: dict[str, Any] = {
        "max_epochs": epochs,
        "logger": logger,
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
) -> MLflowCallback | None:
    """The MLflow callback of a fit: none, a new one, or the one passed as `track`."""
    from lkflow.tracking import MLflowCallback

    if isinstance(track, MLflowCallback):
        settings = {
            "experiment_name": experiment_name,
            "run_name": run_name,
            "registered_model_name": registered_model_name,
            "tracking_uri": tracking_uri,
        }
        given = [f"{name}={value!r}" for name, value in settings.items() if value is not None]
        if given:
            raise LkflowError(
                f"Received: track=MLflowCallback(...) and {', '.join(given)}. Pass these "
                "settings to the MLflowCallback instead."
            )
        return track
    if track is True:
        return MLflowCallback(
            experiment_name=experiment_name,
            run_name=run_name,
            registered_model_name=registered_model_name,
            tracking_uri=tracking_uri,
        )
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
        warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
        # epoch values are already summed across processes before they are logged
        warnings.filterwarnings("ignore", message=".*when logging on epoch level in distributed.*")
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)
