"""MLflowCallback: one Lightning callback that logs a whole fit to MLflow and registers the net.

    trainer = pl.Trainer(max_epochs=10, callbacks=[MLflowCallback(experiment_name="rings")])
    trainer.fit(model, dl_train, dl_valid)

The module is an lkflow.LightModel or any LightningModule. What one fit logs, all through
`MlflowClient` calls naming the run, from rank zero only:
- params (train start): the module's hparams, optimizer, scheduler, epochs, batch size,
  precision, devices, seed, the net's class and size, the data sizes; batched, 100 a call.
- metrics: each epoch's row once, `step=epoch`, one batched call per epoch, after the epoch's
  checkpoint is written; at the end `best_<monitor>` and `best_epoch`. The rows are a
  LightModel's `history`, or what another module logged with `self.log(..., on_epoch=True)`
  (rows.py). A resumed fit first reads which steps its run holds, and logs only the rows of
  the others.
- what the module logs per step, and what Lightning callbacks log, through a logger into the
  run (logger.py) at their steps.
- inputs: the training and validation sets (rows, digest).
- artifacts (fit end): `checkpoints/` (best and last), `net/state_dict.pt` (the best weights
  of the served net), `history.csv`, `curves.png`, `summary.txt`; one of these extras that
  cannot be made is left out with a warning, and the fit still finishes.
- the model: the served net (a LightModel's bare net; another module's `net=` submodule, else
  the module itself where it defines `forward`, else its `net` or `model`) with the best
  weights, exported with torch.export by its layout (a pickle with the net's code where export
  fails), linked to the run, and registered with tags once it answers its input example (a
  few rows of the first batch's inputs, example.py).
- system metrics (CPU, memory, disk, network, GPUs with nvidia-ml-py) from the run's opening
  to the fit's end, sampled by MLflow's monitor in a thread (system_metrics.py).

A run that is already open (`with mlflow.start_run()`, `MLFLOW_RUN_ID` as `mlflow run` sets
it, or `run_id=` of a running run) is logged into and left open; otherwise the callback opens
the run and ends it FINISHED, FAILED on an exception, or KILLED on Ctrl-C. An exception also
leaves its type and message in the tag `lkflow.error` and its traceback's last lines in
`traceback.txt`; the exception itself reaches the caller unchanged. A later fit of the run that
finishes moves that tag to `lkflow.previous_error` (traceback.txt stays, the last error's).

The store is only read until the first training batch has gone through: a mistake that the
arguments, the sanity check or the first step reveal fails the fit before any run is created
or reopened. The run opens at the end of that batch, and what the fit logged before (params,
datasets) goes first.

A tracking server that does not answer when the fit starts stops it before training. One that
goes away during the fit does not: the write that failed and every later write of the run go,
in order, to `mlruns-outbox/<run_id>/` in the working folder (`outbox_dir=`), with one
warning, and `lkflow sync` delivers them into the run once the server is back (see
lkflow/tracking/outbox.py for the layout). Every write goes through the fit's `Writer`
(lkflow/tracking/writes.py): while the server answers it is one MLflow call as before,
retried for seconds rather than MLflow's minutes. The fit owns the run's outbox (holds its
lock) until it has written the run's end: a `lkflow sync` meanwhile leaves it alone.

The hooks below only say when; what is done lives beside this file: the run in run.py, the
writes in writes.py, the epoch rows in rows.py, the metrics in metrics.py, the files in
artifacts.py, the input example in example.py, the model in export.py, its registration in
registry.py, the system metrics in system_metrics.py.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pytorch_lightning as pl
from typing_extensions import override

from lkflow.batches import to_device
from lkflow.checks import check_registered_model_name
from lkflow.tracking.artifacts import (
    checkpoints_write,
    datasets_write,
    figure_files,
    fit_files,
    summary_text,
)
from lkflow.tracking.example import input_example
from lkflow.tracking.export import best_net, has_forward, net_of, saved_model, served_attribute
from lkflow.tracking.logger import RunLogger
from lkflow.tracking.metrics import MetricRows
from lkflow.tracking.outbox import DEFAULT_DIR
from lkflow.tracking.params import fit_params, prepare_params
from lkflow.tracking.registry import best_checkpoint, registered_name, registration
from lkflow.tracking.rows import RowsSource, rows_source
from lkflow.tracking.run import (
    FoundRun,
    TrackedRun,
    clear_error,
    end_run,
    find_run,
    log_error,
    log_params,
    open_run,
)
from lkflow.tracking.store import (
    beside_mlflow_logger,
    check_reachable,
    check_tracking_uri,
    tracking_client,
    tracking_uri_as_set,
)
from lkflow.tracking.system_metrics import (
    SystemMetrics,
    system_metrics_interval,
    system_metrics_on,
)
from lkflow.tracking.writes import Writer

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from lkflow.batches import Inputs


class MLflowCallback(pl.Callback):
    """Logs a fit to MLflow, then logs and registers the served net with its best weights.

    The module is an lkflow.LightModel or any LightningModule, such as one that logs with
    `self.log` and is checkpointed by the Trainer's own `ModelCheckpoint`. Arguments are kept
    as passed; what they resolve to during the fit lives in attributes with a trailing
    underscore: `client_`, `run_id_`, `experiment_id_`, `model_uri_`, `model_servable_`
    (whether that model answered its input example, so that it may be registered),
    `model_version_`, `trainer_`.

    Args:
        experiment_name: Experiment of a new run. Defaults to None (`MLFLOW_EXPERIMENT_NAME`,
            else `MLFLOW_EXPERIMENT_ID`, else MLflow's "Default").
        run_name: Name of a new run. Defaults to None (MLflow picks one).
        registered_model_name: Name to register the net under, or False not to register.
            Defaults to None: the experiment's name, or the net's class name in "Default".
        tracking_uri: Where to log. Defaults to None: `MLFLOW_TRACKING_URI`, else MLflow's
            default (`sqlite:///mlflow.db` in the working folder), read when the fit starts;
            beside an `MLFlowLogger`, which sets MLflow's tracking URI to its own as the fit
            starts, as it was when the callback was made.
        run_id: A run to log into. Defaults to None: the active run, else `MLFLOW_RUN_ID`,
            else the run of the checkpoint being resumed, else a new run.
        log_model: Log (and register) the net as an MLflow model. Defaults to True.
        tags: Tags set on the run. Defaults to None.
        params: More params logged with the fit's own, such as a task's settings; checked
            against the run's like them. Defaults to None.
        outbox_dir: Where the writes that a tracking server gone away during the fit could
            not take are kept, for `lkflow sync`, relative to the working folder at fit
            start. Defaults to "mlruns-outbox".
        net: The attribute of the module's submodule to serve and register, such as
            "encoder" (a dotted path too). Defaults to None: a LightModel's bare net; another
            module itself where it defines `forward`, else its `net` or `model` submodule.
        example_input: A function of the first training batch that returns what the served
            net takes (a tensor, a tuple of tensors passed by position, or a dict passed by
            name); its first rows are the model's input example. Defaults to None: a
            LightModel's `example_input`, else the module's `example_input_array`, else the
            batch's inputs (`x` of `(x, y)`, a dict without its "y"/"label(s)"/"target(s)").
        step_metrics: Log what the module logs per step (`self.log(..., on_step=True)`) at
            the global step, as Lightning hands it to its loggers every
            `log_every_n_steps`. Defaults to True (`self.log` in `training_step` logs per step
            unless told `on_epoch=True`); epoch values are logged at `step=epoch` either way.
        system_metrics: Sample CPU, memory, disk, network and GPU use into the run while it
            is open. Defaults to None: on, unless `MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING` is
            false.
        system_metrics_interval: Seconds between samples. Defaults to None:
            `MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`, else 10.

    Example:
        >>> tracker = MLflowCallback(experiment_name="rings", registered_model_name="rings-net")
        >>> trainer = pl.Trainer(max_epochs=10, callbacks=[tracker])  # doctest: +SKIP
        >>> trainer.fit(model, dl_train, dl_valid)  # doctest: +SKIP
        >>> tracker.model_version_.version  # doctest: +SKIP
        '1'
    """

    def __init__(
        self,
        experiment_name: str | None = None,
        run_name: str | None = None,
        registered_model_name: str | Literal[False] | None = None,
        tracking_uri: str | None = None,
        run_id: str | None = None,
        log_model: bool = True,
        tags: Mapping[str, str] | None = None,
        params: Mapping[str, Any] | None = None,
        outbox_dir: str | os.PathLike[str] = DEFAULT_DIR,
        net: str | None = None,
        example_input: Callable[[Any], Any] | None = None,
        step_metrics: bool = True,
        system_metrics: bool | None = None,
        system_metrics_interval: float | None = None,
    ) -> None:
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.registered_model_name = registered_model_name
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.log_model = log_model
        self.tags = tags
        self.params = params
        self.outbox_dir = outbox_dir
        self.net = net
        self.example_input = example_input
        self.step_metrics = step_metrics
        self.system_metrics = system_metrics
        self.system_metrics_interval = system_metrics_interval
        self.client_: MlflowClient | None = None
        self.run_id_: str | None = None
        self.experiment_id_: str | None = None
        self.model_uri_: str | None = None
        self.model_servable_ = False
        self.model_version_: ModelVersion | None = None
        self.trainer_: pl.Trainer | None = None  # the Trainer of the fit under way
        self._uri_when_made = tracking_uri_as_set()
        self._restored: dict[str, Any] = {}
        self._reset()

    def _reset(self) -> None:
        """Per-fit state, cleared at each setup so one callback can track several fits."""
        self._found: FoundRun | None = None  # what the fit read at its start
        self._writer: Writer | None = None  # the fit's writer, from fit start
        self._rows = MetricRows()
        self._source: RowsSource | None = None  # where the epoch rows come from
        self._attribute: str | None = None  # the served submodule; None: the module
        self._forward = True  # whether the served net has a forward, to export and summarize
        self._logger: RunLogger | None = None  # the logger into the run, where this added one
        self._example: Inputs | None = None
        self._example_done = False
        self._outbox_root = Path(self.outbox_dir)
        self._sampling: float | None = None  # seconds between system metrics samples; None: off
        self._system: SystemMetrics | None = None  # sampling while the run is open

    # ---- Lightning hooks ---------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero:
            return
        attribute = served_attribute(pl_module, self.net)  # before any MLflow call
        check_registered_model_name(self.registered_model_name)
        on = system_metrics_on(self.system_metrics)
        sampling = system_metrics_interval(self.system_metrics_interval) if on else None
        from mlflow import get_tracking_uri

        uri = self.tracking_uri or beside_mlflow_logger(trainer, self._uri_when_made)
        uri = uri or get_tracking_uri()
        check_tracking_uri(uri)
        check_reachable(uri)
        self._reset()
        self._attribute = attribute
        self._forward = has_forward(pl_module, attribute)
        self._source = rows_source(trainer, pl_module)
        self._outbox_root = Path(self.outbox_dir).resolve()
        self._sampling = sampling
        self._restored = {}
        self.client_ = tracking_client(uri)
        self.run_id_ = self.experiment_id_ = self.model_uri_ = self.model_version_ = None
        self.model_servable_ = False
        self.trainer_ = trainer

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        client, source = self.client_, self._source
        if not trainer.is_global_zero or client is None or source is None:
            return
        self._found = found = find_run(
            client,
            run_id=self.run_id,
            experiment_name=self.experiment_name,
            restored_run_id=self._restored.get("run_id"),
        )
        self.run_id_, self.experiment_id_ = found.run_id, found.experiment_id
        self._writer = Writer(self._outbox_root)
        self._logger = RunLogger.join(trainer, self)
        if self.experiment_name not in (None, found.experiment_name):
            warnings.warn(
                f"Logging into run {found.run_id} of experiment {found.experiment_name!r}; "
                f"experiment_name={self.experiment_name!r} applies to new runs only.",
                stacklevel=2,
            )
        source.restore(self._restored.get("rows", []))
        if self._restored and found.run_id is not None:  # resumed, whenever the last fit stopped
            self._rows.hold(client, found.run_id, self._outbox_root, source.rows())

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or self._writer is None or self._found is None:
            return
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        own = fit_params(trainer, net_of(pl_module, self._attribute), pl_module.hparams)
        prepared = prepare_params({**own, **(self.params or {})}, limit=MAX_PARAM_VAL_LENGTH)
        resumed = self._restored.get("run_id") == self.run_id_
        log_params(self._writer, self._found, prepared, resumed)
        datasets = datasets_write(trainer)
        self._rows.link_datasets(datasets)
        if datasets is not None:
            self._writer.send(datasets)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._example_done or not trainer.is_global_zero:
            return
        self._example_done = True
        self._example = input_example(pl_module, batch, self.example_input)

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if trainer.is_global_zero:
            self._open()

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self._writer is not None and self._source is not None:
            self._rows.log(self._writer, self._source.rows())
            self._source.start_epoch()

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self._source is not None:
            self._source.end_validation()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self._writer is not None and self._source is not None:
            self._rows.log(self._writer, self._source.rows())

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        self._leave(trainer)
        opened = self._open()  # opened here by a fit without a batch, as a finished one resumed
        if opened is None or self._source is None:
            return
        writer, run = opened
        self._rows.log(writer, self._source.rows())
        self._log_outputs(writer, run, trainer, pl_module)
        self._stop_system_metrics(writer)
        clear_error(writer, run)
        end_run(writer, run, "FINISHED")

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._leave(trainer)
        writer, source = self._writer, self._source
        run = None if writer is None else writer.run
        if not trainer.is_global_zero or writer is None or run is None or source is None:
            return  # failed before the first batch trained: no run was created or reopened
        status = "FAILED" if isinstance(exception, Exception) else "KILLED"  # Ctrl-C, SIGTERM
        with _carry_on("log the history and checkpoints of the failed fit"):
            self._rows.log(writer, source.rows())
            checkpoints = checkpoints_write(trainer, last=True)
            if checkpoints is not None:
                writer.send(checkpoints)
        with _carry_on("log the error of the failed fit"):
            log_error(writer, exception)
        self._stop_system_metrics(writer)
        with _carry_on(f"end run {run.run_id} {status}"):
            end_run(writer, run, status)

    @override
    def state_dict(self) -> dict[str, Any]:
        saved = None if self._source is None else self._source.saved()
        return {"run_id": self.run_id_} | ({} if saved is None else {"rows": saved})

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict)

    # ---- the run -----------------------------------------------------------------------

    @property
    def writer_(self) -> Writer | None:
        """The writes of the fit under way go through it (RunLogger's too); None before."""
        return self._writer

    def _leave(self, trainer: pl.Trainer) -> None:
        """The fit is over: the Trainer loses the logger this callback gave it."""
        RunLogger.leave(trainer, self._logger)
        self._logger, self.trainer_ = None, None

    def _open(self) -> tuple[Writer, TrackedRun] | None:
        """The fit's writer and its run, the run created or reopened now if it is not yet;
        None before the fit started."""
        writer, found = self._writer, self._found
        if writer is None or found is None:
            return None
        if writer.run is None:
            run = open_run(
                found, experiment_name=self.experiment_name, run_name=self.run_name, tags=self.tags
            )
            self.run_id_, self.experiment_id_ = run.run_id, run.experiment_id
            writer.open(run)
            if self._sampling is not None and writer.outbox is None:
                resumed = found.run is not None  # its steps go on from the last
                self._system = SystemMetrics.start(run.client, run.run_id, self._sampling, resumed)
        return (writer, writer.run) if writer.run is not None else None

    def _stop_system_metrics(self, writer: Writer) -> None:
        """Stops sampling before the run ends, without waiting on a server gone away."""
        if self._system is not None:
            self._system.stop(server_answers=writer.outbox is None)
            self._system = None

    def log_figures(self, figures: Mapping[str, Figure], artifact_path: str = "report") -> None:
        """Figures as PNG files in the run of the last fit, under `artifact_path`.

        They go the way of every other write: into the run, or into its outbox while the
        tracking server is away.

        Args:
            figures: File name (".png" added where there is no suffix) to figure.
            artifact_path: Folder of the run's artifacts. Defaults to "report".

        Example:
            >>> tracker.log_figures({"confusion": figure})  # doctest: +SKIP
        """
        if self._writer is None or self._writer.run is None or not figures:
            return
        with figure_files(figures, artifact_path) as write:
            self._writer.send(write)

    def _log_outputs(
        self, writer: Writer, run: TrackedRun, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> None:
        """Artifacts, the served net with the best weights as an MLflow model, best metrics."""
        rows = [] if self._source is None else self._source.rows()
        best = best_checkpoint(trainer, rows)
        net = best_net(pl_module, best.state_dict, self._attribute)
        example = None if self._example is None else to_device(self._example, "cpu")
        table = summary_text(net, example) if self._forward else ""
        with fit_files(rows, net, table) as files:
            writer.send(files)
        checkpoints = checkpoints_write(trainer, last=False)
        if checkpoints is not None:
            writer.send(checkpoints)
        logged = False
        if self.log_model and self._forward:
            ids = (run.run_id, run.experiment_id)
            with saved_model(net, example, *ids, run.params, best.epoch) as (model, servable):
                model_id = None if model is None else writer.send(model)
            logged = model is not None
            self.model_uri_ = None if model_id is None else f"models:/{model_id}"
            self.model_servable_ = logged and servable
            name = registered_name(
                self.registered_model_name, self.log_model, run.experiment_name, type(net).__name__
            )
            if name is not None and servable:
                key = self._rows.key_of(best.monitor)
                version = registration(name, best, run.run_id, table, key, type(net).__name__)
                self.model_version_ = writer.send(version)
        self._rows.log_best(writer, best, rows, to_model=logged)


@contextlib.contextmanager
def _carry_on(what: str) -> Iterator[None]:
    """An MLflow failure while the fit is already failing becomes a warning: the fit's own
    exception is the one that must reach the caller."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except (MlflowException, OSError) as err:
        warnings.warn(f"Could not {what} in MLflow: {err}", stacklevel=3)
