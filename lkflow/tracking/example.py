"""The served net's input example: a few rows of what the net takes, taken once, from the first
training batch.

    example = input_example(pl_module, batch, given=None)  # at the first training batch

What the net takes is the first of:
1. `MLflowCallback(example_input=fn)`: `fn(batch)`;
2. the module's own `example_input(batch)` (an lkflow.LightModel's: its `inputs` and `target`);
3. the module's `example_input_array`, as Lightning reads it (a tensor is `net(x)`, a tuple
   `net(*x)`, a dict `net(**x)`), when it is set;
4. the batch rule of lkflow/batches.py (`inputs_of`): a tensor alone; `x` of `(x, y)`;
   `(x1, ..., xn)` of `(x1, ..., xn, y)`; a dict without its target key ("y", "target",
   "targets", "label" or "labels").

It must be a tensor, a tuple or a dict of tensors; its first rows (five at most) are the example,
and an example of one row is taken twice, so that the exported net keeps a batch dimension
(torch.export fixes a dimension it sees at 1). A batch that fits no rule gives no example: the
fit goes on, and at its end the model is logged without being registered, with one warning
saying how to give one. The rows stay on the batch's device until the fit's end: nothing is
read back to the host while training.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from lkflow.batches import head, inputs_of
from lkflow.errors import LkflowError

if TYPE_CHECKING:
    import pytorch_lightning as pl

    from lkflow.batches import Inputs

EXAMPLE_ROWS = 5  # rows of the first training batch kept as the model's input example


def input_example(
    pl_module: pl.LightningModule, batch: Any, given: Callable[[Any], Any] | None = None
) -> Inputs | None:
    """A few rows of what the served net takes, by the rule of the module's docstring; None when
    the batch fits no rule or what it gives is not made of tensors.

    Args:
        pl_module: The module being fitted.
        batch: The first training batch.
        given: `MLflowCallback(example_input=...)`, a function of the batch. Defaults to None.

    Raises:
        Exception: What `given` or the module's `example_input` raise, other than an
            `LkflowError` (a batch that fits no rule): a mistake in the user's function fails
            the fit at its first batch, before any run is created.

    Example:
        >>> x, y = torch.randn(64, 2), torch.ones(64, 1)
        >>> input_example(module, (x, y)).shape  # a module without example_input_array
        torch.Size([5, 2])
    """
    own = getattr(pl_module, "example_input", None)
    array = getattr(pl_module, "example_input_array", None)
    try:
        if given is not None:
            inputs = given(batch)
        elif callable(own):
            inputs = own(batch)
        elif array is not None:
            inputs = array
        else:
            inputs = inputs_of(batch)
        rows = head(tuple(inputs) if isinstance(inputs, list) else inputs, EXAMPLE_ROWS)
    except LkflowError:
        return None  # no example: the model is logged, not registered, with a warning at the end
    return _two_rows_at_least(rows)


def _two_rows_at_least(rows: Inputs) -> Inputs:
    """`rows`, or its one row taken twice."""
    import torch

    if isinstance(rows, torch.Tensor):
        return torch.cat([rows, rows]) if rows.ndim and rows.shape[0] == 1 else rows
    tensors = list(rows.values()) if isinstance(rows, Mapping) else list(rows)
    if not tensors or any(t.ndim == 0 or t.shape[0] != 1 for t in tensors):
        return rows
    if isinstance(rows, Mapping):
        return {key: torch.cat([t, t]) for key, t in rows.items()}
    return tuple(torch.cat([t, t]) for t in rows)
