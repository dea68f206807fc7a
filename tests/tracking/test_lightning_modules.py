"""MLflowCallback on LightningModules written for Lightning, not for lkflow (tests/peers.py),
fitted with a plain `pl.Trainer`, beside the Trainer's own loggers.

Each fit records what Lightning's `callback_metrics` held at every epoch's end (after the
module's `on_train_epoch_end`, where `ModelCheckpoint` reads them), and the run must hold those
values at `step=epoch`; what Lightning gave its other loggers per step, the run holds at the
same steps. The registered models are loaded where lkflow cannot be imported, and one is
served by `mlflow models serve`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from helpers import fresh_store
from mlflow import MlflowClient
from peers import (
    DigitsData,
    LitClassifier,
    LitTabular,
    autoencoder,
    flattened,
    tabular_loaders,
)
from pytorch_lightning.callbacks import Checkpoint, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, MLFlowLogger
from servers import lkflow_free_env, lkflow_free_python, models_serve, post

import lkflow

EPOCHS = 2
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}  # the served program may fuse operations
_MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME")


class EpochEnds(Checkpoint):
    """What `trainer.callback_metrics` holds at each epoch's end, read where Lightning's own
    `ModelCheckpoint` reads it (a `Checkpoint` runs after the module's `on_train_epoch_end`)."""

    def __init__(self) -> None:
        self.held: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.held.append({key: float(v) for key, v in trainer.callback_metrics.items()})


@dataclass
class Fitted:
    """One tracked fit of a peer module: what the tests look at afterwards."""

    module: pl.LightningModule
    tracker: lkflow.MLflowCallback
    checkpoint: ModelCheckpoint
    ends: EpochEnds
    uri: str
    folder: Path
    loaders: tuple[Any, ...] = ()
    other_uri: str | None = None  # the store of an MLFlowLogger beside the callback
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(self.uri)

    @property
    def run_id(self) -> str:
        return str(self.tracker.run_id_)

    def logged(self, key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in self.client.get_metric_history(self.run_id, key))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, migrated_store: Path) -> str:
    return fresh_store(tmp_path_factory.mktemp("peers_store"), migrated_store)


@pytest.fixture(scope="module")
def fit_in(
    tmp_path_factory: pytest.TempPathFactory, store: str
) -> Callable[..., tuple[pl.Trainer, Path]]:
    """`fit_in(name, module, make, *loaders, **trainer_kwargs)`: a fit on the CPU in a folder of
    its own, MLFLOW_TRACKING_URI naming the module's store; `make(folder)` makes the callbacks
    and loggers there (Trainer arguments), once the store is set."""

    def fit(
        name: str,
        module: pl.LightningModule,
        make: Callable[[Path], dict[str, Any]],
        *loaders: Any,
        **trainer_kwargs: Any,
    ) -> tuple[pl.Trainer, Path]:
        folder = tmp_path_factory.mktemp(name)
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(folder)
            for variable in _MLFLOW_ENV:
                patch.delenv(variable, raising=False)
            patch.setenv("MLFLOW_TRACKING_URI", store)
            trainer = pl.Trainer(
                max_epochs=EPOCHS,
                enable_progress_bar=False,
                enable_model_summary=False,
                **make(folder),
                **trainer_kwargs,
            )
            trainer.fit(module, *loaders)
            mlflow.set_tracking_uri(None)  # MLFlowLogger sets it
        return trainer, folder

    return fit


def digits_loaders(rows: int = 640) -> tuple[Any, Any]:
    data = DigitsData(batch_size=64, rows=rows)
    data.setup("fit")
    return data.train_dataloader(), data.val_dataloader()


def check_rows(fitted: Fitted, keys: list[str]) -> None:
    """The run holds `keys` at steps 1, 2, ... with what `callback_metrics` held at each epoch's
    end, the first optimizer's learning rate as `lr`, and these as history.csv."""
    held = fitted.ends.held
    assert len(held) == EPOCHS
    for key in keys:
        expected = [
            (epoch, pytest.approx(ends[key], rel=1e-6)) for epoch, ends in enumerate(held, 1)
        ]
        assert fitted.logged(key) == expected, key
    assert [step for step, _ in fitted.logged("lr")] == list(range(1, EPOCHS + 1))
    csv = Path(fitted.client.download_artifacts(fitted.run_id, "history.csv"))
    history = pd.read_csv(csv)
    assert history["epoch"].tolist() == list(range(1, EPOCHS + 1))
    assert sorted(history.columns) == sorted(["epoch", *keys, "lr"])


def check_best(fitted: Fitted, monitor: str, mode: str) -> None:
    """best_<monitor> and best_epoch are the Trainer's ModelCheckpoint's best, whose file is in
    the run, and the registered version is tagged with them."""
    checkpoint = fitted.checkpoint
    saved = torch.load(checkpoint.best_model_path, weights_only=True)
    metrics = fitted.client.get_run(fitted.run_id).data.metrics
    assert metrics[f"best_{monitor}"] == pytest.approx(float(checkpoint.best_model_score))
    assert metrics["best_epoch"] == saved["epoch"] + 1  # epochs count from 1
    files = {a.path for a in fitted.client.list_artifacts(fitted.run_id, "checkpoints")}
    assert f"checkpoints/{Path(checkpoint.best_model_path).name}" in files
    version = fitted.tracker.model_version_
    assert version is not None and version.run_id == fitted.run_id
    assert version.tags["monitor"] == monitor and version.tags["mode"] == mode
    assert version.tags["best_epoch"] == str(saved["epoch"] + 1)


# ---- the quick start's autoencoder: per-step training loss, served encoder -----------------


@pytest.fixture(scope="module")
def autoencoder_fit(fit_in: Callable[..., Any]) -> Fitted:
    pl.seed_everything(0, verbose=False)
    module, ends = autoencoder(), EpochEnds()
    parts: dict[str, Any] = {}

    def make(folder: Path) -> dict[str, Any]:
        parts["tracker"] = lkflow.MLflowCallback(
            registered_model_name="encoder",
            net="encoder",
            example_input=flattened,
        )
        parts["checkpoint"] = ModelCheckpoint(monitor="val_loss")
        return {
            "callbacks": [parts["tracker"], parts["checkpoint"], ends],
            "logger": CSVLogger(folder),
        }

    loaders = digits_loaders()
    trainer, folder = fit_in("autoencoder", module, make, *loaders, log_every_n_steps=2)
    csv_logger = trainer.logger
    return Fitted(
        module,
        parts["tracker"],
        parts["checkpoint"],
        ends,
        parts["tracker"].client_.tracking_uri,
        folder,
        loaders,
        extra={"metrics_csv": Path(csv_logger.log_dir) / "metrics.csv"},
    )


def test_autoencoder_epoch_values_and_its_per_step_loss_as_the_csv_logger_has_it(
    autoencoder_fit: Fitted,
) -> None:
    fitted = autoencoder_fit
    assert fitted.client.get_run(fitted.run_id).info.status == "FINISHED"
    check_rows(fitted, ["val_loss"])  # train_loss is logged per step only: no epoch value
    check_best(fitted, "val_loss", "min")
    theirs = pd.read_csv(fitted.extra["metrics_csv"]).dropna(subset=["train_loss"])
    assert len(theirs) > EPOCHS  # Lightning logged it every 2nd step, to both loggers
    assert fitted.logged("train_loss") == [
        (int(step), pytest.approx(value, rel=1e-6))
        for step, value in zip(theirs["step"], theirs["train_loss"], strict=True)
    ]


def test_autoencoder_serves_the_named_encoder_on_the_given_example(
    autoencoder_fit: Fitted,
) -> None:
    fitted = autoencoder_fit
    run = fitted.client.get_run(fitted.run_id)
    assert run.data.params["net"] == "Sequential" and run.data.params["optimizer"] == "Adam"
    encoder = fitted.module.encoder.eval()
    images, _ = next(iter(fitted.loaders[1]))
    rows = images.view(len(images), -1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", fitted.uri)
        served = mlflow.pyfunc.load_model("models:/encoder/1")
        path = mlflow.artifacts.download_artifacts(run_id=fitted.run_id, artifact_path="net")
    with torch.no_grad():
        np.testing.assert_allclose(served.predict(rows.numpy()), encoder(rows).numpy(), **TOLERANCE)
    weights = torch.load(Path(path) / "state_dict.pt", weights_only=True)
    assert sorted(weights) == sorted(encoder.state_dict())  # the encoder's, not the module's
    saved = torch.load(fitted.checkpoint.best_model_path, weights_only=True)["state_dict"]
    for key, value in weights.items():
        assert torch.equal(value, saved[f"encoder.{key}"]), key


# ---- torchmetrics in Lightning, beside a CSVLogger and an MLFlowLogger elsewhere ------------


@pytest.fixture(scope="module")
def classifier_fit(
    fit_in: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory, migrated_store: Path
) -> Fitted:
    pl.seed_everything(0, verbose=False)
    other = fresh_store(tmp_path_factory.mktemp("other_store"), migrated_store)
    module, ends = LitClassifier(hidden=32, lr=0.05), EpochEnds()
    parts: dict[str, Any] = {}

    def make(folder: Path) -> dict[str, Any]:
        parts["tracker"] = lkflow.MLflowCallback(experiment_name="digits")
        parts["checkpoint"] = ModelCheckpoint(monitor="valid_acc", mode="max")
        parts["loggers"] = [
            CSVLogger(folder),
            MLFlowLogger(experiment_name="theirs", tracking_uri=other),
        ]
        return {
            "callbacks": [parts["tracker"], parts["checkpoint"], ends],
            "logger": parts["loggers"],
        }

    loaders = digits_loaders()
    trainer, folder = fit_in("classifier", module, make, *loaders, log_every_n_steps=2)
    loggers = parts["loggers"]
    assert trainer.loggers == loggers  # the callback's logger into its run left with the fit
    return Fitted(
        module,
        parts["tracker"],
        parts["checkpoint"],
        ends,
        parts["tracker"].client_.tracking_uri,
        folder,
        loaders,
        other_uri=other,
        extra={"their_run": loggers[1].run_id},
    )


def test_classifier_rows_are_what_lightning_held_at_each_epoch_end(
    classifier_fit: Fitted, store: str
) -> None:
    fitted = classifier_fit
    assert fitted.uri == store  # not the MLFlowLogger's, which sets MLflow's URI at setup
    assert fitted.client.get_run(fitted.run_id).info.status == "FINISHED"
    # train_loss on step and epoch, train_acc_epoch from on_train_epoch_end, valid_acc both
    check_rows(fitted, ["train_loss", "train_acc_epoch", "val_loss", "valid_acc"])
    assert [value for _, value in fitted.logged("lr")] == pytest.approx([0.05, 0.025])  # StepLR
    check_best(fitted, "valid_acc", "max")
    assert fitted.ends.held[-1]["valid_acc"] > 0.5  # it learned: chance is 0.1


def test_classifier_params_come_from_its_hparams_optimizer_trainer_and_data(
    classifier_fit: Fitted,
) -> None:
    params = classifier_fit.client.get_run(classifier_fit.run_id).data.params
    expected = {
        "num_classes": "10",
        "hidden": "32",
        "lr": "0.05",
        "optimizer": "Adam",
        "optimizer.lr": "0.05",
        "lr_scheduler": "StepLR",
        "lr_scheduler.gamma": "0.5",
        "epochs": str(EPOCHS),
        "batch_size": "64",
        "train_size": "480",
        "val_size": "160",
        "net": "LitClassifier",  # the module itself, by its forward
    }
    assert {key: params.get(key) for key in expected} == expected


def test_classifier_per_step_values_are_what_an_mlflowlogger_elsewhere_got(
    classifier_fit: Fitted,
) -> None:
    fitted = classifier_fit
    theirs = MlflowClient(fitted.other_uri)
    run_id = fitted.extra["their_run"]
    for key in ("train_loss_step", "train_acc_step"):
        their_points = sorted((m.step, m.value) for m in theirs.get_metric_history(run_id, key))
        assert len(their_points) > EPOCHS and fitted.logged(key) == their_points, key
    # theirs logs the epoch values at the global step, under Lightning's forked names
    assert "train_loss_epoch" in theirs.get_run(run_id).data.metrics
    assert "train_loss_epoch" not in fitted.client.get_run(fitted.run_id).data.metrics
    assert len(fitted.client.search_runs([fitted.tracker.experiment_id_])) == 1


def test_classifier_registers_itself_by_its_forward(classifier_fit: Fitted) -> None:
    images, _ = next(iter(classifier_fit.loaders[1]))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", classifier_fit.uri)
        served = mlflow.pyfunc.load_model("models:/digits/1")  # the experiment's name
    assert served.metadata.flavors.keys() >= {"pytorch", "python_function"}
    with torch.no_grad():
        expected = classifier_fit.module.eval()(images)
    np.testing.assert_allclose(served.predict(images.numpy()), expected.numpy(), **TOLERANCE)


def test_classifier_models_metrics_name_the_data_they_were_computed_on(
    classifier_fit: Fitted,
) -> None:
    client = classifier_fit.client
    run = client.get_run(classifier_fit.run_id)
    data = {d.tags[0].value: (d.dataset.name, d.dataset.digest) for d in run.inputs.dataset_inputs}
    (output,) = run.outputs.model_outputs
    linked = {
        m.key: (m.dataset_name, m.dataset_digest)
        for m in client.get_logged_model(output.model_id).metrics
    }
    assert linked == {
        **dict.fromkeys(["train_loss", "train_acc_epoch"], data["training"]),
        **dict.fromkeys(["val_loss", "valid_acc", "best_valid_acc"], data["validation"]),
        **dict.fromkeys(["lr", "best_epoch"], (None, None)),
    }
    assert data["training"][0] == data["validation"][0] == "digits"


# ---- example_input_array, two inputs, the module itself served -----------------------------


@pytest.fixture(scope="module")
def tabular_fit(fit_in: Callable[..., Any]) -> Fitted:
    pl.seed_everything(0, verbose=False)
    module, ends = LitTabular(), EpochEnds()
    parts: dict[str, Any] = {}

    def make(folder: Path) -> dict[str, Any]:
        parts["tracker"] = lkflow.MLflowCallback(registered_model_name="tabular-module")
        parts["checkpoint"] = ModelCheckpoint(folder / "checkpoints", monitor="val_loss")
        return {"callbacks": [parts["tracker"], parts["checkpoint"], ends], "logger": False}

    loaders = tabular_loaders()
    _, folder = fit_in("tabular", module, make, *loaders)
    return Fitted(
        module,
        parts["tracker"],
        parts["checkpoint"],
        ends,
        parts["tracker"].client_.tracking_uri,
        folder,
        loaders,
    )


def test_tabular_module_logs_its_epoch_values_and_its_best_checkpoint(
    tabular_fit: Fitted,
) -> None:
    check_rows(tabular_fit, ["loss", "val_loss", "val_acc"])
    check_best(tabular_fit, "val_loss", "min")


def test_tabular_module_itself_is_registered_on_its_example_input_array(
    tabular_fit: Fitted,
) -> None:
    from mlflow.models import Model

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", tabular_fit.uri)
        path = mlflow.artifacts.download_artifacts("models:/tabular-module/1")
    model = Model.load(path)
    assert model.flavors.keys() == {"python_function"}  # the program of two named inputs
    assert model.signature.inputs.input_names() == ["x_num", "x_cat"]
    example = model.load_input_example(path)
    x_num, x_cat = tabular_fit.module.example_input_array
    np.testing.assert_array_equal(example["x_num"], x_num[:5].numpy())
    np.testing.assert_array_equal(example["x_cat"], x_cat[:5].numpy())


@pytest.fixture
def served_tabular(tabular_fit: Fitted, tmp_path: Path) -> Iterator[str]:
    """`mlflow models serve` of the registered module, by a Python without lkflow or peers.py."""
    python = lkflow_free_python(tmp_path / "env")
    env = {**lkflow_free_env(python), "MLFLOW_TRACKING_URI": tabular_fit.uri}
    with models_serve("models:/tabular-module/1", tmp_path, env, python) as url:
        yield url


@pytest.mark.slow
def test_tabular_module_is_served_by_mlflow_models_serve(
    tabular_fit: Fitted, served_tabular: str
) -> None:
    x_num, x_cat, _ = tabular_fit.loaders[1].dataset.tensors
    body = {"inputs": {"x_num": x_num[:7].tolist(), "x_cat": x_cat[:7].tolist()}}
    status, answer = post(f"{served_tabular}/invocations", body)
    assert status == 200, answer
    with torch.no_grad():
        expected = tabular_fit.module.eval()(x_num[:7], x_cat[:7])
    np.testing.assert_allclose(np.array(answer["predictions"]), expected.numpy(), **TOLERANCE)


# ---- LightningCLI, from a YAML config ---------------------------------------------------------

CONFIG = """
seed_everything: 0
trainer:
  max_epochs: 2
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
model:
  hidden: 16
  lr: 0.05
data:
  rows: 320
"""

CALLBACKS = """
trainer:
  callbacks:
    - class_path: lkflow.MLflowCallback
      init_args:
        experiment_name: from-yaml
        registered_model_name: false
        net: model
        example_input: peers.flattened
        step_metrics: false
        tags: {team: digits}
"""


def test_lightning_cli_fits_with_the_callback_added_on_its_command_line(
    tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pytorch_lightning.cli import LightningCLI

    monkeypatch.setattr(sys, "argv", ["train.py"])  # the arguments are `args`

    Path("digits.yaml").write_text(CONFIG)
    args = ["fit", "--config", "digits.yaml", "--trainer.callbacks+=lkflow.MLflowCallback"]
    cli = LightningCLI(
        LitClassifier, DigitsData, args=[*args, "--trainer.callbacks.experiment_name=cli"]
    )
    (tracker,) = [c for c in cli.trainer.callbacks if isinstance(c, lkflow.MLflowCallback)]
    client = MlflowClient(tracking_uri)
    run = client.get_run(tracker.run_id_)
    assert client.get_experiment(run.info.experiment_id).name == "cli"
    assert run.info.status == "FINISHED"
    assert {key: run.data.params[key] for key in ("hidden", "lr", "epochs")} == {
        "hidden": "16",
        "lr": "0.05",
        "epochs": "2",
    }
    for key in ("train_loss", "valid_acc", "val_loss", "lr"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2], key
    # Lightning's own ModelCheckpoint, in its folder for a Trainer without loggers
    best = Path(cli.trainer.checkpoint_callback.best_model_path)
    assert best.parent == Path.cwd() / "checkpoints"
    files = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert files == {f"checkpoints/{best.name}"}
    assert tracker.model_version_ is not None and tracker.model_version_.name == "cli"


def test_lightning_cli_makes_the_callback_of_a_yaml_config(monkeypatch: pytest.MonkeyPatch) -> None:
    from pytorch_lightning.cli import LightningCLI

    monkeypatch.setattr(sys, "argv", ["train.py"])

    Path("digits.yaml").write_text(CONFIG)
    Path("callbacks.yaml").write_text(CALLBACKS)
    args = ["--config", "digits.yaml", "--config", "callbacks.yaml"]
    cli = LightningCLI(LitClassifier, DigitsData, run=False, args=args)
    (tracker,) = [c for c in cli.trainer.callbacks if isinstance(c, lkflow.MLflowCallback)]
    assert (tracker.experiment_name, tracker.registered_model_name) == ("from-yaml", False)
    assert (tracker.net, tracker.example_input, tracker.step_metrics) == ("model", flattened, False)
    assert tracker.tags == {"team": "digits"}
