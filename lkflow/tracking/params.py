"""A fit's params for MLflow: what the fit is configured with, flattened, masked, truncated.

Pure functions without MLflow: `MLflowCallback` gathers the params with `fit_params` and
passes them through `prepare_params` before logging them in batches.

Example:
    >>> prepare_params({"optim": {"lr": 0.01, "betas": (0.9, 0.999)}, "api_key": "abc123"})
    {'optim.lr': '0.01', 'optim.betas': '(0.9, 0.999)', 'api_key': '***'}
"""

from __future__ import annotations

import inspect
import math
import os
import posixpath
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lkflow.credentials import hide_credentials, mask_value

if TYPE_CHECKING:
    import pytorch_lightning as pl
    from torch import nn

# MLflow's limit on a param value (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH in 3.x).
MAX_VALUE_LENGTH = 6000
# MLflow's limit on a param, metric or tag key (mlflow.utils.validation.MAX_ENTITY_KEY_LENGTH).
MAX_KEY_LENGTH = 250
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")
# Scheduler constructor arguments that are not settings, or change while training.
_NOT_SCHEDULER_SETTINGS = frozenset({"optimizer", "last_epoch", "verbose"})
# Optimizer group entries that are not settings.
_NOT_GROUP_SETTINGS = frozenset({"params", "initial_lr"})


def fit_params(trainer: pl.Trainer, net: nn.Module, hparams: Mapping[str, Any]) -> dict[str, Any]:
    """What a fit is configured with, read once its optimizers and data loaders exist.

    The trainer's epochs, batch size, precision, devices, strategy, accelerator and seed
    (`PL_GLOBAL_SEED`), the net's class and size, the data sizes, each optimizer's class and
    settings and each scheduler's; then `hparams`, which win over a same-named entry.

    Args:
        trainer: A trainer at `on_train_start`.
        net: The bare net.
        hparams: The module's hyperparameters, such as `pl_module.hparams`.

    Returns:
        Flat `{key: value}`; entries without a value (no seed, no batch size) are left out.

    Example:
        >>> fit_params(trainer, model.net, model.hparams)["optimizer.lr"]  # doctest: +SKIP
        0.01
    """
    params: dict[str, Any] = {
        "epochs": trainer.max_epochs,
        "batch_size": _batch_size(trainer.train_dataloader),
        "precision": trainer.precision,
        "devices": trainer.num_devices,
        "strategy": getattr(trainer.strategy, "strategy_name", type(trainer.strategy).__name__),
        "accelerator": type(trainer.accelerator).__name__.removesuffix("Accelerator").lower(),
        "seed": os.environ.get("PL_GLOBAL_SEED"),
        "net": type(net).__name__,
        "net.params": sum(p.numel() for p in net.parameters()),
        "train_size": _size(getattr(trainer.train_dataloader, "dataset", None)),
        "val_size": _size(getattr(trainer.val_dataloaders, "dataset", None)),
        **_optimizer_params(trainer.optimizers),
        **_scheduler_params(trainer.lr_scheduler_configs),
    }
    params = {key: value for key, value in params.items() if value is not None}
    flat = flatten(dict(hparams))
    shadowed = [k for k in flat if k in params and str(params[k]) != str(flat[k])]
    if shadowed:
        warnings.warn(
            f"hparams {shadowed} share names with lkflow's own params; the hparams are logged.",
            stacklevel=2,
        )
    return {**params, **flat}


def _plain(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Entries that are numbers, strings or tuples of them; 0-d tensors as numbers."""
    plain = {}
    for key, value in settings.items():
        value = _item(value)
        items = value if isinstance(value, tuple) else (value,)
        if all(isinstance(item, (bool, int, float, str)) for item in items):
            plain[key] = value
    return plain


def _optimizer_params(optimizers: Sequence[Any]) -> dict[str, Any]:
    """Class and constructor settings; a param group's own settings under `groupN`."""
    params: dict[str, Any] = {}
    for index, optimizer in enumerate(optimizers):
        name = "optimizer" if index == 0 else f"optimizer_{index}"
        defaults = _plain(optimizer.defaults)
        params[name] = type(optimizer).__name__
        params.update(flatten(defaults, name))
        for number, group in enumerate(optimizer.param_groups):
            settings = _plain({**group, "lr": group.get("initial_lr", group.get("lr"))})
            own = {
                k: v
                for k, v in settings.items()
                if k not in _NOT_GROUP_SETTINGS and defaults.get(k, v) != v
            }
            params.update(flatten(own, f"{name}.group{number}"))
    return params


def _scheduler_params(configs: Sequence[Any]) -> dict[str, Any]:
    """Class, the constructor arguments it keeps under their own names, interval, frequency."""
    params: dict[str, Any] = {}
    for index, config in enumerate(configs):
        name = "lr_scheduler" if index == 0 else f"lr_scheduler_{index}"
        scheduler = config.scheduler
        arguments = inspect.signature(type(scheduler).__init__).parameters
        kept = {
            k: v
            for k, v in vars(scheduler).items()
            if k in arguments and k not in _NOT_SCHEDULER_SETTINGS
        }
        params[name] = type(scheduler).__name__
        params.update(flatten(_plain(kept), name))
        params.update({f"{name}.interval": config.interval, f"{name}.frequency": config.frequency})
        if config.monitor:
            params[f"{name}.monitor"] = config.monitor
    return params


def _batch_size(loader: Any) -> int | None:
    sampler = getattr(loader, "batch_sampler", None)
    return getattr(loader, "batch_size", None) or getattr(sampler, "batch_size", None)


def _size(dataset: Any) -> int | None:
    return len(dataset) if hasattr(dataset, "__len__") else None


def flatten(params: Mapping[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """Nested mappings flattened to one level with dotted keys; other values kept as they are.

    Args:
        params: Possibly nested mapping, such as a model's hyperparameters.
        prefix: Put before every key, such as "model". Defaults to "".
        sep: Joins the levels of a key. Defaults to ".".

    Returns:
        A flat dict; lists, tuples and objects stay values.

    Example:
        >>> flatten({"optim": {"name": "Adam", "lr": 0.01}, "epochs": 3})
        {'optim.name': 'Adam', 'optim.lr': 0.01, 'epochs': 3}
    """
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name, sep))
        else:
            flat[name] = value
    return flat


def stringify(value: Any) -> str:
    """A param value as MLflow stores it; 0-d tensors and NumPy scalars as Python numbers.

    Args:
        value: A number, string, tuple, tensor or any object.

    Returns:
        `str(value)` of the plain value.

    Example:
        >>> stringify(0.01), stringify((0.9, 0.999)), stringify(None)
        ('0.01', '(0.9, 0.999)', 'None')
    """
    return str(_item(value))


def _item(value: Any) -> Any:
    """A 0-d tensor or NumPy scalar as the Python number it holds; anything else as is."""
    return value.item() if getattr(value, "ndim", None) == 0 and hasattr(value, "item") else value


def truncate(text: str, limit: int = MAX_VALUE_LENGTH) -> str:
    """`text` cut to `limit` characters, the last three being "...", when it is longer.

    Args:
        text: A param value.
        limit: The longest value kept. Defaults to MLflow's limit, 6000.

    Returns:
        `text` itself, or its first `limit - 3` characters and "...".

    Example:
        >>> truncate("abcdefgh", limit=6)
        'abc...'
    """
    return text if len(text) <= limit else text[: limit - 3] + "..."


def prepare_params(params: Mapping[str, Any], limit: int = MAX_VALUE_LENGTH) -> dict[str, str]:
    """Flattened, masked, stringified and truncated params with keys valid for MLflow.

    Args:
        params: Possibly nested params.
        limit: The longest value kept. Defaults to MLflow's limit, 6000.

    Returns:
        Flat `{key: value}`, both strings, ready for `MlflowClient.log_batch`.

    Example:
        >>> prepare_params({"data": {"uri": "s3://u:p@bucket/x"}, "hf_token": "hf_abc"})
        {'data.uri': 's3://***@bucket/x', 'hf_token': '***'}
    """
    flat = flatten(params)
    keys = sanitize_keys(flat, what="param")
    return {
        keys[key]: truncate(hide_credentials(stringify(mask_value(key, value))), limit)
        for key, value in flat.items()
    }


def same_value(logged: str, new: str) -> bool:
    """Whether two param strings hold the same value: equal text, numbers or booleans.

    `mlflow run -P epochs=10` logs "10"; a fit's 10.0 or "10" is the same value.

    Args:
        logged: The value the run already holds.
        new: The value about to be logged.

    Returns:
        True when equal as text, as numbers (where both parse) or as booleans.

    Example:
        >>> same_value("10", "10.0"), same_value("1e-2", "0.01"), same_value("0.1", "0.01")
        (True, True, False)
    """
    if logged == new:
        return True
    if logged.lower() in ("true", "false"):
        return logged.lower() == new.lower()
    left, right = _as_number(logged), _as_number(new)
    if left is None or right is None:
        return False
    return left == right or (math.isnan(left) and math.isnan(right))


def _as_number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def sanitize_key(key: str) -> str:
    """`key` made valid for MLflow: characters outside `[/\\w.\\- :]` become `_`, paths made plain.

    Args:
        key: A param or metric name.

    Returns:
        A name MLflow accepts (at most 250 characters, no `..`, no leading or double `/`).

    Example:
        >>> sanitize_key("acc@top-1"), sanitize_key("loss/"), sanitize_key("")
        ('acc_top-1', 'loss_', '_')
    """
    clean = _BAD_KEY_CHARS.sub("_", key)[:MAX_KEY_LENGTH]
    if posixpath.normpath(clean) != clean or clean == "." or clean.startswith(("..", "/")):
        clean = clean.replace("/", "_")
        if clean in ("", ".") or clean.startswith(".."):
            clean = ("_" + clean)[:MAX_KEY_LENGTH]
    return clean


def sanitize_keys(keys: Iterable[str], what: str = "metric") -> dict[str, str]:
    """Each key mapped to a distinct valid MLflow name, with one warning listing every rename.

    Args:
        keys: Names to log.
        what: "metric" or "param", for the warning. Defaults to "metric".

    Returns:
        `{key: name}`; a clash between two cleaned names gets a `_2`, `_3`... suffix, so
        no value is dropped.

    Example:
        >>> sanitize_keys(["loss", "val_loss"])
        {'loss': 'loss', 'val_loss': 'val_loss'}
    """
    keys = list(keys)
    names: dict[str, str] = {}
    taken = {key for key in keys if sanitize_key(key) == key}
    for key in keys:
        name = sanitize_key(key)
        if name != key:
            stem, count = name, 2
            while name in taken:
                name, count = f"{stem}_{count}"[:MAX_KEY_LENGTH], count + 1
            taken.add(name)
        names[key] = name
    renamed = {key: name for key, name in names.items() if key != name}
    if renamed:
        pairs = ", ".join(f"{key!r} -> {name!r}" for key, name in renamed.items())
        warnings.warn(
            f"MLflow {what} names may only hold letters, digits and _ - . / : and spaces; "
            f"logged as: {pairs}. Rename them to keep the names.",
            stacklevel=2,
        )
    return names
