"""What tests build: the article's tiny net, the rings in loaders, Keras-style models, a store,
tracked fits of them, and fits in processes of their own.

Fits in separate processes run `fit_worker.py` (`FIT_WORKER`, written by the `worker` fixture of
conftest.py); every check of what a run holds goes through `MlflowClient`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pytest
import pytorch_lightning as pl
import torch
import torchmetrics
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import BinaryAccuracy

import lkflow
from lkflow.datasets import rings
from lkflow.model import LightModel

if TYPE_CHECKING:
    from mlflow import MlflowClient

ROOT = Path(lkflow.__file__).resolve().parents[1]
STORES = ("sqlite", "postgresql")  # the stores of the `tracking_uri` fixture: a file, a server
# A test whose point is not the store (serving, signals, an MLflow project) runs on sqlite only.
SQLITE_ONLY = pytest.mark.parametrize("tracking_uri", ["sqlite"], indirect=True)
TRACKED_IN_SQLITE = pytest.mark.parametrize("tracked", ["sqlite"], indirect=True)


class Net(nn.Module):
    """The article's net, returning logits: Linear(2, 6) - Linear(6, 12) - Linear(12, 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2, 6)
        self.fc2 = nn.Linear(6, 12)
        self.fc3 = nn.Linear(12, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class TokenNet(nn.Module):
    """Hugging Face-style keyword inputs `(input_ids, attention_mask)` in; a tuple (class logits,
    pooled state) out."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 4)
        self.head = nn.Linear(4, 3)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mask = attention_mask.unsqueeze(-1).float()
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.head(pooled), pooled


def make_loaders() -> tuple[DataLoader, DataLoader]:
    """Train (320 rows) and validation (250 rows, a short last batch) loaders of the rings."""
    train = DataLoader(rings(320, seed=1), batch_size=64, shuffle=True)
    valid = DataLoader(rings(250, seed=2), batch_size=64)
    return train, valid


def make_model(
    net: nn.Module | None = None,
    model_class: type[LightModel] = LightModel,
    scheduled: bool = False,
) -> LightModel:
    """A Keras-style LightModel of `Net`: BCE on logits, accuracy, SGD with momentum, and with
    `scheduled` a StepLR halving the lr every 2 epochs."""
    net = net or Net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 2, gamma=0.5) if scheduled else None
    return model_class(
        net,
        loss_fn=nn.BCEWithLogitsLoss(),
        metrics={"acc": BinaryAccuracy()},
        optimizer=optimizer,
        lr_scheduler=scheduler,
    )


def fresh_store(folder: Path, migrated: Path) -> str:
    """A new, empty sqlite store in `folder`, copied from `migrated` (no schema migrations)."""
    shutil.copy(migrated, folder / "mlflow.db")
    with sqlite3.connect(folder / "mlflow.db") as connection:  # Default's artifacts in `folder`
        connection.execute(
            "UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
            (str(folder / "mlruns" / "0"),),
        )
    connection.close()
    return f"sqlite:///{folder / 'mlflow.db'}"


class ArticleModel(LightModel):
    """The article's subclass: shared_step returns the loss and a functional accuracy."""

    def shared_step(self, batch):
        x, y = batch
        logits = self(x)
        acc = torchmetrics.functional.accuracy((logits > 0).float(), y, task="binary")
        return {"loss": nn.functional.binary_cross_entropy_with_logits(logits, y), "acc": acc}

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def keras_model(lr: float = 1e-2, **kwargs) -> LightModel:
    net = Net()
    return LightModel(
        net,
        loss_fn=nn.BCEWithLogitsLoss(),
        metrics={"acc": torchmetrics.classification.BinaryAccuracy()},
        optimizer=torch.optim.SGD(net.parameters(), lr=lr),
        **kwargs,
    )


def full_pass(net: nn.Module, loader: DataLoader) -> tuple[float, float]:
    """Loss and accuracy over every row at once: the independent recomputation."""
    x, y = loader.dataset.tensors
    with torch.no_grad():
        logits = net(x)
    loss = nn.functional.binary_cross_entropy_with_logits(logits, y).item()
    return loss, ((logits > 0).float() == y).float().mean().item()


def fit_quietly(model, train, valid=None, **kwargs):
    settings = {"epochs": 1, "gpus": 0, "track": False, **kwargs}
    return model.fit(train, valid, verbose=0, **settings)


def small_loaders(train_rows: Dataset | None = None) -> tuple[DataLoader, DataLoader]:
    """Train (192 rows, or `train_rows`) and validation (128 rows) loaders of the rings."""
    train = train_rows if train_rows is not None else rings(192, seed=1)
    return DataLoader(train, batch_size=64, shuffle=True), DataLoader(rings(128, seed=2), 64)


def only_run(client: MlflowClient) -> Any:
    (run,) = client.search_runs(["0"])
    return run


def steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(metric.step for metric in client.get_metric_history(run_id, key))


# ---- tracked fits ------------------------------------------------------------------------


def make_scheduled_model(
    net: nn.Module | None = None, model_class: type[LightModel] = LightModel
) -> LightModel:
    """`make_model` with a StepLR, so that the scheduler's params are logged too."""
    return make_model(net, model_class, scheduled=True)


def fit(model: LightModel, epochs: int = 2, **kwargs: Any) -> LightModel:
    """`model.fit` on `make_loaders()` on the CPU, quiet, with `kwargs` (tracking's too)."""
    model.fit(*make_loaders(), epochs=epochs, gpus=0, verbose=0, **kwargs)
    return model


def plain_fit(
    tracker: pl.Callback,
    folder: Path,
    epochs: int = 2,
    callbacks: tuple[pl.Callback, ...] = (),
    ckpt_path: str | None = None,
    monitor: str | None = "val_loss",
) -> LightModel:
    """A fit with a plain `pl.Trainer`, its checkpoints (best `monitor`, last) in `folder`."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    checkpoint = ModelCheckpoint(folder / "checkpoints", monitor=monitor, save_last=True)
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[tracker, checkpoint, *callbacks],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = make_scheduled_model()
    trainer.fit(model, *make_loaders(), ckpt_path=ckpt_path)
    return model


@dataclass
class Tracked:
    """One tracked fit: its model, a client of its store, its run, the store's URI."""

    model: LightModel
    client: MlflowClient
    run_id: str
    uri: str


# ---- fits in processes of their own -------------------------------------------------------

FIT_WORKER = '''
"""A tracked fit of the rings in a process of its own: python fit_worker.py '{...settings}'.

Settings: uri, epochs, ckpt_path, experiment, registered (a name, or false); `batch_s`, a
sleep after every batch; `stall_epoch` and `stall_s`: after batch 1 of that epoch the fit
writes the file `marker` and sleeps `stall_s`. Prints the run id and history as JSON.
"""
import json
import sys
import time
from dataclasses import dataclass
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


# ---- a store of team size ----------------------------------------------------------------


@dataclass
class Copy:
    """A copy of a run: its id, name, experiment, start (ms) and `best_<monitor>` value."""

    run_id: str
    name: str
    experiment_id: str
    start_ms: int
    best: float


def copy_runs(database: str, run_id: str, copies: list[Copy]) -> None:
    """Adds a copy of run `run_id` of the PostgreSQL store `database` (its row, params, tags,
    latest and logged metrics) for each of `copies`, in one transaction: thousands of runs in
    a second, where MLflow's API takes about 20 ms a run. Columns not named here are copied as
    they are, whatever the MLflow version's tables hold."""
    changed = {
        "runs": {
            "run_uuid": "c.run_id",
            "name": "c.name",
            "experiment_id": "c.experiment_id::integer",
            "start_time": "c.start_ms",
            "end_time": "c.start_ms + (r.end_time - r.start_time)",
            "artifact_uri": "replace(r.artifact_uri, r.run_uuid, c.run_id)",
        },
        "params": {"run_uuid": "c.run_id"},
        "tags": {
            "run_uuid": "c.run_id",
            "value": "CASE WHEN r.key = 'mlflow.runName' THEN c.name ELSE r.value END",
        },
        "latest_metrics": {"run_uuid": "c.run_id", "value": _BEST_VALUE},
        "metrics": {"run_uuid": "c.run_id", "value": _BEST_VALUE},
    }
    rows = [(c.run_id, c.name, c.experiment_id, c.start_ms, c.best) for c in copies]
    with _transaction(database) as cursor:
        cursor.execute(
            "CREATE TEMP TABLE c (run_id text, name text, experiment_id text, start_ms bigint, "
            "best double precision) ON COMMIT DROP"
        )
        cursor.executemany("INSERT INTO c VALUES (%s, %s, %s, %s, %s)", rows)
        for table, values in changed.items():
            _copy_rows(cursor, table, values, f"r.run_uuid = '{run_id}'")


def copy_versions(database: str, name: str, copies: dict[int, tuple[str, float]]) -> None:
    """Adds versions to registered model `name` of the PostgreSQL store `database`, copies of
    its version 1: `copies` maps each new version number to its run and `monitor_value`."""
    rows = [(version, run_id, repr(value)) for version, (run_id, value) in copies.items()]
    with _transaction(database) as cursor:
        cursor.execute(
            "CREATE TEMP TABLE v (version integer, run_id text, monitor_value text) ON COMMIT DROP"
        )
        cursor.executemany("INSERT INTO v VALUES (%s, %s, %s)", rows)
        where = f"r.name = '{name}' AND r.version = 1"
        _copy_rows(
            cursor, "model_versions", {"version": "c.version", "run_id": "c.run_id"}, where, "v"
        )
        value = (
            "CASE r.key WHEN 'monitor_value' THEN c.monitor_value "
            "WHEN 'run_id' THEN c.run_id ELSE r.value END"
        )
        _copy_rows(
            cursor, "model_version_tags", {"version": "c.version", "value": value}, where, "v"
        )


_BEST_VALUE = "CASE WHEN r.key LIKE 'best%' AND r.key <> 'best_epoch' THEN c.best ELSE r.value END"


def _copy_rows(
    cursor: Any, table: str, values: dict[str, str], where: str, copies: str = "c"
) -> None:
    """INSERT INTO `table` a row per (row of `table` meeting `where`, row of `copies`)."""
    cursor.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = %s "
        "ORDER BY ordinal_position",
        (table,),
    )
    columns = [column for (column,) in cursor.fetchall()]
    chosen = ", ".join(values.get(column, f"r.{column}") for column in columns)
    cursor.execute(
        f"INSERT INTO {table} ({', '.join(columns)}) "
        f"SELECT {chosen} FROM {table} r CROSS JOIN {copies} c WHERE {where}"
    )


@contextmanager
def _transaction(database: str) -> Iterator[Any]:
    import psycopg

    with psycopg.connect(database) as connection, connection.cursor() as cursor:
        yield cursor  # committed when the block ends well


# ---- sweeps ------------------------------------------------------------------------------

# The rings task with hooks for the sweep tests, at a trial's first batch: SWEEP_BARRIER=N
# holds each process's first trial until N processes have started one; SWEEP_STALL stalls the
# trial (for a kill); a file `interrupt` raises KeyboardInterrupt, as Ctrl-C would; a file
# `fail` makes the task itself raise in trials.
HOOKED_TASK = f"""
import os
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

sys.path.insert(0, {str(ROOT / "examples")!r})
from rings import task as rings_task


class Hooks(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch != 0 or batch_idx != 0:
            return
        mine = Path(f"started-{{os.getpid()}}")
        first = not mine.exists()
        mine.touch()
        wanted = int(os.environ.get("SWEEP_BARRIER", "0"))
        deadline = time.monotonic() + 120
        while first and len(list(Path().glob("started-*"))) < wanted:
            assert time.monotonic() < deadline, "the other process never started a trial"
            time.sleep(0.1)
        if os.environ.get("SWEEP_STALL"):
            Path("stalled").write_text(str(os.getpid()))
            time.sleep(600)
        if Path("interrupt").exists():
            raise KeyboardInterrupt


class Noisy(torch.nn.Module):
    # the net plus noise: its saved model never answers its example with the net's outputs

    def __init__(self, net):
        super().__init__()
        self.inner = net

    def forward(self, x):
        return self.inner(x) + 0.01 * torch.rand(x.shape[0], 1)


def task(options):
    if Path("fail").exists() and options.lr is not None:  # a trial's, not the sweep's first look
        raise ZeroDivisionError("the task failed on purpose")
    built = rings_task(options)
    built.fit_kwargs["callbacks"] = [Hooks()]
    if Path("unservable").exists():
        built.model.net = Noisy(built.model.net)
    return built
"""


def start_sweep(folder: Path, uri: str, *args: str, **env: str) -> subprocess.Popen:
    """`lkflow sweep ARGS` in a process of its own in `folder`; its output in sweep-N.txt."""
    log = open(folder / f"sweep-{len(list(folder.glob('sweep-*.txt')))}.txt", "w")  # noqa: SIM115
    bin_dir = Path(sys.executable).parent
    return subprocess.Popen(
        [str(bin_dir / "lkflow"), "sweep", *args, "--tracking-uri", uri],
        cwd=folder,
        env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", **env},
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def sweep_ended(process: subprocess.Popen, folder: Path) -> str:
    """The output of every sweep process in `folder`, once `process` ended well."""
    process.wait(timeout=300)
    output = "\n".join(path.read_text() for path in sorted(folder.glob("sweep-*.txt")))
    assert process.returncode == 0, output[-6000:]
    return output


@dataclass
class Sweep:
    """A sweep's runs as MLflow holds them, and its study as Optuna does."""

    client: MlflowClient
    parent: Any  # mlflow.entities.Run
    children: list[Any]  # by trial number
    study: Any  # optuna.Study


def sweep_of(uri: str, storage: str, study: str) -> Sweep:
    """The sweep of `study`: its one parent run and its trials' runs in the store at `uri`."""
    import optuna
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    (parent,) = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    children = [run for run in runs if "mlflow.parentRunId" in run.data.tags]
    children.sort(key=lambda run: int(run.data.tags["lkflow.sweep.trial"]))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return Sweep(client, parent, children, optuna.load_study(study_name=study, storage=storage))
