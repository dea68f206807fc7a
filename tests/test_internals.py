"""Lightning's and MLflow's unpublished parts that lkflow uses (lkflow/internals.py) still do
what it needs."""

from __future__ import annotations

import os

import mlflow
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, SequentialSampler, TensorDataset

from lkflow.internals import global_tracking_uri, trains_in_child_processes, with_sampler


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


@pytest.mark.parametrize("before", [None, "variable", "set", "set, variable gone"])
def test_the_global_tracking_uri_is_the_clients_inside_and_as_it_was_after(
    before: str | None, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inside = f"sqlite:///{tmp_path / 'inside.db'}"
    outside = f"sqlite:///{tmp_path / 'outside.db'}"
    mlflow.set_tracking_uri(None)
    if before == "variable":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", outside)
    elif before is not None and before.startswith("set"):
        mlflow.set_tracking_uri(outside)
    if before == "set, variable gone":
        monkeypatch.delenv("MLFLOW_TRACKING_URI")
    expected = mlflow.get_tracking_uri()
    try:
        with global_tracking_uri(inside):
            assert mlflow.get_tracking_uri() == inside
        assert mlflow.get_tracking_uri() == expected
        # a global URI put back is in the variable too, as mlflow.set_tracking_uri leaves it
        assert os.environ.get("MLFLOW_TRACKING_URI") == (None if before is None else outside)
    finally:
        mlflow.set_tracking_uri(None)
