"""Credentials kept out of what lkflow logs and prints: secret values masked, URI passwords hidden.

    hide_credentials("https://alice:s3cret@mlflow.example.com")  # 'https://***@mlflow.example.com'
    mask_value("db.password", "hunter2")                        # '***'
    mask_secrets({"db": {"password": "hunter2"}})                # {'db': {'password': '***'}}

Every module that logs a value or prints a tracking URI masks it with these functions: the
params and tags of a run, its error tag and traceback, the hyperparameters a checkpoint
keeps, the outbox's record of the URI, and every message that names a store.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

MASK = "***"
# Key segments that name a credential; a whole segment must match, so `monkey` is no `key`.
_SECRET_WORDS = frozenset(
    {
        "token",
        "password",
        "passwd",
        "secret",
        "key",
        "apikey",
        "accesskey",
        "secretkey",
        "privatekey",
        "authtoken",
        "accesstoken",
    }
)
_SEGMENT = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")
_URI_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)[^/@\s]+@")


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


def mask_value(key: str, value: Any) -> Any:
    """`MASK` for text under a key that names a credential, else the value itself.

    Only text is masked: `token_dim=64` stays, `hf_token="hf_abc"` does not.

    Args:
        key: The flat key of the value.
        value: The value.

    Returns:
        `MASK` or `value`.

    Example:
        >>> mask_value("db.password", "hunter2"), mask_value("token_dim", 64)
        ('***', 64)
    """
    return MASK if isinstance(value, (str, bytes)) and is_secret_key(key) else value


def mask_secrets(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`params` with the same nesting, each value masked as `mask_value` masks its flat key.

    Args:
        params: Possibly nested params, such as a model's hyperparameters.
        prefix: The flat key of `params` itself, such as "model". Defaults to "".

    Returns:
        A new dict; nested mappings become dicts, other values are kept or `MASK`.

    Example:
        >>> mask_secrets({"db": {"password": "hunter2", "port": 5432}, "lr": 0.1})
        {'db': {'password': '***', 'port': 5432}, 'lr': 0.1}
    """
    masked: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        nested = isinstance(value, Mapping) and value
        masked[key] = mask_secrets(value, name) if nested else mask_value(name, value)
    return masked
