"""The files a tracked fit leaves in its run, and its data's fingerprints, as writes.

    with fit_files(history, net, summary_text(net, example)) as write:
        writer.send(write)  # net/state_dict.pt, history.csv, curves.png, summary.txt
    writer.send(datasets_write(trainer))  # the training and validation sets: name, rows, digest

Nothing here talks to MLflow's tracking server; `MLflowCallback` sends what these functions
write (lkflow/tracking/writes.py). The servable model is lkflow/tracking/export.py's.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    import pytorch_lightning as pl
    from matplotlib.figure import Figure

    from lkflow.tracking.writes import ArtifactsWrite, DatasetRecord, InputRecord, InputsWrite

_DIGEST_ROWS = 16  # rows hashed for a dataset's digest
# What a dataset was to the fit (MLflow's `mlflow.data.context` input tag).
TRAINING, VALIDATION = "training", "validation"


def dataset_record(dataset: Any) -> DatasetRecord | None:
    """The fields of an MLflow Dataset of a map-style dataset: its name (`dataset_name`), its
    rows and a digest of a sample of them; None for a dataset without length or indexing.

    Example:
        >>> from lkflow.datasets import rings
        >>> record = dataset_record(rings(10))
        >>> record["name"], record["profile"]
        ('rings', '{"num_rows": 10}')
    """
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        return None
    rows = len(dataset)
    digest = hashlib.sha256(f"{type(dataset).__name__}:{rows}".encode())
    for index in sorted({i * rows // _DIGEST_ROWS for i in range(min(rows, _DIGEST_ROWS))}):
        for item in _leaves(dataset[index]):
            digest.update(item)
    return {
        "name": dataset_name(dataset),
        "digest": digest.hexdigest()[:12],
        "source_type": "code",
        "source": json.dumps({"tags": {}}),
        "profile": json.dumps({"num_rows": rows}),
    }


def dataset_name(dataset: Any) -> str:
    """What a dataset is called in the run: its own `name` attribute (lkflow.datasets' sets
    have one; set `dataset.name = "..."` on yours), else that of the data a `Subset` (as
    `random_split` makes) or a `ConcatDataset` is made of, else its class name.

    Example:
        >>> from torch.utils.data import random_split
        >>> from lkflow.datasets import rings
        >>> train, valid = random_split(rings(10), [7, 3])
        >>> dataset_name(train), dataset_name(torch.utils.data.ConcatDataset([train, valid]))
        ('rings', 'rings')
    """
    from torch.utils.data import ConcatDataset, Subset

    own = getattr(dataset, "name", None)
    if isinstance(own, str) and own.strip():
        return own.strip()
    if isinstance(dataset, Subset):
        return dataset_name(dataset.dataset)
    if isinstance(dataset, ConcatDataset):
        return "+".join(dict.fromkeys(dataset_name(part) for part in dataset.datasets))
    return type(dataset).__name__


def _leaves(item: Any) -> Iterator[bytes]:
    """Bytes of a dataset row's tensors, arrays and plain values, depth first."""
    if isinstance(item, torch.Tensor):
        yield item.detach().cpu().contiguous().numpy().tobytes()
    elif isinstance(item, Mapping):
        for key in sorted(item, key=str):
            yield str(key).encode()
            yield from _leaves(item[key])
    elif isinstance(item, (tuple, list)):
        for value in item:
            yield from _leaves(value)
    elif hasattr(item, "tobytes"):
        yield item.tobytes()
    else:
        yield repr(item).encode()


def summary_text(net: nn.Module, example: Any) -> str:
    """The layer table of the net on the example: a tensor's shape (batch shown as -1), or a
    tuple's or dict's own shapes; "" without an example, or after one warning when the table
    cannot be made (the fit's other outputs do not need it)."""
    if example is None or (isinstance(example, torch.Tensor) and example.ndim < 1):
        return ""
    from lkflow.summary_table import layer_table, summary

    with _missing("summary.txt", f"the layer table of {type(net).__name__}") as made:
        if isinstance(example, torch.Tensor):
            shape, dtype = tuple(example.shape[1:]), example.dtype
            made.append(str(summary(net, input_shape=shape, dtype=dtype, print_fn=None)))
        else:
            made.append(layer_table(net, example))
    return made[0] if made else ""


@contextlib.contextmanager
def _missing(file: str, what: str) -> Iterator[list[str]]:
    """An end-of-fit file that fails to be made is left out, with one warning naming it: a fit
    that trained never fails for it."""
    made: list[str] = []
    try:
        yield made
    except Exception as err:  # whatever the failure, only this file is missing
        reason = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:300]}"
        warnings.warn(
            f"The run has no {file}: {what} could not be made ({reason}). Everything else is "
            "logged and registered.",
            stacklevel=4,
        )


def datasets_write(trainer: pl.Trainer) -> InputsWrite | None:
    """The fit's training and validation sets, by their `CONTEXTS`; None when neither is a
    map-style dataset."""
    loaders = {TRAINING: trainer.train_dataloader, VALIDATION: trainer.val_dataloaders}
    datasets: list[InputRecord] = [
        {**dataset, "context": context}
        for context, loader in loaders.items()
        if (dataset := dataset_record(getattr(loader, "dataset", None))) is not None
    ]
    return {"op": "inputs", "datasets": datasets} if datasets else None


@contextlib.contextmanager
def fit_files(
    history: Sequence[Mapping[str, Any]], net: nn.Module, table: str
) -> Iterator[ArtifactsWrite]:
    """The write of the fit's files (`write_artifacts`) into the run's artifact root; the files
    are there while the block runs."""
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary) / "artifacts"  # its files go to the run's artifact root
        write_artifacts(folder, history, net.state_dict(), table)
        yield {"op": "artifacts", "paths": [str(folder)], "artifact_path": None}


@contextlib.contextmanager
def figure_files(figures: Mapping[str, Figure], artifact_path: str) -> Iterator[ArtifactsWrite]:
    """The write of figures as PNG files under `artifact_path`; the files are there while the
    block runs."""
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary) / artifact_path
        folder.mkdir(parents=True)
        for name, figure in figures.items():
            figure.savefig(folder / (name if "." in name else f"{name}.png"), dpi=100)
        yield {"op": "artifacts", "paths": [str(folder)], "artifact_path": artifact_path}


def checkpoints_write(trainer: pl.Trainer, *, last: bool) -> ArtifactsWrite | None:
    """The best checkpoint; with `last`, also every checkpoint callback's best and last
    files, which a fit that stopped resumes from. None when there is no such file."""
    monitored = trainer.checkpoint_callback
    paths = {getattr(monitored, "best_model_path", "")}
    if last:
        paths |= {
            getattr(checkpoint, f"{which}_model_path", "")
            for checkpoint in trainer.checkpoint_callbacks
            for which in ("best", "last")
        }
    files = sorted(p for p in paths if p and os.path.isfile(p))
    return {"op": "artifacts", "paths": files, "artifact_path": "checkpoints"} if files else None


def write_artifacts(
    folder: Path, history: Sequence[Mapping[str, Any]], state_dict: Mapping[str, Any], table: str
) -> None:
    """net/state_dict.pt, history.csv, curves.png and summary.txt, in a new `folder`."""
    (folder / "net").mkdir(parents=True)
    torch.save(dict(state_dict), folder / "net" / "state_dict.pt")
    if history:
        columns = list(dict.fromkeys(key for row in history for key in row))
        with open(folder / "history.csv", "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=columns)
            writer.writeheader()
            writer.writerows(history)
        from lkflow.plots import plot_history

        with _missing("curves.png", "the history's curves"):
            plot_history(list(history)).savefig(folder / "curves.png", dpi=100)
    if table:
        (folder / "summary.txt").write_text(table + "\n")
