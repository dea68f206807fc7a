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
