"""The checkpoints a fit keeps, whole or absent, and the checks of a checkpoint file.

Lightning's `save_last` writes `last.ckpt` only when a top-k checkpoint was saved, so a fit
whose monitored value stops improving would resume from its last best. `LastCheckpoint` writes
after every epoch instead; in an epoch that has just saved a new best, it hard-links the best
file rather than writing the same state a second time, so each epoch writes one file.

Every checkpoint file is whole or absent: it is written as `<name>.partial`, flushed to disk
and renamed into place (`CompleteCheckpointIO`), and a write that fails (a full disk) leaves
`BestCheckpoint` pointing at the best before it, which is still on disk. Checkpoints hold
secret hyperparameters masked (`mask_hparams`); a file to resume from or to load is read and
checked before any work (`check_resumable`, `check_loadable`).

They override `ModelCheckpoint._save_checkpoint` and `_update_best_and_save`, the unpublished
parts of Lightning used here that cannot live in lkflow/internals.py (which documents them and
tests their signatures).
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import pickle
import shutil
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.plugins import TorchCheckpointIO
from typing_extensions import override

from lkflow.credentials import MASK, mask_secrets
from lkflow.epoch_values import epoch_number
from lkflow.errors import LkflowError
from lkflow.internals import last_global_step_saved, record_save
from lkflow.tracking.params import flatten

_PARTIAL = ".partial"  # the suffix of a checkpoint file being written
LAST = "last.ckpt"  # the checkpoint written after every epoch, which ckpt_path="last" means
# What lkflow's checkpoints hold beyond Lightning's weights, and what resuming also needs.
_CHECKPOINT_KEYS = ("state_dict", "lkflow_history")
_RESUME_KEYS = ("epoch", "loops", "optimizer_states")


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
            super().save_checkpoint(checkpoint, os.fspath(path), storage_options)
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
    """Lightning's `ModelCheckpoint`, except that a save that fails leaves it as it was, and
    that `{epoch}` in file names counts from 1, as everywhere else (`epoch_number`).

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
    def format_checkpoint_name(
        self,
        metrics: dict[str, torch.Tensor],
        filename: str | None = None,
        ver: int | None = None,
        prefix: str | None = None,
    ) -> str:
        if "epoch" in metrics:  # Lightning's zero-based current_epoch
            metrics = {**metrics, "epoch": torch.tensor(epoch_number(int(metrics["epoch"])))}
        return super().format_checkpoint_name(metrics, filename, ver, prefix)

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


# ---- checkpoint files ------------------------------------------------------------------


def resume_path(
    ckpt_path: str | os.PathLike[str] | None, ckpt_dir: str | os.PathLike[str]
) -> str | None:
    """The file a fit resumes from: None, `ckpt_path`, or for "last" the `last.ckpt` in
    `ckpt_dir` (the one checked by `check_resumable`, rather than Lightning's own pick)."""
    if ckpt_path is None:
        return None
    return os.path.join(ckpt_dir, LAST) if ckpt_path == "last" else os.fspath(ckpt_path)


def check_resumable(
    ckpt_path: str | os.PathLike[str] | None, ckpt_dir: str | os.PathLike[str]
) -> None:
    """Fails unless `ckpt_path` names a complete lkflow checkpoint to resume from.

    Args:
        ckpt_path: None (a fresh fit), "last", or the path of a `.ckpt`.
        ckpt_dir: The fit's checkpoint folder, where "last" looks.

    Raises:
        LkflowError: Naming the file or folder and the fix.
    """
    path = resume_path(ckpt_path, ckpt_dir)
    if path is None:
        return
    if ckpt_path == "last" and not os.path.isfile(path):
        raise LkflowError(
            f"Received: ckpt_path='last', but ckpt_dir={os.fspath(ckpt_dir)!r} holds no {LAST}, "
            "so there is no fit to resume there. Expected the ckpt_dir of the fit to resume "
            "(it writes last.ckpt after every epoch). Fix: pass that folder as ckpt_dir=..., or "
            "leave ckpt_path unset to start a fresh fit."
        )
    if not os.path.isfile(path):
        raise LkflowError(
            f"Received: ckpt_path={path!r}, which is not a file. Pass a .ckpt written by "
            "a previous fit, or 'last' for the newest one."
        )
    check_checkpoint(path, "ckpt_path", resume=True)


def check_checkpoint(
    path: str | os.PathLike[str], argument: str, resume: bool = False
) -> dict[str, Any]:
    """Reads the checkpoint at `path` (its tensors mapped, not read) and fails unless it is a
    whole checkpoint that lkflow wrote: not empty, cut short or of another program.

    Args:
        path: A `.ckpt` file.
        argument: The argument that named it, for the message, such as "ckpt_path".
        resume: Also require the training state that resuming needs. Defaults to False.

    Returns:
        The checkpoint's contents.

    Raises:
        LkflowError: Naming the file and what is wrong with it.

    Example:
        >>> check_checkpoint("checkpoints/last.ckpt", "ckpt_path")["epoch"]  # doctest: +SKIP
        9
    """
    saved, reason = _read_checkpoint(Path(path))
    required = _CHECKPOINT_KEYS + (_RESUME_KEYS if resume else ())
    missing = [key for key in required if key not in saved]
    if reason is None and missing:
        reason = f"it has no {', '.join(missing)}"
    if reason is not None:
        raise LkflowError(
            f"Received: {argument}={os.fspath(path)!r}, which is not a complete lkflow "
            f"checkpoint: {reason}. Expected a .ckpt that LightModel wrote while fitting. "
            f"Fix: pass another checkpoint of that fit, such as the best epoch=....ckpt or "
            f"{LAST} in its checkpoint folder."
        )
    return saved


def _read_checkpoint(path: Path) -> tuple[dict[str, Any], str | None]:
    """The checkpoint at `path`, or {} and why torch cannot read it as weights and values."""
    if path.stat().st_size == 0:
        return {}, "the file is empty"
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:  # its message would suggest unpickling anything
        return {}, "it holds objects other than tensors and plain values"
    except PermissionError:
        raise
    except (RuntimeError, EOFError, ValueError, OSError):  # a cut zip fails to seek, too
        return {}, "it is cut short, or not a file that torch.save wrote"
    if not isinstance(saved, dict):
        return {}, f"it holds a {type(saved).__name__}, not a dict"
    return saved, None


def mask_hparams(checkpoint: dict[str, Any], key: str) -> None:
    """Masks the secrets of the hyperparameters that `checkpoint` holds under `key`, as in the
    run's params (`api_key` becomes `'***'`)."""
    hparams = checkpoint.get(key)
    if isinstance(hparams, Mapping):
        checkpoint[key] = mask_secrets(hparams)


def check_loadable(
    model_class: str,
    net: Any,
    path: str | Path | IO[bytes],
    hparams_key: str,
    given: Mapping[str, Any],
) -> None:
    """Fails unless `model_class.load_from_checkpoint` has the net, which a checkpoint does not
    hold, and a local file `path` is a complete lkflow checkpoint; warns of hyperparameters it
    holds masked that are not `given` again. Other paths (remote, file objects) go to Lightning.

    Args:
        model_class: The name of the class that loads.
        net: The net passed, or None.
        path: What `load_from_checkpoint` was given.
        hparams_key: Where the checkpoint holds the hyperparameters.
        given: The constructor arguments passed to `load_from_checkpoint`.
    """
    if net is None:
        raise LkflowError(
            f"{model_class}.load_from_checkpoint needs the net: checkpoints hold weights, "
            "not modules. Pass a fresh one: "
            f"{model_class}.load_from_checkpoint(path, net=Net())."
        )
    if isinstance(path, (str, os.PathLike)) and os.path.isfile(path):
        saved = check_checkpoint(path, "checkpoint_path")
        _warn_of_masked(saved.get(hparams_key) or {}, given)


def _warn_of_masked(hparams: Mapping[str, Any], given: Mapping[str, Any]) -> None:
    """Warns of hyperparameters held masked in a checkpoint and not passed again."""
    masked = [key for key, value in hparams.items() if key not in given and _holds_mask(value)]
    if masked:
        names = ", ".join(f"{key}=..." for key in masked)
        warnings.warn(
            f"The checkpoint holds {', '.join(masked)} masked as {MASK!r} (lkflow keeps "
            f"secrets out of checkpoints), so the model gets {MASK!r}. Pass {names} to "
            "load_from_checkpoint for the real value.",
            stacklevel=4,
        )


def _holds_mask(value: Any) -> bool:
    values = flatten(value).values() if isinstance(value, Mapping) else [value]
    return any(isinstance(v, str) and v == MASK for v in values)
