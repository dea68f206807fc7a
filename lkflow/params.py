"""Hyperparameters made fit for MLflow: flattened, masked, stringified, truncated.

Pure functions without MLflow: `MLflowCallback` builds one dict of everything a fit is
configured with and passes it through `prepare_params` before logging it in batches.

Example:
    >>> prepare_params({"optim": {"lr": 0.01, "betas": (0.9, 0.999)}, "api_key": "abc123"})
    {'optim.lr': '0.01', 'optim.betas': '(0.9, 0.999)', 'api_key': '***'}
"""

from __future__ import annotations

import math
import posixpath
import re
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

MASK = "***"
# MLflow's limit on a param value (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH in 3.x).
MAX_VALUE_LENGTH = 6000
# MLflow's limit on a param, metric or tag key (mlflow.utils.validation.MAX_ENTITY_KEY_LENGTH).
MAX_KEY_LENGTH = 250
# Key segments that name a credential; a whole segment must match, so `monkey` is no `key`.
_SECRET_WORDS = frozenset({
    "token", "password", "passwd", "secret", "key",
    "apikey", "accesskey", "secretkey", "privatekey", "authtoken", "accesstoken",
})
_SEGMENT = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")
_URI_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)[^/@\s]+@")
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")


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


def is_secret_key(key: str) -> bool:
    """Whether a segment of `key` (split at `.`, `_`, `-`, `/` and camelCase) names a credential.

    Args:
        key: A parameter name, such as "db.password" or "hfToken".

    Returns:
        True for token, password, passwd, secret, key and compounds such as apikey.

    Example:
        >>> [is_secret_key(k) for k in ("db.password", "hfToken", "api_key", "monkey", "max_len")]
        [True, True, True, False, False]
    """
    return any(segment.lower() in _SECRET_WORDS for segment in _SEGMENT.findall(key))


def hide_credentials(text: str) -> str:
    """`text` with the user and password of every URI in it replaced by `***`.

    Args:
        text: Any string, such as a tracking URI.

    Returns:
        The same string, with `scheme://user:pass@host` shown as `scheme://***@host`.

    Example:
        >>> hide_credentials("https://alice:s3cret@mlflow.example.com/api")
        'https://***@mlflow.example.com/api'
    """
    return _URI_USERINFO.sub(rf"\g<scheme>{MASK}@", text)


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
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        value = value.item()
    return str(value)


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


def mask_value(key: str, value: Any) -> Any:
    """`MASK` for a credential-looking value, else the value with URI credentials hidden.

    Only text is masked by key: `token_dim=64` stays, `hf_token="hf_abc"` does not.

    Args:
        key: The flat key of the value.
        value: The value.

    Returns:
        `MASK`, the value with credentials in URIs hidden, or the value itself.

    Example:
        >>> mask_value("db.password", "hunter2"), mask_value("token_dim", 64)
        ('***', 64)
    """
    if isinstance(value, (str, bytes)) and is_secret_key(key):
        return MASK
    if isinstance(value, str):
        return hide_credentials(value)
    return value


def prepare_params(
    params: Mapping[str, Any], limit: int = MAX_VALUE_LENGTH
) -> dict[str, str]:
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
