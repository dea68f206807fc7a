"""The best checkpoint and `last.ckpt`: one file written per epoch, neither overwriting the other;
resuming from the last epoch; every checkpoint loaded with weights only."""

from __future__ import annotations

import ast
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from helpers import ROOT, make_loaders, make_model, only_run, small_loaders
from mlflow import MlflowClient
from pytorch_lightning.loggers import Logger
from pytorch_lightning.plugins import TorchCheckpointIO


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
    return torch.load(path, map_location="cpu", weights_only=True)["epoch"]


def test_an_epoch_with_a_new_best_writes_one_file_and_links_last_to_it() -> None:
    model = make_model()
    io = CountingIO()
    model.fit(*make_loaders(), epochs=4, gpus=0, verbose=0, track=False, plugins=[io])

    best = model.trainer.checkpoint_callback.best_model_path
    last = Path("checkpoints/last.ckpt")
    assert len(io.saved) == 4  # one write per epoch, whether or not it was a new best
    last_epoch_was_best = io.saved[-1] == Path(best).name
    assert os.path.samefile(best, last) == last_epoch_was_best
    assert _epoch_of(last) == 3


def test_later_epochs_rewrite_last_without_touching_the_linked_best() -> None:
    # mode="max" on a falling val_loss: epoch 0 is the only best, so last.ckpt starts as a link
    # to it and must be replaced, not written through, in epochs 1 and 2
    model = make_model()
    io = CountingIO()
    model.fit(*make_loaders(), epochs=3, gpus=0, verbose=0, track=False, mode="max", plugins=[io])

    best = Path(model.trainer.checkpoint_callback.best_model_path)
    assert best.name.startswith("epoch=0-")
    assert io.saved == [best.name, "last.ckpt", "last.ckpt"]
    assert _epoch_of(best) == 0
    assert _epoch_of("checkpoints/last.ckpt") == 2
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

    assert [row["epoch"] for row in resumed.history] == [0, 1, 2, 3]
    assert resumed.trainer.checkpoint_callback.best_model_score <= best_before
    assert _epoch_of("checkpoints/last.ckpt") == 3
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
            *small_loaders(),
            epochs=5,
            gpus=0,
            verbose=0,
            mode="max",
            callbacks=[_StopsAtEpochStart(3)],
        )
    assert [row["epoch"] for row in first.history] == [0, 1, 2]

    resumed = make_model()
    resumed.fit(*small_loaders(), epochs=5, gpus=0, verbose=0, mode="max", ckpt_path="last")
    assert [row["epoch"] for row in resumed.history] == [0, 1, 2, 3, 4]
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
