"""What a tracked fit leaves: its files, its data's fingerprints, the net as an MLflow model.

    write_artifacts(folder, history, net.state_dict(), summary_text(net, example))
    save_model(net, example, folder / "model", mlflow_model)  # torch.export, else a pickle

Nothing here talks to MLflow's tracking server; `MLflowCallback` sends what these functions
write.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import sys
import sysconfig
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

_DIGEST_ROWS = 16  # rows hashed for a dataset's digest


def dataset_record(dataset: Any) -> dict[str, str] | None:
    """The fields of an MLflow Dataset of a map-style dataset: its rows and a digest of a
    sample of them; None for a dataset without length or indexing."""
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        return None
    rows = len(dataset)
    digest = hashlib.sha256(f"{type(dataset).__name__}:{rows}".encode())
    for index in sorted({i * rows // _DIGEST_ROWS for i in range(min(rows, _DIGEST_ROWS))}):
        for item in _leaves(dataset[index]):
            digest.update(item)
    return {
        "name": type(dataset).__name__,
        "digest": digest.hexdigest()[:12],
        "source_type": "code",
        "source": json.dumps({"tags": {}}),
        "profile": json.dumps({"num_rows": rows}),
    }


def _leaves(item: Any) -> Iterator[bytes]:
    """Bytes of a dataset row's tensors, arrays and plain values, depth first."""
    if isinstance(item, torch.Tensor):
        yield item.detach().cpu().contiguous().numpy().tobytes()
    elif isinstance(item, Mapping):
        for key in sorted(item, key=str):
            yield str(key).encode()
            yield from _leaves(item[key])
    elif isinstance(item, (tuple, list)):
        for value in item:
            yield from _leaves(value)
    elif hasattr(item, "tobytes"):
        yield item.tobytes()
    else:
        yield repr(item).encode()


def summary_text(net: nn.Module, example: torch.Tensor | None) -> str:
    """The layer table of the net on the example's shape, or "" without an example."""
    if example is None or example.ndim < 1:
        return ""
    from lkflow.summary_table import summary

    shape = tuple(example.shape[1:])
    return str(summary(net, input_shape=shape, dtype=example.dtype, print_fn=None))


def write_artifacts(
    folder: Path, history: Sequence[Mapping[str, Any]], state_dict: Mapping[str, Any], table: str
) -> None:
    """net/state_dict.pt, history.csv, curves.png and summary.txt, in a new `folder`."""
    (folder / "net").mkdir(parents=True)
    torch.save(dict(state_dict), folder / "net" / "state_dict.pt")
    if history:
        columns = list(dict.fromkeys(key for row in history for key in row))
        with open(folder / "history.csv", "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=columns)
            writer.writeheader()
            writer.writerows(history)
        from lkflow.plots import plot_history

        plot_history(list(history)).savefig(folder / "curves.png", dpi=100)
    if table:
        (folder / "summary.txt").write_text(table + "\n")


def save_model(net: nn.Module, example: torch.Tensor | None, path: Path, mlflow_model: Any) -> None:
    """The net saved as an MLflow model: torch.export (pt2), or a pickle where export fails."""
    import mlflow.pytorch
    from mlflow.exceptions import MlflowException

    example_array = None if example is None else example.numpy()
    options = {
        "mlflow_model": mlflow_model,
        "input_example": example_array,
        "pip_requirements": _requirements(),
    }
    if example_array is not None:
        try:
            mlflow.pytorch.save_model(net, path, serialization_format="pt2", **options)
            _load_on_cpu(path)
            return
        except (RuntimeError, MlflowException) as err:  # torch.export could not trace the net
            reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0]}"
        shutil.rmtree(path, ignore_errors=True)
    else:
        reason = "the first batch has no input tensor to export with"
    warnings.warn(
        f"torch.export could not export {type(net).__name__} ({reason}). The MLflow model is "
        "a pickle fallback with the net's code; loading it needs "
        "MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true and trust in its source.",
        stacklevel=2,
    )
    mlflow.pytorch.save_model(
        net, path, serialization_format="pickle", code_paths=_code_paths(net), **options
    )


def _load_on_cpu(path: Path) -> None:
    """A pt2 archive keeps the CPU weights it was exported with, and MLflow 3.17 loads a pyfunc
    on CUDA wherever there is one, where these weights fail: the pyfunc flavor asks for CPU."""
    from mlflow.models import Model

    model = Model.load(path)
    model.flavors["python_function"]["model_config"] = {"device": "cpu"}
    model.save(path / "MLmodel")


def _requirements() -> list[str]:
    """Pinned requirements from the installed versions, without local labels like +cpu."""
    from importlib.metadata import version

    from packaging.version import Version

    names = ("mlflow", "torch", "cloudpickle")
    return [f"{name}=={Version(version(name)).public}" for name in names]


def _code_paths(net: nn.Module) -> list[str]:
    """The file or top-level package that defines the net's class, unless it is installed."""
    top = type(net).__module__.split(".")[0]
    module = sys.modules.get(top)
    file = getattr(module, "__file__", None)
    if top == "__main__" or file is None:
        return []
    installed = {sysconfig.get_paths()[key] for key in ("purelib", "platlib", "stdlib")}
    if any(Path(file).resolve().is_relative_to(Path(p).resolve()) for p in installed):
        return []
    return [str(Path(file).parent if Path(file).name == "__init__.py" else Path(file))]
