"""Say which layer of a net a forward pass failed in, and what that layer expects."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lkflow.errors import LkflowError


def expected_input(module: nn.Module) -> str:
    """What a Linear or convolution layer expects of its input, or "" for other layers.

    Args:
        module: A layer.

    Returns:
        A phrase such as "Linear expects in_features=2 in the last dimension".

    Example:
        >>> expected_input(nn.Linear(2, 6))
        'Linear expects in_features=2 in the last dimension'
    """
    if isinstance(module, nn.Linear):
        return f"Linear expects in_features={module.in_features} in the last dimension"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        kind = type(module).__name__
        return f"{kind} expects in_channels={module.in_channels} in dimension 1"
    return ""


@contextlib.contextmanager
def naming_the_failing_layer(net: nn.Module) -> Iterator[None]:
    """Re-raises a `RuntimeError` from inside one of `net`'s layers as an error naming it.

    Hooks are on every submodule while the block runs, so use it for one step, not all.

    Args:
        net: The network whose forward pass runs inside the block.

    Raises:
        LkflowError: Naming the innermost layer that was running, the shapes it received, and
            what it expects; the original error is its cause.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 6))
        >>> with naming_the_failing_layer(net):  # doctest: +ELLIPSIS
        ...     net(torch.zeros(4, 3))
        Traceback (most recent call last):
        lkflow.errors.LkflowError: The net's layer '0' (Linear) failed on input of shape (4, 3)...
    """
    running: list[tuple[str, nn.Module, str]] = []
    handles = []
    for name, module in net.named_modules():
        if name:
            enter = functools.partial(_enter, running, name)
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(functools.partial(_leave, running)))
    try:
        yield
    except RuntimeError as err:
        if not running:
            raise
        name, module, shapes = running[-1]
        hint = expected_input(module)
        raise LkflowError(
            f"The net's layer {name!r} ({type(module).__name__}) failed on input of shape "
            f"{shapes}: {err}. {hint + '; m' if hint else 'M'}ake the data's shape match the "
            "net, or change the net."
        ) from err
    finally:
        for handle in handles:
            handle.remove()


def _enter(
    running: list[tuple[str, nn.Module, str]], name: str, module: nn.Module, args: Any
) -> None:
    shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
    running.append((name, module, ", ".join(map(str, shapes)) or "()"))


def _leave(
    running: list[tuple[str, nn.Module, str]], module: nn.Module, args: Any, out: Any
) -> None:
    running.pop()
