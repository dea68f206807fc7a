"""Checks of what a user passes to LightModel and fit, made before any work is done."""

from __future__ import annotations

import copy
import math
import os
import pickle
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torchmetrics
from torch import nn

from lkflow.errors import LkflowError

LAST = "last.ckpt"  # the checkpoint written after every epoch, which ckpt_path="last" means
# What lkflow's checkpoints hold beyond Lightning's weights, and what resuming also needs.
_CHECKPOINT_KEYS = ("state_dict", "lkflow_history")
_RESUME_KEYS = ("epoch", "loops", "optimizer_states")
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


def stage_metrics(metrics: Mapping[str, Any] | None) -> dict[str, torchmetrics.Metric]:
    """Copies of the torchmetrics in `metrics` (one set per stage); rejects non-metrics."""
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise LkflowError(
            f"Received: metrics={metrics!r}. Expected a dict of name to metric, such as "
            "{'acc': torchmetrics.classification.BinaryAccuracy()}."
        )
    for name, metric in metrics.items():
        if isinstance(metric, type) or not callable(metric):
            hint = f" Pass an instance: {metric.__name__}()." if isinstance(metric, type) else ""
            raise LkflowError(
                f"Received: metrics[{name!r}]={metric!r}. Expected a torchmetrics.Metric "
                f"instance or a function (preds, target) -> tensor.{hint}"
            )
    return {name: copy.deepcopy(metric) for name, metric in metrics.items() if is_metric(metric)}


def is_metric(value: Any) -> bool:
    return isinstance(value, torchmetrics.Metric)


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
    return str(len(dataset)) if hasattr(dataset, "__len__") else "unknown"


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


def resume_path(
    ckpt_path: str | os.PathLike[str] | None, ckpt_dir: str | os.PathLike[str]
) -> str | None:
    """The file a fit resumes from: None, `ckpt_path`, or for "last" the `last.ckpt` in
    `ckpt_dir` (the one checked by `check_resumable`, rather than Lightning's own pick)."""
    if ckpt_path is None:
        return None
    return os.path.join(ckpt_dir, LAST) if ckpt_path == "last" else os.fspath(ckpt_path)


def check_resumable(
    ckpt_path: str | os.PathLike[str] | None, ckpt_dir: str | os.PathLike[str]
) -> None:
    """Fails unless `ckpt_path` names a complete lkflow checkpoint to resume from.

    Args:
        ckpt_path: None (a fresh fit), "last", or the path of a `.ckpt`.
        ckpt_dir: The fit's checkpoint folder, where "last" looks.

    Raises:
        LkflowError: Naming the file or folder and the fix.
    """
    path = resume_path(ckpt_path, ckpt_dir)
    if path is None:
        return
    if ckpt_path == "last" and not os.path.isfile(path):
        raise LkflowError(
            f"Received: ckpt_path='last', but ckpt_dir={os.fspath(ckpt_dir)!r} holds no {LAST}, "
            "so there is no fit to resume there. Expected the ckpt_dir of the fit to resume "
            "(it writes last.ckpt after every epoch). Fix: pass that folder as ckpt_dir=..., or "
            "leave ckpt_path unset to start a fresh fit."
        )
    if not os.path.isfile(path):
        raise LkflowError(
            f"Received: ckpt_path={path!r}, which is not a file. Pass a .ckpt written by "
            "a previous fit, or 'last' for the newest one."
        )
    check_checkpoint(path, "ckpt_path", resume=True)


def check_checkpoint(
    path: str | os.PathLike[str], argument: str, resume: bool = False
) -> dict[str, Any]:
    """Reads the checkpoint at `path` (its tensors mapped, not read) and fails unless it is a
    whole checkpoint that lkflow wrote: not empty, cut short or of another program.

    Args:
        path: A `.ckpt` file.
        argument: The argument that named it, for the message, such as "ckpt_path".
        resume: Also require the training state that resuming needs. Defaults to False.

    Returns:
        The checkpoint's contents.

    Raises:
        LkflowError: Naming the file and what is wrong with it.

    Example:
        >>> check_checkpoint("checkpoints/last.ckpt", "ckpt_path")["epoch"]  # doctest: +SKIP
        9
    """
    saved, reason = _read_checkpoint(Path(path))
    required = _CHECKPOINT_KEYS + (_RESUME_KEYS if resume else ())
    missing = [key for key in required if key not in saved]
    if reason is None and missing:
        reason = f"it has no {', '.join(missing)}"
    if reason is not None:
        raise LkflowError(
            f"Received: {argument}={os.fspath(path)!r}, which is not a complete lkflow "
            f"checkpoint: {reason}. Expected a .ckpt that LightModel wrote while fitting. "
            f"Fix: pass another checkpoint of that fit, such as the best epoch=....ckpt or "
            f"{LAST} in its checkpoint folder."
        )
    return saved


def _read_checkpoint(path: Path) -> tuple[dict[str, Any], str | None]:
    """The checkpoint at `path`, or {} and why torch cannot read it as weights and values."""
    if path.stat().st_size == 0:
        return {}, "the file is empty"
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:  # its message would suggest unpickling anything
        return {}, "it holds objects other than tensors and plain values"
    except PermissionError:
        raise
    except (RuntimeError, EOFError, ValueError, OSError):  # a cut zip fails to seek, too
        return {}, "it is cut short, or not a file that torch.save wrote"
    if not isinstance(saved, dict):
        return {}, f"it holds a {type(saved).__name__}, not a dict"
    return saved, None


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
