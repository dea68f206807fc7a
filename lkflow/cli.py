"""The `lkflow` command: train a task, list and compare runs, serve a registered net.

    lkflow train examples/rings.py:task --epochs 10 --registered-model-name rings-net
    lkflow sweep examples/rings.py:task --trials 20 --space 'lr=loguniform(1e-4,1e-1)'
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
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlparse

import click

from lkflow import run_table as listing
from lkflow.errors import LkflowError
from lkflow.numbers import parse_float, parse_int
from lkflow.tracking import registry
from lkflow.tracking.outbox import DEFAULT_DIR
from lkflow.tracking.store import check_reachable, check_sqlite_file

if TYPE_CHECKING:
    from mlflow import MlflowClient

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


class _Number(click.ParamType):  # type: ignore[type-arg]
    """A number option spelt in ASCII (lkflow.numbers), at least `minimum`, at most `maximum`.

    Click's own int and float types take whatever Python's `int()` and `float()` take, other
    scripts' digits too.
    """

    def __init__(
        self,
        parse: Callable[[str], float | None],
        name: str,
        minimum: int | None = None,
        maximum: int | None = None,
    ) -> None:
        self.parse, self.name = parse, name
        self.minimum, self.maximum = minimum, maximum

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = value if isinstance(value, (int, float)) else self.parse(str(value))
        if number is None:
            self.fail(f"{value!r} is not a valid {self.name}.", param, ctx)
        if self.minimum is not None and number < self.minimum:
            self.fail(f"{number} is not >= {self.minimum}.", param, ctx)
        if self.maximum is not None and number > self.maximum:
            self.fail(f"{number} is not <= {self.maximum}.", param, ctx)
        return number


def _int(minimum: int | None = None, maximum: int | None = None) -> _Number:
    return _Number(parse_int, "integer", minimum, maximum)


_POSITIVE = _int(minimum=1)
_FLOAT = _Number(parse_float, "float")


# ---- train --------------------------------------------------------------------------------


@main.command()
@click.argument("target")
@click.option("--epochs", type=_POSITIVE, default=10, show_default=True)
@click.option("--gpus", help="0 the CPU, N GPUs, -1 all, '0,1' those. Default: a GPU if any.")
@click.option("--lr", type=_FLOAT, help="Learning rate. Default: the task's.")
@click.option("--batch-size", type=_POSITIVE, help="Default: the task's.")
@click.option("--seed", type=_int(0, 2**32 - 1), help="Default: drawn.")
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
    run_task(
        target,
        options,
        epochs=epochs,
        gpus=gpus,
        experiment_name=experiment_name,
        run_name=run_name,
        registered_model_name=registered_model_name,
        tracking_uri=tracking_uri,
    )
    click.echo("Compare runs with: lkflow runs")  # the fit said which run, experiment and version


# ---- sweep --------------------------------------------------------------------------------


@main.command()
@click.argument("target")
@click.option("--trials", type=_POSITIVE, required=True, help="Trials of the study in all.")
@click.option("--jobs", type=_POSITIVE, default=1, show_default=True, help="Trials at once here.")
@click.option(
    "--space",
    "space",
    multiple=True,
    metavar="KEY=SPEC",
    help="uniform(a,b), loguniform(a,b), int(a,b[,log][,step=N]), choice(x,y,...). "
    "Default: the task file's space(trial).",
)
@click.option("--epochs", type=_POSITIVE, default=10, show_default=True)
@click.option("--gpus", help="0 the CPU, N GPUs, -1 all, '0,1' those. Default: a GPU if any.")
@click.option("--lr", type=_FLOAT, help="A fixed learning rate. Default: the task's.")
@click.option("--batch-size", type=_POSITIVE, help="A fixed batch size. Default: the task's.")
@click.option("--seed", type=_int(0, 2**32 - 1), help="Every trial's seed. Default: drawn each.")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE", help="A fixed setting.")
@click.option("--monitor", help="The value to optimise, a history key. Default: the task's.")
@click.option("--mode", type=click.Choice(["min", "max"]), help="Default: the task's.")
@click.option(
    "--pruner",
    type=click.Choice(["none", "median", "hyperband"]),
    default="median",
    show_default=True,
)
@click.option(
    "--startup-trials",
    type=_int(minimum=0),
    default=5,
    show_default=True,
    help="Trials that complete before the median pruner prunes.",
)
@click.option("--study", help="Optuna study name. Default: TARGET.")
@click.option("--storage", help="Optuna storage URL. Default: sqlite:///sweep.db by mlflow.db.")
@click.option("--experiment-name", help="MLflow experiment. Default: MLflow's.")
@click.option("--run-name", help="The sweep's run name. Default: MLflow picks one.")
@click.option(
    "--registered-model-name", help="Register the champion so. Default: the experiment's."
)
@click.option("--register-trials", is_flag=True, help="Register every trial's net too.")
@click.option("--tracking-uri", help=_TRACKING_URI_HELP)
@click.option(
    "--heartbeat",
    type=_POSITIVE,
    default=10,
    show_default=True,
    help="Seconds; a trial silent for twice this is taken as killed and run again.",
)
def sweep(
    target: str,
    trials: int,
    jobs: int,
    space: tuple[str, ...],
    epochs: int,
    gpus: str | None,
    lr: float | None,
    batch_size: int | None,
    seed: int | None,
    params: tuple[str, ...],
    monitor: str | None,
    mode: Literal["min", "max"] | None,
    pruner: str,
    startup_trials: int,
    study: str | None,
    storage: str | None,
    experiment_name: str | None,
    run_name: str | None,
    registered_model_name: str | None,
    register_trials: bool,
    tracking_uri: str | None,
    heartbeat: int,
) -> None:
    """Search the hyperparameters of the task TARGET with Optuna; every trial a tracked run.

    \b
    lkflow sweep examples/rings.py:task --trials 20 --jobs 2 \\
        --space 'lr=loguniform(1e-4,1e-1)' --space 'hidden=int(4,64,log)'

    The task reads the values as lkflow train's options: options.lr, options.batch_size,
    options.param(KEY, default). One MLflow run for the sweep, a child run per trial, the
    best trial's net registered with the alias champion. The same command continues a
    stopped sweep, and on other machines (a shared --storage) adds to the same study.
    """
    from lkflow.sweep import SweepSettings, run_sweep
    from lkflow.tasks import TaskOptions, parse_params

    options = TaskOptions(lr=lr, batch_size=batch_size, seed=seed, params=parse_params(params))
    settings = SweepSettings(
        target=target,
        trials=trials,
        space=space,
        jobs=jobs,
        epochs=epochs,
        gpus=gpus,
        options=options,
        monitor=monitor,
        mode=mode,
        pruner=pruner,
        startup_trials=startup_trials,
        study=study,
        storage=storage,
        experiment_name=experiment_name,
        run_name=run_name,
        registered_model_name=registered_model_name,
        register_trials=register_trials,
        tracking_uri=tracking_uri,
        heartbeat_s=heartbeat,
    )
    result = run_sweep(settings)
    counts = f"{result.complete} complete, {result.pruned} pruned, {result.failed} failed"
    click.echo(f"Sweep {result.study!r}: {counts}; MLflow run {result.parent_run_id}")
    if result.best_trial is not None:
        shown = ", ".join(f"{key}={value}" for key, value in result.best_params.items())
        click.echo(
            f"Best: trial {result.best_trial} (run {result.best_run_id}), "
            f"{result.best_value:.6g} with {shown}"
        )
    if result.champion is not None:
        name = result.champion.split("/")[0]
        click.echo(f"Registered {result.champion}, alias champion: lkflow serve {name}@champion")


# ---- tracking store -----------------------------------------------------------------------


def _client(tracking_uri: str | None) -> MlflowClient:
    """A client of an existing store: reachable server, or sqlite file that is there."""
    from mlflow import MlflowClient, get_tracking_uri

    uri = tracking_uri or get_tracking_uri()
    check_reachable(uri)
    check_sqlite_file(uri)
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
    from lkflow.credentials import hide_credentials

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
@click.option(
    "--max",
    "max_runs",
    type=_POSITIVE,
    default=20,
    show_default=True,
    help="Rows shown: the newest runs, or the first of all runs by --sort.",
)
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
    experiments = (
        [listing.experiment(client, experiment)] if experiment else client.search_experiments()
    )
    found = listing.table_runs(client, [e.experiment_id for e in experiments], sort, max_runs)
    if not found:
        where = f"experiment {experiment!r}" if experiment else "any experiment"
        click.echo(f"No runs in {where} at {_uri(client)}.")
        return
    several = len({run.info.experiment_id for run in found}) > 1
    names = {e.experiment_id: e.name for e in experiments} if several else {}
    table = listing.sort_runs(listing.runs_frame(found, names), sort).head(max_runs)
    if as_csv:
        click.echo(table.to_csv(index=False), nl=False)
    else:
        shown = table.astype(object).where(table.notna(), None)
        cells = [
            [listing.cell(str(column), value) for column, value in row.items()]
            for _, row in shown.iterrows()
        ]
        click.echo(listing.text_table([list(table.columns), *cells]))


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
    found = [listing.find_run(client, ref) for ref in run_refs]
    names = listing.labels(found)
    curves = {
        label: listing.metric_history(client, run, metric)
        for label, run in zip(names, found, strict=True)
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    listing.plot_curves(curves, metric).savefig(out, dpi=100)
    click.echo(listing.params_table(found, names))
    click.echo(f"\nWrote {metric} curves of {len(found)} runs to {out}")


# ---- serve --------------------------------------------------------------------------------


@main.command()
@click.argument("model_spec", metavar="NAME[/VERSION|@ALIAS]")
@click.option("--port", type=_int(1, 65535), default=5001, show_default=True)
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
    version, why = registry.model_version(client, model_spec)
    model_uri = f"models:/{version.name}/{version.version}"
    url = f"http://{host}:{port}/invocations"
    payload = registry.example_request(client, version)
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
@click.option(
    "--wait",
    is_flag=True,
    help="Wait for a run whose fit is still running (or that another sync delivers), "
    "instead of leaving it for a later sync.",
)
def sync(tracking_uri: str | None, outbox: Path, wait: bool) -> None:
    """Deliver what fits kept while the tracking server was away, into their runs.

    \b
    lkflow sync
    lkflow sync --tracking-uri http://127.0.0.1:5000
    lkflow sync --wait

    Each run gets its params, metrics, artifacts, model and registered version, and ends
    with the status its fit ended with. Delivered writes leave the outbox, so running it
    again delivers nothing twice. One line per run says what went in. A run whose fit is
    still running, or that another sync delivers, is left as it is and named; the exit
    status is then 1, after the other runs are delivered.
    """
    from lkflow.tracking.outbox import OutboxBusy, run_folders, sync_run

    folders = run_folders(outbox)
    if not folders:
        click.echo(f"Nothing to deliver: no run kept in {outbox.resolve()}.")
        return
    busy = 0
    for folder in folders:
        try:
            click.echo(sync_run(folder, tracking_uri, wait))
        except OutboxBusy as err:
            click.echo(str(err), err=True)
            busy += 1
    if busy:
        raise click.exceptions.Exit(1)
