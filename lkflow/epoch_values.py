"""Exact epoch values: sums of `value x rows` on the device, added up across processes.

A mean of batch means weighs a short last batch like a full one, and Lightning's distributed
sampler repeats rows so that every process takes the same number of steps. Here each value is
summed with its batch's row count, read once per epoch, and evaluation sets are shared out so
that every row counts once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence, Sized
from typing import TYPE_CHECKING, Any, cast

import pytorch_lightning as pl
import torch
import torchmetrics
from torch.utils.data import Dataset, DistributedSampler, RandomSampler, SequentialSampler
from typing_extensions import override

from lkflow.errors import LkflowError
from lkflow.internals import with_sampler

if TYPE_CHECKING:
    from torch.utils.data import DataLoader


def epoch_number(current_epoch: int) -> int:
    """The number a person reads for Lightning's zero-based `current_epoch`: epochs count from 1.

    One convention everywhere an epoch is shown or recorded: the line per epoch ("Epoch 3/10"),
    the history's `epoch`, the MLflow metric steps, `best_epoch`, checkpoint file names and
    curves. Lightning's own counters (`trainer.current_epoch`, a checkpoint's "epoch") stay
    zero-based inside.

    Example:
        >>> epoch_number(0)
        1
    """
    return current_epoch + 1


class EpochValues:
    """Sums of `value * rows` and row counts on the device; read once per epoch.

    Metrics and metric collections are computed by torchmetrics over the epoch (synced across
    processes as torchmetrics syncs them); a collection gives its values under its own names.
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self.metrics: dict[str, torchmetrics.Metric | torchmetrics.MetricCollection] = {}

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()
        self.sums, self.rows, self.metrics = {}, {}, {}

    def add(self, values: Mapping[str, Any], rows: int) -> None:
        for key, value in values.items():
            if isinstance(value, (torchmetrics.Metric, torchmetrics.MetricCollection)):
                self.metrics[key] = value
                continue
            weighted = _scalar(key, value).detach().float() * rows
            if key in self.sums:
                self.sums[key].add_(weighted)
                self.rows[key] += rows
            else:
                self.sums[key], self.rows[key] = weighted, rows

    def compute(self, strategy: Any, prefix: str) -> dict[str, float]:
        """Epoch values over every row on every process, then a reset."""
        keys = list(self.sums)
        values: list[float] = []
        if keys:
            sums = torch.stack([self.sums[key] for key in keys])
            rows = torch.tensor([self.rows[key] for key in keys], device=sums.device).float()
            totals = strategy.reduce(torch.cat([sums, rows]), reduce_op="sum")
            values = (totals[: len(keys)] / totals[len(keys) :]).tolist()
        computed = dict(zip(keys, values, strict=True))
        for key, metric in self.metrics.items():
            if isinstance(metric, torchmetrics.MetricCollection):  # under its own names
                computed |= {name: float(value) for name, value in metric.compute().items()}
            else:
                computed[key] = float(metric.compute())
        self.reset()
        return {f"{prefix}{key}": value for key, value in computed.items()}


class EpochRows:
    """Each stage's epoch values (train, val, test), and the history row of a training epoch.

    Lightning validates before a training epoch ends, so the row holds the epoch's training
    values, the `val_` values of its validation, and the learning rate it started with.
    """

    def __init__(self) -> None:
        self.stages = {stage: EpochValues() for stage in ("train", "val", "test")}
        self.val_row: dict[str, float] = {}
        self.lr: float | None = None

    def reset(self) -> None:
        """No values in any stage (as after each epoch's `compute`), for a new run."""
        for values in self.stages.values():
            values.reset()

    def start_training(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        """A new training epoch: no validation values yet, and the learning rate it starts with."""
        self.val_row = {}
        self.lr = float(optimizers[0].param_groups[0]["lr"]) if optimizers else None

    def add(self, stage: str, values: Mapping[str, Any], batch: Any) -> None:
        self.stages[stage].add(values, rows_in(batch))

    def compute(self, stage: str, strategy: Any) -> dict[str, float]:
        """`stage`'s epoch values over every row on every process, keys prefixed `val_`, `test_`."""
        return self.stages[stage].compute(strategy, prefix="" if stage == "train" else f"{stage}_")

    def train_row(self, epoch: int, train: Mapping[str, float]) -> dict[str, float]:
        """The history row of training epoch `epoch` (`epoch_number`), whose values are `train`."""
        row = {"epoch": epoch, **train, **self.val_row}
        if self.lr is not None:
            row["lr"] = self.lr
        return row


class EachRowOnce(DistributedSampler[int]):
    """One process's share of an evaluation set: rows `rank, rank + n, ...` of `n` processes.

    Lightning gives evaluation loaders a `DistributedSampler`, which repeats up to one row per
    process so that all take the same number of steps; summed epoch values would count those
    rows twice. Here a share is one row shorter instead, as in Lightning's own sampler for
    predictions: evaluation steps never wait for each other (DDP syncs buffers at most before
    the first batch, which every share has), only the epoch end does. The rank is read when
    rows are drawn, as forked or spawned processes learn it after the loader is built.
    """

    def __init__(self, dataset: Dataset[Any], trainer: pl.Trainer) -> None:
        super().__init__(dataset, num_replicas=1, rank=0, shuffle=False)
        self.trainer = trainer
        self.rows = _rows(dataset)

    def _share(self) -> range:
        kwargs = self.trainer.distributed_sampler_kwargs or {}
        return range(kwargs.get("rank", 0), self.rows, kwargs.get("num_replicas", 1))

    @override
    def __iter__(self) -> Iterator[int]:
        return iter(self._share())

    @override
    def __len__(self) -> int:
        return len(self._share())


def each_row_once(
    name: str, loader: DataLoader[Any], trainer: pl.Trainer, trainer_kwargs: Mapping[str, Any]
) -> DataLoader[Any]:
    """`loader` with an `EachRowOnce` sampler where Lightning would add a padding one."""
    processes = (trainer.distributed_sampler_kwargs or {}).get("num_replicas", 1)
    plain = type(getattr(loader, "sampler", None)) in (SequentialSampler, RandomSampler)
    if processes == 1 or not plain or not trainer_kwargs.get("use_distributed_sampler", True):
        return loader
    rows = _rows(loader.dataset)
    if rows < processes:
        raise LkflowError(
            f"Received: {name} of {rows} rows for {processes} processes. Each "
            f"process needs a row: pass at least {processes} rows, or use fewer devices."
        )
    return with_sampler(loader, EachRowOnce(loader.dataset, trainer))


def _rows(dataset: Dataset[Any]) -> int:
    """The rows of a map-style dataset (a plain loader's sampler takes its length)."""
    return len(cast(Sized, dataset))


def _scalar(key: str, value: Any) -> torch.Tensor:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(float(value))
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.reshape(())
    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
    raise LkflowError(
        f"Received: shared_step value {key!r} of {shape}. Expected a scalar tensor or a "
        "torchmetrics.Metric; reduce it first, such as value.mean()."
    )


def rows_in(batch: Any) -> int:
    """The number of rows in a batch: the first dimension of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else 1
    items = batch.values() if isinstance(batch, Mapping) else batch
    if isinstance(items, Iterable) and not isinstance(items, (str, bytes)):
        for item in items:
            rows = rows_in(item)
            if rows:
                return rows
    return 0
