"""Turn the article's `gpus=` argument into Lightning's `accelerator=` and `devices=`.

`gpus` means what it meant in Lightning 1.x: 0 the CPU, N that many GPUs, -1 all of them,
`[0, 1]` or `"0,1"` those devices. `None` picks one GPU when CUDA is there, else the CPU.
"""

from __future__ import annotations

from typing import Any

import torch

from lkflow.errors import LkflowError
from lkflow.numbers import parse_int

Gpus = int | str | list[int] | tuple[int, ...] | None

_ACCEPTED = (
    "0 (CPU), N > 0 (N GPUs), -1 (all GPUs), a list like [0, 1], or a string like '1' or '0,1'"
)


def parse_gpus(gpus: Gpus) -> int | list[int] | None:
    """Normalise a `gpus` value: an int count (-1 for all), a list of device indices, or None.

    Args:
        gpus: The value the user passed.

    Returns:
        An int, a list of ints, or None when `gpus` is None.

    Raises:
        LkflowError: For any other form, naming the value and the accepted forms.

    Example:
        >>> parse_gpus("0,1"), parse_gpus("2"), parse_gpus(-1), parse_gpus([1])
        ([0, 1], 2, -1, [1])
    """
    if gpus is None:
        return None
    if isinstance(gpus, bool):
        raise _bad_gpus(gpus)
    if isinstance(gpus, int):
        if gpus < -1:
            raise _bad_gpus(gpus)
        return gpus
    if isinstance(gpus, str):
        return _parse_gpus_str(gpus)
    if isinstance(gpus, (list, tuple)):
        return _device_list(gpus, original=gpus)
    raise _bad_gpus(gpus)


def _parse_gpus_str(text: str) -> int | list[int]:
    stripped = text.strip()
    if "," in stripped:
        parsed = [parse_int(part, signed=False) for part in stripped.split(",") if part.strip()]
        indices = [index for index in parsed if index is not None]
        if len(indices) < len(parsed):
            raise _bad_gpus(text)
        return _device_list(indices, original=text)
    count = -1 if stripped == "-1" else parse_int(stripped, signed=False)
    if count is None:
        raise _bad_gpus(text)
    return count


def _device_list(indices: list[int] | tuple[int, ...], original: object) -> list[int]:
    valid = all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices)
    if not indices or not valid or len(set(indices)) != len(indices):
        raise _bad_gpus(original)
    return list(indices)


def _bad_gpus(gpus: object) -> LkflowError:
    return LkflowError(f"Received: gpus={gpus!r}. Expected {_ACCEPTED}.")


def trainer_device_kwargs(gpus: Gpus, trainer_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The `accelerator` and `devices` arguments for `pl.Trainer` that `gpus` asks for.

    `accelerator=` and `devices=` in `trainer_kwargs` pass through; `gpus=0` may be combined
    with `devices=N` for several CPU processes. A GPU request fails here, before any work,
    when CUDA is absent or has too few devices.

    Args:
        gpus: The user's `gpus` value (see `parse_gpus`).
        trainer_kwargs: The other keyword arguments bound for `pl.Trainer`.

    Returns:
        The keyword arguments to merge into the Trainer's.

    Raises:
        LkflowError: For a bad `gpus`, a conflicting `accelerator`, or GPUs that are not there.

    Example:
        >>> trainer_device_kwargs(0, {"devices": 2, "strategy": "ddp"})
        {'accelerator': 'cpu', 'devices': 2}
    """
    parsed = parse_gpus(gpus)
    accelerator = trainer_kwargs.get("accelerator")
    devices = trainer_kwargs.get("devices")
    if parsed is None:
        if accelerator is None and devices is None:
            return {"accelerator": "auto", "devices": 1}
        return {"accelerator": accelerator or "auto", "devices": devices or "auto"}
    if parsed == 0:
        if accelerator not in (None, "cpu"):
            raise LkflowError(
                f"Received: gpus=0 with accelerator={accelerator!r}. gpus=0 means the CPU; "
                "drop gpus= to choose the accelerator yourself."
            )
        return {"accelerator": "cpu", "devices": devices or 1}
    if accelerator not in (None, "gpu", "cuda") or devices is not None:
        raise LkflowError(
            f"Received: gpus={gpus!r} with accelerator={accelerator!r}, devices={devices!r}. "
            "Pass either gpus= or accelerator=/devices=, not both."
        )
    _require_cuda(gpus, parsed)
    return {"accelerator": "gpu", "devices": parsed}


def _require_cuda(gpus: Gpus, parsed: int | list[int]) -> None:
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if available == 0:
        raise LkflowError(
            f"Received: gpus={gpus!r}, but CUDA is not available on this machine "
            f"(torch {torch.__version__}). Run on the CPU with gpus=0."
        )
    wanted = max(parsed) + 1 if isinstance(parsed, list) else parsed
    if wanted > available:
        raise LkflowError(
            f"Received: gpus={gpus!r}, but this machine has {available} CUDA device(s). "
            f"Use gpus=-1 for all of them, or a count or indices below {available}."
        )
