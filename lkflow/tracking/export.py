"""The servable model of a fit: the bare net with its best weights, saved as an MLflow model.

    net = best_net(pl_module, best.state_dict)  # a CPU copy in eval mode
    with saved_model(net, example, run_id, experiment_id, params, step) as write:
        model_id = writer.send(write)  # a LoggedModel of the run

The net is exported with torch.export (MLflow's "pt2" format) on the first batch's rows; a net
that cannot be exported, or a fit without an input tensor, gets a pickle with the net's code
instead, and a warning that says so.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
import sys
import sysconfig
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lkflow.tracking.store import is_unreachable

if TYPE_CHECKING:
    import pytorch_lightning as pl
    import torch
    from mlflow import MlflowClient
    from torch import nn

    from lkflow.tracking.writes import ModelWrite, State


def net_of(pl_module: pl.LightningModule) -> nn.Module:
    """The bare net of an lkflow.LightModel (its `net`), else the module itself."""
    net: nn.Module = getattr(pl_module, "net", pl_module)
    return net


def best_net(
    pl_module: pl.LightningModule, state_dict: dict[str, torch.Tensor] | None
) -> nn.Module:
    """A CPU copy of the bare net in eval mode, with the best checkpoint's weights."""
    net = copy.deepcopy(net_of(pl_module)).cpu().eval()
    if state_dict is not None:
        prefix = "net." if hasattr(pl_module, "net") else ""
        own = {key[len(prefix) :]: v for key, v in state_dict.items() if key.startswith(prefix)}
        net.load_state_dict(own)
    return net


@contextlib.contextmanager
def saved_model(
    net: nn.Module,
    example: torch.Tensor | None,
    run_id: str,
    experiment_id: str,
    params: dict[str, str],
    step: int,
) -> Iterator[ModelWrite]:
    """The write that logs `net` as an MLflow model of the run at epoch `step` (a LoggedModel
    with the run's `params`); the saved model is there while the block runs."""
    from mlflow.models import Model

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model"
        save_model(net, example, path, Model(run_id=run_id))
        yield {
            "op": "model",
            "path": str(path),
            "experiment_id": experiment_id,
            "params": dict(params),
            "step": step,
            "model_id": None,
        }


def log_model(client: MlflowClient, run_id: str, write: ModelWrite, state: State) -> str:
    """Sends a "model" write: creates the LoggedModel (once; its id goes into `write` and
    `state`), uploads the saved model, marks it READY and links it to the run."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    model_id = write.get("model_id") or state.get("model_id")
    if model_id is None:
        model = client.create_logged_model(
            write["experiment_id"], name="model", source_run_id=run_id, params=write["params"]
        )
        model_id = str(model.model_id)
    else:  # created by the write that failed, or by a sync that broke off
        model = client.get_logged_model(model_id)
    write["model_id"] = state["model_id"] = model_id
    _stamp(Path(write["path"]), model.artifact_location, model_id)
    try:
        client.log_model_artifacts(model_id, write["path"])
    except BaseException as err:
        if not is_unreachable(err):  # kept PENDING when the upload is only postponed
            client.finalize_logged_model(model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(model_id, LoggedModelStatus.READY)
    client.log_outputs(run_id, [LoggedModelOutput(model_id, step=write["step"])])
    return model_id


def _stamp(folder: Path, artifact_location: str, model_id: str) -> None:
    """The saved model's MLmodel file names the LoggedModel it is uploaded to."""
    from mlflow.models import Model

    model = Model.load(folder)
    model.artifact_path, model.model_uuid, model.model_id = artifact_location, model_id, model_id
    model.save(folder / "MLmodel")


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
