"""The article's walk-through on its two rings, end to end, and the same model as a task.

Run the walk-through (data, model, summary, fit, curves, test, predictions, and the bare net
leaving its wrapper), with its figures written to `--out`:

    python examples/rings.py --out figures

Train it as a task, tracked and registered in MLflow, or search its learning rate and width
with Optuna (`space` below; `pip install -e ".[sweep]"`):

    lkflow train examples/rings.py:task --epochs 10 --registered-model-name rings-net
    lkflow sweep examples/rings.py:task --trials 20 --jobs 2 --epochs 10
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

import pytorch_lightning as pl
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import nn
from torch.utils.data import DataLoader, Dataset, random_split
from torchmetrics.classification import BinaryAccuracy

from lkflow import LightModel, plot_metric, summary
from lkflow.datasets import rings
from lkflow.tasks import Task, TaskOptions

if TYPE_CHECKING:
    import optuna


class Net(nn.Module):
    """The article's net: 2 -> 6 -> 12 -> 1 with ReLUs, returning probabilities; `hidden`
    sets the second layer's width (the first is half of it)."""

    def __init__(self, hidden: int = 12) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2, max(hidden // 2, 1))
        self.fc2 = nn.Linear(max(hidden // 2, 1), hidden)
        self.fc3 = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return torch.sigmoid(self.fc3(x))


def loaders(batch_size: int = 100, rows: int = 4000) -> tuple[DataLoader, DataLoader]:
    """The article's 4000 points split 70/30 (the same split every time).

    Args:
        batch_size: Rows per batch. Defaults to 100, the article's.
        rows: Points in all. Defaults to 4000, the article's.

    Returns:
        The shuffled training loader and the validation loader.

    Example:
        >>> dl_train, dl_valid = loaders()
        >>> len(dl_train.dataset), len(dl_valid.dataset)
        (2800, 1200)
    """
    split = torch.Generator().manual_seed(0)
    train_rows = rows * 7 // 10
    ds_train, ds_valid = random_split(rings(rows), [train_rows, rows - train_rows], generator=split)
    return DataLoader(ds_train, batch_size, shuffle=True), DataLoader(ds_valid, batch_size)


def build_model(lr: float = 1e-2, hidden: int = 12) -> LightModel:
    """The article's model: its net, BCELoss on the probabilities, accuracy, Adam.

    Args:
        lr: Adam's learning rate. Defaults to 1e-2, the article's.
        hidden: The net's width. Defaults to 12, the article's.

    Returns:
        A LightModel around a fresh `Net`.

    Example:
        >>> build_model().net.fc3.out_features
        1
    """
    net = Net(hidden)
    return LightModel(
        net,
        loss_fn=nn.BCELoss(),
        metrics={"acc": BinaryAccuracy()},
        optimizer=torch.optim.Adam(net.parameters(), lr=lr),
    )


def _scatter(ax: Axes, x: torch.Tensor, positive: torch.Tensor, title: str) -> None:
    ax.scatter(x[positive, 0], x[positive, 1], c="r", s=4, label="positive")
    ax.scatter(x[~positive, 0], x[~positive, 1], c="g", s=4, label="negative")
    ax.set_title(title)
    ax.set_aspect("equal")
    ax.legend(loc="upper right")


def plot_data(dataset: Dataset) -> Figure:
    """The points of `dataset`, positives red and negatives green, as the article draws them.

    Args:
        dataset: `(x, y)` rows, such as `rings(4000)`.

    Returns:
        The figure.

    Example:
        >>> plot_data(rings(100)).savefig("data.png")
    """
    x, y = _tensors(dataset)
    figure = Figure(figsize=(6, 6), layout="constrained")
    _scatter(figure.subplots(), x, y[:, 0] > 0.5, "Data")
    return figure


def plot_predictions(model: LightModel, dataset: Dataset) -> Figure:
    """True labels beside the model's predictions (probability >= 0.5) on `dataset`.

    Args:
        model: The fitted model.
        dataset: `(x, y)` rows.

    Returns:
        The figure, `y_true` on the left and `y_pred` on the right.

    Example:
        >>> plot_predictions(model, dl_valid.dataset).savefig("predictions.png")  # doctest: +SKIP
    """
    x, y = _tensors(dataset)
    predicted = model.predict(x)[:, 0] >= 0.5
    figure = Figure(figsize=(12, 5), layout="constrained")
    left, right = figure.subplots(1, 2)
    _scatter(left, x, y[:, 0] > 0.5, "y_true")
    _scatter(right, x, predicted, "y_pred")
    return figure


def _tensors(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return torch.stack(x), torch.stack(y)


def task(options: TaskOptions) -> Task:
    """The article's model and data as a task for `lkflow train examples/rings.py:task`.

    Args:
        options: `lr` (default 1e-2) and `batch_size` (default 100) are used, and the params
            `hidden` (the net's width, default 12) and `rows` (points in all, default 4000).

    Returns:
        The task: best epoch by `val_loss`, and a predictions figure as its report.

    Example:
        >>> task(TaskOptions(batch_size=50)).train_data.batch_size
        50
    """
    dl_train, dl_valid = loaders(options.batch_size or 100, options.param("rows", 4000))
    model = build_model(1e-2 if options.lr is None else options.lr, options.param("hidden", 12))
    return Task(
        model,
        dl_train,
        dl_valid,
        fit_kwargs={"monitor": "val_loss", "mode": "min"},
        report=lambda fitted: {"predictions.png": plot_predictions(fitted, dl_valid.dataset)},
    )


def space(trial: optuna.Trial) -> dict[str, float | int]:
    """What `lkflow sweep examples/rings.py:task` searches when it is given no --space.

    Args:
        trial: The Optuna trial.

    Returns:
        Adam's learning rate (1e-3 to 0.1, log-scaled) and the net's width (4 to 64).

    Example:
        >>> space(optuna.trial.FixedTrial({"lr": 0.01, "hidden": 16}))  # doctest: +SKIP
        {'lr': 0.01, 'hidden': 16}
    """
    return {
        "lr": trial.suggest_float("lr", 1e-3, 1e-1, log=True),
        "hidden": trial.suggest_int("hidden", 4, 64, log=True),
    }


def main(out: Path, epochs: int = 10, gpus: int = 0) -> dict[str, float]:
    """The article's walk-through; figures and the bare net's weights go to `out`.

    Args:
        out: Folder for data.png, loss.png, acc.png, predictions.png and best_net.pt.
        epochs: Epochs to train. Defaults to 10, the article's.
        gpus: As in `LightModel.fit`. Defaults to 0 (the CPU).

    Returns:
        The test loss and accuracy on the validation data.

    Example:
        >>> main(Path("figures"), epochs=2)  # doctest: +SKIP
    """
    out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(123, verbose=False)
    plot_data(rings(4000)).savefig(out / "data.png")

    dl_train, dl_valid = loaders()
    model = build_model()
    summary(model, input_shape=(2,))
    # track=False: this walk-through stays off MLflow; `lkflow train` tracks the same model.
    history = model.fit(
        dl_train, dl_valid, epochs=epochs, gpus=gpus, track=False, ckpt_dir=out / "checkpoints"
    )
    print(history.round(4).to_string(index=False))
    for metric in ("loss", "acc"):
        plot_metric(history, metric).savefig(out / f"{metric}.png")
    results = model.evaluate(dl_valid, gpus=gpus)
    print("test:", {key: round(value, 4) for key, value in results.items()})
    plot_predictions(model, dl_valid.dataset).savefig(out / "predictions.png")

    # The bare net leaves its wrapper: save its weights, load them into a fresh Net.
    torch.save(model.net.state_dict(), out / "best_net.pt")
    net_clone = Net()
    net_clone.load_state_dict(torch.load(out / "best_net.pt", weights_only=True))
    x, _ = next(iter(dl_valid))
    with torch.no_grad():
        preds, preds_clone = model.predict(x), net_clone.eval()(x)
    print("model prediction:\n", preds[:5], "\nnet_clone prediction:\n", preds_clone[:5])
    assert torch.allclose(preds, preds_clone), "the clone must predict what the model does"
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("figures"), help="figure folder")
    parser.add_argument("--epochs", type=int, default=10, help="epochs to train")
    parser.add_argument("--gpus", type=int, default=0, help="0 for the CPU, N for N GPUs")
    arguments = parser.parse_args()
    main(arguments.out, arguments.epochs, arguments.gpus)
