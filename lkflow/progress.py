"""A Keras-style report of training: one line per epoch, nothing per step."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
from typing_extensions import override


def format_row(row: dict[str, Any], max_epochs: int | None) -> str:
    """One epoch's line: `Epoch 3/10 - 0.41s - loss: 0.2831 - val_loss: 0.2180 - lr: 0.01`.

    Args:
        row: A history row; its `epoch` counts from 1.
        max_epochs: The planned number of epochs, or None when open-ended.

    Returns:
        The line, without a newline.

    Example:
        >>> format_row({"epoch": 1, "loss": 0.5, "lr": 0.01}, 10)
        'Epoch 1/10 - loss: 0.5000 - lr: 0.0100'
    """
    total = f"/{max_epochs}" if max_epochs and max_epochs > 0 else ""
    parts = [f"Epoch {int(row['epoch'])}{total}"]
    if "time" in row:
        parts.append(f"{row['time']:.2f}s")
    parts += [
        f"{key}: {_number(value)}" for key, value in row.items() if key not in ("epoch", "time")
    ]
    return " - ".join(parts)


def _number(value: float) -> str:
    if value == 0 or 1e-3 <= abs(value) < 1e4:
        return f"{value:.4f}"
    return f"{value:.3e}"  # also spells nan and inf


class EpochLogger(pl.Callback):
    """Prints each finished epoch of a LightModel's history as one line, on rank zero.

    A LightModel appends an epoch's row in its own `on_train_epoch_end`, which Lightning calls
    after the callbacks' hook; so the row is printed as the next epoch starts, or as training
    ends.

    Args:
        print_fn: Where the lines go. Defaults to `print`.

    Example:
        >>> trainer = pl.Trainer(callbacks=[EpochLogger()], enable_progress_bar=False)
    """

    def __init__(self, print_fn: Callable[[str], None] = print) -> None:
        self.print_fn = print_fn
        self._printed = 0
        self._epoch_start = 0.0

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._printed = len(getattr(pl_module, "history", []))

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._print_new_rows(trainer, pl_module)
        self._epoch_start = time.perf_counter()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._print_new_rows(trainer, pl_module)

    def _print_new_rows(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        history: list[dict[str, Any]] = getattr(pl_module, "history", [])
        rows = history[self._printed :]
        self._printed = len(history)
        if not trainer.is_global_zero:
            return
        for row in rows:
            timed = {"epoch": row["epoch"], "time": time.perf_counter() - self._epoch_start}
            self.print_fn(format_row(timed | row, trainer.max_epochs))
