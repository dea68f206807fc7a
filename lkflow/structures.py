"""Structures of tensors that pass through a net: tensors alone or nested in tuples and dicts.

How they are moved, cut, joined, converted and named (`to_device`, `rows_of`, `head`, `concat`,
`to_numpy`, `names`), and `describe`, which writes a batch's layout, never its values, for error
messages. Which items of a batch are a net's inputs is lkflow/batches.py.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias, TypeVar, cast

import torch

from lkflow.errors import LkflowError

Structure: TypeAlias = "torch.Tensor | Sequence[Structure] | Mapping[str, Structure]"
"""Tensors, alone or nested in tuples, lists and dicts."""
S = TypeVar("S", bound=Structure)

_SHOWN = 8  # items of a tuple or dict that `describe` writes out


def to_device(structure: S, device: torch.device | str) -> S:
    """Every tensor of `structure` moved to `device`.

    Args:
        structure: Tensors, alone or in tuples, lists and dicts.
        device: Where to move them, such as `"cpu"` or `model.device`.

    Example:
        >>> to_device({"x": torch.ones(2)}, "cpu")["x"].device
        device(type='cpu')
    """
    return cast(S, _map(structure, lambda t, _: t.to(device)))


def rows_of(structure: Structure) -> int:
    """The number of rows: the leading dimension that every tensor of `structure` shares.

    Raises:
        LkflowError: When there is no tensor, a tensor has no dimension, or two disagree.

    Example:
        >>> rows_of((torch.ones(3, 4), {"ids": torch.ones(3, 7)}))
        3
    """
    leaves = _leaves(structure)
    if not leaves:
        raise LkflowError(
            f"Received: {describe(structure)}. Expected at least one tensor to count rows in."
        )
    rows = {path: _rows(path, tensor) for path, tensor in leaves}
    (first, count), *_ = rows.items()
    for path, other in rows.items():
        if other != count:
            raise LkflowError(
                f"Received: {describe(structure)}, with {count} rows in {first} and {other} in "
                f"{path}. Expected the same leading (batch) dimension in every tensor. Fix: "
                "yield tensors of one batch together, with the batch dimension first."
            )
    return count


def head(structure: S, n: int) -> S:
    """The first `n` rows of every tensor of `structure`, detached and cloned.

    Args:
        structure: Tensors, alone or in tuples, lists and dicts, with the batch dimension first.
        n: The rows to keep; fewer where a tensor has fewer.

    Example:
        >>> head((torch.arange(6).view(3, 2), torch.arange(3)), 2)[1]
        tensor([0, 1])
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise LkflowError(f"Received: n={n!r}. Expected an int >= 0, the rows to keep.")

    def first_rows(t: torch.Tensor, path: str) -> torch.Tensor:
        _rows(path, t)
        return t[:n].detach().clone()

    return cast(S, _map(structure, first_rows))


def concat(outputs: Sequence[S]) -> S:
    """Per-batch outputs of one structure as one, tensors concatenated along dim 0.

    Args:
        outputs: The net's output for each batch, in order: tensors, tuples or dicts of them.

    Returns:
        One output of the same structure, as the net would return on all the rows at once.

    Raises:
        LkflowError: When there are no outputs, or two batches' structures or shapes differ.

    Example:
        >>> out = concat([{"logits": torch.ones(2, 3)}, {"logits": torch.zeros(1, 3)}])
        >>> out["logits"].shape
        torch.Size([3, 3])
    """
    if isinstance(outputs, (torch.Tensor, Mapping)) or not outputs:
        raise LkflowError(
            f"Received: outputs: {describe(outputs)}. Expected a non-empty list of per-batch "
            "outputs. Fix: pass data with at least one batch."
        )
    return cast(S, _join(list(outputs), ""))


def to_numpy(structure: Structure) -> Any:
    """`structure` with every tensor a NumPy array on the CPU; bfloat16 becomes float32.

    Example:
        >>> to_numpy({"x": torch.ones(2)})
        {'x': array([1., 1.], dtype=float32)}
    """

    def convert(t: torch.Tensor, _: str) -> Any:
        t = t.detach().cpu()
        return (t.float() if t.dtype == torch.bfloat16 else t).numpy()

    return _map(structure, convert)


def names(structure: Structure, default: str = "input") -> list[str]:
    """The names of a flat structure's tensors, in order, as a signature names them.

    Args:
        structure: A tensor, or a tuple, list or dict of tensors (keys strings).
        default: The name of a lone tensor, and the stem of a tuple's names. Defaults to
            "input"; "output" suits a net's outputs.

    Returns:
        A dict's keys, `f"{default}_{i}"` for the items of a tuple or list, `[default]` for a
        tensor.

    Example:
        >>> names((torch.ones(1), torch.ones(1))), names(torch.ones(1), "output")
        (['input_0', 'input_1'], ['output'])
    """
    if isinstance(structure, torch.Tensor):
        return [default]
    if isinstance(structure, (Mapping, tuple, list)):
        values = structure.values() if isinstance(structure, Mapping) else structure
        if all(isinstance(value, torch.Tensor) for value in values):
            if not isinstance(structure, Mapping):
                return [f"{default}_{i}" for i in range(len(structure))]
            if all(isinstance(key, str) for key in structure):
                return list(structure)
    raise LkflowError(
        f"Received: {describe(structure)}. Expected a tensor, a tuple of tensors or a dict of "
        "tensors with string keys, to name each tensor. Fix: have the net take and return "
        "tensors, or flat tuples or dicts of them."
    )


def describe(batch: Any) -> str:
    """A short text of a batch's layout: types, keys, shapes and dtypes, never values.

    Example:
        >>> describe((torch.ones(64, 4), torch.ones(64).long()))
        'tuple of 2: Tensor(64, 4) float32, Tensor(64,) int64'
        >>> describe({"input_ids": torch.ones(8, 16).long(), "text": ["a"] * 8})
        'dict: input_ids Tensor(8, 16) int64, text list of 8 str'
    """
    return _describe(batch, 0)


def _map(structure: Any, fn: Callable[[torch.Tensor, str], Any], path: str = "") -> Any:
    """`structure` with `fn(tensor, path)` in place of each tensor; tuples stay tuples."""
    if isinstance(structure, torch.Tensor):
        return fn(structure, path or "the tensor")
    if isinstance(structure, Mapping):
        return {k: _map(v, fn, f"{path}[{k!r}]") for k, v in structure.items()}
    if isinstance(structure, (tuple, list)):
        return _like(structure, [_map(v, fn, f"{path}[{i}]") for i, v in enumerate(structure)])
    raise LkflowError(
        f"Received: {describe(structure)} at {path or 'the top'}. Expected tensors, alone or in "
        "tuples, lists and dicts. Fix: keep other values out of the net's inputs and outputs."
    )


def _like(like: Sequence[Any], items: list[Any]) -> Any:
    """`items` in the sequence type of `like`: a list, a tuple or a named tuple."""
    if isinstance(like, list):
        return items
    return type(like)(*items) if hasattr(like, "_fields") else tuple(items)


def _leaves(structure: Any) -> list[tuple[str, torch.Tensor]]:
    leaves: list[tuple[str, torch.Tensor]] = []
    _map(structure, lambda t, path: leaves.append((path, t)))
    return leaves


def _rows(path: str, tensor: torch.Tensor) -> int:
    if tensor.dim() == 0:
        raise LkflowError(
            f"Received: a 0-dim tensor at {path}. Expected a leading batch dimension, one row per "
            "example. Fix: give every tensor the batch dimension first: per-example values, not "
            "a batch mean."
        )
    return int(tensor.shape[0])


def _join(parts: list[Any], path: str) -> Any:
    first = parts[0]
    for i, part in enumerate(parts):
        if not _same_layout(first, part):
            raise LkflowError(
                f"Received: outputs whose batch {i} is {describe(part)}"
                f"{f' at {path}' if path else ''} where batch 0 is {describe(first)}. Expected "
                "one structure, and one shape past the first dimension, from every batch. Fix: "
                "make the net return the same structure, padded to one shape, for every batch."
            )
    if isinstance(first, torch.Tensor):
        for part in parts:
            _rows(path or "the output", part)
        return torch.cat(parts)
    if isinstance(first, Mapping):
        return {k: _join([part[k] for part in parts], f"{path}[{k!r}]") for k in first}
    if isinstance(first, (tuple, list)):
        items = [_join([part[i] for part in parts], f"{path}[{i}]") for i in range(len(first))]
        return _like(first, items)
    return _map(first, lambda t, _: t)  # raises: not a structure of tensors


def _same_layout(a: Any, b: Any) -> bool:
    """Whether `b` is what `a` is at the top: a tensor of its trailing shape, a dict of its keys,
    a sequence of its length."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape[1:] == b.shape[1:]
    if isinstance(a, Mapping):
        return isinstance(b, Mapping) and a.keys() == b.keys()
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b)
    return True


def _describe(value: Any, depth: int) -> str:
    if isinstance(value, torch.Tensor) or (hasattr(value, "shape") and hasattr(value, "dtype")):
        dtype = str(value.dtype).removeprefix("torch.")
        return f"{type(value).__name__}{tuple(value.shape)} {dtype}"
    if isinstance(value, (Mapping, tuple, list)):
        kind = type(value).__name__
        if not value:
            return f"empty {kind}"
        if depth >= 2:
            return f"{kind} of {len(value)}"
        if depth and not isinstance(value, Mapping) and not any(map(_is_structure, value)):
            types = {type(v).__name__ for v in value}  # strings or ints: their type, not values
            return f"{kind} of {len(value)}" + (f" {types.pop()}" if len(types) == 1 else "")
        if isinstance(value, Mapping):
            items = [
                f"{k if isinstance(k, str) else repr(k)} {_describe(v, depth + 1)}"
                for k, v in list(value.items())[:_SHOWN]
            ]
            text = f"{kind}: " if depth == 0 else f"{kind}("
        else:
            items = [_describe(v, depth + 1) for v in list(value)[:_SHOWN]]
            text = f"{kind} of {len(value)}: " if depth == 0 else f"{kind} of {len(value)} ("
        text += ", ".join(items) + (", ..." if len(value) > _SHOWN else "")
        return text if depth == 0 else text + ")"
    return type(value).__name__


def _is_structure(value: Any) -> bool:
    return isinstance(value, (torch.Tensor, Mapping, tuple, list))
