"""The best checkpoint and `last.ckpt`: one file written per epoch, neither overwriting the
other; each whole or absent, with no secrets, resumed from the last epoch without logging an
epoch twice, named when it is missing or is not a complete lkflow checkpoint, and loaded with
weights only.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from click.testing import CliRunner
from helpers import (
    ROOT,
    SQLITE_ONLY,
    Net,
    Worker,
    finished,
    fresh_store,
    make_loaders,
    make_model,
    only_run,
    small_loaders,
    wait_for,
)
from mlflow import MlflowClient
from pytorch_lightning.loggers import Logger
from pytorch_lightning.plugins import TorchCheckpointIO
from servers import free_port, mlflow_server
from test_offline import _KillAtEpochEnd
from torch import nn

from lkflow import LightModel, LkflowError, MLflowCallback
from lkflow.cli import main
from lkflow.credentials import MASK
from lkflow.epoch_values import epoch_number


class CountingIO(TorchCheckpointIO):
    """Lightning's own checkpoint writer, counting the files it writes."""

    def __init__(self) -> None:
        self.saved: list[str] = []

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        self.saved.append(Path(path).name)
        super().save_checkpoint(checkpoint, path, storage_options)


def _epoch_of(path: str | Path) -> int:
    """The epoch a checkpoint file holds, as people count it (the file keeps Lightning's 0-based)."""
    return torch.load(path, map_location="cpu", weights_only=True)["epoch"] + 1


def test_an_epoch_with_a_new_best_writes_one_file_and_links_last_to_it() -> None:
    model = make_model()
    io = CountingIO()
    model.fit(*make_loaders(), epochs=4, gpus=0, verbose=0, track=False, plugins=[io])

    best = model.trainer.checkpoint_callback.best_model_path
    last = Path("checkpoints/last.ckpt")
    assert len(io.saved) == 4  # one write per epoch, whether or not it was a new best
    last_epoch_was_best = io.saved[-1] == Path(best).name
    assert os.path.samefile(best, last) == last_epoch_was_best
    assert _epoch_of(last) == 4


def test_later_epochs_rewrite_last_without_touching_the_linked_best() -> None:
    # mode="max" on a falling val_loss: epoch 1 is the only best, so last.ckpt starts as a link
    # to it and must be replaced, not written through, in epochs 2 and 3
    model = make_model()
    io = CountingIO()
    model.fit(*make_loaders(), epochs=3, gpus=0, verbose=0, track=False, mode="max", plugins=[io])

    best = Path(model.trainer.checkpoint_callback.best_model_path)
    assert best.name.startswith("epoch=1-")
    assert io.saved == [best.name, "last.ckpt", "last.ckpt"]
    assert _epoch_of(best) == 1
    assert _epoch_of("checkpoints/last.ckpt") == 3
    assert not os.path.samefile(best, "checkpoints/last.ckpt")
    assert sorted(p.name for p in Path("checkpoints").iterdir()) == sorted([best.name, "last.ckpt"])


def test_a_file_system_without_hard_links_gets_a_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(source: str, target: str) -> None:
        raise PermissionError(1, "Operation not permitted", target)

    monkeypatch.setattr("lkflow.checkpoints.os.link", refuse)
    model = make_model()
    model.fit(*make_loaders(), epochs=1, gpus=0, verbose=0, track=False)

    best = Path(model.trainer.checkpoint_callback.best_model_path)
    last = Path("checkpoints/last.ckpt")
    assert not os.path.samefile(best, last)
    assert last.read_bytes() == best.read_bytes()


def test_resuming_from_a_linked_last_continues_and_keeps_the_best() -> None:
    first = make_model()
    first.fit(*make_loaders(), epochs=2, gpus=0, verbose=0, track=False)
    best_before = first.trainer.checkpoint_callback.best_model_score

    resumed = make_model()
    resumed.fit(*make_loaders(), epochs=4, gpus=0, verbose=0, track=False, ckpt_path="last")

    assert [row["epoch"] for row in resumed.history] == [1, 2, 3, 4]
    assert resumed.trainer.checkpoint_callback.best_model_score <= best_before
    assert _epoch_of("checkpoints/last.ckpt") == 4
    assert len(list(Path("checkpoints").glob("epoch=*.ckpt"))) == 1


class SeesCheckpoints(Logger):
    """A Lightning logger that notes which checkpoint files it was told of."""

    def __init__(self) -> None:
        super().__init__()
        self.told: list[str] = []

    @property
    def name(self) -> str:
        return "sees-checkpoints"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        self.told.append(Path(checkpoint_callback.best_model_path).name)


def test_loggers_hear_of_last_whether_it_was_written_or_linked() -> None:
    logger = SeesCheckpoints()
    io = CountingIO()
    model = make_model()
    model.fit(
        *make_loaders(),
        epochs=3,
        gpus=0,
        verbose=0,
        track=False,
        logger=logger,
        log_every_n_steps=1,
        plugins=[io],
    )

    assert logger.told.count("last.ckpt") == 3
    assert [name for name in logger.told if name != "last.ckpt"] == [
        name for name in io.saved if name != "last.ckpt"
    ]


# ---- a fit killed around a checkpoint ------------------------------------------------------

_STALLING_WORKER = """
\"\"\"A tracked fit of the rings that stalls, to be killed: python worker.py '{...settings}'.

Settings: uri, epochs, ckpt_path; stall_epoch and stall_in, where the fit writes the file
`marker` and sleeps: "save" in that epoch's checkpoint save, once every hook has seen the
checkpoint and before the file is written; "next_epoch" at the start of the epoch after it,
before that epoch's row is logged. Prints the run id and history as JSON.
\"\"\"
import json
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from lkflow import LightModel, MLflowCallback
from lkflow.datasets import rings

settings = json.loads(sys.argv[1])


def stall(where, epoch):
    if settings.get("stall_in") == where and epoch == settings.get("stall_epoch"):
        Path("marker").write_text(where)
        time.sleep(600)


class SlowToSave(LightModel):
    def on_save_checkpoint(self, checkpoint):
        super().on_save_checkpoint(checkpoint)
        stall("save", checkpoint["epoch"])


class StallsAtEpochStart(pl.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        stall("next_epoch", trainer.current_epoch - 1)


pl.seed_everything(0, verbose=False)
net = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 1))
optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
model = SlowToSave(net, loss_fn=nn.BCEWithLogitsLoss(), optimizer=optimizer)
model.fit(
    DataLoader(rings(128, seed=1), batch_size=32),
    DataLoader(rings(64, seed=2), batch_size=64),
    epochs=settings["epochs"],
    gpus=0,
    verbose=0,
    callbacks=[StallsAtEpochStart()],
    ckpt_path=settings.get("ckpt_path"),
    track=MLflowCallback(tracking_uri=settings["uri"], log_model=False),
)
print(json.dumps({"run_id": model.run_id, "history": model.history}))
"""


@pytest.fixture
def stalling_worker(tmp_path: Path) -> Worker:
    script = tmp_path / "stalling_worker.py"
    script.write_text(_STALLING_WORKER)
    return Worker(script)


@pytest.mark.slow
@pytest.mark.parametrize("stall_in", ["save", "next_epoch"])
@SQLITE_ONLY  # the checkpoint's timing; a killed fit's resume on both: test_reliability.py
def test_a_fit_killed_around_a_checkpoint_resumes_without_duplicate_or_missing_steps(
    tracking_uri: str,
    stalling_worker: Worker,
    tmp_path: Path,
    processes: list[subprocess.Popen],
    stall_in: str,
) -> None:
    # "save": killed while epoch 3's checkpoint is being written, so last.ckpt is epoch 2's
    # and epoch 3 runs again; "next_epoch": killed once epoch 3's checkpoint is on disk,
    # before its row reached MLflow (stall_epoch is Lightning's 0-based current_epoch)
    folder = tmp_path / "fit"
    first = stalling_worker.start(
        folder, uri=tracking_uri, epochs=5, stall_epoch=2, stall_in=stall_in
    )
    processes.append(first)
    wait_for(folder / "marker", first)
    first.kill()  # SIGKILL: no hook runs
    first.wait()
    client = MlflowClient(tracking_uri)
    (killed,) = client.search_runs(["0"])
    run_id = killed.info.run_id
    saved = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)
    assert [row["epoch"] for row in saved["lkflow_history"]] == (
        [1, 2] if stall_in == "save" else [1, 2, 3]
    )
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == [1, 2]

    second = stalling_worker.start(folder, uri=tracking_uri, epochs=5, ckpt_path="last")
    processes.append(second)
    resumed = finished(second, folder)
    assert resumed["run_id"] == run_id
    history = resumed["history"]
    assert [row["epoch"] for row in history] == [1, 2, 3, 4, 5]
    for key in ("loss", "val_loss", "lr"):
        logged = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        assert logged == [(row["epoch"], pytest.approx(row[key])) for row in history], key


class _FailsAtEpochEnd(pl.Callback):
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if epoch_number(trainer.current_epoch) == 3:
            raise RuntimeError("failed in epoch 3")


@pytest.mark.slow
def test_a_fit_resumed_while_its_rows_wait_in_the_outbox_logs_none_twice(
    tmp_path: Path, migrated_store: Path
) -> None:
    # the server goes away after epoch 1, so rows 1 and 2 wait in the outbox, not in MLflow,
    # when the fit fails in epoch 3 and is resumed from epoch 2's last.ckpt
    (tmp_path / "server").mkdir()
    backend, port = fresh_store(tmp_path / "server", migrated_store), free_port()
    server = mlflow_server(backend, tmp_path / "served", tmp_path, port)
    with server as url, pytest.warns(UserWarning, match="stopped answering"):
        first = MLflowCallback(tracking_uri=url, log_model=False)
        with pytest.raises(RuntimeError, match="failed in epoch 3"):
            make_model().fit(
                *make_loaders(),
                epochs=4,
                gpus=0,
                verbose=0,
                callbacks=[_KillAtEpochEnd(server, epoch=1), _FailsAtEpochEnd()],
                track=first,
            )
    with mlflow_server(backend, tmp_path / "served", tmp_path, port):
        resumed = make_model()
        with pytest.warns(UserWarning, match="writes that an earlier fit kept"):
            resumed.fit(
                *make_loaders(),
                epochs=4,
                gpus=0,
                verbose=0,
                ckpt_path="last",
                track=MLflowCallback(tracking_uri=url, log_model=False),
            )
        synced = CliRunner().invoke(main, ["sync"])
        assert synced.exit_code == 0, synced.output
        client = MlflowClient(url)
        run = client.get_run(first.run_id_)
        assert run.info.status == "FINISHED" and resumed.run_id == run.info.run_id
        for key in ("loss", "val_loss", "lr"):
            logged = sorted(
                (m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)
            )
            assert logged == [(row["epoch"], pytest.approx(row[key])) for row in resumed.history]


# ---- a full disk ---------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real file system of 200 KB (a tmpfs) for the test; mounting one needs root."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    mount = shutil.which("mount")
    command = [mount or "mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(folder)]
    mounted = subprocess.run(command, capture_output=True, text=True) if mount else None
    if mounted is None or mounted.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here: {mounted.stderr.strip() if mounted else 'no mount'}"
        )
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def _loads(path: Path) -> bool:
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return False
    return True


def test_a_full_disk_keeps_no_partial_checkpoint_and_the_previous_best(
    tracking_uri: str, small_disk: Path, tmp_path: Path
) -> None:
    # 26k weights (about 106 KB a checkpoint, plain SGD has no state): epoch 0's best fits on
    # the 200 KB disk, epoch 1's new best does not fit beside it
    net = nn.Sequential(
        nn.Linear(2, 160), nn.ReLU(), nn.Linear(160, 160), nn.ReLU(), nn.Linear(160, 1)
    )
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    model = LightModel(net, loss_fn=nn.BCEWithLogitsLoss(), optimizer=optimizer)
    tracker = MLflowCallback(log_model=False)
    with pytest.raises(OSError, match="No space left on device"):
        model.fit(*make_loaders(), epochs=3, gpus=0, verbose=0, ckpt_dir=small_disk, track=tracker)

    assert [row["epoch"] for row in model.history] == [1, 2]
    on_disk = sorted(path.name for path in small_disk.iterdir())
    best = Path(model.trainer.checkpoint_callback.best_model_path)
    assert best.name.startswith("epoch=1-") and on_disk == sorted([best.name, "last.ckpt"])
    assert all(_loads(small_disk / name) for name in on_disk)
    client = MlflowClient(tracking_uri)
    run = client.get_run(tracker.run_id_)
    assert run.info.status == "FAILED"
    uploaded = client.download_artifacts(run.info.run_id, "checkpoints", str(tmp_path))
    assert sorted(path.name for path in Path(uploaded).iterdir()) == on_disk
    assert all(_loads(path) for path in Path(uploaded).iterdir())


# ---- secrets -------------------------------------------------------------------------------


class _WithSecrets(LightModel):
    def __init__(
        self,
        net: nn.Module,
        api_key: str,
        hf_token: str,
        db: dict,
        token_dim: int = 64,
        **kwargs: Any,
    ) -> None:
        super().__init__(net, **kwargs)


def test_secret_hyperparameters_are_masked_in_checkpoints_and_passed_again_to_load(
    tracking_uri: str, tmp_path: Path
) -> None:
    secrets = {
        "api_key": "sk-123",
        "hf_token": "hf_abc",
        "db": {"password": "hunter2", "port": 5432},
    }
    model = _WithSecrets(Net(), **secrets, loss_fn=nn.BCEWithLogitsLoss())
    tracker = MLflowCallback(log_model=False)
    model.fit(*make_loaders(), epochs=2, gpus=0, verbose=0, track=tracker)

    client = MlflowClient(tracking_uri)
    uploaded = client.download_artifacts(tracker.run_id_, "checkpoints", str(tmp_path / "run"))
    files = [*Path("checkpoints").iterdir(), *Path(uploaded).iterdir()]
    assert len(files) == 3  # best and last on disk, the best in the run
    for path in files:
        data = path.read_bytes()
        assert not any(secret.encode() in data for secret in ("sk-123", "hf_abc", "hunter2")), path
        hparams = torch.load(path, weights_only=True)["hyper_parameters"]
        assert hparams == {
            "api_key": MASK,
            "hf_token": MASK,
            "db": {"password": MASK, "port": 5432},
            "token_dim": 64,
        }, path
    assert model.hparams.api_key == "sk-123"  # the model itself keeps its values

    best = model.trainer.checkpoint_callback.best_model_path
    with pytest.warns(
        UserWarning, match=re.escape("Pass hf_token=..., db=... to load_from_checkpoint")
    ):
        loaded = _WithSecrets.load_from_checkpoint(
            best, net=Net(), api_key="sk-123", loss_fn=nn.BCEWithLogitsLoss()
        )
    assert loaded.hparams.api_key == "sk-123" and loaded.hparams.hf_token == MASK
    assert loaded.hparams.token_dim == 64


# ---- a checkpoint that is missing or not one -----------------------------------------------


def test_resuming_last_from_a_folder_without_one_names_it_before_any_run(tracking_uri: str) -> None:
    model = make_model()
    with pytest.raises(
        LkflowError, match=re.escape("ckpt_dir='nothing-here' holds no last.ckpt")
    ) as raised:
        model.fit(
            *make_loaders(), epochs=1, gpus=0, verbose=0, ckpt_path="last", ckpt_dir="nothing-here"
        )
    assert "leave ckpt_path unset to start a fresh fit" in str(raised.value)
    assert model.history == []
    assert MlflowClient(tracking_uri).search_runs(["0"]) == []


class _NotWeights:
    pass


def _not_a_checkpoint(kind: str, folder: Path) -> Path:
    """A file as `kind` says, made from a real checkpoint where it is one cut short."""
    folder.mkdir()
    path = folder / f"{kind.replace(' ', '-')}.ckpt"
    if kind == "truncated":
        make_model().fit(*make_loaders(), epochs=1, gpus=0, verbose=0, track=False, ckpt_dir=folder)
        whole = (folder / "last.ckpt").read_bytes()
        path.write_bytes(whole[: len(whole) * 2 // 3])
    elif kind == "empty":
        path.touch()
    elif kind == "pickled object":
        torch.save({"state_dict": {}, "model": _NotWeights()}, path)
    elif kind == "bare state_dict":
        torch.save(Net().state_dict(), path)
    elif kind == "text":
        path.write_text("not a checkpoint\n")
    return path


@pytest.mark.parametrize(
    "kind", ["truncated", "empty", "pickled object", "bare state_dict", "text"]
)
def test_a_file_that_is_not_a_complete_checkpoint_is_named_before_any_run(
    tracking_uri: str, tmp_path: Path, kind: str
) -> None:
    path = _not_a_checkpoint(kind, tmp_path / "made")
    model = make_model()
    with pytest.raises(LkflowError) as resuming:
        model.fit(*make_loaders(), epochs=2, gpus=0, verbose=0, ckpt_path=path)
    with pytest.raises(LkflowError) as loading:
        LightModel.load_from_checkpoint(path, net=Net())

    for argument, raised in (("ckpt_path", resuming), ("checkpoint_path", loading)):
        message = str(raised.value)
        assert message.startswith(
            f"Received: {argument}='{path}', which is not a complete lkflow checkpoint"
        )
        assert "weights_only" not in "".join(traceback.format_exception(raised.value))
    assert model.history == []
    assert MlflowClient(tracking_uri).search_runs(["0"]) == []


def test_partial_files_a_killed_fit_left_are_never_read_and_the_next_fit_removes_them() -> None:
    make_model().fit(*make_loaders(), epochs=1, gpus=0, verbose=0, track=False)
    for name in ("last.ckpt.partial", "epoch=2-val_loss=0.5000.ckpt.partial"):
        Path("checkpoints", name).write_bytes(b"cut short by a kill")

    resumed = make_model()
    resumed.fit(*make_loaders(), epochs=2, gpus=0, verbose=0, track=False, ckpt_path="last")

    assert [row["epoch"] for row in resumed.history] == [1, 2]
    assert list(Path("checkpoints").glob("*.partial")) == []


class _StopsAtEpochStart(pl.Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if epoch_number(trainer.current_epoch) == self.epoch:
            raise RuntimeError(f"stopped at the start of epoch {self.epoch}")


def test_resuming_from_last_continues_after_the_last_epoch_not_the_last_best(
    tracking_uri: str,
) -> None:
    # mode="max" on a falling val_loss: only epoch 1 is ever a new best, and Lightning 2.6
    # writes its own last.ckpt only with a new best
    first = make_model()
    with pytest.raises(RuntimeError, match="epoch 4"):
        first.fit(
            *small_loaders(),
            epochs=5,
            gpus=0,
            verbose=0,
            mode="max",
            callbacks=[_StopsAtEpochStart(4)],
        )
    assert [row["epoch"] for row in first.history] == [1, 2, 3]

    resumed = make_model()
    resumed.fit(*small_loaders(), epochs=5, gpus=0, verbose=0, mode="max", ckpt_path="last")
    assert [row["epoch"] for row in resumed.history] == [1, 2, 3, 4, 5]
    assert resumed.history[:3] == first.history
    client = MlflowClient(tracking_uri)
    run = only_run(client)
    assert run.info.status == "FINISHED" and resumed.run_id == run.info.run_id
    for key in ("loss", "val_loss", "lr"):
        logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert logged == [(row["epoch"], pytest.approx(row[key])) for row in resumed.history], key


def _calls(source: str) -> Iterator[ast.Call]:
    yield from (node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Call))


def test_every_checkpoint_and_state_dict_is_loaded_with_weights_only() -> None:
    loads = 0
    for path in sorted((ROOT / "lkflow").rglob("*.py")):
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
