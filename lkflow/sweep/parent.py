"""The sweep's own run, parent of its trials' runs: found by every process, logged, finished.

    study, parent = open_sweep(client, storage, "rings", "minimize", sampler, pruner,
                               experiment_name="rings", run_name=None)
    log_sweep_params(client, parent.run_id, {"space.lr": "loguniform(1e-4,1e-1)", ...})
    log_progress(client, parent.run_id, study, "val_loss")  # after each trial: the best so far
    finish(client, parent.run_id, study, ...)  # figures, the champion, the counts, the end

The study records its parent run's id (the study attribute `lkflow.parent_run_id`). The
process that creates the study makes the parent run, or takes the run it runs in (the active
run, or `MLFLOW_RUN_ID`, which `mlflow run` sets); every other process (on this machine or
another, now or after a stop) reads that id and logs its trials under it. The parent holds:
- params: the task, the space, the sampler and pruner, the monitor and mode, the epochs, the
  study's name and storage (credentials hidden); a process whose settings differ from these
  stops before any trial, since MLflow never changes a logged param;
- after each trial: `best_<monitor>` at step = the trials ended, and the tags
  `lkflow.sweep.best_trial`, `lkflow.sweep.best_run_id` and `best.<key>` (the best params);
- at the end: the metrics `trials_complete`, `trials_pruned`, `trials_failed`, `trials_killed`,
  Optuna's `optimization_history.png` and `parallel_coordinate.png`, and the best trial's
  model registered (once) with the alias `champion`.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

from lkflow.credentials import hide_credentials
from lkflow.errors import LkflowError
from lkflow.sweep.study import (
    MODEL_ATTR,
    PARENT_ATTR,
    RUN_ATTR,
    count_trials,
    quiet_experimental,
)

if TYPE_CHECKING:
    import optuna
    from matplotlib.figure import Figure
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from lkflow.tracking.run import TrackedRun

CHAMPION = "champion"  # the alias of the best trial's registered version
BEST_TRIAL_TAG = "lkflow.sweep.best_trial"
BEST_RUN_TAG = "lkflow.sweep.best_run_id"
CHAMPION_TAG = "lkflow.sweep.champion"  # "name/version" of the champion
STUDY_TAG = "lkflow.sweep.study"  # the study of a sweep's run and of its trials' runs
_PARENT_WAIT_S = 5.0  # how long a new study's parent run id may take to be recorded


@dataclass(frozen=True)
class SweepResult:
    """How a sweep ended."""

    study: str
    parent_run_id: str
    complete: int
    pruned: int
    failed: int
    killed: int
    best_trial: int | None  # None: no trial completed
    best_value: float | None
    best_params: dict[str, Any]
    best_run_id: str | None
    champion: str | None  # "name/version", or None when nothing was registered


def outer_run_id() -> str | None:
    """The run this process runs in: the active run, else `MLFLOW_RUN_ID` (`mlflow run`)."""
    import mlflow

    active = mlflow.active_run()
    return active.info.run_id if active else os.environ.get("MLFLOW_RUN_ID") or None


def open_sweep(
    client: MlflowClient,
    storage: optuna.storages.RDBStorage,
    name: str,
    direction: Literal["minimize", "maximize"],
    sampler: optuna.samplers.BaseSampler,
    pruner: optuna.pruners.BasePruner,
    *,
    experiment_name: str | None,
    run_name: str | None,
) -> tuple[optuna.Study, TrackedRun]:
    """The study `name` and its parent run: both made here if the study is new, else found.

    A new study's parent run is made (or taken: the active run, `MLFLOW_RUN_ID`) before the
    study, so that its id is recorded the moment the study exists; a process that loses the
    race to create the study deletes the run it made and takes the winner's. A study made
    elsewhere (Optuna's own `create_study`, to enqueue trials) gets its parent run here.

    Raises:
        LkflowError: The study's run is not in this tracking store, or this process runs in
            another run (`mlflow run`) than the study's; the study optimises the other way.
    """
    from lkflow.sweep.study import create_study, find_study

    study = find_study(storage, name, direction, sampler, pruner)
    if study is None:
        made = _new_parent(client, name, experiment_name, run_name)
        study = create_study(storage, name, direction, sampler, pruner)
        if study is not None:
            study.set_user_attr(PARENT_ATTR, made.run_id)
            return study, made
        if made.found is None:  # made here, but another process created the study first
            client.delete_run(made.run_id)
        study = find_study(storage, name, direction, sampler, pruner)
        if study is None:  # created by the other process, and deleted at once
            raise LkflowError(f"Study {name!r} was created and deleted meanwhile; run again.")
    recorded = _recorded_parent(study)
    if recorded is None:  # made by Optuna itself, or its lkflow creator stopped first
        run = _new_parent(client, name, experiment_name, run_name)
        study.set_user_attr(PARENT_ATTR, run.run_id)
        return study, run
    return study, _reopened(client, study, recorded, experiment_name, storage)


def _new_parent(
    client: MlflowClient, study: str, experiment_name: str | None, run_name: str | None
) -> TrackedRun:
    """The run this process runs in (`mlflow run`, an active run), else a new run."""
    from lkflow.tracking.run import find_run, open_run

    found = find_run(client, run_id=None, experiment_name=experiment_name, restored_run_id=None)
    tags = {STUDY_TAG: study}
    return open_run(found, experiment_name=experiment_name, run_name=run_name, tags=tags)


def _recorded_parent(study: optuna.Study) -> str | None:
    """The study's parent run id; a study without trials may still be getting it from the
    process that created it, for a moment."""
    deadline = time.monotonic() + _PARENT_WAIT_S
    while True:
        recorded = study.user_attrs.get(PARENT_ATTR)
        if recorded is not None or study.get_trials(deepcopy=False):
            return None if recorded is None else str(recorded)
        if time.monotonic() > deadline:
            return None
        time.sleep(0.2)


def _reopened(
    client: MlflowClient,
    study: optuna.Study,
    recorded: str,
    experiment_name: str | None,
    storage: optuna.storages.RDBStorage,
) -> TrackedRun:
    """The study's recorded parent run, reopened if it had ended."""
    from mlflow.exceptions import MlflowException

    from lkflow.tracking.run import find_run, open_run

    outer = outer_run_id()
    where = f"study {study.study_name!r} in {hide_credentials(storage.url)}"
    if outer not in (None, recorded):
        raise LkflowError(
            f"Received: {where}, whose sweep runs as MLflow run {recorded}, but this process "
            f"runs in run {outer} (MLFLOW_RUN_ID or an active run). Continue it in its own run "
            f"(mlflow run --run-id {recorded}), or start another sweep with --study NEW_NAME."
        )
    try:
        client.get_run(recorded)
    except MlflowException as err:
        raise LkflowError(
            f"Received: {where}, whose sweep runs as MLflow run {recorded}, which is not at "
            f"{hide_credentials(client.tracking_uri)}. Pass the tracking URI the sweep began "
            "with (--tracking-uri), or start another sweep with --study NEW_NAME."
        ) from err
    found = find_run(client, run_id=recorded, experiment_name=experiment_name, restored_run_id=None)
    tags = {STUDY_TAG: study.study_name}
    return open_run(found, experiment_name=experiment_name, run_name=None, tags=tags)


def log_sweep_params(client: MlflowClient, run_id: str, params: Mapping[str, str]) -> None:
    """The sweep's settings as params of its run; those it holds already must be equal.

    Raises:
        LkflowError: The run holds another value of one of them.
    """
    from mlflow.entities import Param
    from mlflow.exceptions import MlflowException

    from lkflow.tracking.params import prepare_params

    prepared = prepare_params(params)
    _check_same(client, run_id, prepared)
    new = [Param(k, v) for k, v in prepared.items()]
    try:
        for start in range(0, len(new), 100):
            client.log_batch(run_id, params=new[start : start + 100])
    except MlflowException:
        _check_same(client, run_id, prepared)  # another process logged other values meanwhile
        raise


def _check_same(client: MlflowClient, run_id: str, params: Mapping[str, str]) -> None:
    from lkflow.tracking.params import same_value

    logged = client.get_run(run_id).data.params
    clashes = [k for k, v in params.items() if k in logged and not same_value(logged[k], v)]
    if clashes:
        values = "; ".join(f"{k}: {logged[k]!r} there, {params[k]!r} now" for k in clashes)
        raise LkflowError(
            f"The sweep's run {run_id} was started with other settings: {values}. A sweep "
            "keeps its settings: run it with the same ones, or start another with --study NEW_NAME."
        )


def log_progress(client: MlflowClient, run_id: str, study: optuna.Study, metric: str) -> None:
    """The best trial so far: `metric` at step = the trials ended, and tags naming it."""
    from mlflow.entities import Metric, RunTag
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    if not complete:
        return
    best = study.best_trial
    ended = sum(t.state.is_finished() for t in trials)
    tags = {BEST_TRIAL_TAG: str(best.number), BEST_RUN_TAG: str(best.user_attrs.get(RUN_ATTR))}
    tags.update({f"best.{key}": str(value) for key, value in best.params.items()})
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(metric, float(best.values[0]), now, ended)],
        tags=[RunTag(k, hide_credentials(v)) for k, v in tags.items()],
    )


def finish(
    client: MlflowClient,
    run_id: str,
    study: optuna.Study,
    *,
    monitor: str,
    mode: str,
    registered_model_name: str | None,
) -> SweepResult:
    """The sweep's end in its run: figures, the champion, the counts, status FINISHED (FAILED
    when every trial failed).

    Raises:
        LkflowError: Every trial failed; the message names the first one's error and run.
    """
    from mlflow.entities import Metric
    from optuna.trial import TrialState

    from lkflow.sweep.study import ERROR_ATTR
    from lkflow.tracking.params import sanitize_key
    from lkflow.tracking.registry import BEST_PREFIX
    from lkflow.tracking.run import ERROR_TAG

    trials = study.get_trials(deepcopy=False)
    counts = count_trials(trials)
    now = int(time.time() * 1000)
    numbers = {
        "trials_complete": counts.complete,
        "trials_pruned": counts.pruned,
        "trials_failed": counts.failed,
        "trials_killed": counts.killed,
    }
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in numbers.items()])
    metric = f"{BEST_PREFIX}{sanitize_key(monitor)}"
    log_progress(client, run_id, study, metric)
    if counts.complete == 0:
        failed = [t for t in trials if t.state == TrialState.FAIL and ERROR_ATTR in t.user_attrs]
        if counts.pruned == 0 and failed:
            first = min(failed, key=lambda t: t.number)
            error = str(first.user_attrs[ERROR_ATTR]).rstrip(".")
            message = (
                f"Every trial of sweep {study.study_name!r} failed. The first, trial "
                f"{first.number} (run {first.user_attrs.get(RUN_ATTR)}), with {error}. Its "
                "traceback is that run's traceback.txt."
            )
            client.set_tag(run_id, ERROR_TAG, message)
            client.set_terminated(run_id, "FAILED")
            raise LkflowError(message)
        client.set_terminated(run_id, "FINISHED")
        return _result(study, run_id, counts, None)
    _log_figures(client, run_id, study)
    _clear_error(client, run_id)
    version = None
    if registered_model_name is not None:
        version = register_champion(client, study, registered_model_name, monitor, mode)
    if version is not None:
        client.set_tag(run_id, CHAMPION_TAG, f"{version.name}/{version.version}")
    client.set_terminated(run_id, "FINISHED")
    return _result(study, run_id, counts, version)


def _clear_error(client: MlflowClient, run_id: str) -> None:
    """An earlier end of this sweep with every trial failed: its error tag moves to
    `lkflow.previous_error`, as a fit's does once a later fit of its run finishes."""
    from lkflow.tracking.run import ERROR_TAG, PREVIOUS_ERROR_TAG

    error = client.get_run(run_id).data.tags.get(ERROR_TAG)
    if error is not None:
        client.set_tag(run_id, PREVIOUS_ERROR_TAG, error)
        client.delete_tag(run_id, ERROR_TAG)


def _result(
    study: optuna.Study, run_id: str, counts: Any, version: ModelVersion | None
) -> SweepResult:
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = study.best_trial if complete else None
    return SweepResult(
        study=study.study_name,
        parent_run_id=run_id,
        complete=counts.complete,
        pruned=counts.pruned,
        failed=counts.failed,
        killed=counts.killed,
        best_trial=None if best is None else best.number,
        best_value=None if best is None else best.value,
        best_params={} if best is None else dict(best.params),
        best_run_id=None if best is None else best.user_attrs.get(RUN_ATTR),
        champion=None if version is None else f"{version.name}/{version.version}",
    )


def _log_figures(client: MlflowClient, run_id: str, study: optuna.Study) -> None:
    """Optuna's optimization history and parallel coordinates, as PNGs of the run."""
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as figures

    for name, plot in (
        ("optimization_history.png", figures.plot_optimization_history),
        ("parallel_coordinate.png", figures.plot_parallel_coordinate),
    ):
        try:
            with quiet_experimental(), warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # degenerate axes of few trials
                axes = plot(study)
            figure = cast("Figure", axes.figure)
            figure.set_size_inches(9, 5)
            figure.tight_layout()
            client.log_figure(run_id, figure, name)
            plt.close(figure)
        except Exception as err:  # an extra: the sweep's results stand without it
            warnings.warn(f"Could not draw {name} of the sweep: {err}", stacklevel=2)


def register_champion(
    client: MlflowClient, study: optuna.Study, name: str, monitor: str, mode: str
) -> ModelVersion | None:
    """The best trial's model registered under `name` (its version, where a trial registered
    it already), with the alias `champion`; None when that trial logged no model that answers
    its input example (the check every fit makes before it registers one)."""
    from lkflow.tracking.params import sanitize_key
    from lkflow.tracking.registry import BEST_EPOCH_METRIC, Best, register, registration

    best = study.best_trial
    run_id, model_uri = best.user_attrs.get(RUN_ATTR), best.user_attrs.get(MODEL_ATTR)
    if run_id is None or model_uri is None:
        warnings.warn(
            f"The best trial, {best.number}, logged no model that answers its input example: "
            "no champion is registered. Its run holds the weights (net/state_dict.pt) and a "
            "warning of the fit said why.",
            stacklevel=2,
        )
        return None
    metrics = client.get_run(run_id).data.metrics
    epoch = int(metrics.get(BEST_EPOCH_METRIC, 0))
    score = Best(monitor, mode, float(best.values[0]), epoch, None)
    write = registration(name, score, run_id, _summary(client, run_id), sanitize_key(monitor))
    state: Any = {"model_id": str(model_uri).removeprefix("models:/")}
    version = register(client, run_id, write, state, maybe_sent=True)
    client.set_registered_model_alias(name, CHAMPION, version.version)
    return version


def _summary(client: MlflowClient, run_id: str) -> str:
    """The layer table the trial's fit logged (its `summary.txt`), for the version's
    description; empty when it has none."""
    import tempfile
    from pathlib import Path

    from mlflow.exceptions import MlflowException

    bar = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(bar)
    os.environ[bar] = "false"  # MLflow reads it at each download
    try:
        with tempfile.TemporaryDirectory() as folder:
            path = client.download_artifacts(run_id, "summary.txt", folder)
            return Path(path).read_text().rstrip()
    except (MlflowException, OSError):
        return ""
    finally:
        if before is None:
            del os.environ[bar]
        else:
            os.environ[bar] = before
