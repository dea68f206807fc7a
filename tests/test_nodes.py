"""A DDP fit on two nodes (gloo, one process each), here two processes on this machine, each in
a folder of its own: launched by `torchrun --nnodes 2 --node_rank {0,1}`, and as SLURM starts
them (its variables set by hand). One run, epoch values equal to one process's fit of the same
data, and only rank zero talks to MLflow: node 1's MLFLOW_TRACKING_URI names a dead server.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import ROOT, Net
from mlflow import MlflowClient
from servers import PgServer, free_port
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from lkflow import LightModel
from lkflow.datasets import rings

pytestmark = [pytest.mark.slow, pytest.mark.ddp]

EPOCHS, ROWS, BATCH = 2, 256, 32  # 256 rows: no sampler padding on 2 nodes

# Run on each node: argv[1] is the node's folder.
NODE_SCRIPT = f"""
import sys
from pathlib import Path

import torch
from helpers import Net
from torch import nn
from torch.utils.data import DataLoader

import pytorch_lightning as pl
from lkflow import LightModel
from lkflow.datasets import rings

out = Path(sys.argv[1])
pl.seed_everything(0, verbose=False)
net = Net()
model = LightModel(net, loss_fn=nn.BCEWithLogitsLoss(),
                   optimizer=torch.optim.SGD(net.parameters(), lr=0.5))
history = model.fit(
    DataLoader(rings({ROWS}, seed=1), batch_size={BATCH}),
    DataLoader(rings(193, seed=2), batch_size={BATCH}),
    epochs={EPOCHS}, gpus=0, num_nodes=2, devices=1, strategy="ddp", verbose=0,
    experiment_name="nodes", registered_model_name="nodes-net",
)
best = model.trainer.checkpoint_callback.best_model_path
saved = torch.load(best, weights_only=True)["state_dict"] if model.global_rank == 0 else None
torch.save(dict(rank=model.global_rank, history=history.to_dict("records"), run_id=model.run_id,
                state=model.net.state_dict(), best=saved, best_path=best), out / "result.pt")
"""


class _BothNodesBatches:
    """The rows that the two nodes train on at each step, as one batch: Lightning gives each
    node a `DistributedSampler` (shuffled, seed 0, reshuffled each epoch), and DDP's gradient
    is the mean of the two nodes' gradients, each over `BATCH` rows."""

    def __init__(self) -> None:
        self.epoch = 0
        self.sampler = self  # Lightning calls `batch_sampler.sampler.set_epoch` at epoch starts

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        nodes = []
        for rank in (0, 1):
            sampler = DistributedSampler(range(ROWS), num_replicas=2, rank=rank, seed=0)
            sampler.set_epoch(self.epoch)
            nodes.append(list(sampler))
        for start in range(0, ROWS // 2, BATCH):
            yield nodes[0][start : start + BATCH] + nodes[1][start : start + BATCH]

    def __len__(self) -> int:
        return ROWS // (2 * BATCH)


def _one_process() -> list[dict]:
    """The same fit in this process, each step on both nodes' rows of that step, untracked."""
    import pytorch_lightning as pl

    pl.seed_everything(0, verbose=False)
    net = Net()
    model = LightModel(
        net, loss_fn=nn.BCEWithLogitsLoss(), optimizer=torch.optim.SGD(net.parameters(), lr=0.5)
    )
    history = model.fit(
        DataLoader(rings(ROWS, seed=1), batch_sampler=_BothNodesBatches()),
        DataLoader(rings(193, seed=2), batch_size=BATCH),
        epochs=EPOCHS,
        gpus=0,
        verbose=0,
        track=False,
    )
    return history.to_dict("records")


def _node_env(node: int, url: str, launcher: str, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    env |= {"PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    # Only node 0 can reach the tracking server: node 1 fails if it ever talks to MLflow.
    env["MLFLOW_TRACKING_URI"] = url if node == 0 else f"http://127.0.0.1:{free_port()}"
    if launcher == "slurm":  # what `srun --nodes 2 --ntasks-per-node 1` sets on each node
        env |= {
            "SLURM_NTASKS": "2",
            "SLURM_NNODES": "2",
            "SLURM_NTASKS_PER_NODE": "1",
            "SLURM_PROCID": str(node),
            "SLURM_NODEID": str(node),
            "SLURM_LOCALID": "0",
            "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NAME": "lkflow-nodes",
            "SLURM_NODELIST": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    return env


def _command(node: int, launcher: str, port: int) -> list[str]:
    if launcher == "slurm":
        return [sys.executable, "node.py"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2"]
    torchrun += ["--nproc_per_node", "1", "--node_rank", str(node)]
    return [*torchrun, "--master_addr", "127.0.0.1", "--master_port", str(port), "node.py"]


@pytest.mark.parametrize("launcher", ["torchrun", "slurm"])
def test_two_nodes_make_one_run_equal_to_one_process(
    pg_server: PgServer, tmp_path: Path, launcher: str
) -> None:
    url, port = pg_server.fresh(), free_port()
    nodes = []
    for node in (0, 1):
        folder = tmp_path / f"node{node}"
        folder.mkdir()
        (folder / "node.py").write_text(NODE_SCRIPT)
        with open(folder / "log.txt", "wb") as log:
            nodes.append(
                subprocess.Popen(
                    [*_command(node, launcher, port), str(folder)],
                    cwd=folder,
                    env=_node_env(node, url, launcher, port),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    try:
        for node, process in enumerate(nodes):
            code = process.wait(timeout=240)
            assert code == 0, (tmp_path / f"node{node}" / "log.txt").read_text()[-4000:]
    finally:
        for process in nodes:
            if process.poll() is None:
                os.killpg(process.pid, 9)
                process.wait()
    zero, one = (torch.load(tmp_path / f"node{n}" / "result.pt") for n in (0, 1))
    assert (zero["rank"], one["rank"]) == (0, 1)

    single = _one_process()
    for rank in (zero, one):
        assert len(rank["history"]) == len(single) == EPOCHS
        for mine, other in zip(rank["history"], single, strict=True):
            assert mine == pytest.approx(other, rel=1e-5)
    for key, value in zero["state"].items():
        assert torch.equal(one["state"][key], value), key
        assert torch.equal(zero["best"][f"net.{key}"], value), key
    # Node 0 alone writes checkpoints, in its folder; node 1 got the same best weights from it.
    assert Path(zero["best_path"]).parent == tmp_path / "node0" / "checkpoints"
    assert one["best_path"] == zero["best_path"]
    assert not list((tmp_path / "node1").rglob("*.ckpt"))

    client = MlflowClient(url)
    (run,) = client.search_runs([client.get_experiment_by_name("nodes").experiment_id])
    assert run.info.run_id == zero["run_id"] and one["run_id"] is None
    assert run.info.status == "FINISHED"
    for key in ("loss", "val_loss"):
        logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert logged == [(row["epoch"], pytest.approx(row[key])) for row in zero["history"]]
    (version,) = client.search_model_versions("name = 'nodes-net'")
    assert version.run_id == run.info.run_id
