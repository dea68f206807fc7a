"""Registration: the version a fit registers and its tags, names MLflow refuses, and which
registered version is served."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import pytest
import torch
from helpers import Net, Tracked, fit, make_loaders
from helpers import make_model as make_plain_model
from helpers import make_scheduled_model as make_model
from hypothesis import given
from hypothesis import strategies as st
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion, ModelVersionTag
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import _validate_model_name
from torch import nn
from torchmetrics.classification import BinaryAccuracy

from lkflow import LightModel
from lkflow.checks import check_registered_model_name
from lkflow.errors import LkflowError
from lkflow.tracking.registry import best_version
from lkflow.tracking.writes import deliver


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
    first, *_ = version.description.splitlines()
    assert first == f"val_loss {best['val_loss']:.4f} at epoch {best['epoch']}"  # one cell's worth
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
    data = {d.tags[0].value: (d.dataset.name, d.dataset.digest) for d in run.inputs.dataset_inputs}
    assert {m.key: (m.dataset_name, m.dataset_digest) for m in logged.metrics} == {
        **dict.fromkeys(["loss", "acc"], data["training"]),
        **dict.fromkeys(["val_loss", "val_acc", "best_val_loss"], data["validation"]),
        **dict.fromkeys(["lr", "best_epoch"], (None, None)),
    }
    assert json.loads(logged.tags["mlflow.modelVersions"]) == [{"name": "rings-net", "version": 1}]
    assert info.signature.inputs.inputs[0].shape == (-1, 2)


@pytest.mark.parametrize("name", ["a/b", "a:b", " "])
def test_bad_registered_name_fails_before_mlflow_is_touched(name: str, tmp_path: Path) -> None:
    with pytest.raises(LkflowError, match="registered_model_name"):
        fit(make_model(), registered_model_name=name)
    assert not (tmp_path / "mlflow.db").exists()


@given(st.text(max_size=12))
def test_registered_names_are_refused_exactly_where_mlflow_refuses_them(name: str) -> None:
    try:
        _validate_model_name(name)
    except MlflowException:
        with pytest.raises(LkflowError, match=re.escape(f"registered_model_name={name!r}")):
            check_registered_model_name(name)
    else:
        check_registered_model_name(name)


@pytest.mark.parametrize("name", ["..", ".", "..net"])
def test_a_registered_name_mlflow_rejects_fails_before_training_and_keeps_the_run(
    tracking_uri: str, name: str
) -> None:
    client = MlflowClient(tracking_uri)
    model = make_plain_model()
    with mlflow.start_run() as run:
        client.log_metric(run.info.run_id, "kept", 1.0)
        with pytest.raises(LkflowError, match=re.escape(f"registered_model_name={name!r}")):
            model.fit(*make_loaders(), epochs=1, gpus=0, verbose=0, registered_model_name=name)
    assert model.history == []
    kept = client.get_run(run.info.run_id)
    assert kept.data.metrics == {"kept": 1.0} and kept.data.params == {}
    assert client.search_registered_models() == []


def _version(number: int, **tags: str) -> ModelVersion:
    version_tags = [ModelVersionTag(key, value) for key, value in tags.items()]
    return ModelVersion("net", number, creation_timestamp=number, tags=version_tags)


def test_best_version_follows_the_metric_mode() -> None:
    losses = [_version(1, monitor="val_loss", monitor_value="0.3"), _version(2)]
    losses.append(_version(3, monitor="val_loss", monitor_value="0.2"))
    assert best_version(losses)[0].version == 3
    accs = [_version(n, monitor="val_acc", monitor_value=v) for n, v in ((1, ".9"), (2, ".8"))]
    assert best_version(accs)[0].version == 1
    recorded = [
        _version(n, monitor="score", monitor_value=v, mode="max") for n, v in ((1, "1"), (2, "2"))
    ]
    assert best_version(recorded)[0].version == 2
    assert best_version([_version(1), _version(2)]) == (
        _version(2),
        "the newest version: no recorded metric",
    )


def test_the_monitor_tag_names_the_metric_as_mlflow_logged_it(tracking_uri: str) -> None:
    net = Net()
    model = LightModel(
        net,
        loss_fn=nn.BCEWithLogitsLoss(),
        metrics={"acc@1": BinaryAccuracy()},  # "@" is no part of an MLflow key: it is renamed
        optimizer=torch.optim.SGD(net.parameters(), lr=0.05),
    )
    with pytest.warns(UserWarning, match="val_acc@1"):  # the renamed keys, once
        fit(model, epochs=2, monitor="val_acc@1", mode="max", registered_model_name="acc")
    client = MlflowClient(tracking_uri)
    version = client.get_model_version("acc", "1")
    assert version.tags["monitor"] == "val_acc_1"
    metrics = client.get_run(model.run_id).data.metrics
    assert float(version.tags["monitor_value"]) == pytest.approx(metrics["best_val_acc_1"])
    assert [m.step for m in client.get_metric_history(model.run_id, "val_acc_1")] == [1, 2]
    assert best_version([version])[1].startswith("best val_acc_1=")


def test_a_version_registered_again_after_a_lost_answer_is_named_once_on_its_model(
    tracking_uri: str,
) -> None:
    client = MlflowClient(tracking_uri)
    run_id = client.create_run("0").info.run_id
    model_id = client.create_logged_model("0", name="model", source_run_id=run_id).model_id
    write = {"op": "register", "name": "net", "tags": {}, "description": "val_loss 0.1 at epoch 1"}
    state = {"model_id": model_id}
    first = deliver(client, run_id, write, state)
    again = deliver(client, run_id, write, state, maybe_sent=True)  # as `lkflow sync` resends it
    assert (str(first.version), str(again.version)) == ("1", "1")  # an int on sqlite
    assert [str(v.version) for v in client.search_model_versions("name = 'net'")] == ["1"]
    tag = client.get_logged_model(model_id).tags["mlflow.modelVersions"]
    assert json.loads(tag) == [{"name": "net", "version": 1}]
    assert state["registered"] == "net version 1"
