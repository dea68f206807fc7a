"""The two checkpoints a fit keeps: the best epoch's, and `last.ckpt` after every epoch.

Lightning's `save_last` writes `last.ckpt` only when a top-k checkpoint was saved, so a fit
whose monitored value stops improving would resume from its last best. `LastCheckpoint` writes
after every epoch instead; in an epoch that has just saved a new best, it hard-links the best
file rather than writing the same state a second time, so each epoch writes one file.

Every checkpoint file is whole or absent: it is written as `<name>.partial`, flushed to disk
and renamed into place (`CompleteCheckpointIO`), and a write that fails (a full disk) leaves
`BestCheckpoint` pointing at the best before it, which is still on disk.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from weakref import proxy

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.plugins import TorchCheckpointIO
from typing_extensions import override

_PARTIAL = ".partial"  # the suffix of a checkpoint file being written


class CompleteCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, except that a local file appears only once complete.

    Lightning writes a local checkpoint to a temporary file in the system's temporary folder
    and moves it into place; across file systems the move is a copy, which a full disk cuts
    short at the checkpoint's own name. This writes `<name>.partial` beside it, flushes it to
    disk and renames it over `<name>` in one step; a failed write removes the partial file.
    Remote paths (`s3://...`) are written as Lightning writes them.
    """

    @override
    def save_checkpoint(
        self,
        checkpoint: dict[str, Any],
        path: str | os.PathLike[str],
        storage_options: Any | None = None,
    ) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        buffer = io.BytesIO()  # serialised first: a full disk is then a plain OSError
        torch.save(checkpoint, buffer)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with written_whole(os.fspath(path)) as partial, open(partial, "wb") as file:
            try:
                file.write(buffer.getbuffer())
            except OSError as err:
                raise OSError(err.errno, f"{err.strerror}; checkpoint not written", path) from err


class BestCheckpoint(ModelCheckpoint):
    """Lightning's `ModelCheckpoint`, except that a save that fails leaves it as it was.

    Lightning records a new best before writing it, so a write that fails (a full disk)
    would leave `best_model_path` naming a file that is not there, and forget the previous
    best; that one is still on disk, and stays the best.
    """

    _BEST_STATE = (
        "best_k_models",
        "kth_best_model_path",
        "kth_value",
        "best_model_path",
        "best_model_score",
        "current_score",
    )

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and self.dirpath and "://" not in str(self.dirpath):
            for stale in Path(self.dirpath).glob(f"*.ckpt{_PARTIAL}"):  # left by a killed fit
                stale.unlink(missing_ok=True)

    @override
    def _update_best_and_save(self, *args: Any, **kwargs: Any) -> None:
        before = {name: copy.copy(getattr(self, name)) for name in self._BEST_STATE}
        try:
            super()._update_best_and_save(*args, **kwargs)
        except BaseException:
            for name, value in before.items():
                setattr(self, name, value)
            raise


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

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        best = self.best.best_model_path
        best_saved_now = bool(best) and self.best._last_global_step_saved == trainer.global_step
        # Sharded strategies save a folder, and remote paths are no local files: write those.
        if not best_saved_now or not self._is_local_file(trainer, best):
            super()._save_checkpoint(trainer, filepath)
            return
        if trainer.is_global_zero:
            _link_or_copy(best, filepath)
        trainer.strategy.barrier("lkflow.LastCheckpoint")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:  # as Lightning tells loggers of a checkpoint it wrote
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    @staticmethod
    def _is_local_file(trainer: pl.Trainer, path: str) -> bool:
        """Whether `path` is a file here, as rank 0 sees it (every rank gets the same answer)."""
        return trainer.strategy.reduce_boolean_decision(
            trainer.is_global_zero and os.path.isfile(path), all=False
        )


def _link_or_copy(source: str, target: str) -> None:
    """Points `target` at `source`'s content: a hard link where the file system allows one, else
    a copy. `target` is replaced in one step, so it is never missing or half written."""
    with written_whole(target) as partial:
        try:
            os.link(source, partial)
        except OSError:
            shutil.copyfile(source, partial)


@contextlib.contextmanager
def written_whole(target: str) -> Iterator[str]:
    """A name to write `target` under: once the block ends, the file is flushed to disk and
    renamed to `target` in one step, so `target` is the old file or the new one, whole.

    A block that raises leaves no file behind, and `target` as it was.

    Example:
        >>> with written_whole("checkpoints/last.ckpt") as partial:  # doctest: +SKIP
        ...     torch.save(checkpoint, partial)
    """
    partial = f"{target}{_PARTIAL}"
    with contextlib.suppress(FileNotFoundError):
        os.remove(partial)
    try:
        yield partial
        _flush_to_disk(partial)
        os.replace(partial, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial)
        raise
    if os.name == "posix":  # the rename itself, in the folder's entry
        _flush_to_disk(os.path.dirname(os.path.abspath(target)))


def _flush_to_disk(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
