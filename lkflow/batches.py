"""Batches and the structures of tensors that pass through a net.

Which items of a batch are the net's inputs and which its target (`split_batch`, `inputs_of`),
how the net is called with them (`call_net`), and how tensors nested in tuples and dicts are
moved, cut, joined, converted and named (`to_device`, `rows_of`, `head`, `concat`, `to_numpy`,
`names`). `describe` writes a batch's layout, never its values, for error messages.

The default rule, `target="auto"`:
- a tensor alone is the inputs, with no target;
- a tuple or list `(x, y)` is inputs `x` and target `y`; `(x1, ..., xn, y)` is inputs
  `(x1, ..., xn)`, passed to the net as positional arguments, and target `y`;
- a dict takes its target from the first of the keys "y", "target", "targets", "label", "labels"
  that it holds, and passes every other item to the net by name, as `net(**inputs)`.
`target=` names another item (an index, a key) or None for no target; `inputs=` picks the inputs:
a list of indices or keys gives a tuple or dict of them, one index or key that item alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias, TypeVar, cast

import torch

from lkflow.errors import LkflowError

Inputs: TypeAlias = torch.Tensor | tuple[torch.Tensor, ...] | dict[str, torch.Tensor]
"""What a net takes: a tensor (`net(x)`), a tuple (`net(*x)`) or a dict (`net(**x)`)."""
Structure: TypeAlias = "torch.Tensor | Sequence[Structure] | Mapping[str, Structure]"
"""Tensors, alone or nested in tuples, lists and dicts."""
Choice: TypeAlias = int | str
S = TypeVar("S", bound=Structure)

TARGET_KEYS = ("y", "target", "targets", "label", "labels")
_SHOWN = 8  # items of a tuple or dict that `describe` writes out


def split_batch(
    batch: Any, *, inputs: Choice | Sequence[Choice] | None = None, target: Choice | None = "auto"
) -> tuple[Inputs, Any]:
    """The net's inputs and the target in one batch, by the default rule or the given choice.

    Args:
        batch: One batch from a DataLoader: a tensor, a tuple or list, or a dict.
        inputs: The items that are the net's inputs: indices of a tuple or keys of a dict; a list
            gives a tuple or dict of them, one index or key that item alone. Defaults to None,
            every item that is not the target.
        target: The target's index or key, None for no target, or "auto" for the default rule
            (the last item of a tuple, the first of `TARGET_KEYS` in a dict). Defaults to "auto".

    Returns:
        `(inputs, target)`; the target is None for a tensor alone or with `target=None`.

    Raises:
        LkflowError: When the batch fits neither the rule nor the choice; the message shows the
            batch's layout and the fixes.

    Example:
        >>> x_num, x_cat, y = torch.ones(4, 3), torch.zeros(4, 2).long(), torch.ones(4)
        >>> (a, b), target = split_batch((x_num, x_cat, y))
        >>> inputs, labels = split_batch({"input_ids": x_cat, "attention_mask": x_cat, "labels": y})
        >>> sorted(inputs), labels is y
        (['attention_mask', 'input_ids'], True)
    """
    return _split(batch, inputs, target, need_target=True)


def inputs_of(
    batch: Any, *, inputs: Choice | Sequence[Choice] | None = None, target: Choice | None = "auto"
) -> Inputs:
    """The net's inputs in a batch, as `split_batch` finds them, for predicting.

    A batch without a target is inputs whole here: a dict that holds no target key, a tuple of
    one item, a tuple shorter than a `target` index. Arguments as in `split_batch`.

    Example:
        >>> ids = torch.zeros(2, 5).long()
        >>> sorted(inputs_of({"input_ids": ids, "attention_mask": ids}))
        ['attention_mask', 'input_ids']
    """
    return _split(batch, inputs, target, need_target=False)[0]


def call_net(net: Callable[..., Any], inputs: Inputs) -> Any:
    """Calls `net` with `inputs`: `net(x)` for a tensor, `net(*x)` a tuple, `net(**x)` a dict.

    Example:
        >>> call_net(torch.add, (torch.ones(2), torch.ones(2)))
        tensor([2., 2.])
    """
    if isinstance(inputs, torch.Tensor):
        return net(inputs)
    if isinstance(inputs, Mapping):
        return net(**inputs)
    if isinstance(inputs, (tuple, list)):
        return net(*inputs)
    raise LkflowError(
        f"Received: inputs {describe(inputs)}. Expected a tensor, a tuple or a dict of tensors. "
        "Fix: take them from split_batch(batch) or inputs_of(batch)."
    )


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


def _split(
    batch: Any, inputs: Choice | Sequence[Choice] | None, target: Choice | None, need_target: bool
) -> tuple[Inputs, Any]:
    if isinstance(batch, torch.Tensor):
        if inputs is None and (target in ("auto", None) or not need_target):
            return batch, None
        raise _no_fit(batch, "A tensor alone holds no items to choose inputs or a target from.")
    if isinstance(batch, Mapping):
        if not all(isinstance(key, str) for key in batch):
            raise _no_fit(batch, "Expected a dict with string keys, the names of the net's inputs.")
        positions: list[Any] = list(batch)
        auto = next((key for key in TARGET_KEYS if key in batch), None)
        expected = f"Expected a target under one of the keys {', '.join(map(repr, TARGET_KEYS))}."
    elif isinstance(batch, (tuple, list)):
        positions = list(range(len(batch)))
        auto = positions[-1] if len(positions) >= 2 else None
        expected = "Expected (x, y) or (x1, ..., xn, y): at least 2 items, the target last."
    else:
        raise _no_fit(batch, "Expected a tensor, a tuple or list, or a dict.")
    if target == "auto":
        if auto is None and need_target:
            raise _no_fit(batch, expected)
        t = auto
    else:
        t = None if target is None else _position(batch, "target", target, need_target)
    if inputs is None:
        chosen = [position for position in positions if position != t]
        alone = len(chosen) == 1 and not isinstance(batch, Mapping)
    else:
        alone = isinstance(inputs, (int, str))
        picks = [inputs] if isinstance(inputs, (int, str)) else list(inputs)
        chosen = [_position(batch, "inputs", pick, True) for pick in picks]
        if t is not None and t in chosen:
            given = f"inputs={inputs!r} with target={target!r}"
            raise _no_fit(batch, f"Expected the target {t!r} outside the inputs.", given)
    if not chosen:
        raise _no_fit(batch, "Expected at least one item left for the net's inputs.")
    target_value = None if t is None else batch[t]
    if alone:
        return _one_input(batch, chosen[0]), target_value
    for position in chosen:
        if not isinstance(batch[position], torch.Tensor):
            raise _no_fit(batch, f"Expected tensors as the net's inputs; {position!r} is not one.")
    if isinstance(batch, Mapping):
        return {key: batch[key] for key in chosen}, target_value
    return tuple(batch[i] for i in chosen), target_value


def _position(batch: Any, what: str, choice: Any, strict: bool) -> Any:
    """`choice` as a key of a dict batch or a non-negative index of a tuple.

    A key or index that the batch lacks is None unless `strict`; a choice of the wrong kind
    always raises.
    """
    if isinstance(batch, Mapping):
        if isinstance(choice, str) and choice in batch:
            return choice
        kind_fits = isinstance(choice, str)
        accepted = f"one of its keys {', '.join(map(repr, batch))}"
    else:
        n = len(batch)
        if type(choice) is int and -n <= choice < n:
            return choice % n
        kind_fits = type(choice) is int
        accepted = f"an index from {-n} to {n - 1}" if n else "no index: the batch is empty"
    if kind_fits and not strict:
        return None
    raise _no_fit(batch, f"Expected {accepted}.", f"{what}={choice!r}")


def _one_input(batch: Any, position: Any) -> Inputs:
    """One item as the net's inputs: a tensor, or a tuple or dict of tensors."""
    value = batch[position]
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and all(isinstance(v, torch.Tensor) for v in value):
        return tuple(value)
    if isinstance(value, Mapping) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()
    ):
        return dict(value)
    raise _no_fit(
        batch, f"Expected the input {position!r} to be a tensor, or a tuple or dict of tensors."
    )


def _no_fit(batch: Any, expected: str, given: str = "") -> LkflowError:
    return LkflowError(
        f"Received: {given + ' for ' if given else ''}a batch {describe(batch)}. {expected} Fix: "
        "pass target= (the index or key of the target, None for none) and inputs=[...] (the "
        "indices or keys of the net's inputs) to LightModel, or override shared_step(batch) to "
        "unpack such batches yourself."
    )


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
