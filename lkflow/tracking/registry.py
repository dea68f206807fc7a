"""Registration: a fit's best epoch, its version's tags, and which registered version to serve.

    best = best_checkpoint(trainer, history)  # the epoch, score and weights of the best checkpoint
    writer.send(registration("rings-net", best, run_id, table))  # a version, tagged
    version, why = model_version(client, "rings-net")  # the best version by those tags

A version that a fit registers carries the tags below: the run, and where there is a
monitored checkpoint the monitored key as MLflow logged it, its best value, its mode and the
epoch; its run holds the metrics `best_<monitor>` and `best_epoch`. `lkflow serve` and
`lkflow runs` read them back.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lkflow.credentials import hide_credentials
from lkflow.errors import LkflowError
from lkflow.internals import global_tracking_uri

if TYPE_CHECKING:
    import pytorch_lightning as pl
    import torch
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from lkflow.tracking.writes import RegisterWrite, State

# The tags of a registered version.
RUN_ID_TAG = "run_id"  # the run that logged the model
MONITOR_TAG = "monitor"  # the monitored key of the best checkpoint, such as "val_loss"
MONITOR_VALUE_TAG = "monitor_value"  # its best value, as repr(float)
MODE_TAG = "mode"  # "min" or "max": which way the monitored value is better
BEST_EPOCH_TAG = "best_epoch"  # the epoch of the best checkpoint
# The logged model's tag naming its registered versions, as MLflow's UI reads it.
MODEL_VERSIONS_TAG = "mlflow.modelVersions"
# The run's metrics of the best epoch: `best_<monitor>` and `best_epoch`.
BEST_PREFIX = "best_"
BEST_EPOCH_METRIC = f"{BEST_PREFIX}epoch"

_DEFAULT_EXPERIMENT = "Default"
# Words of metric names that are better higher (as Keras' mode="auto" reads them).
_HIGHER_IS_BETTER = ("acc", "auc", "f1", "precision", "recall", "iou", "dice", "r2", "map")


# ---- the best epoch of a fit ---------------------------------------------------------------


@dataclass(frozen=True)
class Best:
    """The best epoch as the checkpoint callback saw it."""

    monitor: str  # the monitored key; "" without a monitored checkpoint
    mode: str  # "min" or "max": which way the monitored value is better
    score: float | None  # its best value; None without one
    epoch: int  # the epoch of the best checkpoint, else the last epoch; counted from 1
    state_dict: dict[str, torch.Tensor] | None  # the module's weights then; None: current ones


def best_checkpoint(trainer: pl.Trainer, history: Sequence[Mapping[str, Any]]) -> Best:
    """The best checkpoint of the fit's monitored checkpoint callback, read from its file;
    without one, the last epoch of `history` and the current weights."""
    import torch

    from lkflow.epoch_values import epoch_number

    checkpoint = trainer.checkpoint_callback
    path = getattr(checkpoint, "best_model_path", "")
    if checkpoint is None or not path or not os.path.isfile(path):
        last = int(history[-1].get("epoch", len(history))) if history else 0
        return Best("", "min", None, last, None)
    saved = torch.load(path, map_location="cpu", weights_only=True)
    score = getattr(checkpoint, "best_model_score", None)
    return Best(
        getattr(checkpoint, "monitor", None) or "",
        getattr(checkpoint, "mode", "min"),
        None if score is None else float(score),
        epoch_number(int(saved.get("epoch", 0))),
        saved["state_dict"],
    )


def mode(monitor: str, recorded: str | None = None) -> str:
    """The mode of `monitor`: the recorded one, else "max" for accuracy-like names, else "min"."""
    if recorded in ("min", "max"):
        return recorded
    words = re.split(r"[^a-z0-9]+", monitor.lower())
    return "max" if any(word in _HIGHER_IS_BETTER for word in words) else "min"


# ---- registering a version -----------------------------------------------------------------


def registered_name(
    given: str | Literal[False] | None, log_model: bool, experiment_name: str, net_class: str
) -> str | None:
    """The name to register under: as given, the experiment's, or the net's class name; None
    when nothing is registered (`given` False, or no model logged)."""
    if given is False or not log_model:
        return None
    if given is not None:
        return given
    if experiment_name and experiment_name != _DEFAULT_EXPERIMENT:
        return experiment_name.replace("/", "-").replace(":", "-")
    return net_class


def registration(
    name: str, best: Best, run_id: str, table: str, monitor: str | None = None, net_name: str = ""
) -> RegisterWrite:
    """The write that registers the run's logged model under `name`, tagged with the best
    epoch, described by `description`; `monitor` is the monitored key as MLflow logged it
    (`val_f1_macro` for `val_f1/macro`, the name of `best_<monitor>`), defaults to
    `best.monitor`."""
    monitor = monitor or best.monitor
    tags = {RUN_ID_TAG: run_id}
    if best.score is not None:
        tags.update(
            {
                MONITOR_TAG: monitor,
                MONITOR_VALUE_TAG: repr(best.score),
                MODE_TAG: best.mode,
                BEST_EPOCH_TAG: str(best.epoch),
            }
        )
    text = description(net_name, best, monitor, table)
    return {"op": "register", "name": name, "tags": tags, "description": text}


def description(net_name: str, best: Best, monitor: str, table: str) -> str:
    """A version's description: a first line of at most about 30 characters, which MLflow's
    versions table shows in its one-line cell; then, on the version's page, what the weights
    are and the net's layer table as a code block.

    Example:
        >>> print(description("Net", Best("val_loss", "min", 0.25, 3, None), "val_loss", ""))
        val_loss 0.2500 at epoch 3
        <BLANKLINE>
        Net with the weights of its best epoch by val_loss (min).
    """
    net = net_name or "The net"
    if best.score is None:
        line = f"{net}, epoch {best.epoch}"
        detail = f"{net} with the weights of epoch {best.epoch}, the last of its fit."
    else:
        line = f"{monitor} {best.score:.4f} at epoch {best.epoch}"
        detail = f"{net} with the weights of its best epoch by {monitor} ({best.mode})."
    table_block = ["Layers:", f"```\n{table}\n```"] if table else []
    return "\n\n".join([line, detail, *table_block])


def register(
    client: MlflowClient, run_id: str, write: RegisterWrite, state: State, maybe_sent: bool
) -> ModelVersion:
    """Registers the run's logged model (`state["model_id"]`) as a version of `write["name"]`;
    with `maybe_sent`, a version of it already there is kept instead."""
    from mlflow.exceptions import MlflowException

    name, source = write["name"], f"models:/{state['model_id']}"
    if maybe_sent:
        for version in client.search_model_versions(f"run_id = '{run_id}'"):
            if version.name == name and version.source == source:
                link_version(client, state["model_id"], version)
                return _registered(state, version)
    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    # A sqlite or file registry looks `models:/<id>` up with the global tracking URI
    # (MLflow 3.17, sqlalchemy_store.create_model_version), so make it this client's.
    with global_tracking_uri(client.tracking_uri):
        version = client.create_model_version(
            name,
            source=source,
            run_id=run_id,
            tags=write["tags"],
            description=write["description"],
            model_id=state["model_id"],
        )
    link_version(client, state["model_id"], version)
    return _registered(state, version)


def link_version(client: MlflowClient, model_id: str | None, version: ModelVersion) -> None:
    """Names `version` in the logged model's `mlflow.modelVersions` tag, once.

    MLflow's UI lists a logged model's registered versions from that tag (as
    `mlflow.register_model` sets it): without it the model reads "Not registered". A version
    keeps its `model_id` only in registries that store one; sqlite's does not.
    """
    import json

    if model_id is None:
        return
    tag = client.get_logged_model(model_id).tags.get(MODEL_VERSIONS_TAG)
    linked: list[dict[str, Any]] = json.loads(tag) if tag else []
    entry = {"name": version.name, "version": int(version.version)}  # a string over REST
    if any(
        (e.get("name"), str(e.get("version"))) == (version.name, str(version.version))
        for e in linked
    ):
        return
    client.set_logged_model_tags(model_id, {MODEL_VERSIONS_TAG: json.dumps([*linked, entry])})


def _registered(state: State, version: ModelVersion) -> ModelVersion:
    state["registered"] = f"{version.name} version {version.version}"
    return version


# ---- choosing a version to serve -----------------------------------------------------------


def model_version(client: MlflowClient, spec: str) -> tuple[ModelVersion, str]:
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
    return best_version(versions)


def _unknown_model(client: MlflowClient, spec: str, name: str) -> LkflowError:
    models = {model.name: model for model in client.search_registered_models()}
    if name in models:
        versions = client.search_model_versions(f"name = '{name}'")
        numbers = ", ".join(str(n) for n in sorted(int(v.version) for v in versions)) or "none"
        aliases = ", ".join(f"@{alias}" for alias in models[name].aliases) or "none"
        return LkflowError(
            f"Received: model {spec!r}, but {name} has no such version or alias at "
            f"{hide_credentials(client.tracking_uri)}. Its versions: {numbers}; aliases: {aliases}."
        )
    return LkflowError(
        f"Received: model {spec!r}, which is not registered at "
        f"{hide_credentials(client.tracking_uri)}. "
        f"Registered models: {', '.join(models) or 'none'}."
    )


def best_version(versions: Sequence[ModelVersion]) -> tuple[ModelVersion, str]:
    """The best version by its `monitor_value` tag, among those with the newest's monitor."""
    newest = max(versions, key=lambda v: int(v.version))
    monitor = newest.tags.get(MONITOR_TAG)
    scored = [
        v for v in versions if v.tags.get(MONITOR_TAG) == monitor and MONITOR_VALUE_TAG in v.tags
    ]
    if not monitor or not scored:
        return newest, "the newest version: no recorded metric"
    direction = mode(monitor, newest.tags.get(MODE_TAG))
    sign = 1 if direction == "min" else -1
    best = min(scored, key=lambda v: (sign * float(v.tags[MONITOR_VALUE_TAG]), -int(v.version)))
    value = float(best.tags[MONITOR_VALUE_TAG])
    count = f"{len(scored)} version{'s' if len(scored) > 1 else ''}"
    return best, f"best {monitor}={value:.4g} ({direction}) of {count}"


def example_request(client: MlflowClient, version: ModelVersion) -> str:
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
