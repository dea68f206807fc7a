"""LightModel: a bare `nn.Module` in a LightningModule, trained Keras-style.

Subclass it and write `shared_step(batch) -> {"loss": ..., **metrics}`, or pass `loss_fn` and
`metrics`; then `fit`, `evaluate` and `predict`, or hand it to a plain `pl.Trainer`. Epoch
values are accumulated on the device and read once per epoch, never per step. With several
processes (DDP), sums and row counts are added up across them, so every process holds the
values over the whole data set.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, EarlyStopping, ModelCheckpoint
from pytorch_lightning.strategies.launchers import _MultiProcessingLauncher
from torch import nn
from typing_extensions import override

from lkflow.checkpoints import BestCheckpoint, LastCheckpoint
from lkflow.checks import (
    check_checkpoint,
    check_finite,
    check_fit_args,
    check_loader,
    check_monitor,
    is_metric,
    loss_dtype_error,
    resume_path,
    stage_metrics,
)
from lkflow.credentials import MASK, mask_secrets
from lkflow.devices import Gpus, trainer_device_kwargs
from lkflow.epoch_values import EpochValues, each_row_once, rows_in
from lkflow.errors import LkflowError
from lkflow.layers import naming_the_failing_layer
from lkflow.progress import EpochLogger
from lkflow.tracking.params import flatten
from lkflow.trainer import build_trainer, fit_passing_interrupts, quiet, tracker_of

if TYPE_CHECKING:
    import pandas as pd
    from torch.utils.data import DataLoader

_STAGES = ("train", "val", "test")
_NOT_HPARAMS = ["net", "loss_fn", "metrics", "optimizer", "lr_scheduler"]


class LightModel(pl.LightningModule):
    """Wraps a bare `nn.Module` so that it trains like a Keras model.

    Args:
        net: The network; `model.net` is this same object, and it leaves the wrapper untouched.
        loss_fn: `loss_fn(preds, target)` for the default step. Defaults to None (then
            override `shared_step`).
        metrics: Name to `torchmetrics.Metric` (computed over each epoch) or to a function
            `(preds, target) -> tensor` (averaged over the epoch's rows). Defaults to None.
        optimizer: An optimizer over `net.parameters()`. Defaults to None (Adam, lr 1e-3).
        lr_scheduler: A scheduler of `optimizer`, or Lightning's dict
            (`{"scheduler": ..., "interval": "step"}`). Defaults to None.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 1))
        >>> model = LightModel(net, loss_fn=nn.BCEWithLogitsLoss(),
        ...                    metrics={"acc": torchmetrics.classification.BinaryAccuracy()})
        >>> model.net is net
        True
    """

    def __init__(
        self,
        net: nn.Module,
        loss_fn: nn.Module | None = None,
        metrics: Mapping[str, Any] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        lr_scheduler: Any = None,
    ) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise LkflowError(
                f"Received: net={net!r}. Expected a torch.nn.Module instance, such as Net()."
            )
        self.net = net
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.train_metrics = nn.ModuleDict(stage_metrics(metrics))
        self.val_metrics = nn.ModuleDict(stage_metrics(metrics))
        self.test_metrics = nn.ModuleDict(stage_metrics(metrics))
        self._functions = {k: v for k, v in (metrics or {}).items() if not is_metric(v)}
        self.history: list[dict[str, float]] = []
        self.run_id: str | None = None
        self._epochs = {stage: EpochValues() for stage in _STAGES}
        self._val_row: dict[str, float] = {}
        self._epoch_lr: float | None = None
        self._keys_checked = False  # whether the monitored keys were checked in this fit
        self._first_steps = set(_STAGES)  # the stages whose first step, still to come, names
        # a layer that fails: the sanity check's validation step does not stand for training's
        self.save_hyperparameters(ignore=_NOT_HPARAMS)
        self._check_has_loss()

    def _check_has_loss(self) -> None:
        own_step = type(self).shared_step is not LightModel.shared_step
        own_training = type(self).training_step is not LightModel.training_step
        if self.loss_fn is None and not (own_step or own_training):
            raise LkflowError(
                "Received: loss_fn=None and no shared_step. Pass a loss, such as "
                "LightModel(net, loss_fn=nn.BCEWithLogitsLoss()), or subclass LightModel and "
                "override shared_step(batch) to return {'loss': ..., **metrics}."
            )

    @override
    def forward(self, x: Any) -> Any:
        return self.net(x)

    # ---- steps ---------------------------------------------------------------------------

    def shared_step(self, batch: Any) -> dict[str, Any]:
        """One batch's loss and metrics; the default uses `loss_fn` and `metrics` on `(x, y)`.

        Override it for other batch layouts or losses. It must return a dict with a `"loss"`
        key; other values are tensors (averaged over the epoch's rows) or `torchmetrics.Metric`
        objects already updated with the batch (computed over the epoch).

        Args:
            batch: One batch from the DataLoader.

        Returns:
            The batch's loss and metrics, such as `{"loss": loss, "acc": acc}`.
        """
        x, y = _split_xy(batch)
        preds = self(x)
        try:
            values: dict[str, Any] = {"loss": self.loss_fn(preds, y)}
        except RuntimeError as err:
            explained = loss_dtype_error(self.loss_fn, preds, y, err)
            if explained is None:
                raise
            raise explained from err
        stage_metrics: nn.ModuleDict = getattr(self, f"{self._stage()}_metrics")
        for name, metric in stage_metrics.items():
            metric.update(preds, y)
            values[name] = metric
        for name, function in self._functions.items():
            values[name] = function(preds, y)
        return values

    def example_input(self, batch: Any) -> torch.Tensor:
        """The net's input in `batch`: `batch[0]` of a tuple or list, or the batch itself.

        `predict` and the MLflow model's input example use it; override it for other layouts.

        Args:
            batch: One batch from a DataLoader.

        Returns:
            The input tensor.
        """
        if isinstance(batch, torch.Tensor):
            return batch
        if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
            return batch[0]
        raise LkflowError(
            f"Received: a batch of type {type(batch).__name__}. Expected a tensor or (x, ...) "
            "with x a tensor; override example_input(batch) to return the net's input."
        )

    @override
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        values = self._step(batch, "train")
        if not self._keys_checked:
            self._check_monitors(values)
        return values["loss"]

    @override
    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._step(batch, "val")

    @override
    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._step(batch, "test")

    @override
    def setup(self, stage: str) -> None:
        self._keys_checked = False
        self._first_steps = set(_STAGES)

    def _step(self, batch: Any, stage: str) -> dict[str, Any]:
        first = stage in self._first_steps
        watch = naming_the_failing_layer(self.net) if first else contextlib.nullcontext()
        with watch:
            values = self.shared_step(batch)
        if first:
            self._first_steps.discard(stage)
        if isinstance(values, torch.Tensor):
            values = {"loss": values}
        if not isinstance(values, Mapping) or "loss" not in values:
            keys = list(values) if isinstance(values, Mapping) else type(values).__name__
            raise LkflowError(
                f"Received: shared_step returned {keys}. Expected a dict with a 'loss' key, "
                "such as {'loss': loss, 'acc': acc}."
            )
        self._epochs[stage].add(values, rows_in(batch))
        return values

    def _stage(self) -> str:
        if self.trainer.training:
            return "train"
        return "test" if self.trainer.testing else "val"

    # ---- epoch ends ----------------------------------------------------------------------

    @override
    def on_train_epoch_start(self) -> None:
        self._epochs["train"].reset()
        self._val_row = {}
        self._epoch_lr = _first_lr(self.trainer.optimizers)

    @override
    def on_validation_epoch_start(self) -> None:
        self._epochs["val"].reset()

    @override
    def on_test_epoch_start(self) -> None:
        self._epochs["test"].reset()

    @override
    def on_validation_epoch_end(self) -> None:
        values = self._epochs["val"].compute(self.trainer.strategy, prefix="val_")
        if self.trainer.sanity_checking:
            return
        self._val_row = values
        self.log_dict(values)

    @override
    def on_test_epoch_end(self) -> None:
        self.log_dict(self._epochs["test"].compute(self.trainer.strategy, prefix="test_"))

    @override
    def on_train_epoch_end(self) -> None:
        train = self._epochs["train"].compute(self.trainer.strategy, prefix="")
        row = {"epoch": self.current_epoch, **train, **self._val_row}
        if self._epoch_lr is not None:
            row["lr"] = self._epoch_lr
        self.history.append(row)
        self.log_dict(train)
        check_finite(row)

    def _check_monitors(self, values: Mapping[str, Any]) -> None:
        """Fail at the first step when a checkpoint or early stopping watches a key never logged."""
        self._keys_checked = True
        logged = list(values)
        if sum(self.trainer.num_val_batches or [0]) > 0:
            logged += [f"val_{key}" for key in values]
        logged += ["lr"]
        for callback in self.trainer.callbacks:
            monitor = getattr(callback, "monitor", None)
            watches = isinstance(callback, (ModelCheckpoint, EarlyStopping)) and monitor
            if watches and monitor not in logged:
                raise LkflowError(
                    f"Received: monitor={monitor!r} ({type(callback).__name__}), which is "
                    f"never logged. Logged keys: {', '.join(logged)}. Pass one of them."
                )

    # ---- optimizers and checkpoints ------------------------------------------------------

    @override
    def configure_optimizers(self) -> Any:
        if self.optimizer is None:
            self.optimizer = torch.optim.Adam(self.parameters(), lr=1e-3)
        if self.lr_scheduler is None:
            return self.optimizer
        scheduler = self.lr_scheduler
        if not isinstance(scheduler, Mapping):
            scheduler = {"scheduler": scheduler}
        return {"optimizer": self.optimizer, "lr_scheduler": dict(scheduler)}

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["lkflow_history"] = [dict(row) for row in self.history]
        hparams = checkpoint.get(self.CHECKPOINT_HYPER_PARAMS_KEY)
        if isinstance(hparams, Mapping):  # secrets masked as in the run's params
            checkpoint[self.CHECKPOINT_HYPER_PARAMS_KEY] = mask_secrets(hparams)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.history = [dict(row) for row in checkpoint.get("lkflow_history", [])]

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: str | os.PathLike[str],
        *,
        net: nn.Module | None = None,
        map_location: Any = None,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> LightModel:
        """A model from a checkpoint, built around `net`, which receives the saved weights.

        Checkpoints hold weights and plain hyperparameters, never pickled modules, so the
        net (and any loss, metrics or optimizer the constructor takes) is passed in again;
        so are secrets (`api_key=...`), which checkpoints hold masked as `'***'`.

        Args:
            checkpoint_path: A `.ckpt` file written while fitting.
            net: A fresh instance of the net class that was trained. Required.
            map_location: Where to load tensors, as in `torch.load`. Defaults to None.
            strict: Whether every key must match. Defaults to None (Lightning's default).
            **kwargs: Other constructor arguments, such as `loss_fn=` or `api_key=`.

        Returns:
            The model, with the history of the fit that wrote the checkpoint.

        Raises:
            LkflowError: Without `net`, or for a file that is not a complete lkflow
                checkpoint (empty, cut short, or of another program).

        Example:
            >>> clone = Model.load_from_checkpoint(path, net=Net())  # doctest: +SKIP
        """
        if net is None:
            raise LkflowError(
                f"{cls.__name__}.load_from_checkpoint needs the net: checkpoints hold weights, "
                "not modules. Pass a fresh one: "
                f"{cls.__name__}.load_from_checkpoint(path, net=Net())."
            )
        local = isinstance(checkpoint_path, (str, os.PathLike)) and os.path.isfile(checkpoint_path)
        if local:  # else Lightning's own error, or a remote file or a file object
            saved = check_checkpoint(checkpoint_path, "checkpoint_path")
            _warn_of_masked(saved.get(cls.CHECKPOINT_HYPER_PARAMS_KEY) or {}, kwargs)
        return super().load_from_checkpoint(
            checkpoint_path,
            map_location=map_location,
            strict=strict,
            weights_only=True,
            net=net,
            **kwargs,
        )

    # ---- Keras-style API -----------------------------------------------------------------

    def fit(
        self,
        train_data: DataLoader,
        val_data: DataLoader | None = None,
        *,
        epochs: int = 10,
        gpus: Gpus = None,
        monitor: str | None = None,
        mode: Literal["min", "max"] = "min",
        patience: int | None = None,
        ckpt_path: str | os.PathLike[str] | None = None,
        ckpt_dir: str | os.PathLike[str] = "checkpoints",
        callbacks: Iterable[Callback] = (),
        verbose: Literal[0, 1, 2] = 2,
        track: bool | Callback = True,
        experiment_name: str | None = None,
        run_name: str | None = None,
        registered_model_name: str | Literal[False] | None = None,
        tracking_uri: str | None = None,
        **trainer_kwargs: Any,
    ) -> pd.DataFrame:
        """Trains the net, keeps the best epoch's weights, and tracks the fit in MLflow.

        Args:
            train_data: The training DataLoader.
            val_data: The validation DataLoader. Defaults to None.
            epochs: The epoch to stop after, counted from zero for a new fit; a resumed fit
                continues up to it. Defaults to 10.
            gpus: 0 for the CPU, N GPUs, -1 for all, `[0, 1]` or `"0,1"` for those devices.
                Defaults to None: one GPU when CUDA is there, else the CPU.
            monitor: The history key that picks the best epoch. Defaults to None:
                `val_loss`, or `loss` without validation data.
            mode: "min" or "max" for `monitor`. Defaults to "min".
            patience: Stop after this many epochs without improvement. Defaults to None.
            ckpt_path: A checkpoint to resume from, or "last". Defaults to None.
            ckpt_dir: Where checkpoints go. Defaults to "checkpoints".
            callbacks: More Lightning callbacks. Defaults to ().
            verbose: 0 quiet, 1 Lightning's progress bar, 2 one line per epoch. Defaults to 2.
            track: Log the fit to MLflow: True, False, or an `lkflow.MLflowCallback` set up
                beforehand (then leave the MLflow arguments below unset). Defaults to True.
            experiment_name: MLflow experiment. Defaults to None (MLflow's default).
            run_name: MLflow run name. Defaults to None (MLflow picks one).
            registered_model_name: Name to register the net under, or False not to.
                Defaults to None (the experiment's name).
            tracking_uri: MLflow tracking URI. Defaults to None (`MLFLOW_TRACKING_URI`, else
                `sqlite:///mlflow.db`).
            **trainer_kwargs: Passed to `pl.Trainer` (precision, gradient_clip_val,
                accumulate_grad_batches, devices, strategy, ...).

        Returns:
            The history, one row per epoch. With several processes, the `val_` values are over
            every validation row once; the training values are over the rows trained on,
            which Lightning's sampler pads with up to one repeated row per process so that
            all processes take the same number of steps.

        Example:
            >>> history = model.fit(dl_train, dl_valid, epochs=10, gpus=0)  # doctest: +SKIP
        """
        monitor = monitor or ("val_loss" if val_data is not None else "loss")
        check_fit_args(epochs, mode, patience, verbose, train_data, val_data, ckpt_path, ckpt_dir)
        check_monitor(monitor, val_data)
        device_kwargs = trainer_device_kwargs(gpus, trainer_kwargs)
        ckpt_path = resume_path(ckpt_path, ckpt_dir)
        checkpoint = BestCheckpoint(
            dirpath=ckpt_dir,
            filename=f"{{epoch}}-{{{monitor}:.4f}}",
            monitor=monitor,
            mode=mode,
            save_top_k=1,
        )
        fit_callbacks: list[Callback] = [checkpoint, LastCheckpoint(checkpoint), *callbacks]
        if patience is not None:
            fit_callbacks.append(EarlyStopping(monitor=monitor, mode=mode, patience=patience))
        if verbose == 2:
            fit_callbacks.append(EpochLogger())
        tracker = tracker_of(track, experiment_name, run_name, registered_model_name, tracking_uri)
        if tracker is not None:
            fit_callbacks.append(tracker)
        with quiet(verbose):
            trainer = build_trainer(
                epochs, verbose, fit_callbacks, {**trainer_kwargs, **device_kwargs}
            )
            if val_data is not None:
                val_data = each_row_once("val_data", val_data, trainer, trainer_kwargs)
            fit_passing_interrupts(trainer, self, train_data, val_data, ckpt_path=ckpt_path)
        if tracker is not None:
            self.run_id = tracker.run_id_
        if isinstance(trainer.strategy.launcher, _MultiProcessingLauncher):
            self._take_back_from_workers(checkpoint, tracker)
        self._restore_best(checkpoint.best_model_path)
        return self.history_frame()

    def _take_back_from_workers(
        self, checkpoint: ModelCheckpoint, tracker: Callback | None
    ) -> None:
        """The history and run id that forked or spawned processes (`ddp_notebook`) kept.

        Lightning sends only the weights and the best checkpoint's path back to this process;
        the newest last checkpoint holds the rest.
        """
        lasts = sorted(Path(checkpoint.dirpath).glob("last*.ckpt"), key=os.path.getmtime)
        if not lasts:
            return
        saved = torch.load(lasts[-1], map_location="cpu", weights_only=True)
        self.history = [dict(row) for row in saved.get("lkflow_history", [])]
        if tracker is not None:
            self.run_id = saved.get("callbacks", {}).get(tracker.state_key, {}).get("run_id")

    def _restore_best(self, best_model_path: str) -> None:
        if best_model_path:
            state = torch.load(best_model_path, map_location=self.device, weights_only=True)
            self.load_state_dict(state["state_dict"])

    def evaluate(
        self, data: DataLoader, *, gpus: Gpus = None, **trainer_kwargs: Any
    ) -> dict[str, float]:
        """The loss and metrics over a whole DataLoader.

        Args:
            data: The DataLoader to evaluate on.
            gpus: As in `fit`. Defaults to None.
            **trainer_kwargs: Passed to `pl.Trainer`.

        Returns:
            `{"loss": ..., **metrics}`, each over every row of `data` (once, also when
            several processes share the rows).

        Example:
            >>> model.evaluate(dl_valid)  # doctest: +SKIP
            {'loss': 0.16, 'acc': 0.93}
        """
        check_loader("data", data)
        device_kwargs = trainer_device_kwargs(gpus, trainer_kwargs)
        with quiet(0):
            trainer = build_trainer(1, 0, [], {**trainer_kwargs, **device_kwargs})
            data = each_row_once("data", data, trainer, trainer_kwargs)
            (results,) = trainer.test(self, dataloaders=data, verbose=False)
        return {key.removeprefix("test_"): value for key, value in results.items()}

    def predict(self, data: DataLoader | Iterable[Any] | torch.Tensor) -> torch.Tensor:
        """The net's outputs, batches concatenated, on the CPU.

        Args:
            data: A DataLoader (inputs are `batch[0]`, or the batch itself when it is a
                tensor), any iterable of such batches, or one input tensor.

        Returns:
            The outputs of `model.net`, without gradients.

        Example:
            >>> probabilities = torch.sigmoid(model.predict(dl_valid))  # doctest: +SKIP
        """
        batches = [data] if isinstance(data, torch.Tensor) else data
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                outputs = [self.net(self.example_input(b).to(self.device)) for b in batches]
        finally:
            self.train(was_training)
        if not outputs:
            raise LkflowError("Received: data with no batches. Pass a non-empty DataLoader.")
        return torch.cat(outputs).cpu()

    def history_frame(self) -> pd.DataFrame:
        """The history as a DataFrame, one row per epoch.

        Returns:
            Columns `epoch`, the train keys, the `val_` keys and `lr`.
        """
        import pandas as pd

        return pd.DataFrame(self.history)


def _warn_of_masked(hparams: Mapping[str, Any], given: Mapping[str, Any]) -> None:
    """Warns of hyperparameters held masked in a checkpoint and not passed again."""
    masked = [key for key, value in hparams.items() if key not in given and _holds_mask(value)]
    if masked:
        names = ", ".join(f"{key}=..." for key in masked)
        warnings.warn(
            f"The checkpoint holds {', '.join(masked)} masked as {MASK!r} (lkflow keeps "
            f"secrets out of checkpoints), so the model gets {MASK!r}. Pass {names} to "
            "load_from_checkpoint for the real value.",
            stacklevel=3,
        )


def _holds_mask(value: Any) -> bool:
    values = flatten(value).values() if isinstance(value, Mapping) else [value]
    return any(isinstance(v, str) and v == MASK for v in values)


def _split_xy(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    size = f" of {len(batch)} items" if isinstance(batch, (tuple, list)) else ""
    raise LkflowError(
        f"Received: a batch of type {type(batch).__name__}{size}. The default step expects "
        "(x, y) pairs; yield them from the DataLoader, or override shared_step(batch)."
    )


def _first_lr(optimizers: list[torch.optim.Optimizer]) -> float | None:
    if not optimizers:
        return None
    return float(optimizers[0].param_groups[0]["lr"])
