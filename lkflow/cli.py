"""The `lkflow` command: train a task, list and compare runs, serve a registered net.

    lkflow train examples/rings.py:task --epochs 10 --registered-model-name rings-net
    lkflow runs --sort best
    lkflow compare RUN RUN --metric val_loss --out compare.png
    lkflow serve rings-net --port 5001
    lkflow sync

A mistake a user can fix (a bad option, an unknown target, run, experiment or model, an
unreachable tracking server) prints one line and exits non-zero; `lkflow --debug ...` shows
the traceback. Torch, Lightning, MLflow, pandas and matplotlib load inside the commands, so
`lkflow --help` answers at once.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import click

from lkflow.errors import LkflowError
from lkflow.outbox import DEFAULT_DIR
from lkflow.store import check_reachable

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure
    from mlflow import MlflowClient
    from mlflow.entities import Run
    from mlflow.entities.model_registry import ModelVersion

# Params shown by `lkflow runs`, as logged by lkflow (MLflowCallback, `lkflow train`) -> column.
_KEY_PARAMS = {
    "task": "task",
    "epochs": "epochs",
    "batch_size": "batch_size",
    "optimizer.lr": "lr",
    "seed": "seed",
}
# Words of metric names that are better higher (as Keras' mode="auto" reads them).
_HIGHER_IS_BETTER = ("acc", "auc", "f1", "precision", "recall", "iou", "dice", "r2", "map")
_TRACKING_URI_HELP = (
    "MLflow tracking URI. Defaults to MLFLOW_TRACKING_URI, else sqlite:///mlflow.db."
)


class _Group(click.Group):
    """A group that prints user errors as one line: `Error: ...` (exit 1, or 2 for usage)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LkflowError as err:
            if ctx.params.get("debug"):
                raise
            raise click.ClickException(_one_line(str(err))) from None
        except click.UsageError as err:
            if ctx.params.get("debug") or err.ctx is None:
                raise
            hint = f" Try '{err.ctx.command_path} --help'."
            raise _OneLineUsageError(_one_line(err.format_message()) + hint) from None


class _OneLineUsageError(click.ClickException):
    exit_code = 2


def _one_line(text: str) -> str:
    return " ".join(text.split())


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show the full traceback of an error.")
@click.version_option(package_name="lkflow")
def main(debug: bool) -> None:
    """Train PyTorch nets Keras-style on Lightning, tracked, compared and served by MLflow."""


def _positive(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    """Click callback: an int option must be >= 1 (click's int type already parsed it)."""
    if value is not None and value < 1:
        raise click.BadParameter(f"{value} is not >= 1.")
    return value


# ---- train --------------------------------------------------------------------------------


@main.command()
@click.argument("target")
@click.option("--epochs", type=int, callback=_positive, default=10, show_default=True)
@click.option("--gpus", help="0 the CPU, N GPUs, -1 all, '0,1' those. Default: a GPU if any.")
@click.option("--lr", type=float, help="Learning rate. Default: the task's.")
@click.option("--batch-size", type=int, callback=_positive, help="Default: the task's.")
@click.option("--seed", type=click.IntRange(min=0, max=2**32 - 1), help="Default: drawn.")
@click.option("--experiment-name", help="MLflow experiment. Default: MLflow's.")
@click.option("--run-name", help="MLflow run name. Default: MLflow picks one.")
@click.option("--registered-model-name", help="Register the net so. Default: the experiment's.")
@click.option("--tracking-uri", help=_TRACKING_URI_HELP)
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE", help="A task setting.")
def train(
    target: str,
    epochs: int,
    gpus: str | None,
    lr: float | None,
    batch_size: int | None,
    seed: int | None,
    experiment_name: str | None,
    run_name: str | None,
    registered_model_name: str | None,
    tracking_uri: str | None,
    params: tuple[str, ...],
) -> None:
    """Train the task TARGET (path/to/file.py:function or package.module:function), tracked.

    \b
    lkflow train examples/rings.py:task --epochs 10 --lr 0.02
    lkflow train examples/digits.py:task --param channels=32 --experiment-name digits

    The function takes lkflow.tasks.TaskOptions (lr, batch_size, seed, params) and returns
    lkflow.tasks.Task (model, train_data, val_data, fit_kwargs, report); see lkflow/tasks.py.
    """
    from mlflow import get_tracking_uri

    from lkflow.tasks import TaskOptions, parse_params, run_task

    tracking_uri = tracking_uri or get_tracking_uri()
    check_reachable(tracking_uri)
    options = TaskOptions(lr=lr, batch_size=batch_size, seed=seed, params=parse_params(params))
    task = run_task(
        target,
        options,
        epochs=epochs,
        gpus=gpus,
        experiment_name=experiment_name,
        run_name=run_name,
        registered_model_name=registered_model_name,
        tracking_uri=tracking_uri,
    )
    click.echo(f"MLflow run {task.model.run_id}; list runs with: lkflow runs")


# ---- tracking store -----------------------------------------------------------------------


def _client(tracking_uri: str | None) -> MlflowClient:
    """A client of an existing store: reachable server, or sqlite file that is there."""
    from mlflow import MlflowClient, get_tracking_uri

    uri = tracking_uri or get_tracking_uri()
    check_reachable(uri)
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite" and parsed.path not in ("", "/", "/:memory:"):
        path = Path(parsed.path[1:])  # sqlite:///rel.db -> rel.db, sqlite:////abs.db -> /abs.db
        if not path.is_file():
            raise LkflowError(
                f"Received: tracking URI {uri!r}, but {path.resolve()} does not exist. Run "
                "from the folder that holds mlflow.db, or pass --tracking-uri."
            )
    return MlflowClient(uri)


def _uri(client: MlflowClient) -> str:
    from lkflow.params import hide_credentials

    return hide_credentials(client.tracking_uri)


# ---- runs ---------------------------------------------------------------------------------


@main.command()
@click.argument("experiment", required=False)
@click.option(
    "--sort",
    default="start",
    show_default=True,
    help="Column to sort by: start newest first, best best first, others ascending; "
    "a leading - reverses (--sort=-lr).",
)
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV instead of a text table.")
@click.option("--max", "max_runs", type=int, callback=_positive, default=20, show_default=True)
@click.option("--tracking-uri", help=_TRACKING_URI_HELP)
def runs(
    experiment: str | None, sort: str, as_csv: bool, max_runs: int, tracking_uri: str | None
) -> None:
    """List the recent runs of EXPERIMENT (default: every experiment) as a table.

    \b
    lkflow runs
    lkflow runs digits --sort best --max 5
    lkflow runs --csv > runs.csv
    """
    client = _client(tracking_uri)
    experiments = [_experiment(client, experiment)] if experiment else client.search_experiments()
    found = client.search_runs(
        [e.experiment_id for e in experiments],
        max_results=max_runs,
        order_by=["attributes.start_time DESC"],
    )
    if not found:
        where = f"experiment {experiment!r}" if experiment else "any experiment"
        click.echo(f"No runs in {where} at {_uri(client)}.")
        return
    several = len({run.info.experiment_id for run in found}) > 1
    names = {e.experiment_id: e.name for e in experiments} if several else {}
    table = _sorted(_runs_frame(found, names), sort)
    if as_csv:
        click.echo(table.to_csv(index=False), nl=False)
    else:
        shown = table.astype(object).where(table.notna(), None)
        cells = [
            [_cell(column, value) for column, value in row.items()] for _, row in shown.iterrows()
        ]
        click.echo(_text_table([list(table.columns), *cells]))


def _experiment(client: MlflowClient, name: str) -> Any:
    found = client.get_experiment_by_name(name)
    if found is None:
        known = ", ".join(e.name for e in client.search_experiments()) or "none"
        raise LkflowError(
            f"Received: experiment {name!r}, which is not at {_uri(client)}. "
            f"Experiments there: {known}."
        )
    return found


def _runs_frame(found: Sequence[Run], experiment_names: dict[str, str]) -> pd.DataFrame:
    """One row per run: name, id, status, start, duration (s), key params, monitor, best."""
    import pandas as pd

    rows = []
    for run in found:
        info, data = run.info, run.data
        end_ms = info.end_time or int(time.time() * 1000)
        monitor, best = _best_metric(data.metrics)
        params = {label: data.params.get(key) for key, label in _KEY_PARAMS.items()}
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


def _best_metric(metrics: dict[str, float]) -> tuple[str | None, float | None]:
    """The `best_<monitor>` metric that MLflowCallback logs, as (monitor, value)."""
    for key, value in metrics.items():
        if key.startswith("best_") and key != "best_epoch":
            return key.removeprefix("best_"), value
    return None, None


def _mode(monitor: str, recorded: str | None = None) -> str:
    """The mode of `monitor`: the recorded one, else "max" for accuracy-like names, else "min"."""
    if recorded in ("min", "max"):
        return recorded
    words = re.split(r"[^a-z0-9]+", monitor.lower())
    return "max" if any(word in _HIGHER_IS_BETTER for word in words) else "min"


def _sorted(table: pd.DataFrame, sort: str) -> pd.DataFrame:
    import pandas as pd

    column = sort.removeprefix("-")
    if column not in table.columns:
        raise LkflowError(
            f"Received: --sort {sort!r}. Expected a column: {', '.join(table.columns)}."
        )
    values = table[column]
    if column == "best":  # best first: a max-mode value counts negated
        sign = table["monitor"].map(lambda monitor: -1 if _mode(str(monitor)) == "max" else 1)
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


def _cell(column: str, value: Any) -> str:
    """A runs-table value as text: start to the minute, duration as 1m05s, best to 4 places."""
    if value is None:
        return ""
    if column == "start":
        return value.strftime("%Y-%m-%d %H:%M")
    if column == "duration":
        return _duration(value)
    return f"{value:.4f}" if column == "best" else str(value)


# ---- compare ------------------------------------------------------------------------------


@main.command()
@click.argument("run_refs", nargs=-1, required=True, metavar="RUN...")
@click.option("--metric", default="val_loss", show_default=True, help="The curve to overlay.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("compare.png"),
    show_default=True,
    help="Where the figure goes (.png, .svg, .pdf).",
)
@click.option("--tracking-uri", help=_TRACKING_URI_HELP)
def compare(run_refs: tuple[str, ...], metric: str, out: Path, tracking_uri: str | None) -> None:
    """Overlay METRIC's per-epoch curves of RUNs (names or ids) and print their params.

    \b
    lkflow compare calm-owl-12 brave-fox-3 --metric val_acc --out acc.png

    Params that differ between the runs are marked with *.
    """
    client = _client(tracking_uri)
    found = [_find_run(client, ref) for ref in run_refs]
    labels = _labels(found)
    curves = {
        label: _history(client, run, metric) for label, run in zip(labels, found, strict=True)
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    _plot_curves(curves, metric).savefig(out, dpi=100)
    click.echo(_params_table(found, labels))
    click.echo(f"\nWrote {metric} curves of {len(found)} runs to {out}")


def _find_run(client: MlflowClient, ref: str) -> Run:
    """The run named `ref`, or whose id is (or, unambiguously, starts with) `ref`."""
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    quote = '"' if "'" in ref else "'"
    named = client.search_runs(
        experiment_ids, f"attributes.run_name = {quote}{ref}{quote}", max_results=10
    )
    candidates = list(named)
    if not candidates and re.fullmatch(r"[0-9a-f]{4,32}", ref):
        every = client.search_runs(experiment_ids, max_results=5000)
        candidates = [run for run in every if run.info.run_id.startswith(ref)]
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        ids = ", ".join(run.info.run_id for run in candidates)
        raise LkflowError(
            f"Received: run {ref!r}, which names {len(candidates)} runs: {ids}. Pass one run id."
        )
    raise LkflowError(
        f"Received: run {ref!r}, which is no run name or id at {_uri(client)}. "
        "`lkflow runs` lists the runs."
    )


def _labels(found: Sequence[Run]) -> list[str]:
    """Run names, with the id's start added where two runs share a name."""
    names = [run.info.run_name or run.info.run_id[:8] for run in found]
    return [
        f"{name} ({run.info.run_id[:8]})" if names.count(name) > 1 else name
        for name, run in zip(names, found, strict=True)
    ]


def _history(client: MlflowClient, run: Run, metric: str) -> list[tuple[int, float]]:
    history = client.get_metric_history(run.info.run_id, metric)
    if not history:
        logged = ", ".join(sorted(run.data.metrics)) or "none"
        raise LkflowError(
            f"Received: --metric {metric!r}, which run {run.info.run_name or run.info.run_id} "
            f"did not log. Its metrics: {logged}."
        )
    return sorted((point.step, point.value) for point in history)


def _plot_curves(curves: dict[str, list[tuple[int, float]]], metric: str) -> Figure:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(7, 4.5), layout="constrained")
    ax = figure.subplots()
    for label, points in curves.items():
        steps, values = zip(*points, strict=True)
        ax.plot([step + 1 for step in steps], values, "o-", label=label)  # epoch 0 is the 1st
    ax.set(title=f"{metric} by epoch", xlabel="Epochs", ylabel=metric)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend()
    return figure


def _params_table(found: Sequence[Run], labels: Sequence[str]) -> str:
    """Params side by side, left-aligned; rows whose values differ come first, marked `*`."""
    keys = sorted({key for run in found for key in run.data.params})
    rows = [[run.data.params.get(key, "-") for run in found] for key in keys]
    marked = [
        (f"* {key}" if len(set(row)) > 1 else f"  {key}", row)
        for key, row in zip(keys, rows, strict=True)
    ]
    marked.sort(key=lambda item: not item[0].startswith("*"))  # stable: differing first
    return _text_table([["  param", *labels], *([name, *row] for name, row in marked)])


def _text_table(lines: list[list[str]]) -> str:
    """Rows of cells as left-aligned columns two spaces apart."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


# ---- serve --------------------------------------------------------------------------------


@main.command()
@click.argument("model_spec", metavar="NAME[/VERSION|@ALIAS]")
@click.option("--port", type=click.IntRange(1, 65535), default=5001, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--tracking-uri", help=_TRACKING_URI_HELP)
def serve(model_spec: str, port: int, host: str, tracking_uri: str | None) -> None:
    """Serve a registered net over HTTP with `mlflow models serve --env-manager local`.

    Without /VERSION or @ALIAS, the version with the best recorded metric (the monitor of
    its fit, lowest or highest by the monitor's mode) is served.

    \b
    lkflow serve rings-net
    lkflow serve rings-net/3 --port 8080
    lkflow serve rings-net@champion
    """
    client = _client(tracking_uri)
    version, why = _model_version(client, model_spec)
    model_uri = f"models:/{version.name}/{version.version}"
    url = f"http://{host}:{port}/invocations"
    payload = _example_request(client, version)
    click.echo(f"Serving {model_uri} ({why}; run {version.run_id}) at {url}")
    click.echo(f"Try: curl -X POST {url} -H 'Content-Type: application/json' -d '{payload}'")
    sys.stdout.flush()
    bin_dir = str(Path(sys.executable).parent)  # the venv's bin, where uvicorn lives
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": client.tracking_uri,
        "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")]),
    }
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri]
    command += ["--env-manager", "local", "-h", host, "-p", str(port)]
    os.execve(sys.executable, command, env)


def _model_version(client: MlflowClient, spec: str) -> tuple[ModelVersion, str]:
    """The version `spec` names, or the best by its recorded metric; and why it was chosen."""
    from mlflow.exceptions import MlflowException

    match = re.fullmatch(r"(?:models:/)?([^/@]+)(?:/(\d+)|@([\w.-]+))?", spec.strip())
    if match is None:
        raise LkflowError(
            f"Received: model {spec!r}. Expected NAME, NAME/VERSION or NAME@ALIAS, such as "
            "rings-net, rings-net/3 or rings-net@champion."
        )
    name, number, alias = match.groups()
    try:
        if alias:
            return client.get_model_version_by_alias(name, alias), f"alias @{alias}"
        if number:
            return client.get_model_version(name, number), "the version asked for"
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        raise _unknown_model(client, spec, name) from err
    if not versions:
        raise _unknown_model(client, spec, name)
    return _best_version(versions)


def _unknown_model(client: MlflowClient, spec: str, name: str) -> LkflowError:
    models = {model.name: model for model in client.search_registered_models()}
    if name in models:
        versions = client.search_model_versions(f"name = '{name}'")
        numbers = ", ".join(str(n) for n in sorted(int(v.version) for v in versions)) or "none"
        aliases = ", ".join(f"@{alias}" for alias in models[name].aliases) or "none"
        return LkflowError(
            f"Received: model {spec!r}, but {name} has no such version or alias at "
            f"{_uri(client)}. Its versions: {numbers}; aliases: {aliases}."
        )
    return LkflowError(
        f"Received: model {spec!r}, which is not registered at {_uri(client)}. "
        f"Registered models: {', '.join(models) or 'none'}."
    )


def _best_version(versions: Sequence[ModelVersion]) -> tuple[ModelVersion, str]:
    """The best version by its `monitor_value` tag, among those with the newest's monitor."""
    newest = max(versions, key=lambda v: int(v.version))
    monitor = newest.tags.get("monitor")
    scored = [v for v in versions if v.tags.get("monitor") == monitor and "monitor_value" in v.tags]
    if not monitor or not scored:
        return newest, "the newest version: no recorded metric"
    mode = _mode(monitor, newest.tags.get("mode"))
    sign = 1 if mode == "min" else -1
    best = min(scored, key=lambda v: (sign * float(v.tags["monitor_value"]), -int(v.version)))
    value = float(best.tags["monitor_value"])
    count = f"{len(scored)} version{'s' if len(scored) > 1 else ''}"
    return best, f"best {monitor}={value:.4g} ({mode}) of {count}"


def _example_request(client: MlflowClient, version: ModelVersion) -> str:
    """The model's logged serving example cut to one row, else a placeholder."""
    import json

    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    source = client.get_model_version_download_uri(version.name, version.version)
    try:
        path = mlflow.artifacts.download_artifacts(
            f"{source.rstrip('/')}/serving_input_example.json", tracking_uri=client.tracking_uri
        )
    except (MlflowException, OSError):  # a model logged without an input example
        return '{"inputs": [[...]]}'
    example = json.loads(Path(path).read_text())
    if isinstance(example.get("inputs"), list):
        example["inputs"] = _rounded(example["inputs"][:1])
    return json.dumps(example, separators=(",", ":"))


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    return [_rounded(item) for item in value] if isinstance(value, list) else value


# ---- sync ---------------------------------------------------------------------------------


@main.command()
@click.option(
    "--tracking-uri",
    help="Deliver there. Default: the tracking URI each fit logged to (MLFLOW_TRACKING_URI "
    "gives it when it had credentials).",
)
@click.option(
    "--outbox",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(DEFAULT_DIR),
    show_default=True,
    help="The folder a fit kept its undelivered writes in.",
)
def sync(tracking_uri: str | None, outbox: Path) -> None:
    """Deliver what fits kept while the tracking server was away, into their runs.

    \b
    lkflow sync
    lkflow sync --tracking-uri http://127.0.0.1:5000

    Each run gets its params, metrics, artifacts, model and registered version, and ends
    with the status its fit ended with. Delivered writes leave the outbox, so running it
    again delivers nothing twice. One line per run says what went in.
    """
    from lkflow.outbox import run_folders, sync_run

    folders = run_folders(outbox)
    if not folders:
        click.echo(f"Nothing to deliver: no run kept in {outbox.resolve()}.")
        return
    for folder in folders:
        click.echo(sync_run(folder, tracking_uri))
