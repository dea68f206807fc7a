"""Numbers a user types: `--gpus 2`, `--epochs 10`, `--param dropout=0.1`, in ASCII only.

Python's `int()` and `float()` read more than a command line means: other scripts' digits
(`int("١٢")` is 12), underscores (`int("1_0")` is 10), and `str.isdigit()` passes "²", which
`int()` then refuses with a bare `ValueError`. lkflow reads numbers with these functions
instead, so a value is either the number it plainly spells or an error that names it.

    parse_int(" 12 "), parse_int("-1"), parse_int("١٢"), parse_int("²")  # 12, -1, None, None
    parse_float("1e-3"), parse_float(".5"), parse_float("1_0.5")  # 0.001, 0.5, None
"""

from __future__ import annotations

import re

_INT = re.compile(r"[+-]?[0-9]+")
_UNSIGNED = re.compile(r"[0-9]+")
_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[+-]?(?:inf|nan)", re.I)


def parse_int(text: str, *, signed: bool = True) -> int | None:
    """The int that `text` spells in ASCII digits, with spaces around and, if `signed`, a sign.

    Args:
        text: What the user typed.
        signed: Whether a leading `+` or `-` is allowed. Defaults to True.

    Returns:
        The int, or None when `text` is anything else.

    Example:
        >>> parse_int(" 12 "), parse_int("-1"), parse_int("-1", signed=False), parse_int("²")
        (12, -1, None, None)
    """
    stripped = text.strip()
    return int(stripped) if (_INT if signed else _UNSIGNED).fullmatch(stripped) else None


def parse_float(text: str) -> float | None:
    """The float that `text` spells in ASCII: `0.1`, `1e-3`, `.5`, `-2`, `inf` or `nan`.

    Args:
        text: What the user typed.

    Returns:
        The float, or None when `text` is anything else.

    Example:
        >>> parse_float("1e-3"), parse_float(" .5 "), parse_float("1_0.5"), parse_float("١")
        (0.001, 0.5, None, None)
    """
    stripped = text.strip()
    return float(stripped) if _FLOAT.fullmatch(stripped) else None
