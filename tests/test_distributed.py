"""DDP on the CPU (gloo, 2 processes): one correct result whoever launches the processes.

Lightning's "ddp" strategy starts the other processes by running the script again, so every
fit here runs in a script written to a temporary folder; each process saves what it holds
to `rank<r>.pt`, and the tests compare the processes with each other and with a single-process
evaluation of the same weights. The data sets do not divide evenly by 2 x the batch size,
and the two processes get a different number of validation batches.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torchmetrics
from helpers import Net, fresh_store
from servers import mlflow_server
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from lkflow import LightModel
from lkflow.datasets import rings

pytestmark = pytest.mark.ddp

ROOT = Path(__file__).resolve().parents[1]
PROCESSES = 2
# 251 training rows: the training sampler repeats one. 193 validation rows: 97 rows in 4
# batches for the first process, 96 in 3 for the second.
TRAIN_ROWS, VAL_ROWS, BATCH = 251, 193, 32
TRACKED_EPOCHS = 2
_TIMEOUT_S = 180

# Run by every process. argv[1] is the output folder.
FIT_SCRIPT = f"""
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
import torchmetrics
from helpers import Net
from torch import nn
from torch.utils.data import DataLoader

from lkflow import LightModel, LkflowError
from lkflow.datasets import rings

out = Path(sys.argv[1])
ddp = dict(gpus=0, devices={PROCESSES}, strategy="ddp", track=False, verbose=0)


def model(lr):
    pl.seed_everything(0, verbose=False)
    net = Net()
    metrics = {{"acc": torchmetrics.classification.BinaryAccuracy()}}
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    return LightModel(net, loss_fn=nn.BCEWithLogitsLoss(), metrics=metrics, optimizer=optimizer)


train = DataLoader(rings({TRAIN_ROWS}, seed=1), batch_size={BATCH}, shuffle=True)
val = DataLoader(rings({VAL_ROWS}, seed=2), batch_size={BATCH})
still = model(lr=0.0)  # weights never move: every value is checkable afterwards
still_history = still.fit(train, val, epochs=1, ckpt_dir=out / "still", **ddp)
pl.seed_everything(0, verbose=False)
collected = LightModel(
    Net(),
    loss_fn=nn.BCEWithLogitsLoss(),
    metrics=torchmetrics.MetricCollection(
        {{"acc": torchmetrics.classification.BinaryAccuracy(),
          "auroc": torchmetrics.classification.BinaryAUROC()}},
        prefix="c_",
    ),
)
collected.optimizer = torch.optim.SGD(collected.net.parameters(), lr=0.0)
collected_history = collected.fit(train, val, epochs=1, ckpt_dir=out / "collected", **ddp)
moving = model(lr=0.5)
history = moving.fit(train, val, epochs=3, ckpt_dir=out / "moving", **ddp)
best = moving.trainer.checkpoint_callback.best_model_path
evaluated = moving.evaluate(val, gpus=0, devices={PROCESSES}, strategy="ddp")
try:
    moving.evaluate(DataLoader(rings(1)), gpus=0, devices={PROCESSES}, strategy="ddp")
except LkflowError as err:
    too_few_rows = str(err)
rank = torch.distributed.get_rank()
result = dict(
    world_size=torch.distributed.get_world_size(),
    still_history=still_history.to_dict("records"),
    still_state=still.net.state_dict(),
    collected_history=collected_history.to_dict("records"),
    collected_state=collected.net.state_dict(),
    history=history.to_dict("records"),
    best=best,
    state=moving.net.state_dict(),
    evaluated=evaluated,
    too_few_rows=too_few_rows,
)
torch.save(result, out / f"rank{{rank}}.pt")
torch.distributed.barrier()  # every file is written before the first process exits
"""

# Two tracked fits with 2 processes, one after the other in the same processes, to the tracking
# server that MLFLOW_TRACKING_URI names: a LightModel's, then a LightningModule that is no
# LightModel tracked by MLflowCallback on a plain Trainer; rank zero writes what Lightning's
# callback_metrics held at each of the second fit's epoch ends.
TRACKED_SCRIPT = f"""
import json
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from helpers import Net
from peers import DigitsData, LitClassifier
from pytorch_lightning.callbacks import Checkpoint, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

import lkflow
from lkflow import LightModel
from lkflow.datasets import rings

out = Path(sys.argv[1])
pl.seed_everything(0, verbose=False)
model = LightModel(Net(), loss_fn=nn.BCEWithLogitsLoss())
train = DataLoader(rings({TRAIN_ROWS}, seed=1), batch_size={BATCH}, shuffle=True)
val = DataLoader(rings({VAL_ROWS}, seed=2), batch_size={BATCH})
model.fit(
    train,
    val,
    epochs={TRACKED_EPOCHS},
    gpus=0,
    devices={PROCESSES},
    strategy="ddp",
    verbose=0,
    experiment_name="ddp",
    registered_model_name="ddp-net",
)  # logs to MLFLOW_TRACKING_URI: a shared `mlflow server` over HTTP


class EpochEnds(Checkpoint):
    def __init__(self):
        self.held = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.held.append({{k: float(v) for k, v in trainer.callback_metrics.items()}})

    def on_fit_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            (out / "held.json").write_text(json.dumps(self.held))


pl.seed_everything(0, verbose=False)
trainer = pl.Trainer(
    max_epochs={TRACKED_EPOCHS},
    accelerator="cpu",
    devices={PROCESSES},
    strategy="ddp",
    logger=False,
    log_every_n_steps=1,
    enable_progress_bar=False,
    enable_model_summary=False,
    callbacks=[
        lkflow.MLflowCallback(experiment_name="ddp-module", registered_model_name="ddp-module"),
        ModelCheckpoint(monitor="valid_acc", mode="max"),
        EpochEnds(),
    ],
)
trainer.fit(LitClassifier(hidden=16, lr=0.05), datamodule=DigitsData(batch_size=32, rows=320))
"""

# A session that Lightning takes for an interactive one (it checks `sys.ps1`), as in a notebook.
NOTEBOOK_SCRIPT = f"""
import sys

sys.ps1 = ">>> "

from pathlib import Path

import pytorch_lightning as pl
import torch
import torchmetrics
from helpers import Net
from lightning_fabric.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader

from lkflow import LightModel
from lkflow.datasets import rings

out = Path(sys.argv[1])
pl.seed_everything(0, verbose=False)
net = Net()
model = LightModel(
    net,
    loss_fn=nn.BCEWithLogitsLoss(),
    metrics={{"acc": torchmetrics.classification.BinaryAccuracy()}},
    optimizer=torch.optim.SGD(net.parameters(), lr=0.5),
)
train = DataLoader(rings({TRAIN_ROWS}, seed=1), batch_size={BATCH}, shuffle=True)
val = DataLoader(rings({VAL_ROWS}, seed=2), batch_size={BATCH})
kwargs = dict(gpus=0, devices={PROCESSES}, track=False, verbose=0)
try:
    model.fit(train, val, epochs=2, strategy="ddp", **kwargs)
except MisconfigurationException as err:
    (out / "ddp_error.txt").write_text(str(err))
history = model.fit(train, val, epochs=2, strategy="ddp_notebook", ckpt_dir=out / "nb", **kwargs)
(best,) = [str(path) for path in (out / "nb").glob("epoch=*.ckpt")]  # save_top_k=1
evaluated = model.evaluate(val, gpus=0, devices={PROCESSES}, strategy="ddp_notebook")
result = dict(
    history=history.to_dict("records"),
    best=best,
    state=model.net.state_dict(),
    evaluated=evaluated,
)
torch.save(result, out / "main.pt")
"""


@dataclass
class _Launch:
    """A script started in its own folder, with its output going to `log.txt` there."""

    out: Path
    process: subprocess.Popen[bytes]

    def finish(self) -> int:
        """Waits for the script, killing its processes after `_TIMEOUT_S`; its exit code."""
        try:
            return self.process.wait(timeout=_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)  # its session holds all its processes
            raise

    def wait(self) -> Path:
        """Waits for the script and fails with its output unless it succeeded."""
        code = self.finish()
        assert code == 0, f"{self.process.args} failed:\n{(self.out / 'log.txt').read_text()}"
        return self.out


def _launch(out: Path, name: str, script: str, command: list[str], **extra_env: str) -> _Launch:
    (out / name).write_text(script)
    env = {
        **os.environ,
        **extra_env,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)]),
        "OMP_NUM_THREADS": "1",
    }
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK"):
        env.pop(key, None)
    with open(out / "log.txt", "wb") as log:
        process = subprocess.Popen(
            [*command, name, str(out)],
            cwd=out,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return _Launch(out, process)


@pytest.fixture(scope="module")
def tracking_server(
    tmp_path_factory: pytest.TempPathFactory, migrated_store: Path
) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 (sqlite backend, artifacts served by it)."""
    folder = tmp_path_factory.mktemp("server")
    with mlflow_server(fresh_store(folder, migrated_store), folder / "artifacts", folder) as url:
        yield url


@pytest.fixture(scope="module")
def launches(
    tmp_path_factory: pytest.TempPathFactory, tracking_server: str
) -> Iterator[dict[str, _Launch]]:
    """Starts every script at once, so that the processes import torch side by side."""
    python = [sys.executable]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    started = {
        # Lightning starts the second process itself, running the script again.
        "lightning": _launch(tmp_path_factory.mktemp("lightning"), "fit.py", FIT_SCRIPT, python),
        # `torchrun --standalone --nproc_per_node 2 fit.py`, in torch's module form.
        "torchrun": _launch(
            tmp_path_factory.mktemp("torchrun"),
            "fit.py",
            FIT_SCRIPT,
            [*torchrun, "--nproc_per_node", str(PROCESSES)],
        ),
        "notebook": _launch(
            tmp_path_factory.mktemp("notebook"), "notebook.py", NOTEBOOK_SCRIPT, python
        ),
        "tracked": _launch(
            tmp_path_factory.mktemp("tracked"),
            "tracked.py",
            TRACKED_SCRIPT,
            python,
            MLFLOW_TRACKING_URI=tracking_server,
        ),
    }
    yield started
    for launch in started.values():
        launch.finish()


def _ranks(out: Path) -> list[dict[str, Any]]:
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(PROCESSES)]


@pytest.fixture(scope="module")
def lightning_run(launches: dict[str, _Launch]) -> list[dict[str, Any]]:
    """What each process of the Lightning-launched fit script held at its end."""
    return _ranks(launches["lightning"].wait())


@pytest.fixture(scope="module")
def torchrun_run(launches: dict[str, _Launch]) -> list[dict[str, Any]]:
    """What each process of the torchrun-launched fit script held at its end."""
    return _ranks(launches["torchrun"].wait())


@pytest.fixture(scope="module")
def notebook_run(launches: dict[str, _Launch]) -> tuple[dict[str, Any], str]:
    """The notebook script's results in its main process, and the error `strategy="ddp"` raised."""
    out = launches["notebook"].wait()
    error = (out / "ddp_error.txt").read_text() if (out / "ddp_error.txt").exists() else ""
    return torch.load(out / "main.pt", weights_only=True), error


@pytest.fixture(scope="module")
def tracked_store(launches: dict[str, _Launch], tracking_server: str) -> str:
    """The tracking server that the tracked 2-process fits logged to, once they have finished."""
    launches["tracked"].wait()
    return tracking_server


def _single_process(state: dict[str, torch.Tensor]) -> dict[str, float]:
    """`evaluate` of these weights on the validation rows in this one process."""
    net = Net()
    net.load_state_dict(state)
    model = LightModel(
        net,
        loss_fn=nn.BCEWithLogitsLoss(),
        metrics={"acc": torchmetrics.classification.BinaryAccuracy()},
    )
    return model.evaluate(DataLoader(rings(VAL_ROWS, seed=2), batch_size=BATCH), gpus=0)


def _full_pass(state: dict[str, torch.Tensor], rows: list[int]) -> tuple[float, float]:
    """Loss and accuracy over these training rows at once: an independent recomputation."""
    net = Net()
    net.load_state_dict(state)
    x, y = rings(TRAIN_ROWS, seed=1).tensors
    with torch.no_grad():
        logits = net(x[rows])
    loss = nn.functional.binary_cross_entropy_with_logits(logits, y[rows]).item()
    return loss, ((logits > 0).float() == y[rows]).float().mean().item()


def _assert_same_on_every_rank(ranks: list[dict[str, Any]]) -> None:
    first, *others = ranks
    for other in others:
        assert other["history"] == first["history"]
        assert other["still_history"] == first["still_history"]
        assert other["evaluated"] == first["evaluated"]
        assert other["best"] == first["best"]
        assert other["too_few_rows"] == first["too_few_rows"]
        assert other["state"].keys() == first["state"].keys()
        for key, value in first["state"].items():
            assert torch.equal(other["state"][key], value), key


def test_epoch_values_are_over_the_whole_data_set_on_every_rank(lightning_run):
    assert [rank["world_size"] for rank in lightning_run] == [PROCESSES] * PROCESSES
    _assert_same_on_every_rank(lightning_run)
    (row,) = lightning_run[0]["still_history"]
    single = _single_process(lightning_run[0]["still_state"])
    assert row["val_loss"] == pytest.approx(single["loss"], rel=1e-6)
    assert row["val_acc"] == pytest.approx(single["acc"], rel=1e-6)


def test_a_metric_collection_is_over_every_validation_row_on_every_rank(lightning_run):
    net = Net()
    net.load_state_dict(lightning_run[0]["collected_state"])
    x, y = rings(VAL_ROWS, seed=2).tensors
    with torch.no_grad():
        logits = net(x)
    acc = torchmetrics.classification.BinaryAccuracy()(logits, y).item()
    auroc = torchmetrics.classification.BinaryAUROC()(logits, y).item()
    for rank in lightning_run:
        (row,) = rank["collected_history"]
        assert row["val_c_acc"] == pytest.approx(acc, rel=1e-6)
        assert row["val_c_auroc"] == pytest.approx(auroc, rel=1e-6)


def test_training_values_are_over_the_rows_trained_on_with_the_repeated_row(lightning_run):
    # Lightning's DistributedSampler(shuffle=True, seed=0) pads 251 rows to 252 so that both
    # processes take as many steps; the training values are over exactly those 252 rows.
    dataset = rings(TRAIN_ROWS, seed=1)
    seen = []
    for rank in range(PROCESSES):
        sampler = DistributedSampler(dataset, num_replicas=PROCESSES, rank=rank, seed=0)
        sampler.set_epoch(0)
        seen += list(sampler)
    assert len(seen) == TRAIN_ROWS + 1
    (row,) = lightning_run[0]["still_history"]
    loss, acc = _full_pass(lightning_run[0]["still_state"], seen)
    assert row["loss"] == pytest.approx(loss, rel=1e-6)
    assert row["acc"] == pytest.approx(acc, rel=1e-6)
    unique_loss, _ = _full_pass(lightning_run[0]["still_state"], sorted(set(seen)))
    assert abs(unique_loss - loss) > 1e-6  # the repeated row is really counted


def test_evaluate_with_two_processes_counts_every_row_once(lightning_run):
    single = _single_process(lightning_run[0]["state"])
    evaluated = lightning_run[0]["evaluated"]
    assert evaluated["loss"] == pytest.approx(single["loss"], rel=1e-6)
    assert evaluated["acc"] == pytest.approx(single["acc"], rel=1e-6)
    # The restored net is the best epoch's: its val_ values are this same evaluation.
    history = lightning_run[0]["history"]
    assert [row["epoch"] for row in history] == [1, 2, 3]
    best = min(history, key=lambda row: row["val_loss"])
    assert best["val_loss"] == pytest.approx(single["loss"], rel=1e-6)
    assert best["val_acc"] == pytest.approx(single["acc"], rel=1e-6)


def test_an_evaluation_set_smaller_than_the_processes_fails_before_any_step(lightning_run):
    assert lightning_run[0]["too_few_rows"].startswith("Received: data of 1 rows for 2 processes")


def test_best_checkpoint_and_net_are_the_same_on_every_rank(lightning_run):
    _assert_same_on_every_rank(lightning_run)
    best = lightning_run[0]["best"]
    assert Path(best).is_file() and Path(best).parent.name == "moving"
    saved = torch.load(best, weights_only=True)["state_dict"]
    for key, value in lightning_run[0]["state"].items():
        assert torch.equal(saved[f"net.{key}"], value), key


def test_torchrun_gives_the_same_result_as_lightning_launching(torchrun_run, lightning_run):
    assert [rank["world_size"] for rank in torchrun_run] == [PROCESSES] * PROCESSES
    _assert_same_on_every_rank(torchrun_run)
    ours, theirs = torchrun_run[0], lightning_run[0]
    for key in ("history", "still_history"):
        for mine, other in zip(ours[key], theirs[key], strict=True):
            assert mine == pytest.approx(other, rel=1e-6)
    assert ours["evaluated"] == pytest.approx(theirs["evaluated"], rel=1e-6)
    for key, value in theirs["state"].items():
        assert torch.allclose(ours["state"][key], value, rtol=1e-6, atol=0), key


def test_ddp_in_a_notebook_fails_with_a_message_naming_ddp_notebook(notebook_run):
    _, error = notebook_run
    assert "is not compatible with an interactive environment" in error
    assert "strategy='ddp_notebook'" in error


def test_ddp_notebook_trains_and_restores_the_best_weights(notebook_run):
    main, _ = notebook_run
    saved = torch.load(main["best"], weights_only=True)["state_dict"]
    for key, value in main["state"].items():
        assert torch.equal(saved[f"net.{key}"], value), key
    single = _single_process(main["state"])
    assert main["evaluated"]["loss"] == pytest.approx(single["loss"], rel=1e-6)
    assert main["evaluated"]["acc"] == pytest.approx(single["acc"], rel=1e-6)


def test_ddp_notebook_returns_the_history(notebook_run):
    main, _ = notebook_run
    assert [row["epoch"] for row in main["history"]] == [1, 2]


def test_a_tracked_fit_over_http_makes_one_run_with_each_epoch_logged_once(tracked_store, launches):
    from mlflow import MlflowClient

    client = MlflowClient(tracked_store)
    experiment = client.get_experiment_by_name("ddp")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    for key in ("loss", "val_loss"):
        steps = [metric.step for metric in client.get_metric_history(run.info.run_id, key)]
        assert steps == list(range(1, TRACKED_EPOCHS + 1)), key
    (version,) = client.search_model_versions("name = 'ddp-net'")
    assert version.run_id == run.info.run_id
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"checkpoints", "net", "history.csv"} <= artifacts  # uploaded through the server
    assert not (launches["tracked"].out / "mlruns").exists()


def test_a_lightning_module_tracked_with_two_processes_makes_one_run_of_rank_zeros_values(
    launches, tracked_store
):
    import json

    from mlflow import MlflowClient

    held = json.loads((launches["tracked"].out / "held.json").read_text())
    client = MlflowClient(tracked_store)
    experiment = client.get_experiment_by_name("ddp-module")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    for key in ("train_loss", "train_acc_epoch", "val_loss", "valid_acc"):
        logged = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
        expected = [
            (epoch, pytest.approx(ends[key], rel=1e-6)) for epoch, ends in enumerate(held, 1)
        ]
        assert sorted(logged) == expected, key
    step_values = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss_step")]
    assert len(step_values) == len(set(step_values)) == TRACKED_EPOCHS * 4  # rank zero's, once
    (version,) = client.search_model_versions("name = 'ddp-module'")
    assert version.run_id == run.info.run_id and version.tags["monitor"] == "valid_acc"
