"""A small CNN on scikit-learn's 8x8 digits (10 classes), as a task for `lkflow train`.

    lkflow train examples/digits.py:task --epochs 10 --registered-model-name digits-cnn
    lkflow train examples/digits.py:task --param channels=32

The data ships with scikit-learn (no download). Validation accuracy passes 0.95 within ten
epochs on a CPU; the run gets the validation set's confusion matrix as `report/`.
"""

from __future__ import annotations

import torch
from matplotlib.figure import Figure
from torch import nn
from torch.utils.data import DataLoader, random_split
from torchmetrics.classification import MulticlassAccuracy

from lkflow import LightModel
from lkflow.datasets import digits
from lkflow.tasks import Task, TaskOptions

CLASSES = 10


def cnn(channels: int = 16) -> nn.Sequential:
    """Two 3x3 convolutions, a 2x2 pooling and two linear layers: 1x8x8 images to 10 logits.

    Args:
        channels: Channels of the first convolution; the second has twice as many.
            Defaults to 16.

    Returns:
        The net.

    Example:
        >>> cnn()(torch.zeros(4, 1, 8, 8)).shape
        torch.Size([4, 10])
    """
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(channels, 2 * channels, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * channels * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, CLASSES),
    )


def confusion_matrix(model: LightModel, data: DataLoader) -> torch.Tensor:
    """Counts of (true class, predicted class) over `data`.

    Args:
        model: A model whose net returns class logits.
        data: `(x, y)` batches.

    Returns:
        A `(10, 10)` int tensor; row i holds the predictions for images of digit i.

    Example:
        >>> confusion_matrix(model, dl_valid).trace()  # doctest: +SKIP
        tensor(352)
    """
    predicted = model.predict(data).argmax(dim=1)
    target = torch.cat([y for _, y in data])
    counts = torch.bincount(target * CLASSES + predicted, minlength=CLASSES**2)
    return counts.reshape(CLASSES, CLASSES)


def plot_confusion(matrix: torch.Tensor) -> Figure:
    """The confusion matrix as a heat map with its counts written in.

    Args:
        matrix: What `confusion_matrix` returns.

    Returns:
        The figure.

    Example:
        >>> plot_confusion(torch.eye(10, dtype=torch.int64)).savefig("confusion.png")
    """
    figure = Figure(figsize=(6, 5.5), layout="constrained")
    ax = figure.subplots()
    image = ax.imshow(matrix.numpy(), cmap="Blues")
    counts, half = matrix.tolist(), int(matrix.max()) / 2
    for row, column in ((r, c) for r in range(CLASSES) for c in range(CLASSES)):
        if counts[row][column]:
            color = "white" if counts[row][column] > half else "black"
            ax.text(column, row, counts[row][column], ha="center", va="center", color=color)
    accuracy = float(matrix.trace() / matrix.sum())
    ax.set(xlabel="predicted", ylabel="true", xticks=range(CLASSES), yticks=range(CLASSES))
    ax.set_title(f"Validation confusion matrix (accuracy {accuracy:.3f})")
    figure.colorbar(image, ax=ax)
    return figure


def task(options: TaskOptions) -> Task:
    """The digits CNN as a task: 1437 training and 360 validation images.

    Args:
        options: `lr` (default 3e-3), `batch_size` (default 64), and `--param channels=N`
            (default 16) are used.

    Returns:
        The task: best epoch by `val_acc` (max), the confusion matrix as its report.

    Example:
        >>> task(TaskOptions(params={"channels": "8"})).model.net[0].out_channels
        8
    """
    split = torch.Generator().manual_seed(0)
    ds_train, ds_valid = random_split(digits(), [1437, 360], generator=split)
    batch_size = options.batch_size or 64
    dl_train = DataLoader(ds_train, batch_size, shuffle=True)
    dl_valid = DataLoader(ds_valid, batch_size=360)
    net = cnn(options.param("channels", 16))
    lr = 3e-3 if options.lr is None else options.lr
    model = LightModel(
        net,
        loss_fn=nn.CrossEntropyLoss(),
        metrics={"acc": MulticlassAccuracy(num_classes=CLASSES, average="micro")},
        optimizer=torch.optim.Adam(net.parameters(), lr=lr),
    )
    return Task(
        model,
        dl_train,
        dl_valid,
        fit_kwargs={"monitor": "val_acc", "mode": "max"},
        report=lambda fitted: {
            "confusion_matrix.png": plot_confusion(confusion_matrix(fitted, dl_valid))
        },
    )
