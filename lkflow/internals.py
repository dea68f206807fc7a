"""The parts of Lightning and MLflow that lkflow relies on and they do not publish, in one place.

Each one has a test in tests/test_internals.py that fails on a release that changes it, so that
an upgrade breaks there, by name, rather than somewhere in a fit.

    loader = with_sampler(loader, sampler)  # a DataLoader rebuilt around another sampler
    trains_in_child_processes(trainer)  # ddp_spawn, ddp_notebook: workers train, not this process
    with global_tracking_uri(uri): ...  # MLflow's global tracking URI for a block, then as it was
    last_global_step_saved(checkpoint)  # the step at which a ModelCheckpoint last saved
    record_save(checkpoint, trainer, filepath)  # a file counted as saved without writing it
    epoch_level_names(trainer, "train")  # what the module logged with on_epoch=True, by name
    logging_step_values(trainer)  # whether Lightning is logging a step's values, not an epoch's
    epochs_processed(trainer)  # the epochs whose training has ended, on_train_epoch_end hooks on

Overriding is the one use that cannot live here. lkflow/checkpoints.py overrides two methods
of `ModelCheckpoint`: `_save_checkpoint(trainer, filepath)`, where it writes each file, and
`_update_best_and_save(current, trainer, monitor_candidates)`, where it records a new best
(its best_... attributes) and then writes it. Their signatures, that Lightning goes through
them, and which attributes a new best changes are tested too.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, Sampler


def with_sampler(loader: DataLoader[Any], sampler: Sampler[Any] | Iterable[Any]) -> DataLoader[Any]:
    """`loader` rebuilt with `sampler`, every other argument (and subclass) kept.

    Lightning's `_update_dataloader` re-creates a DataLoader from the arguments it was built with,
    as Lightning does itself when it adds a distributed sampler.
    """
    from pytorch_lightning.utilities.data import _update_dataloader

    return _update_dataloader(loader, sampler)


def trains_in_child_processes(trainer: pl.Trainer) -> bool:
    """Whether the fit runs in processes that this one starts and waits for (spawn or fork).

    Those processes send back only the weights and the best checkpoint's path; `ddp` started
    as a script (or torchrun) trains in this process too.
    """
    from pytorch_lightning.strategies.launchers import _MultiProcessingLauncher

    return isinstance(trainer.strategy.launcher, _MultiProcessingLauncher)


@contextlib.contextmanager
def global_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's global tracking URI set to `uri` for the block, then put back as it was.

    MLflow's `_use_tracking_uri` puts back the global URI exactly (also one set without the
    environment variable), which the public `set_tracking_uri` cannot; it also unsets
    `MLFLOW_TRACKING_URI` on the way out when the URI had come from it, so the variable is
    kept here.
    """
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    variable = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with _use_tracking_uri(uri):
            yield
    finally:
        if variable is not None:
            os.environ["MLFLOW_TRACKING_URI"] = variable


def last_global_step_saved(checkpoint: ModelCheckpoint) -> int:
    """The global step at which `checkpoint` last saved a file (0 before its first).

    Lightning reads it to save at most once a step; a checkpoint that saved in this step has
    `last_global_step_saved(checkpoint) == trainer.global_step`.
    """
    step: int = checkpoint._last_global_step_saved
    return step


def record_save(checkpoint: ModelCheckpoint, trainer: pl.Trainer, filepath: str) -> None:
    """Counts `filepath` as saved by `checkpoint` at this step, for a file it put in place itself.

    Sets what Lightning's own `_save_checkpoint` sets after writing (the step and the path of
    the last save), and tells the Trainer's loggers of the checkpoint, on rank zero, as it does.
    """
    from weakref import proxy

    checkpoint._last_global_step_saved = trainer.global_step
    checkpoint._last_checkpoint_saved = filepath
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.after_save_checkpoint(proxy(checkpoint))


def epoch_level_names(
    trainer: pl.Trainer, stage: Literal["train", "validation"], *, since_reset: bool = False
) -> list[str]:
    """The names under which `trainer.callback_metrics` holds the values logged with
    `self.log(..., on_epoch=True)` in the fit's training or validation, by the module or a
    callback (`/dataloader_idx_N` added as Lightning adds it); with `since_reset`, only those
    logged since Lightning last reset the loop's values (at the end of each training epoch,
    after the Trainer's loggers had them, and of each validation, after `on_validation_end`).

    Lightning keeps what `self.log` receives in a `_ResultCollection` per loop, one entry per
    logged name with its `on_step`/`on_epoch` settings; `callback_metrics` merges every loop's
    values and keeps a value until it is logged again, so it cannot tell these apart itself.
    """
    loop = trainer.fit_loop.epoch_loop
    results = loop._results if stage == "train" else loop.val_loop._results
    names = []
    for result in results.values():
        meta = result.meta
        if not meta.on_epoch or (since_reset and result.has_reset):
            continue
        suffix = ""
        if meta.add_dataloader_idx and meta.dataloader_idx is not None:
            suffix = results.DATALOADER_SUFFIX.format(meta.dataloader_idx)
        names.append(f"{meta.name}{suffix}")
    return names


def logging_step_values(trainer: pl.Trainer) -> bool:
    """Whether the Trainer's loggers are being given the values of a step (`on_step=True`, every
    `log_every_n_steps`), rather than an epoch's reduced ones.

    Lightning's logger connector marks an epoch's end by setting `_first_loop_iter` to None,
    and a batch of the loop by True or False.
    """
    return trainer._logger_connector._first_loop_iter is not None


def epochs_processed(trainer: pl.Trainer) -> int:
    """The training epochs of the fit whose batches are all done, counted from the start of
    training (a resumed fit counts the epochs of the checkpoint).

    Lightning counts an epoch processed before it calls the `on_train_epoch_end` hooks and
    completed after them; `trainer.current_epoch` is the completed count.
    """
    processed: int = trainer.fit_loop.epoch_progress.current.processed  # type: ignore[attr-defined]
    return processed
