"""The examples: the article's walk-through as a script and a notebook, and both tasks."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from helpers import SQLITE_ONLY
from matplotlib.figure import Figure
from torch import nn

from lkflow.tasks import TaskOptions, run_task

ROOT = Path(__file__).resolve().parents[1]


def _example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        f"example_{name}", ROOT / "examples" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_rings_walkthrough_reaches_90_percent_and_the_bare_net_predicts_alike(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = _example("rings").main(tmp_path / "figures", epochs=10)
    assert results["acc"] > 0.9
    for name in ("data", "loss", "acc", "predictions"):
        assert (tmp_path / "figures" / f"{name}.png").stat().st_size > 10_000
    assert (tmp_path / "figures" / "best_net.pt").is_file()
    printed = capsys.readouterr().out
    assert "Total params: 115" in printed and "Epoch 10/10" in printed
    assert "net_clone prediction" in printed


def test_rings_task_takes_lr_and_batch_size_or_the_articles() -> None:
    rings = _example("rings")
    task = rings.task(TaskOptions(lr=0.05, batch_size=50))
    assert task.train_data.batch_size == 50
    assert task.model.optimizer.param_groups[0]["lr"] == 0.05
    default = rings.task(TaskOptions())
    assert default.train_data.batch_size == 100
    assert default.model.optimizer.param_groups[0]["lr"] == 0.01
    assert isinstance(default.model.loss_fn, nn.BCELoss)
    probabilities = default.model.net(torch.randn(64, 2))
    assert probabilities.min() >= 0 and probabilities.max() <= 1
    assert default.fit_kwargs == {"monitor": "val_loss", "mode": "min"}
    assert list(default.report(default.model)) == ["predictions.png"]


def test_rings_task_takes_the_nets_width_and_the_rows_a_sweep_samples() -> None:
    rings = _example("rings")
    task = rings.task(TaskOptions(params={"hidden": "32", "rows": "400"}))
    assert (len(task.train_data.dataset), len(task.val_data.dataset)) == (280, 120)
    assert (task.model.net.fc1.out_features, task.model.net.fc2.out_features) == (16, 32)
    assert rings.Net().fc2.out_features == 12  # the article's net by default


def test_digits_task_and_its_confusion_matrix_report() -> None:
    digits = _example("digits")
    task = digits.task(TaskOptions(params={"channels": "4"}))
    assert (len(task.train_data.dataset), len(task.val_data.dataset)) == (1437, 360)
    assert task.model.net[0].out_channels == 4
    assert task.fit_kwargs == {"monitor": "val_acc", "mode": "max"}
    matrix = digits.confusion_matrix(task.model, task.val_data)
    assert matrix.shape == (10, 10) and int(matrix.sum()) == 360
    (name, figure), *others = task.report(task.model).items()
    assert name == "confusion_matrix.png" and isinstance(figure, Figure) and not others


def test_tabular_task_reads_its_params_and_batches_two_inputs_and_a_target() -> None:
    tabular = _example("tabular")
    task = tabular.task(TaskOptions(lr=0.02, params={"hidden": "8", "embedding": "2"}))
    assert (len(task.train_data.dataset), len(task.val_data.dataset)) == (3200, 800)
    assert task.model.net.embed.embedding_dim == 2 and task.model.net.mlp[0].out_features == 8
    assert task.model.optimizer.param_groups[0]["lr"] == 0.02
    assert task.fit_kwargs == {"monitor": "val_acc", "mode": "max"}
    x_num, x_cat, y = next(iter(task.train_data))
    assert (x_num.dtype, x_cat.dtype, y.dtype) == (torch.float32, torch.int64, torch.float32)
    assert x_num.shape == (64, 4) and x_cat.shape == (64,) and y.shape == (64, 1)
    probabilities = task.model.net(x_num, x_cat)
    assert probabilities.shape == (64, 1) and 0 <= probabilities.min() <= probabilities.max() <= 1
    default = tabular.task(TaskOptions())
    assert default.model.net.embed.embedding_dim == 4 and default.train_data.batch_size == 64


@SQLITE_ONLY
def test_tabular_task_trains_past_90_percent_and_registers_named_inputs(
    tracking_uri: str,
) -> None:
    from mlflow import MlflowClient
    from mlflow.models import Model

    task = run_task(
        str(ROOT / "examples" / "tabular.py") + ":task",
        TaskOptions(seed=0),
        epochs=3,
        gpus=0,
        registered_model_name="tabular-net",
        tracking_uri=tracking_uri,
    )
    assert max(row["val_acc"] for row in task.model.history) > 0.9  # 0.5 by chance
    client = MlflowClient(tracking_uri)
    version = client.get_model_version("tabular-net", "1")
    assert version.run_id == task.model.run_id
    signature = Model.load("models:/tabular-net/1").signature
    assert signature.inputs.input_names() == ["x_num", "x_cat"]


@pytest.mark.slow
def test_notebook_runs_top_to_bottom_with_figures_and_compact_fit_output(tmp_path: Path) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(ROOT / "examples" / "rings.ipynb", as_version=4)
    resources = {"metadata": {"path": str(tmp_path)}}
    nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources=resources
    ).execute()
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    images = [o for cell in code for o in cell.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 4, [cell.outputs for cell in code]  # data, predictions, curves
    (fit,) = [cell for cell in code if ".fit(" in cell.source]
    lines = "".join(o.get("text", "") for o in fit.outputs).splitlines()
    assert len(lines) == 10 and all(line.startswith("Epoch ") for line in lines), lines
    last = "".join(o.get("text", "") for o in code[-1].outputs)
    assert "identical: True" in last, last
