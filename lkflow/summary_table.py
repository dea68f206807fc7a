"""Keras-style layer table of a PyTorch model, in the layout of torchsummary.

``summary(net, input_shape=(2,))`` runs one forward pass with hooks on the leaf modules and prints::

    ----------------------------------------------------------------
            Layer (type)               Output Shape         Param #
    ================================================================
                Linear-1                    [-1, 4]              12
                Linear-2                    [-1, 8]              40
                Linear-3                    [-1, 1]               9
    ================================================================
    Total params: 61
    ...
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lkflow.batches import Inputs, call_net
from lkflow.errors import LkflowError
from lkflow.layers import first_layer, layer_hooks
from lkflow.structures import describe, to_device

_MB = 1024**2
# Rows fed to the forward pass for input_shape: 2 like torchsummary, so batch statistics exist.
_RUN_BATCH = 2
# What a forward pass raises on a wrong input: shape mismatch, wrong arguments, bad indices.
_FORWARD_ERRORS = (RuntimeError, TypeError, IndexError, ValueError)

Shape = list[int]


@dataclass(frozen=True)
class LayerRow:
    """One call of a leaf module in the forward pass."""

    name: str  # class name and position in the forward pass, e.g. "Linear-1"
    type: str  # the module's class name, e.g. "Linear"
    output_shape: Shape | list[Shape]  # one shape, or one per output tensor of a tuple/dict output
    params: int  # parameters this call reaches first (a shared module counts them once)


@dataclass(frozen=True)
class Summary:
    """Layer table and totals returned by :func:`summary`; ``str()`` renders the table."""

    layers: list[LayerRow]
    total_params: int  # every parameter of the model, counted once
    trainable_params: int  # of those, the ones with requires_grad
    non_trainable_params: int  # frozen ones; buffers (BatchNorm statistics) are not parameters
    input_size_mb: float  # one input batch
    forward_backward_size_mb: float  # layer outputs x2 (activations and their gradients)
    params_size_mb: float  # parameter storage

    @property
    def total_size_mb(self) -> float:
        """Estimated total size in MB: input + forward/backward pass + parameters."""
        return self.input_size_mb + self.forward_backward_size_mb + self.params_size_mb

    def __str__(self) -> str:
        name_width = max([20] + [len(row.name) for row in self.layers])
        shape_width = max([25] + [len(str(row.output_shape)) for row in self.layers])
        width = name_width + shape_width + 19  # torchsummary: 20 + 25 + 19 = 64
        rule, double_rule = "-" * width, "=" * width
        header = f"{'Layer (type)':>{name_width}}  {'Output Shape':>{shape_width}} {'Param #':>15}"
        lines = [rule, header, double_rule]
        for row in self.layers:
            shape = str(row.output_shape)
            lines.append(f"{row.name:>{name_width}}  {shape:>{shape_width}} {row.params:>15,}")
        lines += [
            double_rule,
            f"Total params: {self.total_params:,}",
            f"Trainable params: {self.trainable_params:,}",
            f"Non-trainable params: {self.non_trainable_params:,}",
            rule,
            f"Input size (MB): {self.input_size_mb:0.6f}",
            f"Forward/backward pass size (MB): {self.forward_backward_size_mb:0.6f}",
            f"Params size (MB): {self.params_size_mb:0.6f}",
            f"Estimated Total Size (MB): {self.total_size_mb:0.6f}",
            rule,
        ]
        return "\n".join(lines)


@dataclass
class _Trace:
    """What the hooks record during the forward pass."""

    batch: int | None  # leading dim to show as display_batch; None shows real shapes
    display_batch: int
    rows: list[LayerRow] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)  # id() of parameters already counted in a row
    running: list[str] = field(default_factory=list)  # labels of hooked modules now running
    output_bytes: int = 0

    def enter(self, path: str, module: nn.Module, args: tuple[Any, ...]) -> None:
        """Note that the forward of `module` is running, to name it if it fails."""
        kind = type(module).__name__
        self.running.append(f"'{path}' ({kind})" if path else kind)

    def record(self, path: str, module: nn.Module, output: Any) -> None:
        """Append the row of one finished module call."""
        self.running.pop()
        tensors = _tensors(output)
        shapes = [_shown_shape(tensor, self) for tensor in tensors]
        own = [p for p in module.parameters(recurse=False) if id(p) not in self.seen]
        self.seen.update(id(p) for p in own)
        self.output_bytes += sum(
            math.prod(abs(d) for d in shape) * tensor.element_size()
            for shape, tensor in zip(shapes, tensors, strict=True)
        )
        kind = type(module).__name__
        self.rows.append(
            LayerRow(
                name=f"{kind}-{len(self.rows) + 1}",
                type=kind,
                output_shape=shapes[0] if len(shapes) == 1 else shapes,
                params=sum(p.numel() for p in own),
            )
        )


def summary(
    model: nn.Module,
    input_shape: tuple[int, ...] | None = None,
    *,
    input_data: Inputs | None = None,
    batch_size: int = -1,
    dtype: torch.dtype = torch.float32,
    print_fn: Callable[[str], Any] | None = print,
) -> Summary:
    """Run one forward pass of ``model`` and print its layer table with parameter counts and sizes.

    The pass runs in eval mode without gradients on the model's device; each module's train/eval
    mode is restored afterwards. A row is one call of a leaf module (or of a module holding its
    own parameters); modules created inside ``forward`` are not seen. Totals count every parameter
    of the model once, so they hold for shared layers and for a LightningModule wrapping a net as
    ``.net``. Only a leading dimension equal to the batch is shown as the batch size.

    Args:
        model: Any ``nn.Module``: a bare net, or a LightningModule wrapping one as ``.net``.
        input_shape: Shape of one sample without the batch dimension, e.g. ``(2,)`` or
            ``(3, 32, 32)``; a random batch of 2 such samples is fed. Defaults to None (then pass
            ``input_data``).
        input_data: A real input batch, fed as is: a tensor (``model(x)``), a tuple
            (``model(*x)``) or a dict of tensors (``model(**x)``), as ``LightModel.example_input``
            returns; the table then shows its real shapes. Defaults to None.
        batch_size: Batch size shown as the leading output dimension and used for the size estimates
            with ``input_shape``; -1 shows ``-1`` and sizes for one sample. Defaults to -1.
        dtype: Dtype of the random input built from ``input_shape``, e.g. ``torch.long`` for an
            ``nn.Embedding``. Defaults to ``torch.float32``.
        print_fn: Called with the rendered table; None prints nothing. Defaults to ``print``.

    Returns:
        The :class:`Summary`; ``str(result)`` is the printed table.

    Raises:
        LkflowError: Neither or both of ``input_shape`` and ``input_data`` given, a malformed
            ``input_shape`` or ``batch_size``, or a forward pass that fails on the input (the
            message names the failing layer).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
        >>> summary(net, input_shape=(2,), print_fn=None).total_params
        17
    """
    inputs, trace, input_bytes = _prepare_input(model, input_shape, input_data, batch_size, dtype)
    _traced_forward(model, inputs, trace, input_shape)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result = Summary(
        layers=trace.rows,
        total_params=total,
        trainable_params=trainable,
        non_trainable_params=total - trainable,
        input_size_mb=input_bytes / _MB,
        forward_backward_size_mb=2 * trace.output_bytes / _MB,
        params_size_mb=sum(p.numel() * p.element_size() for p in model.parameters()) / _MB,
    )
    if print_fn is not None:
        print_fn(str(result))
    return result


def layer_table(net: nn.Module, example: Inputs | None) -> str:
    """The layer table of `net` run on `example`, a batch of its inputs of any structure (a
    tensor, a tuple or a dict of tensors, as `LightModel.example_input` returns), with the
    example's own shapes; "" without an example. Errors as in `summary`.

    Example:
        >>> net = nn.Bilinear(2, 3, 1)
        >>> "Bilinear-1" in layer_table(net, (torch.ones(4, 2), torch.ones(4, 3)))
        True
    """
    if example is None:
        return ""
    return str(summary(net, input_data=example, print_fn=None))


def _prepare_input(
    model: nn.Module,
    input_shape: tuple[int, ...] | None,
    input_data: Inputs | None,
    batch_size: int,
    dtype: torch.dtype,
) -> tuple[Inputs, _Trace, int]:
    """Input batch on the model's device, an empty trace, and the input size in bytes."""
    if batch_size != -1 and batch_size < 1:
        raise LkflowError(
            f"batch_size must be -1 (shown as -1) or a positive int; "
            f"received batch_size={batch_size}."
        )
    device = _device(model)
    if input_data is None:
        shape = _checked_shape(input_shape)
        inputs = torch.rand(_RUN_BATCH, *shape, device=device).to(dtype)
        input_bytes = math.prod(shape) * abs(batch_size) * dtype.itemsize
        return inputs, _Trace(_RUN_BATCH, batch_size), input_bytes
    if input_shape is None:
        data = to_device(input_data, device)
        size = sum(t.numel() * t.element_size() for t in _tensors(data))
        return data, _Trace(None, batch_size), size
    raise LkflowError(
        f"summary() takes input_shape or input_data, not both; received "
        f"input_shape={input_shape!r} and input_data {describe(input_data)}. "
        f"Pass only one of them."
    )


def _checked_shape(input_shape: Sequence[int] | None) -> tuple[int, ...]:
    """``input_shape`` as a tuple of positive ints, or an error saying how to fix it."""
    if input_shape is None:
        raise LkflowError(
            "summary() needs an input to run the model on: pass input_shape, the shape of one "
            "sample without the batch dimension (e.g. input_shape=(2,)), or input_data, a real "
            "input batch."
        )
    is_shape = isinstance(input_shape, Sequence) and all(
        isinstance(d, int) and d > 0 for d in input_shape
    )
    if not is_shape:
        raise LkflowError(
            f"input_shape must be a tuple of positive ints, the shape of one sample without the "
            f"batch dimension; received input_shape={input_shape!r}. For example input_shape=(2,) "
            f"or (3, 32, 32)."
        )
    return tuple(input_shape)


def _device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer; CPU for a model without either."""
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return torch.device("cpu") if first is None else first.device


def _traced_forward(model: nn.Module, inputs: Inputs, trace: _Trace, input_shape: Any) -> None:
    """Call ``model`` with ``inputs`` (a tensor, tuple or dict, as ``call_net`` does) in eval mode
    under no_grad, hooks recording rows into ``trace``."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with layer_hooks(_table_layers(model), trace.enter, trace.record), torch.no_grad():
            call_net(model, inputs)
    except _FORWARD_ERRORS as err:
        raise LkflowError(_forward_error(model, inputs, trace, input_shape, err)) from err
    finally:
        for module, training in modes.items():
            module.training = training


def _table_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The leaf modules, and modules holding parameters of their own: a row per call."""
    return [
        (path, module)
        for path, module in model.named_modules()
        if next(module.children(), None) is None
        or next(module.parameters(recurse=False), None) is not None
    ]


def _tensors(output: Any) -> list[torch.Tensor]:
    """Tensors in a module output, in order, looking into tuples, lists and dicts."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [tensor for item in output for tensor in _tensors(item)]
    return []


def _shown_shape(tensor: torch.Tensor, trace: _Trace) -> Shape:
    """Shape of ``tensor`` with a leading batch dimension replaced by the batch size to display."""
    shape = list(tensor.shape)
    if trace.batch is not None and shape and shape[0] == trace.batch:
        shape[0] = trace.display_batch
    return shape


def _forward_error(
    model: nn.Module, inputs: Inputs, trace: _Trace, input_shape: Any, err: Exception
) -> str:
    """Message for a failed forward pass: the input, the failing layer, the cause, and the fix."""
    given = f"input_shape={input_shape!r}" if input_shape is not None else "input_data"
    if trace.running:
        where = f"in layer {trace.running[-1]}"
    elif trace.rows:
        where = f"in the model's forward code after layer {trace.rows[-1].name}"
    else:
        where = "before the first layer"
    return (
        f"summary() could not run the model on {given} (a batch "
        f"{describe(inputs)}): it failed {where} with {type(err).__name__}: {err}. "
        f"Pass input_shape as the shape of one sample without the batch dimension, matching "
        f"the model's first layer{_first_layer_hint(model)}, or pass input_data=<a real input "
        f"batch>."
    )


def _first_layer_hint(model: nn.Module) -> str:
    """Suggested input_shape from the model's first Linear or Conv layer, or "" if none."""
    first = first_layer(model)
    if isinstance(first, nn.Linear):
        features = first.in_features
        return f" (first Linear: in_features={features}, so input_shape=({features},))"
    if first is not None:
        spatial = {1: "L", 2: "H, W", 3: "D, H, W"}[len(first.kernel_size)]
        channels = first.in_channels
        return f" (first conv: in_channels={channels}, so input_shape=({channels}, {spatial}))"
    return ""
