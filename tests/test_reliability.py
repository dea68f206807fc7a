"""Reliability: faults in user code, a killed fit resumed, concurrent writers of one sqlite
store, bad input tried on purpose, and secrets kept out of the run.

Fits in separate processes run `fit_worker.py` (written by the `worker` fixture of conftest.py);
every check of what a run holds goes through `MlflowClient`.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import mlflow
import pytest
import pytorch_lightning as pl
import torch
from click.testing import CliRunner
from helpers import (
    Net,
    Worker,
    finished,
    fresh_store,
    make_model,
    only_run,
    small_loaders,
    steps,
    wait_for,
)
from hypothesis import given
from hypothesis import strategies as st
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import _validate_model_name
from servers import free_port, mlflow_server
from torch import nn
from torch.utils.data import Dataset

from lkflow import LightModel, LkflowError
from lkflow.checks import check_registered_model_name
from lkflow.cli import main
from lkflow.datasets import rings
from lkflow.outbox import Outbox, deliver
from lkflow.params import MASK, flatten
from lkflow.store import check_sqlite_file, check_tracking_uri, tracking_client

# ---- an exception in user code -----------------------------------------------------------


class _FailsInEpochOne(LightModel):
    """Raises `error` in epoch 1's training step or validation, as `where` says."""

    where = ""
    error: BaseException = RuntimeError()

    def shared_step(self, batch: Any) -> dict[str, Any]:
        stage = "training_step" if self.trainer.training else "validation"
        if self.current_epoch == 1 and stage == self.where and not self.trainer.sanity_checking:
            raise self.error
        return super().shared_step(batch)


class _FailsAtEpochEnd(pl.Callback):
    def __init__(self, error: BaseException) -> None:
        self.error = error

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == 1:
            raise self.error


class _UnreadableRow(Dataset):
    """The rings, except that row 7 cannot be read once every row has been read once."""

    def __init__(self, error: BaseException) -> None:
        self.rows, self.error, self.reads = rings(192, seed=1), error, 0

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.reads += 1
        if index == 7 and self.reads > len(self.rows):
            raise self.error
        return self.rows[index]


@pytest.mark.parametrize(
    ("where", "error"),
    [
        ("training_step", RuntimeError("bad step")),
        ("validation", ZeroDivisionError("bad validation")),
        ("epoch_end", KeyError("bad epoch end")),
        ("data_loading", OSError("row 7 is unreadable")),
    ],
)
def test_an_exception_in_user_code_reaches_the_caller_and_fails_the_run(
    tracking_uri: str, where: str, error: BaseException
) -> None:
    model = make_model(model_class=_FailsInEpochOne)
    model.where, model.error = where, error
    callbacks = [_FailsAtEpochEnd(error)] if where == "epoch_end" else []
    loaders = small_loaders(_UnreadableRow(error) if where == "data_loading" else None)
    with pytest.raises(type(error)) as raised:
        model.fit(*loaders, epochs=3, gpus=0, verbose=0, callbacks=callbacks)
    assert raised.value is error  # the very object, unwrapped

    client = MlflowClient(tracking_uri)
    run = only_run(client)
    assert run.info.status == "FAILED"
    epochs = [row["epoch"] for row in model.history]
    assert epochs == [0]  # epoch 1 never ended
    for key in ("loss", "acc", "val_loss", "val_acc", "lr"):
        assert steps(client, run.info.run_id, key) == epochs, key
    logged = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    best = Path(model.trainer.checkpoint_callback.best_model_path).name
    assert logged == {best, "last.ckpt"} and best.startswith("epoch=0-")


# ---- fits in processes of their own -------------------------------------------------------


@pytest.mark.slow
def test_a_killed_fit_resumes_into_the_same_run_without_gaps_or_duplicates(
    tracking_uri: str, worker: Worker, tmp_path: Path, processes: list[subprocess.Popen]
) -> None:
    folder = tmp_path / "fit"
    first = worker.start(folder, uri=tracking_uri, epochs=6, stall_epoch=3, stall_s=600)
    processes.append(first)
    model, train, valid = worker.module().build()  # meanwhile: the same fit, never stopped
    reference = model.fit(train, valid, epochs=6, gpus=0, verbose=0, track=False, ckpt_dir="ref")
    wait_for(folder / "marker", first)  # in epoch 3, after epoch 2's checkpoint
    first.send_signal(signal.SIGKILL)
    first.wait()
    client = MlflowClient(tracking_uri)
    killed = only_run(client)
    assert killed.info.status == "RUNNING"  # nobody could end it
    assert steps(client, killed.info.run_id, "loss") == [0, 1, 2]

    second = worker.start(folder, uri=tracking_uri, epochs=6, ckpt_path="last")
    processes.append(second)
    resumed = finished(second, folder)
    assert resumed["run_id"] == killed.info.run_id
    history = resumed["history"]
    assert [row["epoch"] for row in history] == list(range(6))
    # weights, optimizer momentum, the schedule and the epoch counter all went on
    for row, expected in zip(history, reference.to_dict("records"), strict=True):
        assert row == pytest.approx(expected, rel=1e-5)
    run = client.get_run(killed.info.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["epochs"] == "6"
    for key in ("loss", "val_loss", "lr"):
        logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert logged == [(row["epoch"], pytest.approx(row[key])) for row in history], key


@pytest.mark.slow
@pytest.mark.parametrize("store", ["migrated", "new"])
def test_three_fits_at_once_write_one_sqlite_store(
    store: str,
    worker: Worker,
    tmp_path: Path,
    migrated_store: Path,
    processes: list[subprocess.Popen],
) -> None:
    if store == "migrated":
        uri = fresh_store(tmp_path, migrated_store)
    else:  # a user's first sweep: every process finds the file without tables
        uri = f"sqlite:///{tmp_path / 'sweep' / 'mlflow.db'}"
    settings = {"uri": uri, "epochs": 2, "experiment": "sweep", "registered": "sweep"}
    folders = [tmp_path / f"fit{i}" for i in range(3)]
    processes += [worker.start(folder, **settings) for folder in folders]
    outputs = [
        finished(process, folder) for process, folder in zip(processes, folders, strict=True)
    ]

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("sweep").experiment_id])
    assert sorted(run.info.run_id for run in runs) == sorted(out["run_id"] for out in outputs)
    for run, out in zip(
        sorted(runs, key=lambda run: run.info.run_id),
        sorted(outputs, key=lambda out: out["run_id"]),
        strict=True,
    ):
        assert run.info.status == "FINISHED"
        for key in ("loss", "val_loss", "lr"):
            logged = sorted(
                (m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)
            )
            assert logged == [(row["epoch"], pytest.approx(row[key])) for row in out["history"]]
    versions = client.search_model_versions("name = 'sweep'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3]
    assert {v.run_id for v in versions} == {run.info.run_id for run in runs}


# ---- bad input, tried on purpose ------------------------------------------------------------
# Covered elsewhere: a batch that is not (x, y) and shapes that do not fit the net (the layer
# named) (test_model.py); a metrics dict with a non-metric, epochs of 0, -1, 2.5 or "3", a
# monitor never logged and checkpoint folders no file can be created in (test_checks.py);
# every form of gpus, with hypothesis (test_devices.py); -P values of the wrong type under
# `mlflow run` (test_mlproject.py); a CLI target that does not exist or returns the wrong
# thing, param pairs (test_cli.py, test_tasks.py).


@pytest.mark.parametrize(
    ("uri", "meant"),
    [
        ("sqlite:/mlflow.db", "sqlite:///mlflow.db"),
        ("sqlite://mlflow.db", "sqlite:///mlflow.db"),
        ("sqllite:///mlflow.db", "sqlite:///mlflow.db"),
        ("mlflow.db", "sqlite:///mlflow.db"),
        ("htp://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("http:/127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("http//127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("localhost:5000", "http://localhost:5000"),
        ("htps://alice:s3cret@mlflow.example.com", "https://***@mlflow.example.com"),
        ("file:./mlruns", None),
        ("./mlruns", None),
    ],
)
def test_a_tracking_uri_typo_is_one_line_naming_it_and_the_accepted_forms(
    uri: str, meant: str | None
) -> None:
    with pytest.raises(LkflowError) as raised:
        check_tracking_uri(uri)
    message = str(raised.value)
    assert "\n" not in message and "s3cret" not in message
    shown = uri.replace("alice:s3cret", "***")
    assert message.startswith(f"Received: tracking URI {shown!r}. Expected sqlite:///mlflow.db")
    assert "http://host:port" in message and "MLFLOW_TRACKING_URI" in message
    if meant is None:
        assert "MLFLOW_ALLOW_FILE_STORE=true" in message
    else:
        assert f"Did you mean {meant!r}?" in message


@pytest.mark.parametrize(
    "uri",
    [
        "sqlite:///mlflow.db",
        "sqlite:////tmp/runs/mlflow.db",
        "http://127.0.0.1:5000",
        "https://alice:s3cret@mlflow.example.com/prefix",
        "postgresql://mlflow@db.example.com/mlflow",
        "mysql+pymysql://mlflow@db/mlflow",
        "databricks",
        "databricks://profile",
    ],
)
def test_tracking_uris_mlflow_opens_pass(uri: str) -> None:
    check_tracking_uri(uri)


def test_a_file_store_passes_where_mlflow_is_told_to_open_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    check_tracking_uri("file:./mlruns")


def test_a_tracking_uri_typo_fails_the_fit_before_training(tmp_path: Path) -> None:
    model = make_model()
    with pytest.raises(LkflowError, match=r"tracking URI 'sqlite:/mlflow\.db'.*sqlite:///"):
        model.fit(*small_loaders(), epochs=1, gpus=0, verbose=0, tracking_uri="sqlite:/mlflow.db")
    assert model.history == []
    assert not list(tmp_path.glob("*.db"))


def _not_a_database(path: Path, kind: str) -> None:
    if kind == "folder":
        path.mkdir()
    else:
        path.write_text("run,loss\n1,0.5\n")


@pytest.mark.parametrize("kind", ["folder", "text file"])
def test_a_mlflow_db_that_is_not_a_sqlite_database_fails_the_fit_at_once(
    tmp_path: Path, kind: str
) -> None:
    path = tmp_path / "mlflow.db"  # the default store, sqlite:///mlflow.db
    _not_a_database(path, kind)
    model = make_model()
    started = time.monotonic()
    with pytest.raises(LkflowError) as raised:
        model.fit(*small_loaders(), epochs=1, gpus=0, verbose=0)
    assert time.monotonic() - started < 30  # not MLflow's 100 seconds of retries
    message = str(raised.value)
    found = "a folder" if kind == "folder" else "a file that is not a sqlite database"
    assert f"but {path} is {found}" in message
    assert "Move it out of the way" in message and "MLFLOW_TRACKING_URI" in message
    assert model.history == [] and not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize("kind", ["folder", "text file"])
def test_lkflow_runs_on_a_mlflow_db_that_is_not_a_sqlite_database_is_one_line(
    tmp_path: Path, kind: str
) -> None:
    _not_a_database(tmp_path / "mlflow.db", kind)
    result = CliRunner().invoke(main, ["runs"])
    assert result.exit_code == 1
    (line,) = result.output.splitlines()
    assert line.startswith("Error: Received: tracking URI 'sqlite:///")
    assert f"{tmp_path / 'mlflow.db'} is a " in line and "Move it out of the way" in line


def test_an_empty_or_real_sqlite_file_passes_the_store_check(
    tmp_path: Path, migrated_store: Path
) -> None:
    (tmp_path / "empty.db").touch()  # MLflow makes its tables in it
    check_sqlite_file(f"sqlite:///{tmp_path / 'empty.db'}")
    check_sqlite_file(f"sqlite:///{migrated_store}")
    check_sqlite_file(f"sqlite:///{tmp_path / 'missing.db'}")


def test_a_store_is_opened_in_a_new_folder_or_names_the_folder_it_cannot_make(
    tmp_path: Path,
) -> None:
    client = tracking_client(f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}")
    assert [e.name for e in client.search_experiments()] == ["Default"]
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["mlflow.db", "mlflow.db.lock"]
    (tmp_path / "file").write_text("")
    with pytest.raises(LkflowError, match=r"whose folder .*file/sub cannot be created"):
        tracking_client(f"sqlite:///{tmp_path / 'file' / 'sub' / 'mlflow.db'}")


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
    model = make_model()
    with mlflow.start_run() as run:
        client.log_metric(run.info.run_id, "kept", 1.0)
        with pytest.raises(LkflowError, match=re.escape(f"registered_model_name={name!r}")):
            model.fit(*small_loaders(), epochs=1, gpus=0, verbose=0, registered_model_name=name)
    assert model.history == []
    kept = client.get_run(run.info.run_id)
    assert kept.data.metrics == {"kept": 1.0} and kept.data.params == {}
    assert client.search_registered_models() == []


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        level = nested
        for parent in parents:
            level = level.setdefault(parent, {})
        level[leaf] = value
    return nested


_NESTED = st.recursive(
    st.one_of(st.integers(), st.text(max_size=5), st.none(), st.just({})),
    lambda children: st.dictionaries(
        st.text(alphabet="abcxyz_-", min_size=1, max_size=4), children, min_size=1, max_size=4
    ),
    max_leaves=15,
).filter(lambda value: isinstance(value, dict))


@given(_NESTED)
def test_flattening_keeps_every_leaf_under_its_dotted_path(params: dict[str, Any]) -> None:
    flat = flatten(params)
    assert all(not isinstance(v, dict) or v == {} for v in flat.values())
    assert _unflatten(flat) == params


# ---- security -------------------------------------------------------------------------------


class _WithToken(LightModel):
    def __init__(self, net: nn.Module, api_token: str, hidden: int = 6, **kwargs: Any) -> None:
        super().__init__(net, **kwargs)


@pytest.mark.slow
def test_secrets_never_become_params_or_tags(
    tmp_path: Path, migrated_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "abc123"
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", secret)
    (tmp_path / "server").mkdir()
    port = free_port()
    backend = fresh_store(tmp_path / "server", migrated_store)
    with mlflow_server(backend, tmp_path / "served", tmp_path, port):
        uri = f"http://alice:{secret}@127.0.0.1:{port}"
        net = Net()
        model = _WithToken(net, api_token=secret, loss_fn=nn.BCEWithLogitsLoss())
        model.fit(*small_loaders(), epochs=1, gpus=0, verbose=0, tracking_uri=uri)
        client = MlflowClient(f"http://127.0.0.1:{port}")
        run = client.get_run(model.run_id)
        version = client.get_model_version("Net", "1")
        (output,) = run.outputs.model_outputs
        logged_model = client.get_logged_model(output.model_id)
    assert run.data.params["api_token"] == MASK and run.data.params["hidden"] == "6"
    texts = {
        "params": run.data.params,
        "tags": run.data.tags,
        "model params": logged_model.params,
        "model tags": logged_model.tags,
        "version tags": version.tags,
        "version": {"description": version.description or "", "source": version.source},
    }
    for what, values in texts.items():
        leaks = {k: v for k, v in values.items() if secret in k or secret in str(v)}
        assert not leaks, what


# ---- the error of an earlier fit ---------------------------------------------------------


def test_deleting_a_tag_through_deliver_passes_when_it_is_gone(tracking_uri: str) -> None:
    client = MlflowClient(tracking_uri)
    run_id = client.create_run("0").info.run_id
    client.set_tag(run_id, "lkflow.error", "RuntimeError: boom")
    entry = {"op": "delete_tag", "key": "lkflow.error"}
    deliver(client, run_id, entry, {"model_id": None})
    assert "lkflow.error" not in client.get_run(run_id).data.tags
    deliver(client, run_id, entry, {"model_id": None}, maybe_sent=True)  # already deleted


def test_a_resumed_fit_into_the_outbox_drops_the_error_tag_at_sync(
    tracking_uri: str, tmp_path: Path
) -> None:
    error = RuntimeError("failed at the end of epoch 1")
    with pytest.raises(RuntimeError):
        make_model().fit(
            *small_loaders(), epochs=3, gpus=0, verbose=0, callbacks=[_FailsAtEpochEnd(error)]
        )
    client = MlflowClient(tracking_uri)
    run_id = only_run(client).info.run_id
    # writes of the run kept earlier: the resumed fit's writes join them in the outbox
    Outbox.open(tmp_path / "mlruns-outbox", run_id, "0", tracking_uri).append(
        {"op": "batch", "tags": {"kept": "yes"}}
    )
    with pytest.warns(UserWarning, match="writes that an earlier fit kept"):
        make_model().fit(*small_loaders(), epochs=3, gpus=0, verbose=0, ckpt_path="last")
    assert client.get_run(run_id).data.tags["lkflow.error"] == f"RuntimeError: {error}"
    synced = CliRunner().invoke(main, ["sync"])
    assert synced.exit_code == 0, synced.output
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and "lkflow.error" not in run.data.tags
    assert run.data.tags["lkflow.previous_error"] == f"RuntimeError: {error}"
