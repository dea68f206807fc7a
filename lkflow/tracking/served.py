"""The served model of a net with several inputs or outputs: its torch.export program as a pyfunc.

MLflow's pytorch flavor takes one array in and gives one tensor out. A net that takes several
tensors (by position or by name) or returns a tuple or a dict of them is saved instead as an
MLflow models-from-code pyfunc model: the net's torch.export program, exported with one dynamic
batch dimension, and a small self-contained loader (served_model.py, torch, numpy and mlflow
only), with a signature of named tensors:

    if served_flavor(example, net_outputs(net, example)) == "pyfunc":
        save_structured_model(net, example, path, pip_requirements=["mlflow==3.17.2", ...])
        reason = answers_its_example(path, example, net_outputs(net, example))

so that `mlflow models serve -m path` answers `{"inputs": {"x_num": [[...]], "x_cat": [...]}}`
and `{"dataframe_split": {"columns": ["x_num", "x_cat"], "data": [[[...], 2], ...]}}` with
`{"predictions": {"logits": [...], "prob": [...]}}`.

The names: a dict example's keys; a tuple example's forward parameter names (`x_num`, `x_cat`),
or `input_0`, `input_1`, ... where the forward does not name them. Outputs: a dict's keys, a named
tuple's fields, a tuple's `output_0`, `output_1`, ...; a single tensor output is one unnamed array.
Requests are cast to each input's dtype (the example's); bfloat16 is float32 in the signature.
"""

from __future__ import annotations

import inspect
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

from lkflow.batches import names as batch_names
from lkflow.batches import to_numpy
from lkflow.errors import LkflowError

if TYPE_CHECKING:
    import torch
    from mlflow.models import Model
    from torch import nn

    Example: TypeAlias = "torch.Tensor | tuple[torch.Tensor, ...] | dict[str, torch.Tensor]"
    Output: TypeAlias = "torch.Tensor | tuple[torch.Tensor, ...] | dict[str, torch.Tensor]"

LOADER = Path(__file__).with_name("served_model.py")
"""The models-from-code file that loads the program, copied into every saved model."""

RTOL, ATOL = 1e-4, 1e-5
"""How far the served outputs may be from the net's own (the program may fuse operations)."""


def served_flavor(example: Example, output: Output) -> Literal["pytorch", "pyfunc"]:
    """Which MLflow flavor serves a net called on `example` that returned `output`.

    Args:
        example: What the net takes: a tensor, a tuple of tensors (positional inputs) or a dict
            of name -> tensor (keyword inputs).
        output: What the net returned for it.

    Returns:
        "pytorch" for one tensor in and one tensor out (MLflow's pytorch flavor, one array in
        and one out), "pyfunc" for every other net (`save_structured_model`).

    Example:
        >>> served_flavor(torch.zeros(2, 3), torch.zeros(2, 1))
        'pytorch'
    """
    import torch

    one_in = isinstance(example, torch.Tensor)
    return "pytorch" if one_in and isinstance(output, torch.Tensor) else "pyfunc"


def net_outputs(net: nn.Module, example: Example) -> Output:
    """What `net` returns for `example` under no_grad: a tuple is passed by position, a dict by
    name.

    Example:
        >>> net_outputs(TwoInputs(), (x_num, x_cat))  # net(x_num, x_cat)
        {'logits': tensor(...), 'prob': tensor(...)}
    """
    import torch

    args, kwargs = _call(example)
    with torch.no_grad():
        output: Output = net(*args, **kwargs)
    return output


def save_structured_model(
    net: nn.Module,
    example: Example,
    path: str | Path,
    *,
    pip_requirements: list[str],
    mlflow_model: Model | None = None,
) -> None:
    """Saves `net` at `path` as a pyfunc model of its torch.export program, with named inputs
    and outputs, that serves any number of rows.

    The net is exported in eval mode (its mode is restored after) on `example`'s rows, with one
    batch dimension shared by all inputs; an example of one row is repeated to two, since
    torch.export fixes a dimension it sees at 1.

    Args:
        net: The net, on CPU.
        example: What the net takes, a few rows of a real batch: a tensor, a tuple of tensors
            (positional inputs) or a dict of name -> tensor (keyword inputs), all of the same
            number of rows. Saved as the model's input example.
        path: The folder to save the model in; it must not exist yet.
        pip_requirements: The model's requirements, as written (MLflow infers none).
        mlflow_model: The MLflow `Model` to save into (its run id, for one). Defaults to a new
            one.

    Raises:
        LkflowError: `example` is not made of tensors with a batch dimension, the net is not on
            CPU, or torch.export cannot export it with a dynamic batch dimension (the reason and
            the fix are in the message).

    Example:
        >>> save_structured_model(net, (x_num[:4], x_cat[:4]), "model", pip_requirements=reqs)
        >>> mlflow.pyfunc.load_model("model").predict({"x_num": ..., "x_cat": ...})
        {'logits': array(...), 'prob': array(...)}
    """
    import mlflow.pyfunc
    import torch

    named = _named_inputs(net, example)
    device = next((t.device for t in [*net.parameters(), *net.buffers()]), torch.device("cpu"))
    if device.type != "cpu":
        raise LkflowError(
            f"Received: a {type(net).__name__} on {device}. Expected a net on CPU, whose "
            "program loads where the model is served. Fix: pass a CPU copy, "
            "copy.deepcopy(net).cpu()."
        )
    program = _export(net, named, isinstance(example, Mapping))
    output = _call_program(program, named, isinstance(example, Mapping))
    outputs = _named_outputs(output)
    config = {
        "inputs": [
            {"name": name, "dtype": _dtype_name(t), "shape": list(t.shape[1:])}
            for name, t in named.items()
        ],
        "keywords": isinstance(example, Mapping),
        "outputs": None if isinstance(output, torch.Tensor) else list(outputs),
    }
    with tempfile.TemporaryDirectory() as folder:
        program_path = Path(folder) / "program.pt2"
        torch.export.save(program, program_path)
        mlflow.pyfunc.save_model(
            str(path),
            python_model=str(LOADER),
            artifacts={"program": str(program_path)},
            model_config=config,
            signature=_signature(named, outputs, named_outputs=config["outputs"] is not None),
            input_example={name: to_numpy(t) for name, t in named.items()},
            pip_requirements=pip_requirements,
            mlflow_model=mlflow_model,
        )


def answers_its_example(path: str | Path, example: Example, expected: Output) -> str | None:
    """Why the MLflow model at `path` does not answer `example` with `expected`, or None when it
    does (within float tolerance).

    The model is loaded with `mlflow.pyfunc.load_model`, as a server loads it, and predicts
    `example` as a dict of arrays by input name (an array for an unnamed input, as the pytorch
    flavor takes it).

    Args:
        path: The saved model's folder.
        example: The input example, as the net takes it.
        expected: The net's own outputs for `example`.

    Returns:
        None when every output matches, else a short reason (a failure to load or predict, a
        missing output, a shape or a value that differs).

    Example:
        >>> answers_its_example("model", example, net_outputs(net, example)) is None
        True
    """
    import mlflow.pyfunc
    import numpy as np

    tensors = _tensors(example)
    try:
        model = mlflow.pyfunc.load_model(str(path))
        schema = model.metadata.get_input_schema()
        names = schema.input_names() if schema is not None and schema.has_input_names() else []
        if len(names or [None]) != len(tensors):
            return (
                f"the model takes the inputs {names or ['one array']}, the example {len(tensors)}"
            )
        request: Any = to_numpy(tensors[0])
        if names:
            request = {name: to_numpy(t) for name, t in zip(names, tensors, strict=True)}
        predicted = model.predict(request)
    except Exception as err:  # any failure is the reason to report; nothing is lost
        return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:300]}"
    wanted = _named_outputs(expected)
    if not isinstance(predicted, dict):
        predicted = dict(zip(wanted, [predicted], strict=False))
    for name, tensor in wanted.items():
        if name not in predicted:
            return f"output {name!r} is missing; the model answers {sorted(predicted)}"
        got, want = np.asarray(predicted[name]), to_numpy(tensor)
        if got.shape != want.shape:
            return f"output {name!r} has shape {got.shape}, the net's {want.shape}"
        if not np.allclose(got, want, rtol=RTOL, atol=ATOL, equal_nan=True):
            diff = np.max(np.abs(got.astype(np.float64) - want.astype(np.float64)))
            return f"output {name!r} differs from the net's by up to {diff:.3g}"
    return None


# ---- inputs and outputs ---------------------------------------------------------------------


def _call(example: Example) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    """The positional and keyword arguments that `example` is passed to the net as."""
    if isinstance(example, Mapping):
        return (), dict(example)
    if isinstance(example, tuple):
        return example, {}
    return (example,), {}


def _tensors(example: Example) -> list[torch.Tensor]:
    args, kwargs = _call(example)
    return [*args, *kwargs.values()]


def _named_inputs(net: nn.Module, example: Example) -> dict[str, torch.Tensor]:
    """The example's tensors by input name, checked: a dict's keys, else the forward's parameter
    names, else input_0, input_1, ..."""
    import torch

    if isinstance(example, Mapping):
        named = {str(name): t for name, t in example.items()}
    elif isinstance(example, (tuple, torch.Tensor)):
        tensors = _tensors(example)
        named = dict(zip(_parameter_names(net, len(tensors)), tensors, strict=True))
    else:
        named = {}
    _check_tensors(
        named,
        example,
        "Received: an example of type {got}. Expected what the net takes: a tensor, a tuple of "
        "tensors (positional inputs) or a dict of name -> tensor (keyword inputs). Fix: pass a "
        "few rows of a real batch without its target.",
    )
    rows = {n: (t.shape[0] if t.ndim else None) for n, t in named.items()}
    if None in rows.values() or len(set(rows.values())) != 1 or 0 in rows.values():
        raise LkflowError(
            f"Received: an example whose inputs have {rows} rows. Expected the same number of "
            "rows (at least one) in every input, along its first dimension. Fix: pass the rows "
            "of one batch."
        )
    return {n: t.detach().cpu() for n, t in named.items()}


def _parameter_names(net: nn.Module, count: int) -> list[str]:
    """The names of the forward's first `count` positional parameters, else input_0, ..."""
    try:
        parameters = list(inspect.signature(net.forward).parameters.values())
    except (TypeError, ValueError):  # a forward without a readable signature
        parameters = []
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = []
    for parameter in parameters:
        if parameter.kind not in positional:
            break
        names.append(parameter.name)
    return names[:count] if len(names) >= count else [f"input_{i}" for i in range(count)]


def _named_outputs(output: Any) -> dict[str, torch.Tensor]:
    """The outputs by name: a named tuple's fields, else as `lkflow.batches.names` names them (a
    dict's keys, a tuple's output_0, ..., a single tensor's "output")."""
    import torch

    values: dict[Any, Any] = {}
    if isinstance(output, torch.Tensor):
        values = {"output": output}
    elif isinstance(output, (Mapping, tuple, list)):
        values = dict(output) if isinstance(output, Mapping) else dict(enumerate(output))
    _check_tensors(
        values,
        output,
        "Received: a net that returns {got}. Expected a tensor, a tuple of tensors or a dict of "
        "name -> tensor. Fix: return the tensors a client needs, flat.",
    )
    keys = getattr(output, "_fields", None) or batch_names(output, "output")
    return {str(k): t.detach().cpu() for k, t in zip(keys, values.values(), strict=True)}


def _check_tensors(named: dict[Any, Any], given: Any, message: str) -> None:
    """Raises the LkflowError of `message` ({got}: the type given, and its items that are no
    tensors) unless `named` holds tensors only, at least one."""
    import torch

    bad = {n: type(t).__name__ for n, t in named.items() if not isinstance(t, torch.Tensor)}
    if not named or bad:
        got = f"{type(given).__name__} {bad}" if bad else type(given).__name__
        raise LkflowError(message.format(got=got))


# ---- export ---------------------------------------------------------------------------------


def _export(net: nn.Module, named: dict[str, torch.Tensor], keywords: bool) -> Any:
    """The net's torch.export program, in eval mode, with one batch dimension for all inputs."""
    import torch

    # torch.export fixes a dimension it sees at 1; two rows keep it dynamic
    rows = {n: (t if t.shape[0] > 1 else torch.cat([t, t])) for n, t in named.items()}
    args, kwargs = ((), rows) if keywords else (tuple(rows.values()), {})
    batch = torch.export.Dim("batch")
    dims = torch.export.ShapesCollection()  # type: ignore[no-untyped-call]
    for tensor in rows.values():  # by tensor, whatever the forward's parameters (*args too)
        dims[tensor] = {0: batch}
    training = net.training
    net.eval()  # as it is served; BatchNorm's statistics stay as they are
    try:
        _check_call(net, args, kwargs)
        shapes = dims.dynamic_shapes(net, args, kwargs)  # type: ignore[no-untyped-call]
        return _traced(net, args, kwargs, shapes)
    finally:
        net.train(training)


def _check_call(net: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """The net runs on the example, or a LkflowError says why (a wrong name, a target left in)."""
    import torch

    try:
        with torch.no_grad():
            net(*args, **kwargs)
    except Exception as err:  # the net's own error, whatever its kind, is the reason
        got = list(kwargs) if kwargs else f"{len(args)} positional tensors"
        raise LkflowError(
            f"Received: an example ({got}) that {type(net).__name__} fails on "
            f"({type(err).__name__}: {str(err).strip()[:300]}). Expected what its forward "
            f"takes{_forward_parameters(net)}. Fix: pass a batch's inputs without its target, "
            "a dict by the forward's parameter names."
        ) from err


def _forward_parameters(net: nn.Module) -> str:
    """ ", (x_num, x_cat)": the forward's parameters for a message, or nothing if unreadable."""
    try:
        return f", ({', '.join(inspect.signature(net.forward).parameters)})"
    except (TypeError, ValueError):
        return ""


def _traced(net: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], shapes: Any) -> Any:
    import torch

    try:
        return torch.export.export(net, args, kwargs, dynamic_shapes=shapes)
    except Exception as err:  # torch.export raises many kinds; each is this net's
        lines = [line for line in str(err).strip().splitlines() if line.strip()][:4]
        reason = f"{type(err).__name__}: " + " ".join(lines)[:600]
        raise LkflowError(
            f"Received: a {type(net).__name__} that torch.export cannot export with a dynamic "
            f"batch dimension ({reason}). Expected a forward that traces for any number of "
            "rows. Fix: branch with torch.where/torch.cond instead of Python `if` on tensor "
            "values or on the batch size, and keep every input's first dimension the batch."
        ) from err


def _call_program(program: Any, named: dict[str, torch.Tensor], keywords: bool) -> Any:
    import torch

    module = program.module()
    with torch.no_grad():
        return module(**named) if keywords else module(*named.values())


def _signature(
    inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor], named_outputs: bool
) -> Any:
    """Named TensorSpecs of the inputs and outputs, the batch dimension -1; a single output is
    unnamed."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    def spec(tensor: torch.Tensor, name: str | None) -> TensorSpec:
        shape = (-1, *tensor.shape[1:]) if tensor.ndim else ()
        return TensorSpec(to_numpy(tensor).dtype, shape, name)

    return ModelSignature(
        inputs=Schema([spec(t, name) for name, t in inputs.items()]),
        outputs=Schema([spec(t, name if named_outputs else None) for name, t in outputs.items()]),
    )


def _dtype_name(tensor: torch.Tensor) -> str:
    """The torch dtype's name, as `getattr(torch, name)` reads it back: "float32", "int64"."""
    return str(tensor.dtype).removeprefix("torch.")
