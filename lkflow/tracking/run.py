"""The run a fit logs into: found at fit start, created or reopened after the first batch, ended.

    found = find_run(client, run_id=None, experiment_name="rings", restored_run_id=None)
    run = open_run(found, experiment_name="rings", run_name=None, tags={})  # after a batch
    end_run(writer, run, "FINISHED")  # only a run this fit opened

The run is the first of: `run_id=`, the active run (`with mlflow.start_run()`), `MLFLOW_RUN_ID`
(as `mlflow run` sets it), the run of the checkpoint being resumed; else a new run of the
experiment (`experiment_name=`, `MLFLOW_EXPERIMENT_NAME`, `MLFLOW_EXPERIMENT_ID`, "Default").
The store is only read until the first training batch has gone through (`find_run`): a
mistake that the arguments, the sanity check or the first step reveal fails the fit before
any run is created or reopened (`open_run`). A run that is already open is logged into and
left open; a run that had ended is reopened and ended again, and so is a run still RUNNING
whose id only the checkpoint knew (its process was killed). A fit that fails leaves its error
in the tag `lkflow.error` and its traceback's last lines in `traceback.txt`; a later fit of
the run that finishes moves that tag to `lkflow.previous_error`.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

from lkflow.credentials import hide_credentials
from lkflow.errors import LkflowError
from lkflow.tracking.params import same_value, truncate
from lkflow.tracking.store import (
    UI_ADDRESS,
    bounded_http_retries,
    is_http,
    run_url,
    ui_command,
    ui_route,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

    from lkflow.tracking.writes import Writer

# MLflow's experiment kind, and its value for model training (as MLflow's UI sets it).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
_DEFAULT_EXPERIMENT_ID = "0"
ERROR_TAG = "lkflow.error"  # the type and message of the exception a fit failed with
PREVIOUS_ERROR_TAG = "lkflow.previous_error"  # that tag, once a later fit of the run finished
RESUMED_EPOCHS_TAG = "lkflow.resumed_epochs"  # the epochs of a resumed fit that runs longer
_TRACEBACK_LINES = 40  # the last lines of a failed fit's traceback kept in traceback.txt
_ERROR_TAG_LENGTH = 500  # the longest `lkflow.error` tag
_FROM_CHECKPOINT = "the checkpoint's run_id"


@dataclass
class FoundRun:
    """What a fit reads at its start, before any run is created or reopened: the existing run
    to log into, if there is one, else the experiment of the new run."""

    client: MlflowClient  # the client of the store
    run: Run | None  # the existing run; None: a new run is created when the run opens
    source: str  # where the existing run's id came from: "run_id", "the active run", ...
    experiment_id: str | None  # the run's experiment; None: one still to be created
    experiment_name: str  # its name, or the name asked for
    params: dict[str, str]  # the params the run holds, and those this fit logged

    @property
    def run_id(self) -> str | None:
        return None if self.run is None else str(self.run.info.run_id)


@dataclass
class TrackedRun:
    """The run a fit logs into, once it is created or reopened."""

    client: MlflowClient  # the client of the run's store
    run_id: str
    experiment_id: str
    experiment_name: str
    params: dict[str, str]  # the params the run holds, and those this fit logged
    owned: bool  # created or reopened by this fit, which ends it
    found: Run | None  # the run as the fit found it; None for a run this fit created


def find_run(
    client: MlflowClient,
    *,
    run_id: str | None,
    experiment_name: str | None,
    restored_run_id: str | None,
) -> FoundRun:
    """The run to log into, or the experiment of a new one; reads only, creates nothing.

    Args:
        client: The client of the store.
        run_id: The callback's `run_id=`.
        experiment_name: The callback's `experiment_name=`, for a new run.
        restored_run_id: The run of the checkpoint the fit resumes from.

    Raises:
        LkflowError: `run_id` (or the active run, `MLFLOW_RUN_ID`) is no run of the store, or
            the experiment was deleted.
    """
    existing, source = _existing_run_id(run_id, restored_run_id)
    with bounded_http_retries():  # reads only: the run opens after the first batch
        if existing is None:
            run, experiment_id = None, _experiment_id(client, experiment_name, create=False)
        else:
            run = _found_run(client, existing, source)
            experiment_id = str(run.info.experiment_id)
        if experiment_id is None:  # still to be created: the name asked for
            name = experiment_name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or ""
        else:
            name = client.get_experiment(experiment_id).name
    params = {} if run is None else dict(run.data.params)
    return FoundRun(client, run, source, experiment_id, name, params)


def open_run(
    found: FoundRun,
    *,
    experiment_name: str | None,
    run_name: str | None,
    tags: Mapping[str, Any] | None,
) -> TrackedRun:
    """Creates the run found missing, or reopens the run found when it had ended.

    Args:
        found: What the fit read at its start.
        experiment_name: The callback's `experiment_name=`, for a new run.
        run_name: The callback's `run_name=`, for a new run.
        tags: The callback's `tags=`, set on the run (credentials hidden).
    """
    client, existing, all_tags = found.client, found.run, run_tags(tags)
    with bounded_http_retries():
        if existing is None:
            run, owned = _create_run(client, experiment_name, run_name, all_tags), True
        else:
            run = existing
            # A run still RUNNING whose id only the checkpoint knew belongs to a killed
            # process: the resumed fit takes it over and ends it.
            owned = run.info.status != "RUNNING" or found.source == _FROM_CHECKPOINT
            if owned:  # resumed: open it again, and end it as this fit ends
                client.update_run(run.info.run_id, status="RUNNING")
            _set_tags(client, run.info.run_id, all_tags)
        mark_model_training(client, str(run.info.experiment_id))
    return TrackedRun(
        client=client,
        run_id=run.info.run_id,
        experiment_id=run.info.experiment_id,
        experiment_name=found.experiment_name,
        params=found.params,
        owned=owned,
        found=existing,
    )


def _existing_run_id(run_id: str | None, restored_run_id: str | None) -> tuple[str | None, str]:
    import mlflow

    active = mlflow.active_run()
    candidates = [
        (run_id, "run_id"),
        (active.info.run_id if active else None, "the active run"),
        (os.environ.get("MLFLOW_RUN_ID"), "MLFLOW_RUN_ID"),
        (restored_run_id, _FROM_CHECKPOINT),
    ]
    return next(((found, source) for found, source in candidates if found), (None, ""))


def _found_run(client: MlflowClient, run_id: str, source: str) -> Run:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise LkflowError(
            f"Received: {source}={run_id!r}, which is not a run at "
            f"{hide_credentials(client.tracking_uri)}. Pass a run id of that store, "
            "or leave run_id unset for a new run."
        ) from err


def _create_run(
    client: MlflowClient, experiment_name: str | None, run_name: str | None, tags: dict[str, str]
) -> Run:
    from mlflow.tracking.context.registry import resolve_tags

    resolved = resolve_tags(tags)  # adds user, source and git commit like start_run
    experiment_id = _experiment_id(client, experiment_name, create=True)
    # A store in this process names the run from Python's `random`, which the fit's seed fixed:
    # two fits of one seed would share a name, and the fit's own draws would depend on it.
    seeded = random.getstate()
    random.seed()
    try:
        return client.create_run(experiment_id, run_name=run_name, tags=resolved)
    finally:
        random.setstate(seeded)


@overload
def _experiment_id(
    client: MlflowClient, experiment_name: str | None, create: Literal[True]
) -> str: ...
@overload
def _experiment_id(
    client: MlflowClient, experiment_name: str | None, create: bool
) -> str | None: ...
def _experiment_id(client: MlflowClient, experiment_name: str | None, create: bool) -> str | None:
    """The experiment of a new run; one that does not exist yet is None, or with `create`
    created."""
    from mlflow.exceptions import MlflowException

    name = experiment_name or os.environ.get("MLFLOW_EXPERIMENT_NAME")
    if name is None:
        return os.environ.get("MLFLOW_EXPERIMENT_ID", "0")
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        if not create:
            return None
        try:
            return str(client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING}))
        except MlflowException as err:  # created meanwhile by a concurrent fit
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)
            if experiment is None:  # deleted at once: the error that was raised stands
                raise
    if experiment.lifecycle_stage == "deleted":
        raise LkflowError(
            f"Received: experiment_name={name!r}, an experiment that was deleted. Restore "
            f"it (mlflow experiments restore --experiment-id {experiment.experiment_id}) "
            "or pass another name."
        )
    return str(experiment.experiment_id)


def mark_model_training(client: MlflowClient, experiment_id: str) -> None:
    """Tags the experiment as one of model training (`mlflow.experimentKind`), so that UIs
    that read the tag open it on its runs, not on a GenAI overview. Experiments lkflow
    creates carry it from the start; one that has no kind yet gets it here, except MLflow's
    "Default", which holds whatever names no experiment. A kind already set is kept."""
    if experiment_id == _DEFAULT_EXPERIMENT_ID:
        return
    if EXPERIMENT_KIND_TAG not in client.get_experiment(experiment_id).tags:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)


def run_tags(tags: Mapping[str, Any] | None) -> dict[str, str]:
    """lkflow's version and the given tags, their credentials hidden."""
    from lkflow import __version__

    all_tags = {"lkflow.version": __version__}
    all_tags.update({key: hide_credentials(str(value)) for key, value in (tags or {}).items()})
    return all_tags


def _set_tags(client: MlflowClient, run_id: str, tags: Mapping[str, str]) -> None:
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])


def log_params(writer: Writer, found: FoundRun, prepared: Mapping[str, str], resumed: bool) -> None:
    """Params the run lacks, in batches; a different value already logged is an error.

    Args:
        writer: The fit's writer (before the run opens, it keeps the writes for then).
        found: The run as the fit found it; its params gain the ones logged.
        prepared: Params as `lkflow.tracking.params.prepare_params` makes them.
        resumed: The fit resumes from a checkpoint of this run: `epochs` may grow, and the
            new value goes to the tag `lkflow.resumed_epochs`.

    Raises:
        LkflowError: The run holds another value of a param; no run was created or reopened.
    """
    params, logged = dict(prepared), found.params
    clashes = [k for k, v in params.items() if k in logged and not same_value(logged[k], v)]
    if "epochs" in clashes and resumed:  # a resumed fit may run longer than the one before
        clashes.remove("epochs")
        writer.send({"op": "batch", "tags": {RESUMED_EPOCHS_TAG: params.pop("epochs")}})
    if clashes:
        values = "; ".join(f"{k}: {logged[k]!r} logged, {params[k]!r} now" for k in clashes)
        raise LkflowError(
            f"MLflow run {found.run_id} already holds other values for {values}. MLflow "
            "never changes a logged param. Fit with the logged values (as `mlflow run -P` "
            "gave them), or log into a new run: no active run, MLFLOW_RUN_ID and run_id unset."
        )
    new = {k: v for k, v in params.items() if k not in logged}
    if new:
        writer.send({"op": "batch", "params": new})
    found.params.update(params)


def log_error(writer: Writer, exception: BaseException) -> None:
    """The exception as the tag `lkflow.error`, its traceback's end as traceback.txt."""
    message = traceback.format_exception_only(exception)[-1].strip()
    tag = truncate(hide_credentials(message), _ERROR_TAG_LENGTH)
    writer.send({"op": "batch", "tags": {ERROR_TAG: tag}})
    lines = "".join(traceback.format_exception(exception)).splitlines()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "traceback.txt"
        path.write_text(hide_credentials("\n".join(lines[-_TRACEBACK_LINES:])) + "\n")
        writer.send({"op": "artifacts", "paths": [str(path)], "artifact_path": None})


def clear_error(writer: Writer, run: TrackedRun) -> None:
    """A run found with the `lkflow.error` of an earlier fit that failed: now that this fit
    finished, the tag moves to `lkflow.previous_error` (traceback.txt stays, that error's)."""
    if run.found is None:
        return
    error = run.found.data.tags.get(ERROR_TAG)
    if error is not None:
        writer.send({"op": "batch", "tags": {PREVIOUS_ERROR_TAG: error}})
    # also where the error only waits in the outbox: deleting a tag that is not there passes
    writer.send({"op": "delete_tag", "key": ERROR_TAG})


def end_run(writer: Writer, run: TrackedRun, status: str) -> None:
    """Ends a run this fit opened with `status` and lets go of the outbox; then, unless the
    run's writes wait in the outbox, says where the run is (`print_summary`)."""
    try:
        if run.owned:
            writer.send({"op": "end", "status": status, "end_time": int(time.time() * 1000)})
            run.owned = False
    finally:
        writer.release()  # the fit has written all: `lkflow sync` may deliver it
    if writer.outbox is None:
        print_summary(run, writer.registered)


def print_summary(run: TrackedRun, registered: str | None) -> None:
    """What a fit leaves in MLflow, in two lines without credentials: the run, its experiment
    and the version it registered; then the run's page (on a tracking server, the run's link
    as MLflow prints it; for a local store, the page `mlflow ui` serves)::

        Logged run calm-owl-12 to experiment 'rings'; registered rings-net version 3.
        View run calm-owl-12 at: http://mlflow-host:5000/#/experiments/1/runs/3f2a...?workflowType=machine_learning
    """
    from mlflow.exceptions import MlflowException

    uri = run.client.tracking_uri
    try:
        with bounded_http_retries():
            name = run.client.get_run(run.run_id).info.run_name
    except MlflowException:  # the server went away as the run ended: all is logged
        name = run.run_id
    where = "" if is_http(uri) else f" in {hide_credentials(uri)}"
    done = f"; registered {registered}" if registered else ""
    print(f"Logged run {name} to experiment {run.experiment_name!r}{where}{done}.", flush=True)
    url, command = run_url(uri, run.experiment_id, run.run_id), ui_command(uri)
    if url is not None:
        print(f"View run {name} at: {url}", flush=True)
    elif command is not None:
        page = f"{UI_ADDRESS}/{ui_route(run.experiment_id, run.run_id)}"
        print(f"View run {name} with `{command}` at: {page}", flush=True)
