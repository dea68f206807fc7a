"""A trial's pruning: each epoch's monitored value reported at the history row's epoch, and the fit
stopped, whole, at the end of the epoch the pruner prunes."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from helpers import fit_quietly, make_model, small_loaders

from lkflow import LkflowError
from lkflow.sweep.trial import Pruning


def _trial(pruner: optuna.pruners.BasePruner) -> optuna.Trial:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(pruner=pruner).ask()


def test_every_epoch_is_reported_at_its_history_epoch() -> None:
    trial = _trial(optuna.pruners.NopPruner())
    pruning = Pruning(trial, "val_loss")
    model = make_model()
    fit_quietly(model, *small_loaders(), epochs=3, callbacks=[pruning])
    reported = trial.study.trials[0].intermediate_values
    assert reported == {row["epoch"]: row["val_loss"] for row in model.history}
    assert len(model.history) == 3 and pruning.pruned_epoch is None


def test_a_pruned_fit_stops_at_that_epochs_end_with_its_best_checkpoint(tmp_path: Path) -> None:
    trial = _trial(optuna.pruners.ThresholdPruner(upper=0.0))  # any loss is above: prune at once
    pruning = Pruning(trial, "loss")
    model = make_model()
    fit_quietly(model, small_loaders()[0], epochs=5, callbacks=[pruning], ckpt_dir=tmp_path)
    (row,) = model.history
    assert pruning.pruned_epoch == row["epoch"]
    assert trial.study.trials[0].intermediate_values == {row["epoch"]: row["loss"]}
    assert trial.should_prune()
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        f"epoch={row['epoch']}-loss={row['loss']:.4f}.ckpt",
        "last.ckpt",
    ]


def test_a_trial_trains_in_one_process() -> None:
    import pytorch_lightning as pl

    pruning = Pruning(_trial(optuna.pruners.NopPruner()), "val_loss")
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False)
    with pytest.raises(LkflowError, match="Each trial trains in one process; run trials side"):
        pruning.setup(trainer, make_model(), "fit")
