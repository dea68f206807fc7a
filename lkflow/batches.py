"""Batches: which items are the net's inputs and which its target, and how the net takes them.

`split_batch` and `inputs_of` find the inputs (and the target) in a batch; `call_net` calls the
net with them. The structure helpers (`to_device`, `rows_of`, `head`, `concat`, `to_numpy`,
`names`, `describe`) live in lkflow/structures.py and are importable from here too.

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
from typing import Any, TypeAlias

import torch

from lkflow.errors import LkflowError
from lkflow.structures import (
    Structure,
    concat,
    describe,
    head,
    names,
    rows_of,
    to_device,
    to_numpy,
)

__all__ = [
    "TARGET_KEYS",
    "Choice",
    "Inputs",
    "Structure",
    "call_net",
    "concat",
    "describe",
    "head",
    "inputs_of",
    "names",
    "rows_of",
    "split_batch",
    "to_device",
    "to_numpy",
]

Inputs: TypeAlias = torch.Tensor | tuple[torch.Tensor, ...] | dict[str, torch.Tensor]
"""What a net takes: a tensor (`net(x)`), a tuple (`net(*x)`) or a dict (`net(**x)`)."""
Choice: TypeAlias = int | str

TARGET_KEYS = ("y", "target", "targets", "label", "labels")


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
