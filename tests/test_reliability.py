"""Reliability: resuming from the last checkpoint, SIGTERM, a killed fit resumed, concurrent
writers of one sqlite store, bad input tried on purpose, and what lkflow loads and listens on.

Fits in separate processes run `fit_worker.py` (written by the `worker` fixture); every check of
what a run holds goes through `MlflowClient`.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from helpers import fresh_store, make_model
from hypothesis import given
from hypothesis import strategies as st
from mlflow import MlflowClient
from torch.utils.data import DataLoader, Dataset

import lkflow
from lkflow import LkflowError
from lkflow.datasets import rings
from lkflow.tasks import parse_params

ROOT = Path(lkflow.__file__).resolve().parents[1]


def make_loaders(train_rows: Dataset | None = None) -> tuple[DataLoader, DataLoader]:
    train = train_rows if train_rows is not None else rings(192, seed=1)
    return DataLoader(train, batch_size=64, shuffle=True), DataLoader(rings(128, seed=2), 64)


def only_run(client: MlflowClient) -> Any:
    (run,) = client.search_runs(["0"])
    return run


def steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(metric.step for metric in client.get_metric_history(run_id, key))


# ---- resuming ----------------------------------------------------------------------------


class _StopsAtEpochStart(pl.Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise RuntimeError(f"stopped at the start of epoch {self.epoch}")


def test_resuming_from_last_continues_after_the_last_epoch_not_the_last_best(
    tracking_uri: str,
) -> None:
    # mode="max" on a falling val_loss: only epoch 0 is ever a new best, and Lightning 2.6
    # writes its own last.ckpt only with a new best
    first = make_model()
    with pytest.raises(RuntimeError, match="epoch 3"):
        first.fit(
            *make_loaders(),
            epochs=5,
            gpus=0,
            verbose=0,
            mode="max",
            callbacks=[_StopsAtEpochStart(3)],
        )
    assert [row["epoch"] for row in first.history] == [0, 1, 2]

    resumed = make_model()
    resumed.fit(*make_loaders(), epochs=5, gpus=0, verbose=0, mode="max", ckpt_path="last")
    assert [row["epoch"] for row in resumed.history] == [0, 1, 2, 3, 4]
    assert resumed.history[:3] == first.history
    client = MlflowClient(tracking_uri)
    run = only_run(client)
    assert run.info.status == "FINISHED" and resumed.run_id == run.info.run_id
    for key in ("loss", "val_loss", "lr"):
        logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert logged == [(row["epoch"], pytest.approx(row[key])) for row in resumed.history], key


# ---- fits in processes of their own -------------------------------------------------------

_WORKER = '''
"""A tracked fit of the rings in a process of its own: python fit_worker.py '{...settings}'.

Settings: uri, epochs, ckpt_path, experiment, registered (a name, or false); `batch_s`, a
sleep after every batch; `stall_epoch` and `stall_s`: after batch 1 of that epoch the fit
writes the file `marker` and sleeps `stall_s`. Prints the run id and history as JSON.
"""
import json
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from lkflow import LightModel
from lkflow.datasets import rings


class Stall(pl.Callback):
    def __init__(self, settings):
        self.settings = settings

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == self.settings.get("stall_epoch") and batch_idx == 1:
            Path("marker").write_text(str(trainer.current_epoch))
            time.sleep(self.settings.get("stall_s", 0))
        time.sleep(self.settings.get("batch_s", 0))


def build():
    """A seeded model (SGD with momentum, a StepLR schedule) and unshuffled loaders."""
    pl.seed_everything(0, verbose=False)
    net = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    model = LightModel(
        net,
        loss_fn=nn.BCEWithLogitsLoss(),
        optimizer=optimizer,
        lr_scheduler=torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5),
    )
    train = DataLoader(rings(256, seed=1), batch_size=32)
    valid = DataLoader(rings(128, seed=2), batch_size=64)
    return model, train, valid


if __name__ == "__main__":
    settings = json.loads(sys.argv[1])
    model, train, valid = build()
    model.fit(
        train,
        valid,
        epochs=settings["epochs"],
        gpus=0,
        verbose=0,
        callbacks=[Stall(settings)],
        ckpt_path=settings.get("ckpt_path"),
        experiment_name=settings.get("experiment"),
        registered_model_name=settings.get("registered", False),
        tracking_uri=settings["uri"],
    )
    print(json.dumps({"run_id": model.run_id, "history": model.history}))
'''


class Worker:
    """Starts `fit_worker.py` in a folder of its own, with the lkflow under test; its output
    goes to `out.txt` and `err.txt` there (a pipe nobody reads would stall it)."""

    def __init__(self, script: Path) -> None:
        self.script = script
        self.env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def start(self, folder: Path, **settings: Any) -> subprocess.Popen:
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "out.txt", "w") as out, open(folder / "err.txt", "w") as err:
            return subprocess.Popen(
                [sys.executable, str(self.script), json.dumps(settings)],
                cwd=folder,
                env=self.env,
                stdout=out,
                stderr=err,
            )

    def module(self) -> ModuleType:
        """The script imported here, for its `build()`."""
        spec = importlib.util.spec_from_file_location("fit_worker", self.script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


@pytest.fixture
def worker(tmp_path: Path) -> Worker:
    script = tmp_path / "fit_worker.py"
    script.write_text(_WORKER)
    return Worker(script)


def finished(process: subprocess.Popen, folder: Path, timeout_s: float = 120) -> dict[str, Any]:
    """The JSON a worker printed; fails with its errors when it did not end well."""
    process.wait(timeout=timeout_s)
    assert process.returncode == 0, (folder / "err.txt").read_text()[-4000:]
    return json.loads((folder / "out.txt").read_text().strip().splitlines()[-1])


def wait_for(marker: Path, process: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not marker.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            errors = (marker.parent / "err.txt").read_text()[-4000:]
            raise AssertionError(f"no {marker.name} from the worker:\n{errors}")
        time.sleep(0.05)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen]]:
    """Processes a test starts; any still running at its end are killed (only those)."""
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.slow
def test_sigterm_ends_the_run_killed_and_the_process_promptly_non_zero(
    tracking_uri: str, worker: Worker, tmp_path: Path, processes: list[subprocess.Popen]
) -> None:
    folder = tmp_path / "fit"
    fit = worker.start(folder, uri=tracking_uri, epochs=50, batch_s=0.05, stall_epoch=2)
    processes.append(fit)
    wait_for(folder / "marker", fit)
    sent = time.monotonic()
    fit.send_signal(signal.SIGTERM)  # as a scheduler does
    fit.wait(timeout=60)
    assert time.monotonic() - sent < 10, "the fit did not stop promptly"
    assert fit.returncode == 128 + signal.SIGTERM, (folder / "err.txt").read_text()[-4000:]

    client = MlflowClient(tracking_uri)
    run = only_run(client)
    assert run.info.status == "KILLED"
    last = client.download_artifacts(run.info.run_id, "checkpoints/last.ckpt", str(tmp_path))
    saved = [row["epoch"] for row in torch.load(last, weights_only=True)["lkflow_history"]]
    assert len(saved) >= 2 and saved == list(range(len(saved)))
    for key in ("loss", "val_loss", "lr"):
        assert steps(client, run.info.run_id, key) == saved, key


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
# Covered elsewhere: a batch that is not (x, y), shapes that do not fit the net (the layer
# named), a metrics dict with a non-metric, epochs of 0, -1, 2.5 or "3", a monitor never
# logged and a checkpoint folder under a file (test_model.py); every form of gpus, with
# hypothesis (test_devices.py); -P values of the wrong type under `mlflow run`
# (test_mlproject.py); a CLI target that does not exist or returns the wrong thing
# (test_cli.py, test_tasks.py).


def _no_file_can_be_created(folder: Path) -> bool:
    probe = folder / "probe"
    try:
        probe.touch()
    except OSError:
        return True
    probe.unlink()
    return False


def _read_only_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    if not _no_file_can_be_created(folder):
        pytest.skip("this user (root) can write to a folder of mode 0o500")
    return folder


def _read_only_file_system(tmp_path: Path) -> Path:
    folder = Path("/sys")  # sysfs: os.access says writable to root, yet no file can be made
    if not folder.is_dir() or not _no_file_can_be_created(folder):
        pytest.skip("needs sysfs at /sys, which refuses new files")
    return folder


@pytest.mark.parametrize("make_folder", [_read_only_folder, _read_only_file_system])
def test_a_checkpoint_folder_no_file_can_be_created_in(
    tracking_uri: str, tmp_path: Path, make_folder: Any
) -> None:
    folder = make_folder(tmp_path)
    model = make_model()
    with pytest.raises(LkflowError, match=re.escape(f"ckpt_dir='{folder}', which is not writable")):
        model.fit(*make_loaders(), epochs=1, gpus=0, verbose=0, ckpt_dir=folder)
    assert model.history == []
    assert MlflowClient(tracking_uri).search_runs(["0"]) == []  # failed before any run


_KEYS = st.text(alphabet=st.characters(blacklist_characters="=", blacklist_categories=["Cs"]))


@given(_KEYS.filter(lambda key: key.strip()), st.text())
def test_param_pairs_split_at_the_first_equals_sign(key: str, value: str) -> None:
    assert parse_params([f"{key}={value}"]) == {key.strip(): value}


@given(st.text().filter(lambda pair: "=" not in pair or not pair.partition("=")[0].strip()))
def test_param_pairs_without_a_key_are_refused_by_name(pair: str) -> None:
    with pytest.raises(LkflowError, match=re.escape(f"--param {pair!r}. Expected key=value")):
        parse_params([pair])


# ---- security -------------------------------------------------------------------------------


def _calls(source: str) -> Iterator[ast.Call]:
    yield from (node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Call))


def test_every_checkpoint_and_state_dict_is_loaded_with_weights_only() -> None:
    loads = 0
    for path in sorted((ROOT / "lkflow").glob("*.py")):
        for call in _calls(path.read_text()):
            name = ast.unparse(call.func)
            keywords = {k.arg: k.value for k in call.keywords}
            where = f"{path.name}:{call.lineno} {name}"
            if name == "torch.load":
                loads += 1
                assert "weights_only" in keywords, where
            if "weights_only" in keywords:
                value = keywords["weights_only"]
                assert isinstance(value, ast.Constant) and value.value is True, where
            assert name not in ("pickle.load", "pickle.loads", "torch.serialization.load"), where
    assert loads >= 2  # the scan sees the loads that exist


def test_servers_lkflow_starts_listen_on_localhost_by_default() -> None:
    from lkflow.cli import serve

    (host,) = [option for option in serve.params if option.name == "host"]
    assert host.default == "127.0.0.1"
    for path in (ROOT / "lkflow").glob("*.py"):
        assert "0.0.0.0" not in path.read_text(), path.name
