"""MLflowCallback against real MLflow: sqlite stores, `mlflow server`, `mlflow models serve`.

Every check goes through `MlflowClient` (or the registered model itself), never by listing files.
"""

from __future__ import annotations

import csv
import importlib
import json
import math
import os
import signal
import subprocess
import sys
import sysconfig
import textwrap
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from helpers import Net, fresh_store, make_loaders
from helpers import make_model as make_plain_model
from mlflow import MlflowClient
from mlflow.entities import Param
from pytorch_lightning.callbacks import ModelCheckpoint
from servers import BIN, Server, bin_path_env, free_port, mlflow_server
from torch import nn

import lkflow
from lkflow.errors import LkflowError
from lkflow.model import LightModel
from lkflow.tracking import MLflowCallback

EPOCHS = 3
X = [[5.0, 0.0], [0.0, -8.0], [3.5, 3.5], [-6.0, 6.0]]


def make_model(
    net: nn.Module | None = None, model_class: type[LightModel] = LightModel
) -> LightModel:
    """conftest's model with a StepLR, so that the scheduler's params are logged too."""
    return make_plain_model(net, model_class, scheduled=True)


def fit(model: LightModel, epochs: int = 2, **kwargs: Any) -> LightModel:
    model.fit(*make_loaders(), epochs=epochs, gpus=0, verbose=0, **kwargs)
    return model


def plain_fit(
    tracker: MLflowCallback,
    folder: Path,
    epochs: int = 2,
    callbacks: tuple[pl.Callback, ...] = (),
    ckpt_path: str | None = None,
    monitor: str | None = "val_loss",
) -> LightModel:
    """A fit with a plain `pl.Trainer`, its checkpoints (best `monitor`, last) in `folder`."""
    checkpoint = ModelCheckpoint(folder / "checkpoints", monitor=monitor, save_last=True)
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[tracker, checkpoint, *callbacks],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = make_model()
    trainer.fit(model, *make_loaders(), ckpt_path=ckpt_path)
    return model


def net_predictions(net: nn.Module) -> np.ndarray:
    with torch.no_grad():
        return net.eval()(torch.tensor(X)).numpy()


@dataclass
class Tracked:
    model: LightModel
    client: MlflowClient
    run_id: str
    uri: str


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory, migrated_store: Path) -> Iterator[Tracked]:
    """One tracked fit of the article's task, shared by the checks that only read it."""
    folder = tmp_path_factory.mktemp("tracked")
    uri = fresh_store(folder, migrated_store)
    here = os.getcwd()
    os.chdir(folder)
    try:
        pl.seed_everything(0, verbose=False)
        model = fit(
            make_model(),
            EPOCHS,
            experiment_name="rings",
            registered_model_name="rings-net",
            tracking_uri=uri,
        )
    finally:
        os.chdir(here)
    yield Tracked(model, MlflowClient(uri), model.run_id, uri)


# ---- one complete run --------------------------------------------------------------------


def test_params(tracked: Tracked) -> None:
    params = tracked.client.get_run(tracked.run_id).data.params
    assert (
        params
        | {
            "epochs": "3",
            "batch_size": "64",
            "train_size": "320",
            "val_size": "250",
            "net": "Net",
            "net.params": "115",
            "precision": "32-true",
            "devices": "1",
            "accelerator": "cpu",
            "strategy": "single_device",
            "seed": "0",
            "optimizer": "SGD",
            "optimizer.lr": "0.05",
            "optimizer.momentum": "0.9",
            "lr_scheduler": "StepLR",
            "lr_scheduler.step_size": "2",
            "lr_scheduler.gamma": "0.5",
            "lr_scheduler.interval": "epoch",
        }
        == params
    )


def test_metrics_one_value_per_epoch(tracked: Tracked) -> None:
    history = tracked.model.history
    assert [row["epoch"] for row in history] == list(range(EPOCHS))
    for key in ("loss", "acc", "val_loss", "val_acc", "lr"):
        logged = sorted(
            (m.step, m.value) for m in tracked.client.get_metric_history(tracked.run_id, key)
        )
        assert logged == [(row["epoch"], pytest.approx(row[key])) for row in history]
    best = min(history, key=lambda row: row["val_loss"])
    metrics = tracked.client.get_run(tracked.run_id).data.metrics
    assert metrics["best_val_loss"] == pytest.approx(best["val_loss"])
    assert metrics["best_epoch"] == best["epoch"]


def test_artifacts(tracked: Tracked, tmp_path: Path) -> None:
    client, run_id = tracked.client, tracked.run_id
    top = {a.path for a in client.list_artifacts(run_id)}
    assert top == {"checkpoints", "net", "history.csv", "curves.png", "summary.txt"}
    (best,) = client.list_artifacts(run_id, "checkpoints")  # a finished fit keeps the best
    assert (
        Path(best.path).name == Path(tracked.model.trainer.checkpoint_callback.best_model_path).name
    )
    folder = Path(client.download_artifacts(run_id, "", str(tmp_path)))
    net = Net()
    net.load_state_dict(torch.load(folder / "net" / "state_dict.pt", weights_only=True))
    for name, value in tracked.model.net.state_dict().items():  # fit() restored the best weights
        assert torch.equal(net.state_dict()[name], value.cpu()), name
    with open(folder / "history.csv") as file:
        rows = list(csv.DictReader(file))
    assert [float(row["val_loss"]) for row in rows] == pytest.approx(
        [row["val_loss"] for row in tracked.model.history]
    )
    assert (folder / "curves.png").read_bytes().startswith(b"\x89PNG")
    assert "Total params: 115" in (folder / "summary.txt").read_text()


def test_registered_version(tracked: Tracked, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracked.uri)
    client, run_id = tracked.client, tracked.run_id
    version = client.get_model_version("rings-net", "1")
    model_id = version.source.removeprefix("models:/")
    best = min(tracked.model.history, key=lambda row: row["val_loss"])
    assert version.run_id == run_id and version.status == "READY"
    assert version.tags["monitor"] == "val_loss" and version.tags["mode"] == "min"
    assert float(version.tags["monitor_value"]) == pytest.approx(best["val_loss"])
    assert version.tags["best_epoch"] == str(best["epoch"])
    assert version.tags["run_id"] == run_id
    assert "Linear-1" in version.description and "Total params: 115" in version.description
    run = client.get_run(run_id)
    logged = client.get_logged_model(model_id)
    assert logged.experiment_id == run.info.experiment_id  # not MLflow's Default experiment
    assert logged.source_run_id == run_id and str(logged.status) == "READY"
    assert [o.model_id for o in run.outputs.model_outputs] == [model_id]
    info = mlflow.models.get_model_info(f"models:/{model_id}")
    assert "python_function" in info.flavors
    assert info.flavors["python_function"]["model_config"] == {"device": "cpu"}
    assert {m.key: m.value for m in logged.metrics} == {
        **{key: pytest.approx(value) for key, value in best.items() if key != "epoch"},
        "best_val_loss": pytest.approx(best["val_loss"]),
        "best_epoch": best["epoch"],
    }
    assert info.signature.inputs.inputs[0].shape == (-1, 2)


def test_datasets_and_tags(tracked: Tracked) -> None:
    run = tracked.client.get_run(tracked.run_id)
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation"}
    assert json.loads(inputs["training"].profile) == {"num_rows": 320}
    assert json.loads(inputs["validation"].profile) == {"num_rows": 250}
    assert inputs["training"].digest != inputs["validation"].digest
    assert run.data.tags["lkflow.version"] == lkflow.__version__
    assert run.data.tags["mlflow.user"]
    assert run.info.status == "FINISHED"
    assert tracked.client.get_experiment(run.info.experiment_id).name == "rings"


def _isolated_python(
    code: str, cwd: Path, env: dict[str, str], *args: str
) -> subprocess.CompletedProcess:
    """`python -I -S`: no site hooks (so no editable lkflow), no PYTHONPATH, no cwd on sys.path."""
    paths = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    prelude = f"import sys; sys.path.extend({paths!r})\n"
    return subprocess.run(
        [sys.executable, "-I", "-S", "-c", prelude + textwrap.dedent(code), *args],
        cwd=cwd,
        env={"PATH": os.environ.get("PATH", ""), **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


_PREDICT = """
    import importlib, json
    for name in sys.argv[2].split(","):
        try:
            importlib.import_module(name)
        except ImportError:
            continue
        sys.exit(f"{name} can be imported here")
    import numpy as np
    import mlflow.pyfunc
    model = mlflow.pyfunc.load_model(sys.argv[1])
    print(json.dumps(model.predict(np.array(json.loads(sys.argv[3]), dtype=np.float32)).tolist()))
"""


def test_registered_model_predicts_without_lkflow(tracked: Tracked, tmp_path: Path) -> None:
    done = _isolated_python(
        _PREDICT,
        tmp_path,
        {"MLFLOW_TRACKING_URI": tracked.uri},
        "models:/rings-net/1",
        "lkflow,conftest,test_tracking",
        json.dumps(X),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    predicted = np.array(json.loads(done.stdout.strip().splitlines()[-1]))
    np.testing.assert_allclose(predicted, net_predictions(tracked.model.net), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_models_serve_answers_invocations(tracked: Tracked, tmp_path: Path) -> None:
    port = free_port()
    command = [str(BIN / "mlflow"), "models", "serve", "-m", "models:/rings-net/1"]
    command += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    env = {**bin_path_env(), "MLFLOW_TRACKING_URI": tracked.uri}
    with Server(command, tmp_path, f"http://127.0.0.1:{port}/ping", env) as url:
        status, answer = _post(f"{url}/invocations", {"inputs": X})
        assert status == 200, answer
        np.testing.assert_allclose(
            np.array(answer["predictions"]),
            net_predictions(tracked.model.net),
            rtol=1e-5,
            atol=1e-6,
        )
        status, answer = _post(f"{url}/invocations", {"inputs": [[1.0, 2.0, 3.0]]})
        assert 400 <= status < 500
        assert "shape" in answer["message"].lower()


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


@pytest.mark.slow
def test_fit_logs_to_a_tracking_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, migrated_store: Path
) -> None:
    (tmp_path / "server").mkdir()
    backend = fresh_store(tmp_path / "server", migrated_store)
    with mlflow_server(backend, tmp_path / "served", tmp_path) as url:
        model = fit(make_model(), experiment_name="served", tracking_uri=url)
        client = MlflowClient(url)
        run = client.get_run(model.run_id)
        assert run.info.status == "FINISHED" and run.data.params["epochs"] == "2"
        assert [m.step for m in client.get_metric_history(model.run_id, "val_loss")] == [0, 1]
        assert {a.path for a in client.list_artifacts(model.run_id)} >= {
            "checkpoints",
            "net",
            "history.csv",
        }
        version = client.get_model_version("served", "1")
        assert version.run_id == model.run_id
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        info = mlflow.models.get_model_info(version.source)
        assert info.run_id == model.run_id and "python_function" in info.flavors
    assert not (tmp_path / "mlruns").exists()  # artifacts went through the server


def test_plain_trainer_logs_to_mlflow_db_in_the_working_folder(
    tmp_path: Path, migrated_store: Path
) -> None:
    uri = fresh_store(tmp_path, migrated_store)  # what MLflow's default URI finds: ./mlflow.db
    tracker = MLflowCallback(experiment_name="plain", run_name="first", tags={"team": "rings"})
    plain_fit(tracker, tmp_path, monitor=None)
    client = MlflowClient(uri)
    run = client.get_run(tracker.run_id_)
    assert run.info.run_name == "first" and run.data.tags["team"] == "rings"
    assert run.info.artifact_uri.startswith(str(tmp_path / "mlruns"))
    assert "best_epoch" not in run.data.metrics  # the checkpoint monitors nothing
    assert tracker.model_version_.name == "plain" and tracker.model_version_.tags == {
        "run_id": run.info.run_id
    }
    assert tracker.model_uri_ == tracker.model_version_.source


# ---- runs opened by someone else ---------------------------------------------------------


def test_the_tracking_uri_variable_survives_a_fit(tracking_uri: str) -> None:
    fit(make_model(), 1, registered_model_name="kept")
    assert os.environ["MLFLOW_TRACKING_URI"] == tracking_uri
    assert MlflowClient().get_registered_model("kept").name == "kept"


def test_fit_inside_an_active_run_leaves_it_open(tracking_uri: str) -> None:
    with mlflow.start_run() as run:
        model = fit(make_model())
        assert model.run_id == run.info.run_id
        assert mlflow.active_run().info.run_id == run.info.run_id
        client = MlflowClient(tracking_uri)
        assert client.get_run(run.info.run_id).info.status == "RUNNING"
    assert client.get_run(run.info.run_id).data.params["epochs"] == "2"
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 2
    assert len(client.search_runs(["0"])) == 1  # never a second run
    assert client.get_model_version("Net", "1").run_id == run.info.run_id  # Default: class name


def test_fit_with_mlflow_run_id_like_mlflow_run(
    tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = MlflowClient(tracking_uri)
    run_id = client.create_run("0").info.run_id
    client.log_batch(
        run_id, params=[Param("epochs", "2"), Param("batch_size", "64.0")]
    )  # as -P gives
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    model = fit(make_model(), registered_model_name=False)
    assert model.run_id == run_id
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING"
    assert run.data.params["batch_size"] == "64.0" and run.data.params["net"] == "Net"
    assert client.search_registered_models() == []


def test_a_different_param_value_fails_before_training(
    tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = MlflowClient(tracking_uri)
    run_id = client.create_run("0").info.run_id
    client.log_batch(run_id, params=[Param("epochs", "5")])
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    model = make_model()
    with pytest.raises(LkflowError, match=r"epochs: '5' logged, '2' now.*new run"):
        fit(model)
    assert model.history == []
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING" and run.data.metrics == {}


def test_run_id_of_an_ended_run_is_reopened_and_ended(tracking_uri: str, tmp_path: Path) -> None:
    client = MlflowClient(tracking_uri)
    run_id = client.create_run("0").info.run_id
    client.set_terminated(run_id, "FINISHED")
    plain_fit(MLflowCallback(run_id=run_id, log_model=False), tmp_path)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["epochs"] == "2"
    assert client.search_logged_models(["0"]) == [] and client.search_registered_models() == []


def test_unknown_run_id_names_the_store(
    tracking_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_RUN_ID", "0123456789abcdef")
    with pytest.raises(LkflowError, match=r"MLFLOW_RUN_ID='0123456789abcdef'.*mlflow\.db"):
        plain_fit(MLflowCallback(), tmp_path)


# ---- failures and resumption -------------------------------------------------------------


class _NanAtSecondEpoch(LightModel):
    def shared_step(self, batch: Any) -> dict[str, Any]:
        values = super().shared_step(batch)
        if self.current_epoch == 1 and self.training:
            values["loss"] = values["loss"] * float("nan")
        return values


def test_failing_fit_ends_the_run_failed_with_what_exists(tracking_uri: str) -> None:
    model = make_model(model_class=_NanAtSecondEpoch)
    with pytest.raises(FloatingPointError, match="loss is nan at epoch 1"):
        fit(model, epochs=3, experiment_name="failing")
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("failing").experiment_id])
    assert run.info.status == "FAILED"
    losses = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
    assert [step for step, _ in losses] == [0, 1] and math.isnan(losses[1][1])
    assert [Path(a.path).name for a in client.list_artifacts(run.info.run_id, "checkpoints")]
    assert client.search_registered_models() == []


class _Boom(pl.Callback):
    def __init__(self) -> None:
        self.error = RuntimeError("boom")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == 1:
            raise self.error


def test_resumed_fit_continues_the_same_run(tracking_uri: str, tmp_path: Path) -> None:
    boom = _Boom()
    with pytest.raises(RuntimeError) as raised:
        plain_fit(MLflowCallback(log_model=False), tmp_path, 3, callbacks=(boom,))
    assert raised.value is boom.error  # unchanged
    client = MlflowClient(tracking_uri)
    (failed,) = client.search_runs(["0"])
    assert failed.info.status == "FAILED"
    tracker = MLflowCallback(log_model=False)
    model = plain_fit(tracker, tmp_path, 3, ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"))
    assert tracker.run_id_ == failed.info.run_id
    assert [row["epoch"] for row in model.history] == [0, 1, 2]
    assert client.get_run(tracker.run_id_).info.status == "FINISHED"
    for key in ("loss", "val_loss"):
        assert sorted(m.step for m in client.get_metric_history(tracker.run_id_, key)) == [0, 1, 2]


def test_a_resumed_fit_may_run_more_epochs(tracking_uri: str, tmp_path: Path) -> None:
    first = MLflowCallback(log_model=False)
    plain_fit(first, tmp_path, 2)
    tracker = MLflowCallback(log_model=False)
    plain_fit(tracker, tmp_path, 4, ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"))
    run = MlflowClient(tracking_uri).get_run(first.run_id_)
    assert tracker.run_id_ == first.run_id_ and run.info.status == "FINISHED"
    assert run.data.params["epochs"] == "2" and run.data.tags["lkflow.resumed_epochs"] == "4"
    history = MlflowClient(tracking_uri).get_metric_history(run.info.run_id, "val_loss")
    assert sorted(m.step for m in history) == [0, 1, 2, 3]


def test_a_clashing_param_leaves_an_ended_run_as_it_was(tracking_uri: str, tmp_path: Path) -> None:
    client = MlflowClient(tracking_uri)
    run_id = client.create_run("0").info.run_id
    client.log_param(run_id, "epochs", "7")
    client.set_terminated(run_id, "FINISHED")
    with pytest.raises(LkflowError, match="epochs: '7' logged, '2' now"):
        plain_fit(MLflowCallback(run_id=run_id, log_model=False), tmp_path)
    assert client.get_run(run_id).info.status == "FINISHED"


def test_ctrl_c_ends_the_run_killed(tracking_uri: str, tmp_path: Path) -> None:
    class Interrupt(pl.Callback):
        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            raise KeyboardInterrupt

    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # Lightning turns Ctrl-C into exit status 1
            plain_fit(MLflowCallback(log_model=False), tmp_path, callbacks=(Interrupt(),))
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores SIGINT after one
    (run,) = MlflowClient(tracking_uri).search_runs(["0"])
    assert run.info.status == "KILLED"


# ---- the model as MLflow sees it ---------------------------------------------------------

_UNEXPORTABLE = '''
import torch
from torch import nn


class SignNet(nn.Module):
    """A data-dependent branch: torch.export cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return self.fc(-x)
'''


def test_unexportable_net_falls_back_to_a_pickle_with_its_code(
    tracking_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "sign_net.py").write_text(_UNEXPORTABLE)
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    net = importlib.import_module("sign_net").SignNet()
    with pytest.warns(UserWarning, match="pickle fallback"):
        model = fit(make_model(net), epochs=1, registered_model_name="sign")
    version = MlflowClient(tracking_uri).get_model_version("sign", "1")
    assert version.run_id == model.run_id
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = _isolated_python(
        _PREDICT,
        elsewhere,
        {"MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "true"},
        "models:/sign/1",
        "lkflow,sign_net",
        json.dumps(X),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    np.testing.assert_allclose(
        np.array(json.loads(done.stdout.strip().splitlines()[-1])),
        net_predictions(model.net),
        rtol=1e-5,
        atol=1e-6,
    )


# ---- arguments -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a/b", "a:b", " "])
def test_bad_registered_name_fails_before_mlflow_is_touched(name: str, tmp_path: Path) -> None:
    with pytest.raises(LkflowError, match="registered_model_name"):
        fit(make_model(), registered_model_name=name)
    assert not (tmp_path / "mlflow.db").exists()


def test_module_without_history_is_refused() -> None:
    class Plain(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = Net()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.net(batch[0]).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = pl.Trainer(
        max_epochs=1,
        callbacks=[MLflowCallback()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    with pytest.raises(LkflowError, match="history"):
        trainer.fit(Plain(), make_loaders()[0])


def test_importing_tracking_does_not_import_mlflow(tmp_path: Path) -> None:
    code = "import sys, lkflow.tracking.callback, lkflow.tracking.params; print(sorted(m for m in sys.modules if m.startswith('mlflow')))"
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert done.stdout.strip() == "[]"


def test_arguments_are_kept_as_passed() -> None:
    callback = MLflowCallback(experiment_name="e", registered_model_name=False, tags={"k": "v"})
    assert callback.experiment_name == "e" and callback.registered_model_name is False
    assert callback.tags == {"k": "v"} and callback.run_id is None
    assert callback.run_id_ is None and callback.client_ is None
