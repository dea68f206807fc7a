"""One write into a run: a typed dict per kind, `deliver` to send it, and the `Writer` of a fit.

    writer = Writer(Path("mlruns-outbox").resolve())
    writer.send({"op": "batch", "params": {"lr": "0.1"}})  # kept until the run opens
    writer.open(run)  # a TrackedRun (lkflow/tracking/run.py): the write goes in now
    writer.send({"op": "batch", "metrics": [("loss", 0.4, time_ms, 0)], "to_model": False})

A fit writes into its run only through its `Writer`: while the tracking server answers, each
write is one `deliver` (MLflow calls, retried for seconds rather than MLflow's minutes). Once a
write fails because the server does not answer (`lkflow.tracking.store.is_unreachable`), that
write and every later write of the run go, in order, to the run's outbox
(lkflow/tracking/outbox.py), whose journal holds these same dicts, one a line; `lkflow sync`
delivers them later with `deliver`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypedDict, overload

from typing_extensions import NotRequired

from lkflow.credentials import hide_credentials
from lkflow.tracking.export import log_model
from lkflow.tracking.outbox import Outbox
from lkflow.tracking.registry import register
from lkflow.tracking.store import bounded_http_retries, env_defaults, is_unreachable

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from lkflow.tracking.run import TrackedRun

Point = tuple[str, float, int, int]  # a metric point: key, value, time in ms, step
_PARAMS_PER_CALL = 100  # mlflow.utils.validation.MAX_PARAMS_TAGS_PER_BATCH
_METRICS_PER_CALL = 1000  # mlflow.utils.validation.MAX_METRICS_PER_BATCH


class BatchWrite(TypedDict):
    """Params, tags and metric points (`log_batch`); `to_model` links the points to the model,
    and `datasets` those of a metric key to a dataset of the run: key -> [name, digest]."""

    op: Literal["batch"]
    params: NotRequired[dict[str, str]]
    tags: NotRequired[dict[str, str]]
    metrics: NotRequired[list[Point]]
    to_model: NotRequired[bool]
    datasets: NotRequired[dict[str, list[str]]]


class DatasetRecord(TypedDict):
    """An MLflow Dataset's fields, as `lkflow.tracking.artifacts.dataset_record` makes them."""

    name: str
    digest: str
    source_type: str
    source: str
    profile: str


class InputRecord(DatasetRecord):
    """A dataset and what it was to the fit: "training" or "validation"."""

    context: str


class InputsWrite(TypedDict):
    """The fit's datasets (`log_inputs`)."""

    op: Literal["inputs"]
    datasets: list[InputRecord]


class ArtifactsWrite(TypedDict):
    """Files and folders, put under `artifact_path` of the run's artifacts (None: the root)."""

    op: Literal["artifacts"]
    paths: list[str]
    artifact_path: str | None


class ModelWrite(TypedDict):
    """The saved MLflow model at `path`, logged as a LoggedModel of the run at epoch `step`."""

    op: Literal["model"]
    path: str
    experiment_id: str
    params: dict[str, str]
    step: int
    model_id: str | None  # the LoggedModel, once created


class RegisterWrite(TypedDict):
    """A version of the logged model registered under `name`, with tags and a description."""

    op: Literal["register"]
    name: str
    tags: dict[str, str]
    description: str | None


class EndWrite(TypedDict):
    """The run's end: the status the fit ended with, and when."""

    op: Literal["end"]
    status: str
    end_time: int


class DeleteTagWrite(TypedDict):
    """A tag removed from the run, if the run has it."""

    op: Literal["delete_tag"]
    key: str


Write = (
    BatchWrite
    | InputsWrite
    | ArtifactsWrite
    | ModelWrite
    | RegisterWrite
    | EndWrite
    | DeleteTagWrite
)


class State(TypedDict):
    """What the earlier writes of a run left for later ones (and, in an outbox, its sync)."""

    model_id: str | None  # the LoggedModel of a "model" write, linked by metrics and versions
    registered: NotRequired[str]  # "name version n" of the registered version
    delivered: NotRequired[int]  # in an outbox's progress.json: the journal lines delivered


# ---- delivering one write ------------------------------------------------------------------


def deliver(
    client: MlflowClient, run_id: str, write: Write, state: State, maybe_sent: bool = False
) -> str | ModelVersion | None:
    """Sends one write of a fit to MLflow.

    Args:
        client: The client of the run's store.
        run_id: The run written to.
        write: The write. A "model" write gets the id of the LoggedModel it creates.
        state: What the run's earlier writes left: "model_id" (set by a "model" write, read
            by "register" and by metrics linked to the model) and "registered".
        maybe_sent: The write may have reached MLflow before: metric points the run holds
            are not sent again, an existing version of the model is kept. Defaults to False.

    Returns:
        The model id for "model", the ModelVersion for "register", else None.
    """
    if write["op"] == "batch":
        _batch(client, run_id, write, state, maybe_sent)
    elif write["op"] == "inputs":
        _inputs(client, run_id, write)
    elif write["op"] == "artifacts":
        _artifacts(client, run_id, write)
    elif write["op"] == "model":
        return log_model(client, run_id, write, state)
    elif write["op"] == "register":
        return register(client, run_id, write, state, maybe_sent)
    elif write["op"] == "end":
        _end(client, run_id, write)
    else:
        _delete_tag(client, run_id, write)
    return None


def _batch(
    client: MlflowClient, run_id: str, write: BatchWrite, state: State, maybe_sent: bool
) -> None:
    from mlflow.entities import Metric, Param, RunTag

    model_id = state["model_id"] if write.get("to_model") else None
    datasets = write.get("datasets", {}) if model_id is not None else {}
    points = write.get("metrics", [])
    if maybe_sent and model_id is None:  # linked points repeat logged ones: MLflow keeps one
        points = _not_logged(client, run_id, points)
    params = [Param(key, value) for key, value in write.get("params", {}).items()]
    tags = [RunTag(key, value) for key, value in write.get("tags", {}).items()]
    metrics = [
        Metric(
            key,
            value,
            timestamp,
            step,
            model_id=model_id,
            dataset_name=datasets[key][0] if key in datasets else None,
            dataset_digest=datasets[key][1] if key in datasets else None,
            run_id=run_id,
        )
        for key, value, timestamp, step in points
    ]
    for part in _chunks(params, _PARAMS_PER_CALL):
        client.log_batch(run_id, params=part)
    for part in _chunks(tags, _PARAMS_PER_CALL):
        client.log_batch(run_id, tags=part)
    for part in _chunks(metrics, _METRICS_PER_CALL):
        client.log_batch(run_id, metrics=part)


def _not_logged(client: MlflowClient, run_id: str, points: list[Point]) -> list[Point]:
    """The metric points (key, value, time, step) that the run does not hold yet."""
    logged = {
        (metric.key, metric.step, metric.timestamp)
        for key in {point[0] for point in points}
        for metric in client.get_metric_history(run_id, key)
    }
    return [point for point in points if (point[0], point[3], point[2]) not in logged]


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _inputs(client: MlflowClient, run_id: str, write: InputsWrite) -> None:
    from mlflow.entities import Dataset, DatasetInput, InputTag

    inputs = [
        DatasetInput(
            Dataset(
                name=data["name"],
                digest=data["digest"],
                source_type=data["source_type"],
                source=data["source"],
                profile=data["profile"],
            ),
            tags=[InputTag("mlflow.data.context", data["context"])],
        )
        for data in write["datasets"]
    ]
    from mlflow.exceptions import MlflowException

    try:
        client.log_inputs(run_id, datasets=inputs)  # MLflow links a dataset to a run once
    except MlflowException as err:
        if is_unreachable(err):
            raise
        # Fits that log the same dataset into one experiment at once race in MLflow's store:
        # each looks the dataset up, then inserts it, and the second insert breaks a UNIQUE
        # constraint. The dataset is there now, and logging again links it.
        client.log_inputs(run_id, datasets=inputs)


def _artifacts(client: MlflowClient, run_id: str, write: ArtifactsWrite) -> None:
    for path in write["paths"]:
        if os.path.isdir(path):
            client.log_artifacts(run_id, path, write.get("artifact_path"))
        else:
            client.log_artifact(run_id, path, write.get("artifact_path"))


def _end(client: MlflowClient, run_id: str, write: EndWrite) -> None:
    # MLflow prints the run's link with the tracking URI's credentials; lkflow prints its own.
    with env_defaults({"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}, override=True):
        client.set_terminated(run_id, status=write["status"], end_time=write["end_time"])


def _delete_tag(client: MlflowClient, run_id: str, write: DeleteTagWrite) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.delete_tag(run_id, write["key"])
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":  # not there: nothing to remove
            raise


# ---- the writer of a fit -------------------------------------------------------------------


class Writer:
    """Sends a fit's writes into its run: to MLflow while the server answers, else to the
    run's outbox, so that the outbox holds the write that failed and every later one in order.
    Writes made before the run opens (params, tags, datasets: no files) wait for it.

    Args:
        outbox_root: The folder of the outboxes, `<outbox_dir>` resolved at fit start.

    Example:
        >>> writer = Writer(Path("mlruns-outbox").resolve())  # doctest: +SKIP
        >>> writer.send({"op": "batch", "params": {"lr": "0.1"}})  # doctest: +SKIP
        >>> writer.open(run)  # the params go into the run now  # doctest: +SKIP
    """

    def __init__(self, outbox_root: Path) -> None:
        self.outbox_root = outbox_root
        self.run: TrackedRun | None = None  # set once the run is created or reopened
        self.outbox: Outbox | None = None  # set once the server stopped answering
        self._pending: list[Write] = []  # writes made before the run opened
        self._sent: State = {"model_id": None}  # what deliver() left for later writes

    def open(self, run: TrackedRun) -> None:
        """Writes go into `run` from now on: first the run's kept outbox, if any, is taken
        over, then the writes made before it opened are sent."""
        self.run = run
        self._continue_outbox(run)
        pending, self._pending = self._pending, []
        for write in pending:
            self.send(write)

    @property
    def registered(self) -> str | None:
        """The version this fit registered, "name version n", once MLflow has it."""
        return self._sent.get("registered")

    @overload
    def send(self, write: ModelWrite) -> str | None: ...
    @overload
    def send(self, write: RegisterWrite) -> ModelVersion | None: ...
    @overload
    def send(self, write: Write) -> str | ModelVersion | None: ...
    def send(self, write: Write) -> str | ModelVersion | None:
        """One write into the run.

        Returns:
            What `deliver` returns (the model id, the model version), or None once in the outbox
            or before the run opened.
        """
        run, outbox = self.run, self.outbox
        if run is None:  # before the first batch
            self._pending.append(write)
            return None
        if outbox is None:
            from mlflow.exceptions import MlflowException

            try:
                with bounded_http_retries():
                    return deliver(run.client, run.run_id, write, self._sent)
            except MlflowException as err:
                if not is_unreachable(err):
                    raise
                outbox = self._open_outbox(run, err)
        if outbox.held:
            outbox.append(write)
        else:  # a write after the fit let go of the outbox (log_figures): taken for it
            self.outbox = outbox = self._take_outbox(run)
            try:
                outbox.append(write)
            finally:
                outbox.release()
        return None

    def _take_outbox(self, run: TrackedRun) -> Outbox:
        """The run's outbox, owned by this fit until it lets go (waits while a sync delivers)."""
        return Outbox.open(self.outbox_root, run.run_id, run.experiment_id, run.client.tracking_uri)

    def _open_outbox(self, run: TrackedRun, err: BaseException) -> Outbox:
        uri = run.client.tracking_uri
        self.outbox = outbox = self._take_outbox(run)
        reason = type(err.__cause__ or err.__context__).__name__
        warnings.warn(
            f"The MLflow tracking server at {hide_credentials(uri)} stopped answering "
            f"({reason}). Training goes on; what run {run.run_id} logs from now on (metrics, "
            f"artifacts, the model and its registration, the run's end) is kept in "
            f"{outbox.folder}. Deliver it with `lkflow sync` once the server is back.",
            stacklevel=2,
        )
        return outbox

    def _continue_outbox(self, run: TrackedRun) -> None:
        """Writes of this run kept by an earlier fit wait in the outbox: this fit's go after
        them, so that `lkflow sync` delivers all of them in order."""
        if not (self.outbox_root / run.run_id / "journal.jsonl").exists():
            return
        outbox = self._take_outbox(run)
        if not outbox.journal.exists():  # a sync delivered them while this fit waited
            outbox.remove()
            return
        self.outbox = outbox
        warnings.warn(
            f"Run {run.run_id} has writes that an earlier fit kept in {outbox.folder}. "
            "This fit's writes join them there, in order; deliver them all with `lkflow sync`.",
            stacklevel=2,
        )

    def release(self) -> None:
        """Lets go of the run's outbox, if this fit holds it: `lkflow sync` may deliver it."""
        if self.outbox is not None:
            self.outbox.release()
