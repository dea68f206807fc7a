"""Benchmark workloads: seeded data, nets and training settings shared by every contender.

Two workloads:

- ``rings``: the two-ring task of the LightModel article scaled x10 (40 000 2-D points, a
  2-6-12-1 net, batch 100). The net is tiny, so framework overhead per step dominates.
- ``wide``: a wide MLP on synthetic 10-class data. The matrix multiplies dominate, so a
  wrapper should cost next to nothing here.

Example:
    >>> w = build("rings")
    >>> len(w.dl_train.dataset), len(w.dl_valid.dataset)
    (28000, 12000)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset, random_split

from lkflow.datasets import rings

SEED = 0


@dataclass
class Workload:
    """Everything a contender needs to train; built fresh (and seeded) in each benchmark process."""

    name: str  # "rings" or "wide"
    net: nn.Module  # freshly initialised, same weights for every contender
    dl_train: DataLoader  # shuffled with its own seeded generator
    dl_valid: DataLoader  # not shuffled
    loss_fn: nn.Module  # BCEWithLogitsLoss for rings, CrossEntropyLoss for wide
    lr: float  # Adam learning rate
    epochs: int  # training epochs, each followed by a full validation pass


def accuracy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean accuracy of a batch, as a 0-d tensor on the logits' device (no host sync).

    One output column means binary logits (threshold 0); more columns mean class scores.

    Args:
        logits: Net output, shape ``(n, 1)`` or ``(n, classes)``.
        target: ``(n, 1)`` float labels in {0, 1}, or ``(n,)`` class indices.

    Returns:
        The fraction of correct predictions.
    """
    if logits.shape[-1] == 1:
        return ((logits > 0).to(target.dtype) == target).float().mean()
    return (logits.argmax(dim=-1) == target).float().mean()


def _loaders(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, valid_batch_size: int
) -> tuple[DataLoader, DataLoader]:
    """Split 70/30 (seeded) and wrap in single-process DataLoaders."""
    ds = TensorDataset(x, y)
    n_train = int(len(ds) * 0.7)
    split_gen = torch.Generator().manual_seed(SEED)
    ds_train, ds_valid = random_split(ds, [n_train, len(ds) - n_train], generator=split_gen)
    shuffle_gen = torch.Generator().manual_seed(SEED)
    dl_train = DataLoader(
        ds_train, batch_size=batch_size, shuffle=True, num_workers=0, generator=shuffle_gen
    )
    dl_valid = DataLoader(ds_valid, batch_size=valid_batch_size, num_workers=0)
    return dl_train, dl_valid


def _rings() -> Workload:
    """The article's rings x10: 40 000 points, positives at r=5+N(0,1), negatives at r=8+N(0,1)."""
    x, y = rings(40_000, seed=SEED).tensors
    dl_train, dl_valid = _loaders(x, y, batch_size=100, valid_batch_size=100)
    net = nn.Sequential(nn.Linear(2, 6), nn.ReLU(), nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 1))
    return Workload("rings", net, dl_train, dl_valid, nn.BCEWithLogitsLoss(), 1e-2, 10)


def _wide() -> Workload:
    """Wide MLP (256-2048-2048-10) on 10 000 Gaussian points labelled by a random linear teacher."""
    n, features, classes, hidden = 10_000, 256, 10, 2048
    x = torch.randn(n, features)
    y = (x @ torch.randn(features, classes)).argmax(dim=1)
    dl_train, dl_valid = _loaders(x, y, batch_size=128, valid_batch_size=512)
    net = nn.Sequential(
        nn.Linear(features, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, classes),
    )
    return Workload("wide", net, dl_train, dl_valid, nn.CrossEntropyLoss(), 1e-3, 3)


def shrink(w: Workload, rows: int) -> Workload:
    """``w`` cut to its first ``rows`` training and validation rows and one epoch.

    It runs the same code as ``w`` in a fraction of the time, which is all that probing a
    contender for the modules it imports needs.
    """

    def cut(loader: DataLoader) -> DataLoader:
        return DataLoader(Subset(loader.dataset, range(rows)), batch_size=loader.batch_size)

    return replace(w, dl_train=cut(w.dl_train), dl_valid=cut(w.dl_valid), epochs=1)


WORKLOADS: dict[str, Callable[[], Workload]] = {"rings": _rings, "wide": _wide}


def build(name: str) -> Workload:
    """Build a workload from a fixed seed, so every process gets identical data and weights.

    Args:
        name: A key of ``WORKLOADS``.

    Returns:
        The workload, with a freshly initialised net.

    Raises:
        ValueError: If ``name`` is not a known workload.
    """
    if name not in WORKLOADS:
        raise ValueError(
            f"Unknown workload {name!r}; expected one of {sorted(WORKLOADS)}. "
            "Pass e.g. --workloads rings,wide."
        )
    torch.manual_seed(SEED)
    return WORKLOADS[name]()
