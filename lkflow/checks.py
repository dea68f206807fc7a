"""Checks of what a user passes to LightModel and fit, made before any work is done."""

from __future__ import annotations

import copy
import math
import os
import tempfile
from collections.abc import Mapping, Sized
from typing import TYPE_CHECKING, Any, cast

import torch
import torchmetrics
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from torch import nn

from lkflow.checkpoints import check_resumable
from lkflow.errors import LkflowError

if TYPE_CHECKING:
    import pytorch_lightning as pl


# losses whose target is a float tensor (as the predictions), and those of class indices
_FLOAT_TARGETS = (
    nn.BCELoss,
    nn.BCEWithLogitsLoss,
    nn.MSELoss,
    nn.L1Loss,
    nn.SmoothL1Loss,
    nn.HuberLoss,
    nn.KLDivLoss,
    nn.SoftMarginLoss,
    nn.MultiLabelSoftMarginLoss,
    nn.PoissonNLLLoss,
    nn.GaussianNLLLoss,
)
_INDEX_TARGETS = (nn.CrossEntropyLoss, nn.NLLLoss, nn.MultiMarginLoss)
Metrics = torchmetrics.Metric | torchmetrics.MetricCollection


def check_net(net: Any) -> None:
    if not isinstance(net, nn.Module):
        raise LkflowError(
            f"Received: net={net!r}. Expected a torch.nn.Module instance, such as Net()."
        )


def check_has_loss(loss_fn: Any, own_step: bool) -> None:
    """Fails on a model without `loss_fn` that leaves the loss to the default step."""
    if loss_fn is None and not own_step:
        raise LkflowError(
            "Received: loss_fn=None and no shared_step. Pass a loss, such as "
            "LightModel(net, loss_fn=nn.BCEWithLogitsLoss()), or subclass LightModel and "
            "override shared_step(batch) to return {'loss': ..., **metrics}."
        )


def step_values(values: Any) -> Mapping[str, Any]:
    """What `shared_step` returned, as a dict with a `loss` key; a tensor is the loss alone."""
    if isinstance(values, torch.Tensor):
        values = {"loss": values}
    if not isinstance(values, Mapping) or "loss" not in values:
        keys = list(values) if isinstance(values, Mapping) else type(values).__name__
        raise LkflowError(
            f"Received: shared_step returned {keys}. Expected a dict with a 'loss' key, "
            "such as {'loss': loss, 'acc': acc}."
        )
    return values


def metric_dict(metrics: Any) -> Mapping[str, Any] | None:
    """`metrics` as LightModel keeps them: a lone `MetricCollection` becomes `{"metrics": it}`."""
    if isinstance(metrics, torchmetrics.MetricCollection):
        return {"metrics": metrics}
    return cast("Mapping[str, Any] | None", metrics)


def stage_metrics(metrics: Mapping[str, Any] | None) -> dict[str, Metrics]:
    """Copies of the torchmetrics in `metrics` (one set per stage); rejects non-metrics.

    A `MetricCollection` stays one: its values are logged under its own names (with its prefix
    and postfix), not under its key in `metrics`.
    """
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise LkflowError(
            f"Received: metrics={metrics!r}. Expected a dict of name to metric, such as "
            "{'acc': torchmetrics.classification.BinaryAccuracy()}, or a MetricCollection."
        )
    for name, metric in metrics.items():
        if isinstance(metric, type) or not callable(metric):
            hint = f" Pass an instance: {metric.__name__}()." if isinstance(metric, type) else ""
            raise LkflowError(
                f"Received: metrics[{name!r}]={metric!r}. Expected a torchmetrics.Metric "
                f"or MetricCollection instance, or a function (preds, target) -> tensor.{hint}"
            )
    return {name: copy.deepcopy(metric) for name, metric in metrics.items() if is_metric(metric)}


def is_metric(value: Any) -> bool:
    """Whether `value` is computed over the epoch: a torchmetrics Metric or MetricCollection."""
    return isinstance(value, (torchmetrics.Metric, torchmetrics.MetricCollection))


def logged_names(values: Mapping[str, Any]) -> list[str]:
    """The keys that a step's `values` are logged under: a collection's own names for it."""
    logged: list[str] = []
    for key, value in values.items():
        if isinstance(value, torchmetrics.MetricCollection):
            logged += [str(name) for name in value.keys(keep_base=False)]
        else:
            logged.append(key)
    return logged


def batch_values(
    preds: Any, y: Any, loss_fn: nn.Module, metrics: nn.ModuleDict, functions: Mapping[str, Any]
) -> dict[str, Any]:
    """The default step's values: the loss, the metrics updated with the batch, the functions;
    a loss that refuses the target's dtype raises `loss_dtype_error`'s error."""
    try:
        values: dict[str, Any] = {"loss": loss_fn(preds, y)}
    except RuntimeError as err:
        explained = loss_dtype_error(loss_fn, preds, y, err)
        if explained is None:
            raise
        raise explained from err
    for name, metric in metrics.items():
        cast(Metrics, metric).update(preds, y)
        values[name] = metric
    for name, function in functions.items():
        values[name] = function(preds, y)
    return values


def check_finite(row: Mapping[str, float]) -> None:
    for key, value in row.items():
        if key.endswith("loss") and not math.isfinite(value):
            raise FloatingPointError(
                f"{key} is {value} at epoch {row['epoch']}: training stopped. The best "
                "checkpoint before it is kept; lower the learning rate or clip gradients "
                "(gradient_clip_val=1.0)."
            )


def check_loader(name: str, loader: Any) -> None:
    length = len(loader) if hasattr(loader, "__len__") else None
    if length == 0:
        raise LkflowError(
            f"Received: {name} with no batches (dataset of {_dataset_size(loader)} rows). "
            "Pass a DataLoader over a non-empty dataset, with batch_size <= rows when drop_last."
        )


def _dataset_size(loader: Any) -> str:
    dataset = getattr(loader, "dataset", None)
    return str(len(cast(Sized, dataset))) if hasattr(dataset, "__len__") else "unknown"


def check_monitored_keys(trainer: pl.Trainer, values: Mapping[str, Any]) -> None:
    """Fails at the first step when a checkpoint or early stopping watches a key never logged.

    Args:
        trainer: The Trainer of the fit, with its callbacks.
        values: What the first training step returned: the keys logged, and as `val_` keys
            when there is validation data, besides `lr`.
    """
    logged = logged_names(values)
    if sum(trainer.num_val_batches or [0]) > 0:
        logged += [f"val_{key}" for key in logged]
    logged += ["lr"]
    # in the order of trainer.callbacks, where Lightning puts checkpoints last
    for callback in [*trainer.early_stopping_callbacks, *trainer.checkpoint_callbacks]:
        monitor = getattr(callback, "monitor", None)
        watches = isinstance(callback, (ModelCheckpoint, EarlyStopping)) and monitor
        if watches and monitor not in logged:
            raise LkflowError(
                f"Received: monitor={monitor!r} ({type(callback).__name__}), which is "
                f"never logged. Logged keys: {', '.join(logged)}. Pass one of them."
            )


def check_fit_args(
    epochs: Any,
    mode: Any,
    patience: Any,
    verbose: Any,
    train_data: Any,
    val_data: Any,
    ckpt_path: Any,
    ckpt_dir: Any,
) -> None:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise LkflowError(f"Received: epochs={epochs!r}. Expected an int >= 1, such as epochs=10.")
    if mode not in ("min", "max"):
        raise LkflowError(f"Received: mode={mode!r}. Expected 'min' or 'max'.")
    if patience is not None and (
        isinstance(patience, bool) or not isinstance(patience, int) or patience < 0
    ):
        raise LkflowError(f"Received: patience={patience!r}. Expected None or an int >= 0.")
    if verbose not in (0, 1, 2):
        raise LkflowError(
            f"Received: verbose={verbose!r}. "
            "Expected 0 (quiet), 1 (progress bar) or 2 (a line per epoch)."
        )
    check_loader("train_data", train_data)
    if val_data is not None:
        check_loader("val_data", val_data)
    check_writable(ckpt_dir)
    check_resumable(ckpt_path, ckpt_dir)


def check_writable(folder: str | os.PathLike[str]) -> None:
    """Fails unless a file can be created in `folder` (made if missing).

    A file is created and removed rather than asking `os.access`, which answers "writable" to
    root for a read-only folder, and to anyone on a file system that refuses new files.
    """
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise LkflowError(
            f"Received: ckpt_dir={os.fspath(folder)!r}, which cannot be created ({err.strerror}). "
            "Pass a folder you can write to."
        ) from err
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".lkflow-write-check-"):
            pass
    except OSError as err:
        raise LkflowError(
            f"Received: ckpt_dir={os.fspath(folder)!r}, which is not writable ({err.strerror}). "
            "Pass a folder you can write to."
        ) from err


def check_registered_model_name(name: Any) -> None:
    """Fails on a registered model name that MLflow would refuse only after training.

    MLflow refuses blank names, names with `/` or `:`, and names that read as a relative path
    (`.`, `..`, `..net`); the fit would fail at its end, when it registers the net.

    Args:
        name: The `registered_model_name` given; None and False pass.

    Raises:
        LkflowError: Naming the name, the rules and an example.

    Example:
        >>> check_registered_model_name("rings-net")
    """
    if name is None or name is False:
        return
    valid = isinstance(name, str) and name.strip() and "/" not in name and ":" not in name
    if not valid or name == "." or name.startswith(".."):
        raise LkflowError(
            f"Received: registered_model_name={name!r}. Expected a name that is not blank, "
            "holds no '/' or ':', is not '.' and does not start with '..', such as "
            "'rings-net', or False not to register."
        )


def check_monitor(monitor: Any, val_data: Any) -> None:
    """Fails on a monitored validation value (`val_...`) in a fit without validation data.

    Args:
        monitor: The history key that picks the best epoch.
        val_data: The validation DataLoader, or None.

    Raises:
        LkflowError: Naming the key and the two fixes.

    Example:
        >>> check_monitor("val_loss", val_data=None)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lkflow.errors.LkflowError: Received: monitor='val_loss' and no val_data. ...
    """
    if val_data is None and isinstance(monitor, str) and monitor.startswith("val_"):
        raise LkflowError(
            f"Received: monitor={monitor!r} and no val_data. The `val_` values come from "
            f"validation data. Pass val_data=..., or monitor={monitor.removeprefix('val_')!r} "
            "for the training value."
        )


def loss_dtype_error(
    loss_fn: Any, preds: Any, target: Any, err: BaseException
) -> LkflowError | None:
    """The error to raise when a torch loss failed on a target of the wrong dtype.

    Torch says only "Found dtype Long but expected Float" (`nn.BCELoss` on int labels) or
    "expected target dtype to be Long or Byte" (`nn.CrossEntropyLoss` on float ones).

    Args:
        loss_fn: The loss that raised `err` on `(preds, target)`.
        preds: The net's output.
        target: The labels of the batch.
        err: The loss's error.

    Returns:
        An LkflowError naming the loss, the dtype received, the dtype expected and the fix;
        None when the target's dtype is not what the loss refuses (then `err` stands).

    Example:
        >>> refused = RuntimeError("Found dtype Long but expected Float")
        >>> print(loss_dtype_error(nn.BCELoss(), torch.zeros(2), torch.tensor([0, 1]), refused))
        ... # doctest: +ELLIPSIS
        Received: labels of dtype torch.int64 for BCELoss, ... TensorDataset(x, y.float()), ...
    """
    if not isinstance(preds, torch.Tensor) or not isinstance(target, torch.Tensor):
        return None
    if isinstance(loss_fn, _FLOAT_TARGETS) and not target.is_floating_point():
        expected = f"float labels, of the predictions' dtype {preds.dtype}"
        fix = "y.float()"
    elif (
        isinstance(loss_fn, _INDEX_TARGETS)
        and target.dtype != torch.long
        and target.dim() < preds.dim()  # the same shape as preds: probabilities, not indices
    ):
        expected = "class indices of dtype torch.int64"
        fix = "y.long()"
    else:
        return None
    return LkflowError(
        f"Received: labels of dtype {target.dtype} for {type(loss_fn).__name__}, which "
        f"refused them ({err}). Expected {expected}. Fix the dataset's labels, such as "
        f"TensorDataset(x, {fix}), or convert them in shared_step."
    )
