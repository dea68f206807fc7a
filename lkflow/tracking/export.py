"""The servable model of a fit: the served net with its best weights, saved as an MLflow model.

    attribute = served_attribute(pl_module, net=None)  # "net" of a LightModel, "encoder", None
    net = best_net(pl_module, best.state_dict, attribute)  # a CPU copy in eval mode
    with saved_model(net, example, run_id, experiment_id, params, step) as write:
        model_id = writer.send(write)  # a LoggedModel of the run

The served net is a submodule the user names (`MLflowCallback(net="encoder")`), else an
lkflow.LightModel's bare `net`, else the module itself where it defines `forward`, else its
`net` or `model` submodule. The model
follows the net's layout, read from the input example (a few rows of the first batch's inputs,
lkflow/tracking/example.py) and the net's outputs for it:
- one tensor in, one tensor out: MLflow's pytorch flavor, the net exported with torch.export
  (its "pt2" format); a request `{"inputs": [[...], ...]}` answers `{"predictions": [...]}`;
- any other net (a tuple or a dict of inputs, a tuple or a dict of outputs): a pyfunc model of
  the net's torch.export program with named inputs and outputs (lkflow/tracking/served.py); a
  request `{"inputs": {"x_num": [...], "x_cat": [...]}}` answers
  `{"predictions": {"logits": [...], "prob": [...]}}`, a single output as one array.
A net that torch.export cannot trace gets a pickle of the pytorch flavor with the net's code
instead, and a warning that says so. Every saved model is loaded back and asked its input
example (`served.answers_its_example`) before the fit registers it: one that does not answer
with the net's own outputs is logged but not registered, with one warning saying why.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import shutil
import sys
import sysconfig
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from lkflow.errors import LkflowError
from lkflow.tracking import served
from lkflow.tracking.store import is_unreachable

if TYPE_CHECKING:
    import pytorch_lightning as pl
    import torch
    from mlflow import MlflowClient
    from torch import nn

    from lkflow.batches import Inputs
    from lkflow.tracking.writes import ModelWrite, State


_NET_ATTRIBUTES = ("net", "model")  # the submodules served of a module without a forward


def served_attribute(pl_module: pl.LightningModule, name: str | None = None) -> str | None:
    """The submodule of `pl_module` that is served, by its attribute, or None for the module
    itself: `name` (a dotted path such as "model.backbone" too); else an lkflow.LightModel's
    bare `net`; else the module itself where it defines `forward` (Lightning's inference step);
    else its `net` or `model` submodule, where it has one.

    Raises:
        LkflowError: `name` is no submodule of `pl_module`; the message lists its submodules.

    Example:
        >>> served_attribute(LitAutoEncoder(encoder, decoder), "encoder")
        'encoder'
    """
    from torch import nn

    from lkflow.model import LightModel

    if name is None:
        if isinstance(pl_module, LightModel):
            return "net"
        if _defines_forward(pl_module):
            return None
        found = (a for a in _NET_ATTRIBUTES if isinstance(getattr(pl_module, a, None), nn.Module))
        return next(found, None)
    try:
        pl_module.get_submodule(name)
    except AttributeError:
        children = [child for child, _ in pl_module.named_children()]
        close = difflib.get_close_matches(name, children, n=1)
        hint = f" Did you mean net={close[0]!r}?" if close else ""
        raise LkflowError(
            f"Received: net={name!r}, which is no submodule of {type(pl_module).__name__}. "
            f"Expected the attribute of the net to serve, one of {children}, or net=None "
            f"for the module itself (its `net` or `model` without a forward).{hint}"
        ) from None
    return name


def _defines_forward(net: nn.Module) -> bool:
    import pytorch_lightning as pl
    from torch import nn

    return type(net).forward not in (nn.Module.forward, pl.LightningModule.forward)


def has_forward(pl_module: pl.LightningModule, attribute: str | None) -> bool:
    """Whether the served net defines a `forward` of its own; one warning, naming the module's
    submodules, where it does not (a LightningModule such as Lightning's quick-start
    autoencoder): the run then gets no model and no layer table.

    Example:
        >>> has_forward(LitAutoEncoder(encoder, decoder), None)  # warns: net='encoder'?
        False
    """
    net = net_of(pl_module, attribute)
    if _defines_forward(net):
        return True
    children = [child for child, _ in net.named_children()]
    warnings.warn(
        f"{type(net).__name__} has no forward of its own, so the run gets no MLflow model "
        "and no layer table (everything else is logged). Fix: pass "
        f"MLflowCallback(net=...) naming the submodule to serve, one of {children}, or "
        "define forward.",
        stacklevel=3,
    )
    return False


def net_of(pl_module: pl.LightningModule, attribute: str | None = None) -> nn.Module:
    """The served net: the submodule at `attribute` (`served_attribute`), else the module."""
    return pl_module.get_submodule(attribute) if attribute else pl_module


def best_net(
    pl_module: pl.LightningModule,
    state_dict: dict[str, torch.Tensor] | None,
    attribute: str | None = None,
) -> nn.Module:
    """A CPU copy of the served net in eval mode, with the best checkpoint's weights (the
    module's `state_dict`, of which the net's entries are those under `attribute`)."""
    net = copy.deepcopy(net_of(pl_module, attribute)).cpu().eval()
    if state_dict is not None:
        prefix = f"{attribute}." if attribute else ""
        own = {key[len(prefix) :]: v for key, v in state_dict.items() if key.startswith(prefix)}
        net.load_state_dict(own)
    return net


@contextlib.contextmanager
def saved_model(
    net: nn.Module,
    example: Inputs | None,
    run_id: str,
    experiment_id: str,
    params: dict[str, str],
    step: int,
) -> Iterator[tuple[ModelWrite | None, bool]]:
    """The write that logs `net` as an MLflow model of the run at epoch `step` (a LoggedModel
    with the run's `params`), and whether it may be registered: True when the saved model
    answers its input example with the net's outputs. The saved model is there while the block
    runs. A model that cannot be saved at all is None, after a warning."""
    from mlflow.models import Model

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model"
        try:
            servable = save_model(net, example, path, Model(run_id=run_id))
        except Exception as err:  # an end-of-fit extra: the fit that trained still finishes
            warnings.warn(
                f"The run has no MLflow model of {type(net).__name__}, and nothing is registered: "
                f"saving it failed ({_first_line(err)}). Everything else is logged; the weights "
                "are in the run's net/state_dict.pt.",
                stacklevel=3,
            )
            servable = None
        if servable is None:
            yield None, False
            return
        write: ModelWrite = {
            "op": "model",
            "path": str(path),
            "experiment_id": experiment_id,
            "params": dict(params),
            "step": step,
            "model_id": None,
        }
        yield write, servable


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


def save_model(net: nn.Module, example: Inputs | None, path: Path, mlflow_model: Any) -> bool:
    """The net saved as an MLflow model by its layout (see the module's docstring), a pickle
    where torch.export fails; True when the saved model answers its example with the net's
    outputs, else False after one warning that says why and what to change."""
    name = type(net).__name__
    if example is None:
        _save_pickle(net, None, path, mlflow_model)
        _warn_unregistered(
            name,
            "the fit took no input example from the first batch",
            _EXAMPLE_FIX,
        )
        return False
    try:
        expected = served.net_outputs(net, example)
        flavor = served.served_flavor(example, expected)
    except Exception as err:  # the net's own error on its example, whatever its kind
        _save_pickle(net, None, path, mlflow_model)
        _warn_unregistered(name, f"it fails on its input example ({_first_line(err)})", _FIX)
        return False
    reason = _save_exported(net, example, flavor, path, mlflow_model)
    if reason is not None and flavor == "pyfunc":  # a pickle takes one array: it cannot serve
        _save_pickle(net, None, path, mlflow_model)
        why = f"torch.export could not export it ({reason}), and its pickle takes one array"
        _warn_unregistered(name, why, _FIX)
        return False
    if reason is not None:
        _save_pickle(net, cast("torch.Tensor", example), path, mlflow_model)
        warnings.warn(
            f"torch.export could not export {name} ({reason}). The MLflow model is a pickle "
            f"fallback with the net's code{_PICKLE_LOADING} To get an exported model instead, "
            "make the net trace with torch.export (no Python branch on tensor values or on "
            "the batch size) and have example_input(batch) return what the net takes.",
            stacklevel=3,
        )
    answer = served.answers_its_example(path, example, expected)
    if answer is not None:
        why = f"the saved model does not answer its input example: {answer}"
        _warn_unregistered(name, why, _FIX)
    return answer is None


_EXAMPLE_FIX = (
    "pass MLflowCallback(example_input=fn), fn(batch) returning what the net takes (a tensor, "
    "a tuple or a dict of tensors), or set the module's example_input_array, or override "
    "example_input(batch) of an lkflow.LightModel"
)
_FIX = (
    "make example_input(batch) (or MLflowCallback(example_input=fn), or example_input_array) "
    "give what the net takes (a tensor, a tuple or a dict of tensors), the net return a tensor, "
    "a tuple or a dict of tensors, and its forward trace with torch.export; or serve another "
    "submodule with MLflowCallback(net=...)"
)
_PICKLE_LOADING = (
    ". MLflow loads it as it is (MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false refuses it); "
    "unpickling runs code, so load it only from a source you trust."
)


def _warn_unregistered(net_name: str, why: str, fix: str) -> None:
    warnings.warn(
        f"The MLflow model of {net_name} is logged but not registered: {why}. Its weights are "
        f"in the run's net/state_dict.pt. Fix: {fix}.",
        stacklevel=4,
    )


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:300]}"


def _save_exported(
    net: nn.Module, example: Inputs, flavor: str, path: Path, mlflow_model: Any
) -> str | None:
    """The net exported with torch.export in the model of its flavor; None when saved, else why
    not (nothing is left at `path` then)."""
    import mlflow.pytorch
    from mlflow.exceptions import MlflowException

    try:
        if flavor == "pyfunc":
            served.save_structured_model(
                net, example, path, pip_requirements=_requirements(), mlflow_model=mlflow_model
            )
            return None
        mlflow.pytorch.save_model(
            net,
            path,
            serialization_format="pt2",
            mlflow_model=mlflow_model,
            input_example=example.numpy(),  # type: ignore[union-attr]
            pip_requirements=_requirements(),
        )
        _load_on_cpu(path)
        return None
    except (RuntimeError, MlflowException, LkflowError) as err:  # torch.export failed to trace
        shutil.rmtree(path, ignore_errors=True)
        return _first_line(err)


def _save_pickle(
    net: nn.Module, example: torch.Tensor | None, path: Path, mlflow_model: Any
) -> None:
    """The pytorch flavor's pickle of the net, with the net's code where it is not installed."""
    import mlflow.pytorch

    mlflow.pytorch.save_model(
        net,
        path,
        serialization_format="pickle",
        code_paths=_code_paths(net),
        mlflow_model=mlflow_model,
        input_example=None if example is None else example.numpy(),
        pip_requirements=_requirements(),
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
