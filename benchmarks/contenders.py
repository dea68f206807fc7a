"""The contenders: one function per way of training a workload, each returning nothing.

Every contender trains ``w.net`` with Adam for ``w.epochs`` epochs, with a full validation
pass after each epoch and epoch-level loss and accuracy for train and validation. They differ
only in the framework around that loop:

==================== =====================================================================
torch_loop           hand-written loop; metrics summed on device, read once per epoch
lightning_lean       LightningModule, metrics summed on device and logged once per epoch
lightning_idiomatic  LightningModule with ``self.log(on_step=True, on_epoch=True)`` per step
lightning_lean_ckpt  the lean module plus a best-``val_loss`` ``ModelCheckpoint``
lkflow_untracked     ``lkflow.LightModel(...).fit(track=False)``
lightning_mlflow     idiomatic module + ``MLFlowLogger(log_model=True)`` + ``ModelCheckpoint``
autolog              idiomatic module under ``mlflow.pytorch.autolog()``
lkflow_tracked       ``fit(track=True)``: params, metrics, artifacts and a registered model, and
                     system metrics sampled every 10 s (the default)
lkflow_tracked_no_system_metrics    the same with ``system_metrics=False``
lkflow_tracked_system_metrics_1s    the same sampling system metrics every second
==================== =====================================================================

Contenders that use MLflow write to ``sqlite:///<cwd>/mlflow.db``; the benchmark runs each
one in a fresh temporary working directory, so every store starts empty.

``PRELOAD`` names the modules each contender imports before its clock starts, so that import
time (reported separately) stays out of training time.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.workloads import Workload, accuracy

EXPERIMENT = "benchmark"
REGISTERED_MODEL = "benchmark-model"

_LIGHTNING = ("pytorch_lightning",)
_MLFLOW = (*_LIGHTNING, "mlflow", "mlflow.pytorch", "mlflow.store.tracking.sqlalchemy_store")
_LKFLOW = ("lkflow.model", "pandas")  # `import lkflow` alone is lazy; fit returns a DataFrame


def _tracking_uri() -> str:
    """A sqlite store in the current (temporary) directory."""
    return f"sqlite:///{os.path.join(os.getcwd(), 'mlflow.db')}"


def _trainer_kwargs(w: Workload) -> dict[str, Any]:
    """Trainer settings shared by the Lightning contenders: CPU, quiet, no extras."""
    return {
        "max_epochs": w.epochs,
        "accelerator": "cpu",
        "devices": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }


# --- 1. hand-written loop -------------------------------------------------------------------


def torch_loop(w: Workload) -> None:
    """The floor: plain PyTorch, metrics accumulated on device and read once per epoch."""
    net, loss_fn = w.net, w.loss_fn
    optimizer = torch.optim.Adam(net.parameters(), lr=w.lr)
    history: list[dict[str, float]] = []

    def run_epoch(loader: torch.utils.data.DataLoader, train: bool) -> tuple[float, float]:
        net.train(train)
        total_loss, total_acc, count = torch.zeros(()), torch.zeros(()), 0
        with torch.set_grad_enabled(train):
            for x, y in loader:
                logits = net(x)
                loss = loss_fn(logits, y)
                if train:
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                total_loss += loss.detach() * len(y)
                total_acc += accuracy(logits.detach(), y) * len(y)
                count += len(y)
        return (total_loss / count).item(), (total_acc / count).item()

    for epoch in range(w.epochs):
        loss, acc = run_epoch(w.dl_train, train=True)
        val_loss, val_acc = run_epoch(w.dl_valid, train=False)
        history.append(
            {"epoch": epoch, "loss": loss, "acc": acc, "val_loss": val_loss, "val_acc": val_acc}
        )


# --- 2. Lightning, idiomatic and lean ------------------------------------------------------


def _idiomatic_module(w: Workload) -> Any:
    """The LightningModule most tutorials write: ``self.log`` every step, epoch means kept."""
    import pytorch_lightning as pl

    class Idiomatic(pl.LightningModule):
        def __init__(self, net: torch.nn.Module, loss_fn: torch.nn.Module, lr: float) -> None:
            super().__init__()
            self.save_hyperparameters(ignore=["net", "loss_fn"])
            self.net, self.loss_fn = net, loss_fn

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            logits = self(x)
            loss = self.loss_fn(logits, y)
            self.log("loss", loss, on_step=True, on_epoch=True, prog_bar=True)
            self.log("acc", accuracy(logits, y), on_step=True, on_epoch=True, prog_bar=True)
            return loss

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            logits = self(x)
            self.log("val_loss", self.loss_fn(logits, y), on_epoch=True, prog_bar=True)
            self.log("val_acc", accuracy(logits, y), on_epoch=True, prog_bar=True)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    return Idiomatic(w.net, w.loss_fn, w.lr)


def lightning_idiomatic(w: Workload) -> None:
    """Idiomatic LightningModule, no logger, no checkpoint, progress bar off."""
    import pytorch_lightning as pl

    trainer = pl.Trainer(logger=False, enable_checkpointing=False, **_trainer_kwargs(w))
    trainer.fit(_idiomatic_module(w), w.dl_train, w.dl_valid)


def _lean_module(w: Workload) -> Any:
    """Sums kept on device, one ``self.log`` per metric per epoch."""
    import pytorch_lightning as pl

    class Lean(pl.LightningModule):
        def __init__(self, net: torch.nn.Module, loss_fn: torch.nn.Module, lr: float) -> None:
            super().__init__()
            self.net, self.loss_fn, self.lr = net, loss_fn, lr
            self.sums: dict[str, torch.Tensor] = {}

        def _accumulate(self, prefix: str, batch: Any) -> torch.Tensor:
            x, y = batch
            logits = self.net(x)
            loss = self.loss_fn(logits, y)
            n = len(y)
            for key, value in (("loss", loss.detach()), ("acc", accuracy(logits.detach(), y))):
                self.sums[prefix + key] = self.sums.get(prefix + key, 0) + value * n
            self.sums[prefix + "n"] = self.sums.get(prefix + "n", 0) + n
            return loss

        def _log_epoch(self, prefix: str) -> None:
            n = self.sums.pop(prefix + "n")
            for key in ("loss", "acc"):
                self.log(prefix + key, self.sums.pop(prefix + key) / n)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self._accumulate("", batch)

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self._accumulate("val_", batch)

        def on_validation_epoch_end(self) -> None:
            self._log_epoch("val_")

        def on_train_epoch_end(self) -> None:
            self._log_epoch("")

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=self.lr)

    return Lean(w.net, w.loss_fn, w.lr)


def lightning_lean(w: Workload) -> None:
    """The leanest fair Lightning: sums kept on device, one ``self.log`` per metric per epoch."""
    import pytorch_lightning as pl

    trainer = pl.Trainer(logger=False, enable_checkpointing=False, **_trainer_kwargs(w))
    trainer.fit(_lean_module(w), w.dl_train, w.dl_valid)


def lightning_lean_ckpt(w: Workload) -> None:
    """The lean module keeping its best checkpoint, as lkflow does by default (no logger)."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    checkpoint = ModelCheckpoint(dirpath="checkpoints", monitor="val_loss", mode="min")
    trainer = pl.Trainer(logger=False, callbacks=[checkpoint], **_trainer_kwargs(w))
    trainer.fit(_lean_module(w), w.dl_train, w.dl_valid)


# --- 3. lkflow, untracked ------------------------------------------------------------------


def _light_model(w: Workload) -> Any:
    import lkflow

    return lkflow.LightModel(
        w.net,
        loss_fn=w.loss_fn,
        metrics={"acc": accuracy},
        optimizer=torch.optim.Adam(w.net.parameters(), lr=w.lr),
    )


def lkflow_untracked(w: Workload) -> None:
    """lkflow ``fit(track=False)``: its default checkpointing, no MLflow."""
    _light_model(w).fit(w.dl_train, w.dl_valid, epochs=w.epochs, gpus=0, verbose=0, track=False)


# --- 4. Lightning + MLFlowLogger + ModelCheckpoint ---------------------------------------------


def lightning_mlflow(w: Workload) -> None:
    """Idiomatic module, ``MLFlowLogger(log_model=True)`` and a best-val_loss checkpoint."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import MLFlowLogger

    logger = MLFlowLogger(experiment_name=EXPERIMENT, tracking_uri=_tracking_uri(), log_model=True)
    checkpoint = ModelCheckpoint(dirpath="checkpoints", monitor="val_loss", mode="min")
    trainer = pl.Trainer(logger=logger, callbacks=[checkpoint], **_trainer_kwargs(w))
    trainer.fit(_idiomatic_module(w), w.dl_train, w.dl_valid)


# --- 5. mlflow.pytorch.autolog -------------------------------------------------------------


def autolog(w: Workload) -> None:
    """Idiomatic module under ``mlflow.pytorch.autolog()`` with its defaults (logs the model)."""
    import mlflow
    import mlflow.pytorch
    import pytorch_lightning as pl

    mlflow.set_tracking_uri(_tracking_uri())
    mlflow.set_experiment(EXPERIMENT)
    mlflow.pytorch.autolog()
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, **_trainer_kwargs(w))
    trainer.fit(_idiomatic_module(w), w.dl_train, w.dl_valid)


# --- 6. lkflow, fully tracked --------------------------------------------------------------


def lkflow_tracked(w: Workload) -> None:
    """lkflow ``fit(track=True)``: params, metrics, artifacts and a registered model."""
    _lkflow_tracked(w)


def lkflow_tracked_no_system_metrics(w: Workload) -> None:
    """``lkflow_tracked`` without sampling system metrics."""
    _lkflow_tracked(w, system_metrics=False)


def lkflow_tracked_system_metrics_1s(w: Workload) -> None:
    """``lkflow_tracked`` sampling system metrics every second, ten times the default."""
    _lkflow_tracked(w, system_metrics_interval=1.0)


def _lkflow_tracked(w: Workload, **settings: Any) -> None:
    from lkflow.tracking import MLflowCallback

    tracker = MLflowCallback(
        experiment_name=EXPERIMENT,
        registered_model_name=REGISTERED_MODEL,
        tracking_uri=_tracking_uri(),
        **settings,
    )
    _light_model(w).fit(w.dl_train, w.dl_valid, epochs=w.epochs, gpus=0, verbose=0, track=tracker)


CONTENDERS: dict[str, Callable[[Workload], None]] = {
    "torch_loop": torch_loop,
    "lightning_lean": lightning_lean,
    "lightning_idiomatic": lightning_idiomatic,
    "lightning_lean_ckpt": lightning_lean_ckpt,
    "lkflow_untracked": lkflow_untracked,
    "lightning_mlflow": lightning_mlflow,
    "autolog": autolog,
    "lkflow_tracked": lkflow_tracked,
    "lkflow_tracked_no_system_metrics": lkflow_tracked_no_system_metrics,
    "lkflow_tracked_system_metrics_1s": lkflow_tracked_system_metrics_1s,
}

PRELOAD: dict[str, tuple[str, ...]] = {
    "torch_loop": (),
    "lightning_lean": _LIGHTNING,
    "lightning_idiomatic": _LIGHTNING,
    "lightning_lean_ckpt": _LIGHTNING,
    "lkflow_untracked": (*_LIGHTNING, *_LKFLOW),
    "lightning_mlflow": _MLFLOW,
    "autolog": _MLFLOW,
    "lkflow_tracked": (*_MLFLOW, *_LKFLOW, "lkflow.tracking", "torch.export"),
    "lkflow_tracked_no_system_metrics": (*_MLFLOW, *_LKFLOW, "lkflow.tracking", "torch.export"),
    "lkflow_tracked_system_metrics_1s": (*_MLFLOW, *_LKFLOW, "lkflow.tracking", "torch.export"),
}
