"""Runs of a tracking store as tables and figures: what `lkflow runs` and `lkflow compare` show.

found = table_runs(client, ["1", "2"], sort="best", max_runs=20)  # page by page, no histories
table = sort_runs(runs_frame(found, {}), "best").head(20)
figure = plot_curves({"calm-owl-12": metric_history(client, run, "val_loss")}, "val_loss")
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from lkflow.credentials import hide_credentials
from lkflow.errors import LkflowError
from lkflow.tracking.registry import BEST_EPOCH_METRIC, BEST_PREFIX, mode

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure
    from mlflow import MlflowClient
    from mlflow.entities import Run

_PAGE = 1000  # runs a search request asks for: MLflow's default page

# Columns of `lkflow runs` -> the params they show, the first a run holds: as lkflow logs them
# (MLflowCallback, `lkflow train`), then as `mlflow run -P` logs them before the fit starts,
# which is all a run that failed or stopped before its first batch holds.
_KEY_PARAMS = {
    "task": ("task",),
    "epochs": ("epochs",),
    "batch_size": ("batch_size",),
    "lr": ("optimizer.lr", "lr"),
    "seed": ("seed",),
}


def experiment(client: MlflowClient, name: str) -> Any:
    found = client.get_experiment_by_name(name)
    if found is None:
        known = ", ".join(e.name for e in client.search_experiments()) or "none"
        raise LkflowError(
            f"Received: experiment {name!r}, which is not at "
            f"{hide_credentials(client.tracking_uri)}. "
            f"Experiments there: {known}."
        )
    return found


def table_runs(
    client: MlflowClient, experiment_ids: list[str], sort: str, max_runs: int
) -> list[Run]:
    """The runs that `lkflow runs --sort SORT --max MAX_RUNS` orders and shows.

    Sorted by start, the store orders them and only the `max_runs` newest (oldest for
    `-start`) are read. Any other column is lkflow's to order, so every run of the
    experiments is read, page by page through MLflow's search; a search returns each run's
    params, tags and latest metric values, never a metric's history.

    Args:
        client: The client of the store.
        experiment_ids: The experiments whose runs are listed.
        sort: The `--sort` column, with a leading "-" to reverse.
        max_runs: How many runs the table shows.

    Returns:
        The runs, newest first (oldest first for `-start`).

    Example:
        >>> len(table_runs(client, ["1"], "start", 20))  # doctest: +SKIP
        20
    """
    if sort.removeprefix("-") == "start":
        direction = "ASC" if sort.startswith("-") else "DESC"
        return _search_pages(
            client, experiment_ids, [f"attributes.start_time {direction}"], max_runs
        )
    return _search_pages(client, experiment_ids, ["attributes.start_time DESC"], None)


def _search_pages(
    client: MlflowClient, experiment_ids: list[str], order_by: list[str], limit: int | None
) -> list[Run]:
    """Runs of the experiments in `order_by`'s order, `limit` of them (None: all), by pages."""
    found: list[Run] = []
    token = None
    while limit is None or len(found) < limit:
        size = _PAGE if limit is None else min(_PAGE, limit - len(found))
        page = client.search_runs(
            experiment_ids, max_results=size, order_by=order_by, page_token=token
        )
        found.extend(page)
        token = page.token
        if not token:
            break
    return found


def runs_frame(found: Sequence[Run], experiment_names: dict[str, str]) -> pd.DataFrame:
    """One row per run: name, id, status, start, duration (s), key params, monitor, best."""
    import pandas as pd

    rows = []
    for run in found:
        info, data = run.info, run.data
        end_ms = info.end_time or int(time.time() * 1000)
        monitor, best = best_metric(data.metrics)
        params = {
            column: next((data.params[key] for key in keys if key in data.params), None)
            for column, keys in _KEY_PARAMS.items()
        }
        task_params = {k: v for k, v in data.params.items() if k.startswith("task.")}
        rows.append(
            {
                "run": info.run_name,
                "id": info.run_id[:8],
                "experiment": experiment_names.get(info.experiment_id),
                "status": info.status,
                "start": pd.Timestamp.fromtimestamp(info.start_time / 1000),  # local time
                "duration": (end_ms - info.start_time) / 1000,
                **params,
                **task_params,
                "monitor": monitor,
                "best": best,
            }
        )
    return pd.DataFrame(rows).dropna(axis="columns", how="all")


def best_metric(metrics: dict[str, float]) -> tuple[str | None, float | None]:
    """The `best_<monitor>` metric that MLflowCallback logs, as (monitor, value)."""
    for key, value in metrics.items():
        if key.startswith(BEST_PREFIX) and key != BEST_EPOCH_METRIC:
            return key.removeprefix(BEST_PREFIX), value
    return None, None


def sort_runs(table: pd.DataFrame, sort: str) -> pd.DataFrame:
    import pandas as pd

    column = sort.removeprefix("-")
    if column not in table.columns:
        raise LkflowError(
            f"Received: --sort {sort!r}. Expected a column: {', '.join(table.columns)}."
        )
    values = table[column]
    if column == "best":  # best first: a max-mode value counts negated
        sign = table["monitor"].map(lambda monitor: -1 if mode(str(monitor)) == "max" else 1)
        values = values * sign
    elif column != "start" and not pd.api.types.is_numeric_dtype(values):
        numbers = pd.to_numeric(values, errors="coerce")
        values = numbers if numbers.notna().sum() == values.notna().sum() else values.astype(str)
    descending = (column == "start") != sort.startswith("-")
    order = values.sort_values(ascending=not descending, na_position="last", kind="stable")
    return table.loc[order.index]


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{rest:02d}s"


def cell(column: str, value: Any) -> str:
    """A runs-table value as text: start to the minute, duration as 1m05s, best to 4 places."""
    if value is None:
        return ""
    if column == "start":
        return str(value.strftime("%Y-%m-%d %H:%M"))
    if column == "duration":
        return _duration(value)
    return f"{value:.4f}" if column == "best" else str(value)


def find_run(client: MlflowClient, ref: str) -> Run:
    """The run named `ref`, or whose id is (or, unambiguously, starts with) `ref`."""
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    quote = '"' if "'" in ref else "'"
    named = client.search_runs(
        experiment_ids, f"attributes.run_name = {quote}{ref}{quote}", max_results=10
    )
    candidates = list(named)
    if not candidates and re.fullmatch(r"[0-9a-f]{4,32}", ref):
        candidates = list(
            client.search_runs(experiment_ids, f"attributes.run_id LIKE '{ref}%'", max_results=10)
        )
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        ids = ", ".join(run.info.run_id for run in candidates)
        raise LkflowError(
            f"Received: run {ref!r}, which names {len(candidates)} runs: {ids}. Pass one run id."
        )
    raise LkflowError(
        f"Received: run {ref!r}, which is no run name or id at "
        f"{hide_credentials(client.tracking_uri)}. "
        "`lkflow runs` lists the runs."
    )


def labels(found: Sequence[Run]) -> list[str]:
    """Run names, with the id's start added where two runs share a name."""
    names = [run.info.run_name or run.info.run_id[:8] for run in found]
    return [
        f"{name} ({run.info.run_id[:8]})" if names.count(name) > 1 else name
        for name, run in zip(names, found, strict=True)
    ]


def metric_history(client: MlflowClient, run: Run, metric: str) -> list[tuple[int, float]]:
    history = client.get_metric_history(run.info.run_id, metric)
    if not history:
        logged = ", ".join(sorted(run.data.metrics)) or "none"
        raise LkflowError(
            f"Received: --metric {metric!r}, which run {run.info.run_name or run.info.run_id} "
            f"did not log. Its metrics: {logged}."
        )
    return sorted((point.step, point.value) for point in history)


def plot_curves(curves: dict[str, list[tuple[int, float]]], metric: str) -> Figure:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(7, 4.5), layout="constrained")
    ax = figure.subplots()
    for label, points in curves.items():
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, "o-", label=label)
    ax.set(title=f"{metric} by epoch", xlabel="Epochs", ylabel=metric)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend()
    return figure


def params_table(found: Sequence[Run], labels: Sequence[str]) -> str:
    """Params side by side, left-aligned; rows whose values differ come first, marked `*`."""
    keys = sorted({key for run in found for key in run.data.params})
    rows = [[run.data.params.get(key, "-") for run in found] for key in keys]
    marked = [
        (f"* {key}" if len(set(row)) > 1 else f"  {key}", row)
        for key, row in zip(keys, rows, strict=True)
    ]
    marked.sort(key=lambda item: not item[0].startswith("*"))  # stable: differing first
    return text_table([["  param", *labels], *([name, *row] for name, row in marked)])


def text_table(lines: list[list[str]]) -> str:
    """Rows of cells as left-aligned columns two spaces apart."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )
