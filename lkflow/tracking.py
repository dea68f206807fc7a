"""MLflowCallback: one Lightning callback that logs a whole fit to MLflow and registers the net.

    trainer = pl.Trainer(max_epochs=10, callbacks=[MLflowCallback(experiment_name="rings")])
    trainer.fit(model, dl_train, dl_valid)

What one fit logs, all through `MlflowClient` calls naming the run, from rank zero only:
- params (train start): the module's hparams, optimizer, scheduler, epochs, batch size,
  precision, devices, seed, the net's class and size, the data sizes; batched, 100 a call.
- metrics: each `history` row once, `step=epoch`, one batched call per epoch; at the end
  `best_<monitor>` and `best_epoch`.
- inputs: the training and validation sets (rows, digest).
- artifacts (fit end): `checkpoints/` (best and last), `net/state_dict.pt` (the best weights
  of the bare net), `history.csv`, `curves.png`, `summary.txt`.
- the model: the bare net with the best weights, exported with torch.export (a pickle with
  the net's code where export fails), linked to the run and registered with tags.

A run that is already open (`with mlflow.start_run()`, `MLFLOW_RUN_ID` as `mlflow run` sets
it, or `run_id=` of a running run) is logged into and left open; otherwise the callback opens
the run and ends it FINISHED, FAILED on an exception, or KILLED on Ctrl-C. An exception also
leaves its type and message in the tag `lkflow.error` and its traceback's last lines in
`traceback.txt`; the exception itself reaches the caller unchanged.

A tracking server that does not answer when the fit starts stops it before training. One that
goes away during the fit does not: the write that failed and every later write of the run go,
in order, to `mlruns-outbox/<run_id>/` in the working folder (`outbox_dir=`), with one
warning, and `lkflow sync` delivers them into the run once the server is back (see
lkflow/outbox.py for the layout). Every write goes through `_send`: while the server answers
it is one MLflow call as before, retried for seconds rather than MLflow's minutes. The fit
owns the run's outbox (holds its lock) until it has written the run's end: a `lkflow sync`
meanwhile leaves it alone.
"""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
import time
import traceback
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pytorch_lightning as pl
import torch
from torch import nn
from typing_extensions import override

from lkflow.artifacts import dataset_record, save_model, summary_text, write_artifacts
from lkflow.checks import check_registered_model_name
from lkflow.credentials import hide_credentials
from lkflow.errors import LkflowError
from lkflow.outbox import DEFAULT_DIR, Entry, Outbox, State, deliver
from lkflow.params import (
    fit_params,
    prepare_params,
    same_value,
    sanitize_key,
    sanitize_keys,
    truncate,
)
from lkflow.store import (
    bounded_http_retries,
    check_reachable,
    check_tracking_uri,
    is_unreachable,
    run_url,
    tracking_client,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from mlflow import MlflowClient
    from mlflow.entities import Run
    from mlflow.entities.model_registry import ModelVersion

_DEFAULT_EXPERIMENT = "Default"
_TRACEBACK_LINES = 40  # the last lines of a failed fit's traceback kept in traceback.txt
_ERROR_TAG_LENGTH = 500  # the longest `lkflow.error` tag
_EXAMPLE_ROWS = 5  # rows of the first training batch kept as the model's input example


class MLflowCallback(pl.Callback):
    """Logs a fit to MLflow, then logs and registers the bare net with its best weights.

    Arguments are kept as passed; what they resolve to at fit start lives in attributes
    with a trailing underscore: `client_`, `run_id_`, `experiment_id_`, `model_uri_`,
    `model_version_`.

    Args:
        experiment_name: Experiment of a new run. Defaults to None (`MLFLOW_EXPERIMENT_NAME`,
            else `MLFLOW_EXPERIMENT_ID`, else MLflow's "Default").
        run_name: Name of a new run. Defaults to None (MLflow picks one).
        registered_model_name: Name to register the net under, or False not to register.
            Defaults to None: the experiment's name, or the net's class name in "Default".
        tracking_uri: Where to log. Defaults to None: `MLFLOW_TRACKING_URI`, else MLflow's
            default (`sqlite:///mlflow.db` in the working folder), read when the fit starts.
        run_id: A run to log into. Defaults to None: the active run, else `MLFLOW_RUN_ID`,
            else the run of the checkpoint being resumed, else a new run.
        log_model: Log (and register) the net as an MLflow model. Defaults to True.
        tags: Tags set on the run. Defaults to None.
        params: More params logged with the fit's own, such as a task's settings; checked
            against the run's like them. Defaults to None.
        outbox_dir: Where the writes that a tracking server gone away during the fit could
            not take are kept, for `lkflow sync`, relative to the working folder at fit
            start. Defaults to "mlruns-outbox".

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
        self.client_: MlflowClient | None = None
        self.run_id_: str | None = None
        self.experiment_id_: str | None = None
        self.model_uri_: str | None = None
        self.model_version_: ModelVersion | None = None
        self._restored: dict[str, Any] = {}
        self._reset()

    def _reset(self) -> None:
        """Per-fit state, cleared at each setup so one callback can track several fits."""
        self._owns_run = False
        self._status_found = "RUNNING"  # the status of the run when this fit opened it
        self._run_params: dict[str, str] = {}
        self._experiment_name = ""
        self._n_logged = 0
        self._metric_names: dict[str, str] = {}
        self._logged_at: dict[int, int] = {}  # step -> the time its row was logged, in ms
        self._example: torch.Tensor | None = None
        self._example_done = False
        self._sent: State = {"model_id": None}  # what deliver() left for later writes
        self._outbox: Outbox | None = None  # set once the server stopped answering
        self._outbox_root = Path(self.outbox_dir)

    # ---- Lightning hooks ---------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero:
            return
        if not isinstance(getattr(pl_module, "history", None), list):
            raise LkflowError(
                f"Received: {type(pl_module).__name__}, which has no `history` list. "
                "MLflowCallback logs the per-epoch rows of an lkflow.LightModel; "
                "wrap the net in LightModel(net, ...)."
            )
        check_registered_model_name(self.registered_model_name)  # before any MLflow call
        from mlflow import get_tracking_uri

        uri = self.tracking_uri or get_tracking_uri()
        check_tracking_uri(uri)
        check_reachable(uri)
        self._reset()
        self._outbox_root = Path(self.outbox_dir).resolve()
        self._restored = {}
        self.client_ = tracking_client(uri)
        self.run_id_ = self.experiment_id_ = self.model_uri_ = self.model_version_ = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        with bounded_http_retries():
            run = self._open_run()
            self._experiment_name = self.client_.get_experiment(run.info.experiment_id).name
        self.run_id_, self.experiment_id_ = run.info.run_id, run.info.experiment_id
        self._run_params = dict(run.data.params)
        if (self._outbox_root / self.run_id_ / "journal.jsonl").exists():
            self._continue_outbox()
        if self.experiment_name not in (None, self._experiment_name):
            warnings.warn(
                f"Logging into run {self.run_id_} of experiment {self._experiment_name!r}; "
                f"experiment_name={self.experiment_name!r} applies to new runs only.",
                stacklevel=2,
            )
        if self._restored.get("run_id") == self.run_id_:
            self._n_logged = int(self._restored.get("n_logged", 0))

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        own = fit_params(trainer, _net(pl_module), pl_module.hparams)
        self._log_params({**own, **(self.params or {})})
        self._log_datasets(trainer)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._example_done or not trainer.is_global_zero:
            return
        self._example_done = True
        example_input = getattr(pl_module, "example_input", _first_tensor)
        try:
            inputs = example_input(batch)
        except LkflowError:
            return  # a batch layout without one input tensor: no example, a pickled model
        if isinstance(inputs, torch.Tensor):
            self._example = inputs[:_EXAMPLE_ROWS].detach().clone()  # stays on the device

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self._log_rows(pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self._log_rows(pl_module)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or self.run_id_ is None:
            return
        self._log_rows(pl_module)
        self._log_outputs(trainer, pl_module)
        self._end_run("FINISHED")

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if not trainer.is_global_zero or self.run_id_ is None:
            return
        status = "FAILED" if isinstance(exception, Exception) else "KILLED"  # Ctrl-C, SIGTERM
        with _carry_on("log the history and checkpoints of the failed fit"):
            self._log_rows(pl_module)
            self._log_checkpoints(trainer, last=True)
        with _carry_on("log the error of the failed fit"):
            self._log_error(exception)
        with _carry_on(f"end run {self.run_id_} {status}"):
            self._end_run(status)

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Lightning took state_dict() before this hook; the module adds its history after it.
        # Logging the rows now and saving the count again keeps both in step on resume.
        if trainer.is_global_zero and self.run_id_ is not None:
            self._log_rows(pl_module)
            checkpoint.setdefault("callbacks", {})[self.state_key] = self.state_dict()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id_, "n_logged": self._n_logged}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict)

    # ---- the run -----------------------------------------------------------------------

    def _open_run(self) -> Run:
        """The run to log into: an existing one (reopened when it had ended) or a new one."""
        run_id, source = self._existing_run_id()
        if run_id is None:
            return self._create_run()
        from mlflow.exceptions import MlflowException

        try:
            run = self.client_.get_run(run_id)
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise LkflowError(
                f"Received: {source}={run_id!r}, which is not a run at "
                f"{hide_credentials(self.client_.tracking_uri)}. Pass a run id of that store, "
                "or leave run_id unset for a new run."
            ) from err
        # A run still RUNNING whose id only the checkpoint knew belongs to a killed process:
        # the resumed fit takes it over and ends it.
        self._owns_run = run.info.status != "RUNNING" or source == "the checkpoint's run_id"
        self._status_found = run.info.status
        if self._owns_run:  # resumed: open it again, and end it as this fit ends
            self.client_.update_run(run_id, status="RUNNING")
        self._set_tags(run_id, self._run_tags())
        return run

    def _existing_run_id(self) -> tuple[str | None, str]:
        import mlflow

        active = mlflow.active_run()
        candidates = [
            (self.run_id, "run_id"),
            (active.info.run_id if active else None, "the active run"),
            (os.environ.get("MLFLOW_RUN_ID"), "MLFLOW_RUN_ID"),
            (self._restored.get("run_id"), "the checkpoint's run_id"),
        ]
        return next(((run_id, source) for run_id, source in candidates if run_id), (None, ""))

    def _create_run(self) -> Run:
        from mlflow.tracking.context.registry import resolve_tags

        tags = resolve_tags(self._run_tags())  # adds user, source and git commit like start_run
        run = self.client_.create_run(self._experiment_id(), run_name=self.run_name, tags=tags)
        self._owns_run = True
        return run

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        name = self.experiment_name or os.environ.get("MLFLOW_EXPERIMENT_NAME")
        if name is None:
            return os.environ.get("MLFLOW_EXPERIMENT_ID", "0")
        experiment = self.client_.get_experiment_by_name(name)
        if experiment is None:
            try:
                return self.client_.create_experiment(name)
            except MlflowException as err:  # created meanwhile by a concurrent fit
                if err.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment = self.client_.get_experiment_by_name(name)
        if experiment.lifecycle_stage == "deleted":
            raise LkflowError(
                f"Received: experiment_name={name!r}, an experiment that was deleted. Restore "
                f"it (mlflow experiments restore --experiment-id {experiment.experiment_id}) "
                "or pass another name."
            )
        return experiment.experiment_id

    def _run_tags(self) -> dict[str, str]:
        tags = {"lkflow.version": _lkflow_version()}
        tags.update({key: hide_credentials(str(value)) for key, value in (self.tags or {}).items()})
        return tags

    def _set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client_.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def _end_run(self, status: str) -> None:
        try:
            if self._owns_run:
                self._send({"op": "end", "status": status, "end_time": int(time.time() * 1000)})
                self._owns_run = False
                if self._outbox is None:
                    self._print_link()
        finally:
            if self._outbox is not None:
                self._outbox.release()  # the fit has written all: `lkflow sync` may deliver it

    def _print_link(self) -> None:
        """The run's page on a tracking server, as MLflow prints it, without credentials."""
        url = run_url(self.client_.tracking_uri, self.experiment_id_, self.run_id_)
        if url is not None:
            with bounded_http_retries():
                name = self.client_.get_run(self.run_id_).info.run_name
            print(f"View run {name} at: {url}", flush=True)

    def _send(self, entry: Entry) -> Any:
        """One write into the run (an outbox entry, see lkflow/outbox.py): to MLflow while the
        server answers; after a write failed for want of an answer, to the run's outbox, so
        that the outbox holds that write and every later one in order.

        Returns:
            What `deliver` returns (the model id, the model version), or None once in the outbox.
        """
        if self._outbox is None:
            from mlflow.exceptions import MlflowException

            try:
                with bounded_http_retries():
                    return deliver(self.client_, self.run_id_, entry, self._sent)
            except MlflowException as err:
                if not is_unreachable(err):
                    raise
                self._open_outbox(err)
        if self._outbox.held:
            self._outbox.append(entry)
        else:  # a write after the fit let go of the outbox (log_figures): taken for it
            self._outbox = self._take_outbox()
            try:
                self._outbox.append(entry)
            finally:
                self._outbox.release()
        return None

    def _take_outbox(self) -> Outbox:
        """The run's outbox, owned by this fit until it lets go (waits while a sync delivers)."""
        uri = self.client_.tracking_uri
        return Outbox.open(self._outbox_root, self.run_id_, self.experiment_id_, uri)

    def _open_outbox(self, err: BaseException) -> None:
        uri = self.client_.tracking_uri
        self._outbox = self._take_outbox()
        reason = type(err.__cause__ or err.__context__).__name__
        warnings.warn(
            f"The MLflow tracking server at {hide_credentials(uri)} stopped answering "
            f"({reason}). Training goes on; what run {self.run_id_} logs from now on (metrics, "
            f"artifacts, the model and its registration, the run's end) is kept in "
            f"{self._outbox.folder}. Deliver it with `lkflow sync` once the server is back.",
            stacklevel=2,
        )

    def _continue_outbox(self) -> None:
        """Writes of this run kept by an earlier fit wait in the outbox: this fit's go after
        them, so that `lkflow sync` delivers all of them in order."""
        self._outbox = self._take_outbox()
        if not self._outbox.journal.exists():  # a sync delivered them while this fit waited
            self._outbox.remove()
            self._outbox = None
            return
        warnings.warn(
            f"Run {self.run_id_} has writes that an earlier fit kept in {self._outbox.folder}. "
            "This fit's writes join them there, in order; deliver them all with `lkflow sync`.",
            stacklevel=2,
        )

    def _log_error(self, exception: BaseException) -> None:
        """The exception as the tag `lkflow.error`, its traceback's end as traceback.txt."""
        message = traceback.format_exception_only(exception)[-1].strip()
        tag = truncate(hide_credentials(message), _ERROR_TAG_LENGTH)
        self._send({"op": "batch", "tags": {"lkflow.error": tag}})
        lines = "".join(traceback.format_exception(exception)).splitlines()
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "traceback.txt"
            path.write_text(hide_credentials("\n".join(lines[-_TRACEBACK_LINES:])) + "\n")
            self._send({"op": "artifacts", "paths": [str(path)], "artifact_path": None})

    # ---- params, data and metrics ------------------------------------------------------

    def _log_params(self, params: Mapping[str, Any]) -> None:
        """Params the run lacks, in batches; a different value already logged is an error."""
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        prepared = prepare_params(params, limit=MAX_PARAM_VAL_LENGTH)
        logged = self._run_params
        clashes = [k for k, v in prepared.items() if k in logged and not same_value(logged[k], v)]
        if "epochs" in clashes and self._restored.get("run_id") == self.run_id_:
            # a resumed fit may run longer than the one that wrote the checkpoint
            clashes.remove("epochs")
            self._send({"op": "batch", "tags": {"lkflow.resumed_epochs": prepared.pop("epochs")}})
        if clashes:
            values = "; ".join(f"{k}: {logged[k]!r} logged, {prepared[k]!r} now" for k in clashes)
            self._give_back_run()
            raise LkflowError(
                f"MLflow run {self.run_id_} already holds other values for {values}. MLflow "
                "never changes a logged param. Fit with the logged values (as `mlflow run -P` "
                "gave them), or log into a new run: no active run, MLFLOW_RUN_ID and run_id unset."
            )
        new = {k: v for k, v in prepared.items() if k not in logged}
        if new:
            self._send({"op": "batch", "params": new})
        self._run_params.update(prepared)

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
        if self.run_id_ is None or not figures:
            return
        with tempfile.TemporaryDirectory() as temporary:
            folder = Path(temporary) / artifact_path
            folder.mkdir(parents=True)
            for name, figure in figures.items():
                figure.savefig(folder / (name if "." in name else f"{name}.png"), dpi=100)
            self._send({"op": "artifacts", "paths": [str(folder)], "artifact_path": artifact_path})

    def _give_back_run(self) -> None:
        """Leaves a run this fit reopened as it was found, before the fit fails on a bad value."""
        if self._owns_run and self._status_found != "RUNNING":
            self.client_.update_run(self.run_id_, status=self._status_found)
        self._owns_run = False

    def _log_datasets(self, trainer: pl.Trainer) -> None:
        loaders = {"training": trainer.train_dataloader, "validation": trainer.val_dataloaders}
        datasets = [
            {**dataset, "context": context}
            for context, loader in loaders.items()
            if (dataset := dataset_record(getattr(loader, "dataset", None))) is not None
        ]
        if datasets:
            self._send({"op": "inputs", "datasets": datasets})

    def _log_rows(self, pl_module: pl.LightningModule) -> None:
        """History rows not logged yet: one batched call, each row at `step=epoch`."""
        rows = pl_module.history[self._n_logged :]
        if not rows:
            return
        keys = [key for row in rows for key in row if key != "epoch"]
        if not set(keys) <= set(self._metric_names):
            self._metric_names = sanitize_keys(dict.fromkeys([*self._metric_names, *keys]))
        now = int(time.time() * 1000)
        steps = [int(row.get("epoch", self._n_logged + i)) for i, row in enumerate(rows)]
        values = [
            (self._metric_names[key], float(value), now, step)
            for step, row in zip(steps, rows, strict=True)
            for key, value in row.items()
            if key != "epoch"
        ]
        self._log_metrics(values)
        self._logged_at.update(dict.fromkeys(steps, now))
        self._n_logged += len(rows)

    def _log_metrics(
        self, values: Sequence[tuple[str, float, int, int]], to_model: bool = False
    ) -> None:
        """(key, value, time in ms, step) points; `to_model` links them to the logged model."""
        metrics = [list(value) for value in values]
        self._send({"op": "batch", "metrics": metrics, "to_model": to_model})

    # ---- the end of the fit ------------------------------------------------------------

    def _log_outputs(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Artifacts, the bare net with the best weights as an MLflow model, best metrics."""
        best = _best(trainer, pl_module.history)
        net = _best_net(pl_module, best.state_dict)
        example = None if self._example is None else self._example.cpu()
        table = summary_text(net, example)
        with tempfile.TemporaryDirectory() as temporary:
            folder = Path(temporary) / "artifacts"  # its files go to the run's artifact root
            write_artifacts(folder, pl_module.history, net.state_dict(), table)
            self._send({"op": "artifacts", "paths": [str(folder)], "artifact_path": None})
        self._log_checkpoints(trainer, last=False)
        if self.log_model:
            model_id = self._log_model(net, example, best.epoch)
            self.model_uri_ = None if model_id is None else f"models:/{model_id}"
            name = self._registered_name(pl_module)
            if name is not None:
                self.model_version_ = self._register(name, best, table)
        self._log_best(best, pl_module.history, to_model=self.log_model)

    def _log_best(self, best: _Best, history: Sequence[Mapping[str, Any]], to_model: bool) -> None:
        """`best_<monitor>` and `best_epoch`; with a model, also the best epoch's row again,
        linked to the model (same values and times: the run's histories gain no point)."""
        values = []
        if best.score is not None:
            name = self._metric_names.get(best.monitor) or sanitize_key(best.monitor)
            now = int(time.time() * 1000)
            values += [
                (f"best_{name}", best.score, now, best.epoch),
                ("best_epoch", float(best.epoch), now, best.epoch),
            ]
        logged_at = self._logged_at.get(best.epoch)
        rows = [row for row in history if row.get("epoch") == best.epoch]
        if to_model and logged_at is not None and rows:
            values += [
                (self._metric_names[key], float(value), logged_at, best.epoch)
                for key, value in rows[-1].items()
                if key != "epoch"
            ]
        if values:
            self._log_metrics(values, to_model)

    def _log_checkpoints(self, trainer: pl.Trainer, *, last: bool) -> None:
        """The best checkpoint; with `last`, also every checkpoint callback's best and last
        files, which a fit that stopped resumes from."""
        monitored = trainer.checkpoint_callback
        paths = {getattr(monitored, "best_model_path", "")}
        if last:
            paths |= {
                getattr(checkpoint, f"{which}_model_path", "")
                for checkpoint in trainer.checkpoint_callbacks
                for which in ("best", "last")
            }
        paths = sorted(p for p in paths if p and os.path.isfile(p))
        if paths:
            self._send({"op": "artifacts", "paths": paths, "artifact_path": "checkpoints"})

    def _log_model(self, net: nn.Module, example: torch.Tensor | None, step: int) -> str | None:
        """The net as an MLflow model linked to the run (a LoggedModel); returns its id, or
        None when the model went to the outbox."""
        from mlflow.models import Model

        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "model"
            save_model(net, example, path, Model(run_id=self.run_id_))
            entry = {
                "op": "model",
                "path": str(path),
                "experiment_id": self.experiment_id_,
                "params": dict(self._run_params),
                "step": step,
                "model_id": None,
            }
            return self._send(entry)

    def _registered_name(self, pl_module: pl.LightningModule) -> str | None:
        """The name to register under: as given, the experiment's, or the net's class name."""
        if self.registered_model_name is False or not self.log_model:
            return None
        if self.registered_model_name is not None:
            return self.registered_model_name
        if self._experiment_name and self._experiment_name != _DEFAULT_EXPERIMENT:
            return self._experiment_name.replace("/", "-").replace(":", "-")
        return type(_net(pl_module)).__name__

    def _register(self, name: str, best: _Best, table: str) -> ModelVersion | None:
        """A version of the logged model under `name`; None when it went to the outbox."""
        tags = {"run_id": self.run_id_}
        if best.score is not None:
            tags.update(
                monitor=best.monitor,
                monitor_value=repr(best.score),
                mode=best.mode,
                best_epoch=str(best.epoch),
            )
        entry = {"op": "register", "name": name, "tags": tags}
        return self._send(entry | {"description": f"```\n{table}\n```" if table else None})


@dataclass(frozen=True)
class _Best:
    """The best epoch as the checkpoint callback saw it."""

    monitor: str  # the monitored key; "" without a monitored checkpoint
    mode: str  # "min" or "max": which way the monitored value is better
    score: float | None  # its best value; None without one
    epoch: int  # the epoch of the best checkpoint, else the last epoch
    state_dict: dict[str, torch.Tensor] | None  # the module's weights then; None: current ones


def _best(trainer: pl.Trainer, history: Sequence[Mapping[str, Any]]) -> _Best:
    checkpoint = trainer.checkpoint_callback
    path = getattr(checkpoint, "best_model_path", "")
    if not path or not os.path.isfile(path):
        last = int(history[-1].get("epoch", len(history) - 1)) if history else 0
        return _Best("", "min", last, None)
    saved = torch.load(path, map_location="cpu", weights_only=True)
    score = checkpoint.best_model_score
    return _Best(
        checkpoint.monitor or "",
        getattr(checkpoint, "mode", "min"),
        None if score is None else float(score),
        int(saved.get("epoch", 0)),
        saved["state_dict"],
    )


@contextlib.contextmanager
def _carry_on(what: str) -> Iterator[None]:
    """An MLflow failure while the fit is already failing becomes a warning: the fit's own
    exception is the one that must reach the caller."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except (MlflowException, OSError) as err:
        warnings.warn(f"Could not {what} in MLflow: {err}", stacklevel=3)


# ---- helpers ---------------------------------------------------------------------------


def _net(pl_module: pl.LightningModule) -> nn.Module:
    return getattr(pl_module, "net", pl_module)


def _first_tensor(batch: Any) -> Any:
    return batch[0] if isinstance(batch, (tuple, list)) and batch else batch


def _best_net(pl_module: pl.LightningModule, state_dict: dict | None) -> nn.Module:
    """A CPU copy of the bare net in eval mode, with the best checkpoint's weights."""
    net = copy.deepcopy(_net(pl_module)).cpu().eval()
    if state_dict is not None:
        prefix = "net." if hasattr(pl_module, "net") else ""
        own = {key[len(prefix) :]: v for key, v in state_dict.items() if key.startswith(prefix)}
        net.load_state_dict(own)
    return net


def _lkflow_version() -> str:
    from lkflow import __version__

    return __version__
