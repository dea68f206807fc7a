"""The history's rows as the run's metric points: each row once, at `step=epoch`.

    rows = MetricRows()
    rows.hold(client, run_id, outbox_root, history)  # a resumed fit: the steps its run holds
    rows.log(writer, pl_module.history)  # the rows since the last call, in one write
    rows.link_datasets(datasets_write(trainer))  # the data the model's metrics are computed on
    rows.log_best(writer, best, pl_module.history, to_model=True)  # best_<monitor>, best_epoch

History keys become MLflow-safe metric names (`lkflow.tracking.params.sanitize_keys`, one
warning listing every rename); the names and the time each step was logged are kept, so that
the best epoch's row can be linked to the logged model with the same values and times. A
resumed fit first reads which steps its run holds, and logs only the rows of the others.

The metrics linked to the model name the dataset they are computed on, as MLflow's UI shows
them on the model's page: `val_*` or `val/*` (and `best_val_*`) the validation set, the other
epoch values the training set; `lr` and `best_epoch` none.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lkflow.tracking.artifacts import TRAINING, VALIDATION
from lkflow.tracking.outbox import Outbox
from lkflow.tracking.params import sanitize_key, sanitize_keys
from lkflow.tracking.registry import BEST_EPOCH_METRIC, BEST_PREFIX
from lkflow.tracking.store import bounded_http_retries

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from lkflow.tracking.registry import Best
    from lkflow.tracking.writes import InputsWrite, Point, Writer


class MetricRows:
    """The history's rows as metric points of the run: each row once, at `step=epoch`, under
    MLflow-safe names; at the end `best_<monitor>` and `best_epoch`."""

    def __init__(self) -> None:
        self.n_logged = 0  # the rows of the history logged so far
        self.names: dict[str, str] = {}  # history key -> its MLflow name
        self.logged_at: dict[int, int] = {}  # step -> the time its row was logged, in ms
        self.datasets: dict[str, list[str]] = {}  # context -> the dataset's [name, digest]

    def link_datasets(self, write: InputsWrite | None) -> None:
        """Takes the fit's datasets, which the metrics linked to the model name."""
        records = [] if write is None else write["datasets"]
        self.datasets = {data["context"]: [data["name"], data["digest"]] for data in records}

    def log(self, writer: Writer, history: Sequence[Mapping[str, Any]]) -> None:
        """History rows not logged yet: one batched write, each row at `step=epoch`, except
        rows whose step the run already holds (logged before the fit was resumed)."""
        rows = history[self.n_logged :]
        steps = [int(row.get("epoch", self.n_logged + i + 1)) for i, row in enumerate(rows)]
        new = [
            (step, row) for step, row in zip(steps, rows, strict=True) if step not in self.logged_at
        ]
        if new:
            self._name(row for _, row in new)
            now = int(time.time() * 1000)
            values = [
                (self.names[key], float(value), now, step)
                for step, row in new
                for key, value in row.items()
                if key != "epoch"
            ]
            writer.send({"op": "batch", "metrics": values, "to_model": False})
            self.logged_at.update(dict.fromkeys([step for step, _ in new], now))
        self.n_logged += len(rows)

    def _name(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Adds the MLflow names of the rows' keys to `names`."""
        keys = [key for row in rows for key in row if key != "epoch"]
        if not set(keys) <= set(self.names):
            self.names = sanitize_keys(dict.fromkeys([*self.names, *keys]))

    def hold(
        self,
        client: MlflowClient,
        run_id: str,
        outbox_root: Path,
        history: Sequence[Mapping[str, Any]],
    ) -> None:
        """Takes the steps the run holds, logged by the fits before a resume, as logged.

        Every row is logged in one call, so one metric's history tells the steps of the rows
        that hold it: the histories read are those of the first key of each row that holds
        none of the keys read before (one key where every row has the same keys), from MLflow
        and from the run's outbox, whose writes have not reached MLflow yet.
        """
        keys: list[str] = []
        for row in history:
            if not any(key in row for key in keys):
                keys += [key for key in row if key != "epoch"][:1]
        if not keys:
            self.logged_at = {}
            return
        self._name(history)
        names = {self.names[key] for key in keys}
        # The outbox first: a sync delivering meanwhile moves its points into MLflow, read next.
        kept = Outbox(outbox_root / run_id).entries()
        with bounded_http_retries():
            points = [p for name in names for p in client.get_metric_history(run_id, name)]
        held = {
            step: at
            for write in kept
            if write["op"] == "batch"
            for name, _, at, step in write.get("metrics", [])
            if name in names
        }
        held.update({point.step: point.timestamp for point in points})
        self.logged_at = held

    def key_of(self, key: str) -> str:
        """The MLflow name that history key `key` is logged under (as `log` names it)."""
        return self.names.get(key) or sanitize_key(key)

    def log_best(
        self, writer: Writer, best: Best, history: Sequence[Mapping[str, Any]], to_model: bool
    ) -> None:
        """`best_<monitor>` and `best_epoch`; with a model, also the best epoch's row again,
        linked to the model (same values and times: the run's histories gain no point)."""
        values: list[Point] = []
        if best.score is not None:
            name = self.key_of(best.monitor)
            now = int(time.time() * 1000)
            values += [
                (f"{BEST_PREFIX}{name}", best.score, now, best.epoch),
                (BEST_EPOCH_METRIC, float(best.epoch), now, best.epoch),
            ]
        logged_at = self.logged_at.get(best.epoch)
        rows = [row for row in history if row.get("epoch") == best.epoch]
        if to_model and logged_at is not None and rows:
            values += [
                (self.names[key], float(value), logged_at, best.epoch)
                for key, value in rows[-1].items()
                if key != "epoch"
            ]
        if not values:
            return
        if not to_model:
            writer.send({"op": "batch", "metrics": values, "to_model": False})
            return
        contexts = {name: _context(name) for name, _, _, _ in values}
        datasets = {
            name: self.datasets[context]
            for name, context in contexts.items()
            if context is not None and context in self.datasets
        }
        writer.send({"op": "batch", "metrics": values, "to_model": True, "datasets": datasets})


def _context(name: str) -> str | None:
    """The data a logged value is computed on: `val_*` (`val/*`, `valid_*`, `validation_*`)
    and their `best_*` the validation set, `lr` and `best_epoch` none, any other the training
    set.

    Example:
        >>> [_context(name) for name in ("val_loss", "best_val/acc", "loss", "lr", "best_epoch")]
        ['validation', 'validation', 'training', None, None]
    """
    if name == BEST_EPOCH_METRIC:
        return None
    bare = name.removeprefix(BEST_PREFIX)
    if bare == "lr":
        return None
    return VALIDATION if re.match(r"(val|valid|validation)[^a-z0-9]", bare.lower()) else TRAINING
