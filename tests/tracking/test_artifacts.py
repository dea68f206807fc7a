"""The files a tracked fit leaves in its run: checkpoints, the net's weights, history, curves, summary."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from helpers import Net, Tracked
from torch.utils.data import ConcatDataset, Subset, TensorDataset, random_split

from lkflow.datasets import rings, tabular
from lkflow.tracking.artifacts import dataset_record


def test_artifacts(tracked: Tracked, tmp_path: Path) -> None:
    client, run_id = tracked.client, tracked.run_id
    top = {a.path for a in client.list_artifacts(run_id)}
    assert top == {"checkpoints", "net", "history.csv", "curves.png", "summary.txt"}
    (best,) = client.list_artifacts(run_id, "checkpoints")  # a finished fit keeps the best
    assert (
        Path(best.path).name == Path(tracked.model.trainer.checkpoint_callback.best_model_path).name
    )
    folder = Path(client.download_artifacts(run_id, "", str(tmp_path)))
    net = Net()
    net.load_state_dict(torch.load(folder / "net" / "state_dict.pt", weights_only=True))
    for name, value in tracked.model.net.state_dict().items():  # fit() restored the best weights
        assert torch.equal(net.state_dict()[name], value.cpu()), name
    with open(folder / "history.csv") as file:
        rows = list(csv.DictReader(file))
    assert [float(row["val_loss"]) for row in rows] == pytest.approx(
        [row["val_loss"] for row in tracked.model.history]
    )
    assert (folder / "curves.png").read_bytes().startswith(b"\x89PNG")
    assert "Total params: 115" in (folder / "summary.txt").read_text()


class _TwoInputs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(4, 3)
        self.fc = torch.nn.Linear(2 + 3, 1)

    def forward(self, x_num: torch.Tensor, x_cat: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([x_num, self.emb(x_cat)], dim=-1))


def test_the_summary_of_a_net_with_several_inputs_shows_their_real_shapes() -> None:
    from lkflow.tracking.artifacts import summary_text

    table = summary_text(_TwoInputs(), (torch.zeros(5, 2), torch.zeros(5, dtype=torch.long)))
    assert "Embedding-1" in table and "[5, 3]" in table and "Linear-2" in table
    assert "Total params: 18" in table
    assert summary_text(_TwoInputs(), {"x_num": torch.zeros(2, 2), "x_cat": torch.ones(2).long()})
    assert summary_text(_TwoInputs(), None) == ""


def test_a_dataset_is_named_after_its_data() -> None:
    data = rings(40)
    train, valid = random_split(data, [30, 10], generator=torch.Generator().manual_seed(0))
    named = {
        "rings": data,
        "rings ": train,  # random_split's Subset: the data it is cut from
        "tabular": tabular(8),
        "rings+tabular": ConcatDataset([valid, tabular(8)]),
        "TensorDataset": TensorDataset(torch.zeros(3, 2)),
    }
    assert {name.strip(): dataset_record(d)["name"] for name, d in named.items()} == {
        name.strip(): name.strip() for name in named
    }
    valid.name = "rings-holdout"  # a name the user gives wins
    assert dataset_record(valid)["name"] == "rings-holdout"
    assert dataset_record(Subset(valid, range(5)))["name"] == "rings-holdout"


def test_a_datasets_digest_stays_that_of_its_rows() -> None:
    split = torch.Generator().manual_seed(0)
    train, _ = random_split(rings(40), [30, 10], generator=split)
    digest = dataset_record(train)["digest"]
    assert dataset_record(Subset(rings(40), train.indices))["digest"] == digest  # same rows
    train.name = "renamed"
    assert dataset_record(train)["digest"] == digest  # a name is no part of the data
    other, _ = random_split(rings(40), [30, 10], generator=torch.Generator().manual_seed(1))
    assert dataset_record(other)["digest"] != digest
