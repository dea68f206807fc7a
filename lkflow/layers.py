"""A net's layers as a forward pass runs them: hooks on them for a block, which layer a pass
failed in, and what a layer expects of its input. The layer table (`lkflow.summary_table`) and
the first training step's error message both hook layers through `layer_hooks`."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from lkflow.errors import LkflowError

_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


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
    if isinstance(module, _CONVOLUTIONS):
        kind = type(module).__name__
        return f"{kind} expects in_channels={module.in_channels} in dimension 1"
    return ""


def first_layer(net: nn.Module) -> nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d | None:
    """The net's first Linear or convolution layer, whose input is the net's; None if none.

    Example:
        >>> first_layer(nn.Sequential(nn.ReLU(), nn.Linear(2, 6)))
        Linear(in_features=2, out_features=6, bias=True)
    """
    return next((m for m in net.modules() if isinstance(m, (nn.Linear, *_CONVOLUTIONS))), None)


@contextlib.contextmanager
def layer_hooks(
    modules: Iterable[tuple[str, nn.Module]],
    enter: Callable[[str, nn.Module, tuple[Any, ...]], None],
    leave: Callable[[str, nn.Module, Any], None],
) -> Iterator[None]:
    """Calls `enter(name, module, args)` as each of `modules` starts its forward pass and
    `leave(name, module, output)` as it returns, while the block runs; no hook is left after.

    Args:
        modules: `(name, module)` pairs, such as `net.named_modules()`.
        enter: Called before a module's forward, with its positional arguments.
        leave: Called after a module's forward, with its output.

    Example:
        >>> net, names = nn.Sequential(nn.Linear(2, 3), nn.ReLU()), []
        >>> with layer_hooks(net.named_children(), lambda n, m, a: names.append(n), print):
        ...     _ = net(torch.zeros(1, 2))  # doctest: +ELLIPSIS
        0 Linear(...) tensor(...)
        1 ReLU() tensor(...)
        >>> names
        ['0', '1']
    """
    handles = []
    for name, module in modules:
        handles.append(module.register_forward_pre_hook(functools.partial(_pre, enter, name)))
        handles.append(module.register_forward_hook(functools.partial(_post, leave, name)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _pre(enter: Callable[..., None], name: str, module: nn.Module, args: tuple[Any, ...]) -> None:
    enter(name, module, args)


def _post(
    leave: Callable[..., None], name: str, module: nn.Module, args: tuple[Any, ...], out: Any
) -> None:
    leave(name, module, out)


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

    def enter(name: str, module: nn.Module, args: tuple[Any, ...]) -> None:
        shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
        running.append((name, module, ", ".join(map(str, shapes)) or "()"))

    def leave(name: str, module: nn.Module, output: Any) -> None:
        running.pop()

    submodules = [(name, module) for name, module in net.named_modules() if name]
    try:
        with layer_hooks(submodules, enter, leave):
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
