"""Lightning's unpublished parts that lkflow uses (lkflow/internals.py) still do what it needs."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, SequentialSampler, TensorDataset

from lkflow.internals import trains_in_child_processes, with_sampler


class _Loader(DataLoader):
    """A DataLoader subclass with an argument of its own, as users write them."""

    def __init__(self, dataset, tag: str, **kwargs) -> None:
        super().__init__(dataset, **kwargs)
        self.tag = tag


def test_a_loader_rebuilt_with_a_sampler_keeps_its_class_and_arguments() -> None:
    data = TensorDataset(torch.arange(10.0))
    loader = _Loader(data, "mine", batch_size=3, drop_last=True, num_workers=0)
    sampler = SequentialSampler(range(4))
    rebuilt = with_sampler(loader, sampler)
    assert type(rebuilt) is _Loader and rebuilt.tag == "mine"
    assert rebuilt.sampler is sampler and rebuilt.dataset is data
    assert rebuilt.batch_size == 3 and rebuilt.drop_last
    assert [batch[0].tolist() for batch in rebuilt] == [[0.0, 1.0, 2.0]]


@pytest.mark.parametrize(
    ("strategy", "children"), [("ddp_spawn", True), ("ddp_notebook", True), ("ddp", False)]
)
def test_spawned_and_forked_fits_train_in_child_processes(strategy: str, children: bool) -> None:
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, logger=False, enable_progress_bar=False
    )
    assert trains_in_child_processes(trainer) is children
    one = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    assert not trains_in_child_processes(one)
