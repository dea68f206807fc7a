"""The files a tracked fit leaves in its run: checkpoints, the net's weights, history, curves, summary."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from helpers import Net, Tracked


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
