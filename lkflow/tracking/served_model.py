"""The loader MLflow runs to serve a net with several inputs or outputs; it travels with the model.

lkflow.tracking.served saves a net's torch.export program as an MLflow models-from-code pyfunc
model, and this file is that model's code: MLflow copies it into the model's folder and executes
it on load (never import it). It imports only torch, numpy and mlflow, so that the model loads
and serves where neither lkflow nor the net's code is installed:

    model = mlflow.pyfunc.load_model("model")
    model.predict({"x_num": np.zeros((2, 4), "float32"), "x_cat": np.array([1, 3])})
    # {"logits": array(...), "prob": array(...)}

The model's config says how the program is called:
    inputs    [{"name": "x_num", "dtype": "float32", "shape": [4]}, ...], in the forward's order,
              each shape without its batch dimension
    keywords  true: the program takes its inputs by name (a dict example), else by position
    outputs   the names of the outputs (a dict's keys, a tuple's output_0, ...), or null for a
              single tensor, returned as one array
"""

from __future__ import annotations

import math
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.pyfunc.model import PythonModel

_INTEGRAL = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


class ExportedProgram(PythonModel):
    """A torch.export program called on CPU under no_grad, with named inputs and outputs."""

    # predict takes a dict of arrays or a DataFrame, which MLflow's type-hint validation (it
    # wants list[...] hints, and warns on every load without them) does not describe
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        """Loads the program from the model's "program" artifact, and its config."""
        config = context.model_config
        self.program = torch.export.load(context.artifacts["program"]).module()
        self.inputs: list[dict[str, Any]] = list(config["inputs"])
        self.keywords = bool(config["keywords"])
        self.outputs: list[str] | None = config["outputs"]

    # no type hints: MLflow would read them as a typed model's and warn that they are no list
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        """The program's outputs for `model_input`: a dict of numpy arrays, one a named output,
        or one array for a single output.

        `model_input` is a dict of arrays (what `{"inputs": {...}}` is parsed into), a pandas
        DataFrame with one column per input (each cell a row's value, or its values as a list),
        or for a net of one input its array. Each input is cast to its dtype in the config.
        """
        columns = _columns(model_input, [spec["name"] for spec in self.inputs])
        tensors = {spec["name"]: _tensor(columns[spec["name"]], spec) for spec in self.inputs}
        with torch.no_grad():
            output = self.program(**tensors) if self.keywords else self.program(*tensors.values())
        if self.outputs is None:
            return _array(output)
        values = list(output.values()) if isinstance(output, dict) else list(output)
        return {name: _array(value) for name, value in zip(self.outputs, values, strict=True)}


def _columns(model_input: Any, names: list[str]) -> dict[str, Any]:
    """Each input's values, by name, from a dict, a DataFrame or (one input) an array."""
    if isinstance(model_input, dict):
        source = model_input
    elif hasattr(model_input, "columns") and hasattr(model_input, "iloc"):  # a DataFrame
        source = {str(name): model_input[name].tolist() for name in model_input.columns}
    elif len(names) == 1:
        source = {names[0]: model_input}
    else:
        raise TypeError(
            f"Received: an input of type {type(model_input).__name__}. Expected a dict of "
            f"arrays or a DataFrame with the columns {names}."
        )
    missing = [name for name in names if name not in source]
    if missing:
        raise ValueError(
            f"Received: the inputs {sorted(map(str, source))}. Expected the inputs {names}; "
            f"{missing} missing."
        )
    return {name: source[name] for name in names}


def _tensor(values: Any, spec: dict[str, Any]) -> torch.Tensor:
    """`values` as a tensor of the input's dtype and shape (rows, *spec["shape"])."""
    name, dtype, shape = spec["name"], getattr(torch, spec["dtype"]), tuple(spec["shape"])
    array = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values)
    if array.dtype == object:
        raise ValueError(f"Received: input {name!r} with rows of uneven lengths. Expected {shape}.")
    if dtype in _INTEGRAL and array.dtype.kind == "f" and not np.all(np.mod(array, 1) == 0):
        raise ValueError(
            f"Received: input {name!r} with fractional values. Expected whole numbers ({dtype})."
        )
    rows = array.shape[0] if array.ndim else 0
    if array.ndim == 0 or array.size != rows * math.prod(shape):
        raise ValueError(
            f"Received: input {name!r} of shape {array.shape}. Expected (rows, *{shape})."
        )
    wide = np.float32 if dtype == torch.bfloat16 else None  # numpy has no bfloat16
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=wide))
    return tensor.reshape(rows, *shape).to(dtype)


def _array(value: Any) -> Any:
    """An output tensor as a numpy array; bfloat16 widened to float32, which numpy has."""
    tensor = value.detach().cpu()
    return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()


mlflow.models.set_model(ExportedProgram())
