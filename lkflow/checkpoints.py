"""The two checkpoints a fit keeps: the best epoch's, and `last.ckpt` after every epoch.

Lightning's `save_last` writes `last.ckpt` only when a top-k checkpoint was saved, so a fit
whose monitored value stops improving would resume from its last best. `LastCheckpoint` writes
after every epoch instead; in an epoch that has just saved a new best, it hard-links the best
file rather than writing the same state a second time, so each epoch writes one file.

It overrides `ModelCheckpoint._save_checkpoint`, the one unpublished part of Lightning used
here that cannot live in lkflow/internals.py (which documents it and tests its signature).
"""

from __future__ import annotations

import contextlib
import os
import shutil

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from typing_extensions import override

from lkflow.internals import last_global_step_saved, record_save


class LastCheckpoint(ModelCheckpoint):
    """Writes `last.ckpt` after every epoch, beside (and sharing storage with) `best`.

    Args:
        best: The fit's best-by-monitor checkpoint. It must come before this one in the
            Trainer's callbacks, so that it has saved by the time this one runs.
    """

    def __init__(self, best: ModelCheckpoint) -> None:
        super().__init__(
            dirpath=best.dirpath,
            filename=self.CHECKPOINT_NAME_LAST,
            enable_version_counter=False,
        )
        self.best = best

    @override
    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        best = self.best.best_model_path
        best_saved_now = bool(best) and last_global_step_saved(self.best) == trainer.global_step
        # Sharded strategies save a folder, and remote paths are no local files: write those.
        if not best_saved_now or not self._is_local_file(trainer, best):
            super()._save_checkpoint(trainer, filepath)
            return
        if trainer.is_global_zero:
            _link_or_copy(best, filepath)
        trainer.strategy.barrier("lkflow.LastCheckpoint")
        record_save(self, trainer, filepath)

    @staticmethod
    def _is_local_file(trainer: pl.Trainer, path: str) -> bool:
        """Whether `path` is a file here, as rank 0 sees it (every rank gets the same answer)."""
        return trainer.strategy.reduce_boolean_decision(
            trainer.is_global_zero and os.path.isfile(path), all=False
        )


def _link_or_copy(source: str, target: str) -> None:
    """Points `target` at `source`'s content: a hard link where the file system allows one, else
    a copy. `target` is replaced in one step, so it is never missing or half written."""
    partial = f"{target}.partial"
    with contextlib.suppress(FileNotFoundError):
        os.remove(partial)
    try:
        os.link(source, partial)
    except OSError:
        shutil.copyfile(source, partial)
    os.replace(partial, target)
