"""A team's fits at once: `python team_fits.py '{...settings}'` imports torch, Lightning, MLflow
and lkflow once, then forks one process per tracked fit of the rings, each in a folder of its
own, as if on a machine of its own, and waits for all of them.

Settings: `uri` (the tracking server), `fits` (one-process fits, in folders fit-0, fit-1, ...),
`ddp` (true: also a 2-process DDP fit, forked by Lightning, in the folder ddp), `epochs`,
`experiment`, `registered` (the model name every fit registers under), and `gates` (epochs at
whose end rank zero writes `at-<epoch>` in its folder and waits for the file `go-<epoch>` in
this script's working folder). Each fit writes `result.json` in its folder: the run id, the
history, and `epoch_s`, the seconds its tracker spent between each epoch's last batch and the
next epoch's first (its logging calls of that epoch). Exits 1 when a fit failed; each fit's
output is in `log.txt` in its folder.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from lkflow import LightModel, MLflowCallback
from lkflow.datasets import rings


class TimedTracker(MLflowCallback):
    """The MLflow callback, timing what it spends from the end of each epoch's training to the
    start of the next epoch's (or to the end of training, for the last epoch)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.epoch_s: list[float] = []
        self._window = 0.0

    def _timed(self, hook: Any, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        start = time.perf_counter()
        hook(trainer, module)
        self._window += time.perf_counter() - start

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._timed(super().on_train_epoch_end, trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._timed(super().on_validation_end, trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._timed(super().on_train_epoch_start, trainer, pl_module)
        if trainer.current_epoch > 0:
            self.epoch_s.append(self._window)
        self._window = 0.0

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._timed(super().on_train_end, trainer, pl_module)
        self.epoch_s.append(self._window)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        start = time.perf_counter()
        super().on_fit_end(trainer, pl_module)
        if trainer.is_global_zero:  # under DDP, the process that tracks
            timing = {"epoch_s": self.epoch_s, "end_s": time.perf_counter() - start}
            Path("timing.json").write_text(json.dumps(timing))


class Gate(pl.Callback):
    """At the end of the `gates` epochs, rank zero writes `at-<epoch>` and waits for `go-<epoch>`
    in `root`; the other ranks wait for it at the next step."""

    def __init__(self, root: Path, gates: list[int]) -> None:
        self.root, self.gates = root, gates

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if epoch in self.gates and trainer.is_global_zero:
            Path(f"at-{epoch}").touch()
            while not (self.root / f"go-{epoch}").exists():
                time.sleep(0.05)


def fit(name: str, root: Path, settings: dict[str, Any]) -> None:
    """One tracked fit of the rings, seeded by its name, in the folder `name`."""
    folder = root / name
    folder.mkdir(exist_ok=True)
    os.chdir(folder)
    log = os.open("log.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 1)
    os.dup2(log, 2)
    pl.seed_everything(sum(name.encode()), verbose=False)
    net = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 1))
    model = LightModel(
        net, loss_fn=nn.BCEWithLogitsLoss(), optimizer=torch.optim.SGD(net.parameters(), lr=0.1)
    )
    train = DataLoader(rings(256, seed=1), batch_size=32, shuffle=True)
    valid = DataLoader(rings(128, seed=2), batch_size=64)
    tracker = TimedTracker(
        experiment_name=settings["experiment"],
        registered_model_name=settings["registered"],
        tracking_uri=settings["uri"],
    )
    ddp = {"devices": 2, "strategy": "ddp_fork"} if name == "ddp" else {}
    history = model.fit(
        train,
        valid,
        epochs=settings["epochs"],
        gpus=0,
        verbose=0,
        callbacks=[Gate(root, settings.get("gates", []))],
        track=tracker,
        **ddp,
    )
    timing = json.loads(Path("timing.json").read_text())
    result = {"run_id": model.run_id, "history": history.to_dict("records"), **timing}
    Path("result.json").write_text(json.dumps(result))


def main(settings: dict[str, Any]) -> int:
    root = Path.cwd()
    names = [f"fit-{i}" for i in range(settings["fits"])] + (["ddp"] if settings["ddp"] else [])
    children = {}
    for name in names:
        pid = os.fork()
        if pid == 0:  # the fit's own process
            code = 1
            try:
                fit(name, root, settings)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = name
    failed = []
    for _ in names:
        pid, status = os.wait()
        if os.waitstatus_to_exitcode(status) != 0:
            failed.append(children[pid])
    print(json.dumps({"failed": sorted(failed)}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1])))
