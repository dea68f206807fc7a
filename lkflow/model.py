"""LightModel: a bare `nn.Module` in a LightningModule, trained Keras-style.

Subclass it and write `shared_step(batch) -> {"loss": ..., **metrics}`, or pass `loss_fn` and
`metrics`; then `fit`, `evaluate` and `predict`, or hand it to a plain `pl.Trainer`. Epoch
values are accumulated on the device and read once per epoch, never per step. With several
processes (DDP), sums and row counts are added up across them, so every process holds the
values over the whole data set.

Here are the module's steps, epoch hooks, optimizers and checkpoint hooks; what `fit`,
`evaluate` and `predict` assemble around it (the callbacks, the Trainer) is in lkflow/fit.py.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal, cast

import pytorch_lightning as pl
import torch
import torchmetrics
from pytorch_lightning.callbacks import Callback
from torch import nn
from typing_extensions import override

from lkflow.batches import Choice, Inputs, call_net, inputs_of, split_batch
from lkflow.checkpoints import check_loadable, mask_hparams, resume_path
from lkflow.checks import (
    batch_values,
    check_finite,
    check_fit_args,
    check_has_loss,
    check_monitor,
    check_monitored_keys,
    check_net,
    is_metric,
    metric_dict,
    stage_metrics,
    step_values,
)
from lkflow.devices import Gpus, trainer_device_kwargs
from lkflow.epoch_values import EpochRows, epoch_number
from lkflow.fit import (
    evaluate_model,
    fit_callbacks,
    fit_model,
    optimizers_of,
    predict_outputs,
    tracker_of,
)
from lkflow.layers import naming_the_failing_layer

if TYPE_CHECKING:
    import pandas as pd
    from torch.utils.data import DataLoader

_STAGES = ("train", "val", "test")
_NOT_HPARAMS = ["net", "loss_fn", "metrics", "optimizer", "lr_scheduler"]
_Inputs = Choice | list[Choice] | tuple[Choice, ...] | None


class LightModel(pl.LightningModule):
    """Wraps a bare `nn.Module` so that it trains like a Keras model.

    Args:
        net: The network; `model.net` is this same object, and it leaves the wrapper untouched.
        loss_fn: `loss_fn(preds, target)` for the default step; `preds` is what the net returns
            (a tuple or dict as is). Defaults to None (then override `shared_step`).
        metrics: Name to `torchmetrics.Metric` or `MetricCollection` (computed over each
            epoch; a collection under its own names) or to a function `(preds, target) ->
            tensor` (averaged over the epoch's rows); or one `MetricCollection`. Defaults to None.
        optimizer: An optimizer over `net.parameters()`. Defaults to None (Adam, lr 1e-3).
        lr_scheduler: A scheduler of `optimizer`, or Lightning's dict
            (`{"scheduler": ..., "interval": "step"}`); `ReduceLROnPlateau` without a monitor
            watches the fit's `monitor`. Defaults to None.
        inputs: The net's inputs in a batch: an index or key, or a list of them. Defaults to
            None (all but the target).
        target: The target's index or key, None for none, or "auto" (lkflow/batches.py's rule:
            the last item of a tuple, a dict's "y"/"labels"/... key). Defaults to "auto".

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
        metrics: Mapping[str, Any] | torchmetrics.MetricCollection | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        lr_scheduler: Any = None,
        inputs: _Inputs = None,
        target: Choice | None = "auto",
    ) -> None:
        super().__init__()
        check_net(net)
        self.net = net
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.inputs, self.target = inputs, target
        named = metric_dict(metrics)
        self.train_metrics = nn.ModuleDict(stage_metrics(named))
        self.val_metrics = nn.ModuleDict(stage_metrics(named))
        self.test_metrics = nn.ModuleDict(stage_metrics(named))
        self._functions = {k: v for k, v in (named or {}).items() if not is_metric(v)}
        self.history: list[dict[str, float]] = []
        self.run_id: str | None = None
        self._epochs = EpochRows()
        self._first_steps = set(_STAGES)  # the stages yet to take their first step (see _step)
        self.save_hyperparameters(ignore=_not_hparams(inputs, target))
        check_has_loss(loss_fn, own_step=_has_own_step(type(self)))

    @override
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.net(*args, **kwargs)

    def shared_step(self, batch: Any) -> dict[str, Any]:
        """One batch's loss and metrics: by default `loss_fn` and `metrics` on what the net
        returns and the target, the batch split by `inputs` and `target`.

        Override it for other losses. It returns the batch's values, `{"loss": loss, **metrics}`:
        tensors (averaged over the epoch's rows) or torchmetrics updated with the batch.

        Args:
            batch: One batch from the DataLoader.
        """
        check_has_loss(self.loss_fn, own_step=False)
        x, y = split_batch(batch, inputs=self.inputs, target=self.target)
        preds = call_net(self, x)
        metrics: nn.ModuleDict = getattr(self, f"{_stage_of(self.trainer)}_metrics")
        return batch_values(preds, y, cast(nn.Module, self.loss_fn), metrics, self._functions)

    def example_input(self, batch: Any) -> Inputs:
        """The net's inputs in `batch`, by `inputs` and `target`; `predict`, `summary` and the
        MLflow model's input example use it.

        Args:
            batch: One batch from a DataLoader; a batch without a target is inputs whole.

        Returns:
            A tensor (`net(x)`), a tuple (`net(*x)`) or a dict of tensors (`net(**x)`).
        """
        return inputs_of(batch, inputs=self.inputs, target=self.target)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        first = "train" in self._first_steps
        values = self._step(batch, "train")
        if first:
            check_monitored_keys(self.trainer, values)
        return cast(torch.Tensor, values["loss"])

    @override
    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._step(batch, "val")

    @override
    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._step(batch, "test")

    @override
    def setup(self, stage: str) -> None:
        self._epochs.reset()  # nothing left from a run that an exception ended mid-epoch
        self._first_steps = set(_STAGES)

    def _step(self, batch: Any, stage: str) -> Mapping[str, Any]:
        # each stage's first step names a failing layer (sanity checks do not stand for training)
        first = stage in self._first_steps
        watch = naming_the_failing_layer(self.net) if first else contextlib.nullcontext()
        with watch:
            values = step_values(self.shared_step(batch))
        self._first_steps.discard(stage)
        self._epochs.add(stage, values, batch)
        return values

    @override
    def on_train_epoch_start(self) -> None:
        self._epochs.start_training(self.trainer.optimizers)

    @override
    def on_validation_epoch_end(self) -> None:
        values = self._epochs.compute("val", self.trainer.strategy)
        if not self.trainer.sanity_checking:
            self._epochs.val_row = values
            self.log_dict(values)

    @override
    def on_test_epoch_end(self) -> None:
        self.log_dict(self._epochs.compute("test", self.trainer.strategy))

    @override
    def on_train_epoch_end(self) -> None:
        train = self._epochs.compute("train", self.trainer.strategy)
        self.history.append(self._epochs.train_row(epoch_number(self.current_epoch), train))
        self.log_dict(train)
        check_finite(self.history[-1])

    @override
    def configure_optimizers(self) -> Any:
        return optimizers_of(self)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["lkflow_history"] = [dict(row) for row in self.history]
        mask_hparams(checkpoint, self.CHECKPOINT_HYPER_PARAMS_KEY)  # as in the run's params

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.history = [dict(row) for row in checkpoint.get("lkflow_history", [])]

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: str | Path | IO[bytes],
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
            LkflowError: Without `net`, or for a file not a whole lkflow checkpoint.

        Example:
            >>> clone = Model.load_from_checkpoint(path, net=Net())  # doctest: +SKIP
        """
        check_loadable(cls.__name__, net, checkpoint_path, cls.CHECKPOINT_HYPER_PARAMS_KEY, kwargs)
        options = dict(map_location=map_location, strict=strict, weights_only=True)
        return super().load_from_checkpoint(checkpoint_path, net=net, **options, **kwargs)

    def fit(
        self,
        train_data: DataLoader[Any],
        val_data: DataLoader[Any] | None = None,
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
            epochs: The epoch to stop after (epochs count from 1): a new fit trains this many,
                a resumed fit continues up to it. Defaults to 10.
            gpus: 0 for the CPU, N GPUs, -1 for all, `[0, 1]` or `"0,1"` for those devices.
                Defaults to None: one GPU when CUDA is there, else the CPU.
            monitor: The history key that picks the best epoch. Defaults to None:
                `val_loss`, or `loss` without validation data.
            mode: "min" or "max" for `monitor`. Defaults to "min".
            patience: Stop after this many epochs without improvement. Defaults to None.
            ckpt_path: A checkpoint to resume from, with its history, or "last". Defaults to
                None: a new fit, with a history and MLflow run of its own, even if fitted before.
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
            every validation row once; the training values over the rows trained on (Lightning's
            sampler repeats up to one row per process so that all take as many steps).

        Example:
            >>> history = model.fit(dl_train, dl_valid, epochs=10, gpus=0)  # doctest: +SKIP
        """
        monitor = monitor or ("val_loss" if val_data is not None else "loss")
        check_fit_args(epochs, mode, patience, verbose, train_data, val_data, ckpt_path, ckpt_dir)
        check_monitor(monitor, val_data)
        trainer_kwargs |= trainer_device_kwargs(gpus, trainer_kwargs)
        ckpt_path = resume_path(ckpt_path, ckpt_dir)
        tracker = tracker_of(track, experiment_name, run_name, registered_model_name, tracking_uri)
        every = fit_callbacks(ckpt_dir, monitor, mode, patience, verbose, callbacks, tracker)
        fit_model(self, train_data, val_data, epochs, verbose, ckpt_path, every, trainer_kwargs)
        return self.history_frame()

    def evaluate(
        self, data: DataLoader[Any], *, gpus: Gpus = None, **trainer_kwargs: Any
    ) -> dict[str, float]:
        """The loss and metrics over a whole DataLoader.

        Args:
            data: The DataLoader to evaluate on.
            gpus: As in `fit`. Defaults to None.
            **trainer_kwargs: Passed to `pl.Trainer`.

        Returns:
            `{"loss": ..., **metrics}`, each over every row of `data` once.

        Example:
            >>> model.evaluate(dl_valid)  # doctest: +SKIP
            {'loss': 0.16, 'acc': 0.93}
        """
        return evaluate_model(self, data, gpus, trainer_kwargs)

    def predict(self, data: DataLoader[Any] | Iterable[Any] | torch.Tensor) -> Any:
        """The net's outputs in eval mode, batches concatenated, on the CPU; the wrapper and
        every module of the net are left in the train or eval mode they were in.

        Args:
            data: A DataLoader (inputs found by `example_input`), any iterable of batches,
                or one input tensor.

        Returns:
            What `model.net` returns, without gradients: a tensor, or a tuple or dict of them.

        Example:
            >>> probabilities = torch.sigmoid(model.predict(dl_valid))  # doctest: +SKIP
        """
        return predict_outputs(self, data)

    def history_frame(self) -> pd.DataFrame:
        """The history, one row per epoch: `epoch`, the train keys, the `val_` keys, `lr`."""
        import pandas as pd

        return pd.DataFrame(self.history)


def _not_hparams(inputs: _Inputs, target: Choice | None) -> list[str]:
    """The constructor arguments kept out of the hyperparameters: the modules, and the batch
    layout where it is the default rule (a layout of one's own is saved, and restored on load)."""
    return _NOT_HPARAMS + ["inputs"] * (inputs is None) + ["target"] * (target == "auto")


def _stage_of(trainer: pl.Trainer) -> str:
    return "train" if trainer.training else ("test" if trainer.testing else "val")


def _has_own_step(cls: type[LightModel]) -> bool:
    """Whether `cls` computes the loss itself: it defines shared_step or training_step anew."""
    steps = ("shared_step", "training_step")
    return any(getattr(cls, name) is not getattr(LightModel, name) for name in steps)
