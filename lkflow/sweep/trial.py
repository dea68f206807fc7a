"""One trial of a sweep: a child run of the sweep's run, the task fitted into it, pruning.

    objective = Objective(setup)              # in each process that runs trials
    study.optimize(objective, n_trials=1)     # one trial: sample, fit, end its run

A trial is a complete lkflow run (params, per-epoch metrics, checkpoints, the model), created
before the task is built so that every trial has one, and tagged `mlflow.parentRunId` (MLflow's
nesting), `lkflow.sweep.study`, `lkflow.sweep.trial` and `lkflow.trial_state`. The fit logs
into it by its id, so a sweep under `mlflow run` (which sets `MLFLOW_RUN_ID` to the sweep's
run) still gives each trial its own run. The trial's run ends:
- FINISHED, `lkflow.trial_state=complete`: the trial's value is its `best_<monitor>`;
- FINISHED, `lkflow.trial_state=pruned` and `lkflow.pruned_epoch`: the pruner stopped it at the
  end of that epoch; its history, best checkpoint and model are logged as for any fit;
- FAILED, `lkflow.trial_state=failed`: an exception in the task, in the tag `lkflow.error` and
  `traceback.txt` as for any fit; the sweep goes on;
- KILLED, `lkflow.trial_state=killed`: its process was stopped (Ctrl-C, SIGTERM, or killed,
  found by the heartbeat); the trial runs again with the same params.

Pruning reads the monitored value from the epoch's history row, once per epoch, and reports it
at the row's `epoch`; nothing is read from the device per step.
"""

from __future__ import annotations

import math
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import EarlyStopping
from typing_extensions import override

from lkflow.errors import LkflowError
from lkflow.sweep.parent import STUDY_TAG
from lkflow.sweep.space import sample, task_space, trial_options
from lkflow.sweep.study import ERROR_ATTR, MODEL_ATTR, RUN_ATTR, STATE_ATTR, retry
from lkflow.tasks import TaskOptions, fit_task, load_task, task_params

if TYPE_CHECKING:
    import optuna
    from mlflow import MlflowClient

# Tags of a trial's run.
TRIAL_TAG = "lkflow.sweep.trial"
STATE_TAG = "lkflow.trial_state"  # running, complete, pruned, failed, killed
PRUNED_EPOCH_TAG = "lkflow.pruned_epoch"
PARENT_TAG = "mlflow.parentRunId"


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of a sweep is run with; plain values, sent to worker processes."""

    target: str  # the task: path/to/file.py:function or package.module:function
    options: TaskOptions  # the command's --lr, --batch-size, --seed and --param
    space: tuple[str, ...]  # the --space specs; () for the task file's space(trial)
    epochs: int
    gpus: str | int | None
    monitor: str  # the fit's monitor: the trial's value is its best
    mode: str  # "min" or "max"
    ckpt_dir: str  # each trial's checkpoints go in a folder named by its run id under this
    verbose: int  # the fits' verbose: one line per epoch, or 0 with trials in parallel
    tracking_uri: str
    experiment_id: str  # the sweep's run's experiment, where the trials' runs go
    parent_run_id: str
    study: str
    registered_model_name: str | None  # each trial registers its net so; None: not


class Pruning(EarlyStopping):
    """Reports each epoch's monitored value to the Optuna trial, and stops the fit at the end of
    the first epoch that the pruner prunes.

    It is an `EarlyStopping` because Lightning calls those (and checkpoint callbacks) after the
    module's own `on_train_epoch_end`, where a LightModel appends the epoch's history row; the
    fit then ends as an early-stopped one does, with its best checkpoint and its run's logs.

    Args:
        trial: The Optuna trial.
        monitor: The history key reported.
    """

    def __init__(self, trial: optuna.Trial, monitor: str) -> None:
        super().__init__(monitor=monitor, check_on_train_epoch_end=True)
        self.trial = trial
        self.pruned_epoch: int | None = None

    @property
    @override
    def state_key(self) -> str:
        return "lkflow.sweep.Pruning"

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.world_size > 1:
            raise LkflowError(
                f"Received: a sweep trial on {trainer.world_size} processes. Each trial trains "
                "in one process; run trials side by side with --jobs K instead."
            )

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass  # the check runs once the epoch's row exists, below

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        history: list[dict[str, Any]] = getattr(pl_module, "history", [])
        if not history:
            return
        row = history[-1]
        self.trial.report(float(row[self.monitor]), step=int(row["epoch"]))
        last = trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs
        if not last and self.trial.should_prune():  # a fit that ran all its epochs completed
            self.pruned_epoch = int(row["epoch"])
            trainer.should_stop = True

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"pruned_epoch": self.pruned_epoch}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.pruned_epoch = state_dict.get("pruned_epoch")


class Objective:
    """What Optuna calls for each trial: the task fitted into a child run, its best value back.

    Args:
        setup: The sweep's settings for its trials.
        on_start: Called first thing in each trial, before its run is created (the sweep
            lets other processes count and start trials from then on). Defaults to None.
    """

    def __init__(self, setup: TrialSetup, on_start: Callable[[], None] | None = None) -> None:
        from lkflow.tracking.store import tracking_client

        self.setup = setup
        self.on_start = on_start
        self.function = load_task(setup.target)
        self.space = task_space(self.function, setup.space, setup.target)
        self.client: MlflowClient = tracking_client(setup.tracking_uri)

    def __call__(self, trial: optuna.Trial) -> float:
        import optuna

        from lkflow.tracking import MLflowCallback

        if self.on_start is not None:
            self.on_start()
        setup = self.setup
        run_id = self._child_run(trial)
        trial.set_user_attr(RUN_ATTR, run_id)
        try:
            values = sample(self.space, trial)
            options = trial_options(setup.options, values)
            shown = ", ".join(f"{key}={_shown(value)}" for key, value in values.items())
            print(f"Trial {trial.number} (run {run_id}): {shown}", flush=True)
            pruning = Pruning(trial, setup.monitor)
            name = setup.registered_model_name
            tracker = MLflowCallback(
                tracking_uri=setup.tracking_uri,
                run_id=run_id,
                registered_model_name=name if name is not None else False,
                params=task_params(setup.target, options),
            )
            fit_task(
                self.function,
                setup.target,
                options,
                tracker,
                epochs=setup.epochs,
                gpus=setup.gpus,
                callbacks=[pruning],
                monitor=setup.monitor,
                mode=setup.mode,
                ckpt_dir=Path(setup.ckpt_dir) / run_id,
                verbose=setup.verbose,
            )
            if tracker.model_uri_ is not None and tracker.model_servable_:
                trial.set_user_attr(MODEL_ATTR, tracker.model_uri_)
            value = self._best_value(run_id) if pruning.pruned_epoch is None else None
        except Exception as err:
            self._failed(trial, run_id, err)
            raise
        except BaseException:  # Ctrl-C, SIGTERM: the trial runs again
            self._end(run_id, "KILLED", "killed")
            trial.set_user_attr(STATE_ATTR, "killed")
            retry(trial.study, trial)
            raise
        if value is None:
            self._end(run_id, "FINISHED", "pruned", {PRUNED_EPOCH_TAG: str(pruning.pruned_epoch)})
            raise optuna.TrialPruned(f"pruned after epoch {pruning.pruned_epoch}")
        self._end(run_id, "FINISHED", "complete")
        return value

    def _child_run(self, trial: optuna.Trial) -> str:
        from mlflow.tracking.context.registry import resolve_tags

        from lkflow.tracking.run import run_tags

        tags = run_tags(
            {
                PARENT_TAG: self.setup.parent_run_id,
                STUDY_TAG: self.setup.study,
                TRIAL_TAG: str(trial.number),
                STATE_TAG: "running",
            }
        )
        run = self.client.create_run(
            self.setup.experiment_id, run_name=f"trial-{trial.number}", tags=resolve_tags(tags)
        )
        return str(run.info.run_id)

    def _best_value(self, run_id: str) -> float:
        """The run's `best_<monitor>` as MLflow holds it: the trial's value."""
        from lkflow.tracking.params import sanitize_key
        from lkflow.tracking.registry import BEST_PREFIX

        key = f"{BEST_PREFIX}{sanitize_key(self.setup.monitor)}"
        value = self.client.get_run(run_id).data.metrics.get(key)
        if value is None or not math.isfinite(value):
            raise LkflowError(
                f"Received: trial run {run_id} without a finite {key} ({value}). Expected the "
                f"fit's best {self.setup.monitor!r}; check that the task's history has it."
            )
        return float(value)

    def _failed(self, trial: optuna.Trial, run_id: str, err: Exception) -> None:
        """The task's error in the trial and, unless the fit logged it already, in the run."""
        from lkflow.tracking.run import ERROR_TAG

        message = traceback.format_exception_only(err)[-1].strip()
        trial.set_user_attr(STATE_ATTR, "failed")
        trial.set_user_attr(ERROR_ATTR, message[:500])
        if ERROR_TAG not in self.client.get_run(run_id).data.tags:
            _log_error(self.client, self.setup, run_id, err)
        self._end(run_id, "FAILED", "failed")

    def _end(
        self, run_id: str, status: str, state: str, tags: dict[str, str] | None = None
    ) -> None:
        end_trial_run(self.client, run_id, status, state, tags)


def end_trial_run(
    client: MlflowClient,
    run_id: str,
    status: str,
    state: str,
    tags: dict[str, str] | None = None,
) -> None:
    """Ends a trial's run with `status`, its `lkflow.trial_state` tag saying `state`."""
    from mlflow.entities import RunTag

    all_tags = {STATE_TAG: state, **(tags or {})}
    client.log_batch(run_id, tags=[RunTag(key, value) for key, value in all_tags.items()])
    client.set_terminated(run_id, status)


def _log_error(client: MlflowClient, setup: TrialSetup, run_id: str, err: BaseException) -> None:
    """An error raised before the fit opened its run (building the task, its first batch),
    logged as a fit logs one: the tag `lkflow.error` and `traceback.txt`."""
    from lkflow.tracking.outbox import DEFAULT_DIR
    from lkflow.tracking.run import TrackedRun, log_error
    from lkflow.tracking.writes import Writer

    run = TrackedRun(client, run_id, setup.experiment_id, "", {}, owned=False, found=None)
    writer = Writer(Path(DEFAULT_DIR).resolve())
    writer.open(run)
    try:
        log_error(writer, err)
    finally:
        writer.release()


def _shown(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class StaleTrials:
    """Optuna's callback for a trial failed by the heartbeat (its process stopped beating):
    the trial runs again with the same params, and its run ends KILLED.

    Args:
        tracking_uri: The tracking store of the trials' runs.
    """

    def __init__(self, tracking_uri: str) -> None:
        self.tracking_uri = tracking_uri

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        from mlflow.exceptions import MlflowException

        from lkflow.tracking.store import tracking_client

        if trial.user_attrs.get(STATE_ATTR) != "killed":  # else its process enqueued it itself
            retry(study, trial)
        print(
            f"Trial {trial.number} stopped with its process (no heartbeat): it runs again "
            "with the same params.",
            flush=True,
        )
        run_id = trial.user_attrs.get(RUN_ATTR)
        if run_id is None:
            return
        try:
            end_trial_run(tracking_client(self.tracking_uri), str(run_id), "KILLED", "killed")
        except MlflowException as err:
            warnings.warn(
                f"Could not end run {run_id} of trial {trial.number}: {err}", stacklevel=2
            )
