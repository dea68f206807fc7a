"""Where a tracked fit's epoch rows come from: one row per training epoch, `{"epoch": n, ...}`.

    source = rows_source(trainer, pl_module)
    source.start_epoch()  # on_train_epoch_start: the row of the epoch before is closed
    source.end_validation()  # on_validation_end: the validation values of the epoch
    source.rows()  # the rows of the epochs that have ended, for MetricRows (metrics.py)

`MLflowCallback` logs whatever rows its source gives, the same way for every module, at
`step=epoch` (epochs counted from 1, `lkflow.epoch_values.epoch_number`). Two sources:

- `HistoryRows`, an lkflow.LightModel's `history`: exact epoch values (row-weighted sums over
  every row, a torchmetrics `compute()` over the epoch), which the model keeps itself and saves
  in its checkpoints.
- `LoggedRows`, any other LightningModule: what it (or a callback) logged with
  `self.log(..., on_epoch=True)` in training and in that epoch's validation, as Lightning reduced
  it over the epoch (its `callback_metrics`: a mean over batches weighted by `batch_size`, or
  the metric's `compute()`), under the names given to `self.log`, and the learning rate the
  epoch started with as `lr` (unless the module logs an `lr` itself). A value that was not
  logged again in an epoch (logged only now and then, or in a validation that did not run) is
  left out of that epoch's row rather than repeated. Values logged only per step are not
  rows: Lightning hands them to the Trainer's loggers (lkflow/tracking/logger.py).

An epoch's row is made when the next epoch starts or training ends, once Lightning has reduced
and handed on the epoch's values; a checkpoint that `ModelCheckpoint` writes at the epoch's end
(after the module's `on_train_epoch_end`) already holds it in the callback's state, so a fit
resumed from that checkpoint carries the rows up to its epoch. The values are read to the host
as a row is made (and as such a checkpoint is written): never while the epoch trains.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from lkflow.epoch_values import epoch_number
from lkflow.internals import epoch_level_names, epochs_processed

if TYPE_CHECKING:
    import pytorch_lightning as pl

Row = dict[str, float]


class RowsSource(Protocol):
    """What a tracked fit's epoch rows come from; the callback calls these from its hooks."""

    def start_epoch(self) -> None:
        """A training epoch starts (the row of the one before is closed if it has ended)."""

    def end_validation(self) -> None:
        """A validation has ended (not a sanity check)."""

    def rows(self) -> list[Row]:
        """The rows of every epoch that has ended, in order, each with its `epoch`."""
        ...

    def saved(self) -> list[Row] | None:
        """The rows to keep in the callback's checkpoint state; None when the module keeps them."""
        ...

    def restore(self, rows: Iterable[Mapping[str, float]]) -> None:
        """The rows the checkpoint of a resumed fit kept (`saved`)."""


class HistoryRows:
    """An lkflow.LightModel's `history`: rows it computes itself, and keeps in its checkpoints.

    Example:
        >>> HistoryRows(model).rows() is model.history
        True
    """

    def __init__(self, pl_module: pl.LightningModule) -> None:
        self._module = pl_module

    def start_epoch(self) -> None:
        """Nothing: the model makes its row at its own epoch end."""

    def end_validation(self) -> None:
        """Nothing: the model's row holds its validation values."""

    def rows(self) -> list[Row]:
        history: list[Row] = self._module.history  # type: ignore[assignment]
        return history

    def saved(self) -> None:
        """None: the model's checkpoints hold its history."""

    def restore(self, rows: Iterable[Mapping[str, float]]) -> None:
        """Nothing: the model restores its history from its checkpoint."""


class LoggedRows:
    """The rows of a LightningModule's `self.log(..., on_epoch=True)` values, read from the
    Trainer's `callback_metrics` once per epoch (see the module's docstring).

    Args:
        trainer: The Trainer of the fit.

    Example:
        >>> source = LoggedRows(trainer)  # doctest: +SKIP
        >>> source.rows()  # after two epochs  # doctest: +SKIP
        [{'epoch': 1, 'train_loss': 0.61, 'val_loss': 0.58, 'lr': 0.01}, {'epoch': 2, ...}]
    """

    def __init__(self, trainer: pl.Trainer) -> None:
        self._trainer = trainer
        self._rows: list[Row] = []
        self._epoch: int | None = None  # the epoch under way (counted from 1), its row open
        self._lr: float | None = None  # the learning rate it started with
        self._val: dict[str, Any] = {}  # the values of its last validation
        self._taken: dict[str, Any] = {}  # each training value's object when a row took it

    def start_epoch(self) -> None:
        self._close()
        trainer = self._trainer
        self._epoch, self._val = epoch_number(trainer.current_epoch), {}
        optimizers = trainer.optimizers
        self._lr = float(optimizers[0].param_groups[0]["lr"]) if optimizers else None

    def end_validation(self) -> None:
        trainer = self._trainer
        if self._epoch is not None and not trainer.sanity_checking:
            held = trainer.callback_metrics
            names = epoch_level_names(trainer, "validation", since_reset=True)
            self._val = {name: held[name] for name in names if name in held}

    def rows(self) -> list[Row]:
        self._close()
        return self._rows

    def saved(self) -> list[Row]:
        """The rows, and the open one once its epoch's training has ended: a checkpoint
        written at an epoch's end holds that epoch's row."""
        rows = [dict(row) for row in self._rows]
        epoch = self._ended()
        if epoch is not None:
            held = self._trainer.callback_metrics
            names = epoch_level_names(self._trainer, "train", since_reset=True)
            rows.append(self._row(epoch, {name: held[name] for name in names if name in held}))
        return rows

    def restore(self, rows: Iterable[Mapping[str, float]]) -> None:
        self._rows = [dict(row) for row in rows]

    def _ended(self) -> int | None:
        """The epoch under way once its training has ended (its row can be made), else None."""
        epoch = self._epoch
        return epoch if epoch is not None and epochs_processed(self._trainer) >= epoch else None

    def _close(self) -> None:
        """The open row, once its epoch has ended: called after Lightning reset the epoch's
        training values, when `callback_metrics` holds them for the last time.

        `callback_metrics` keeps a value until it is logged again, and each epoch's reduction
        is a new tensor: a value that is the very object an earlier row took was not logged
        in this epoch, and is left out.
        """
        epoch = self._ended()
        if epoch is None:
            return
        held = self._trainer.callback_metrics
        train = {
            name: held[name]
            for name in epoch_level_names(self._trainer, "train")
            if name in held and held[name] is not self._taken.get(name)
        }
        self._taken.update(train)
        self._rows.append(self._row(epoch, train))
        self._epoch, self._val = None, {}

    def _row(self, epoch: int, train: Mapping[str, Any]) -> Row:
        """The row of `epoch`: `train` values, then validation's, then the learning rate."""
        values = {**train, **{k: v for k, v in self._val.items() if k not in train}}
        row: Row = {"epoch": epoch}
        row.update({key: float(value) for key, value in values.items()})
        if self._lr is not None:
            row.setdefault("lr", self._lr)
        return row


def rows_source(trainer: pl.Trainer, pl_module: pl.LightningModule) -> RowsSource:
    """`HistoryRows` for a module that keeps a `history` list (an lkflow.LightModel), else
    `LoggedRows`.

    Example:
        >>> type(rows_source(trainer, LitAutoEncoder(encoder, decoder))).__name__  # doctest: +SKIP
        'LoggedRows'
    """
    if isinstance(getattr(pl_module, "history", None), list):
        return HistoryRows(pl_module)
    return LoggedRows(trainer)
