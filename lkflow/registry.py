"""Registered versions of a net: which one to serve, and an example request for it."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lkflow.credentials import hide_credentials
from lkflow.errors import LkflowError
from lkflow.run_table import mode

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion


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
    monitor = newest.tags.get("monitor")
    scored = [v for v in versions if v.tags.get("monitor") == monitor and "monitor_value" in v.tags]
    if not monitor or not scored:
        return newest, "the newest version: no recorded metric"
    direction = mode(monitor, newest.tags.get("mode"))
    sign = 1 if direction == "min" else -1
    best = min(scored, key=lambda v: (sign * float(v.tags["monitor_value"]), -int(v.version)))
    value = float(best.tags["monitor_value"])
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
