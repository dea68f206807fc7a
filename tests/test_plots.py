"""Tests of lkflow.plots on the Agg backend: lines, labels, history formats, saving and errors."""

import matplotlib
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from lkflow.errors import LkflowError
from lkflow.plots import plot_history, plot_metric

matplotlib.use("Agg")

ROWS = [
    {"epoch": 1, "loss": 0.9, "acc": 0.55, "val_loss": 1.0, "val_acc": 0.5, "lr": 0.01},
    {"epoch": 2, "loss": 0.6, "acc": 0.70, "val_loss": 0.8, "val_acc": 0.65, "lr": 0.01},
    {"epoch": 3, "loss": 0.4, "acc": 0.85, "val_loss": 0.7, "val_acc": 0.75, "lr": 0.001},
]


def as_frame() -> pd.DataFrame:
    return pd.DataFrame(ROWS)


def as_rows() -> list[dict[str, float]]:
    return [dict(row) for row in ROWS]


def as_columns() -> dict[str, list[float]]:
    return {key: [row[key] for row in ROWS] for key in ROWS[0]}


HISTORIES = pytest.mark.parametrize(
    "make_history", [as_frame, as_rows, as_columns], ids=["frame", "rows", "columns"]
)


@HISTORIES
def test_plot_metric_draws_train_and_val_curves(make_history) -> None:
    figure = plot_metric(make_history(), "loss")

    assert isinstance(figure, Figure)
    (ax,) = figure.axes
    train, val = ax.get_lines()
    np.testing.assert_allclose(train.get_xdata(), [1, 2, 3])
    np.testing.assert_allclose(train.get_ydata(), [0.9, 0.6, 0.4])
    np.testing.assert_allclose(val.get_xdata(), [1, 2, 3])
    np.testing.assert_allclose(val.get_ydata(), [1.0, 0.8, 0.7])
    assert [text.get_text() for text in ax.get_legend().get_texts()] == ["train_loss", "val_loss"]
    assert ax.get_title() == "Training and validation loss"
    assert ax.get_xlabel() == "Epochs"
    assert ax.get_ylabel() == "loss"


def test_x_axis_is_the_epoch_or_a_count() -> None:
    resumed = [{"epoch": 5, "loss": 0.3}, {"epoch": 6, "loss": 0.2}]
    no_epoch = {"loss": [0.5, 0.4, 0.3, 0.2]}

    (resumed_line,) = plot_metric(resumed, "loss").axes[0].get_lines()
    (counted_line,) = plot_metric(no_epoch, "loss").axes[0].get_lines()
    np.testing.assert_allclose(resumed_line.get_xdata(), [5, 6])
    np.testing.assert_allclose(counted_line.get_xdata(), [1, 2, 3, 4])


def test_train_only_history_draws_one_curve() -> None:
    ax = plot_metric({"loss": [0.5, 0.4]}, "loss").axes[0]

    assert len(ax.get_lines()) == 1
    assert [text.get_text() for text in ax.get_legend().get_texts()] == ["train_loss"]
    assert ax.get_title() == "Training loss"


def test_plot_metric_draws_on_a_given_axes() -> None:
    figure = Figure()
    left, right = figure.subplots(1, 2)

    returned = plot_metric(as_rows(), "acc", ax=right)

    assert returned is figure
    assert not left.get_lines()
    np.testing.assert_allclose(right.get_lines()[1].get_ydata(), [0.5, 0.65, 0.75])


def test_plot_metric_on_axes_in_a_subfigure_returns_the_root_figure() -> None:
    figure = Figure()
    ax = figure.subfigures(1, 2)[1].subplots()

    assert plot_metric(as_rows(), "loss", ax=ax) is figure


@HISTORIES
def test_saving_to_png_writes_an_image(make_history, tmp_path) -> None:
    path = tmp_path / "loss.png"

    plot_metric(make_history(), "loss").savefig(path)
    plot_history(make_history()).savefig(tmp_path / "history.png")

    assert path.read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "history.png").stat().st_size > 0


@pytest.mark.parametrize("metric", ["f1", "val_loss", "epoch"])
def test_unknown_metric_lists_the_available_names(metric: str) -> None:
    with pytest.raises(ValueError, match=rf"Unknown metric '{metric}'.*\['loss', 'acc', 'lr'\]"):
        plot_metric(as_rows(), metric)


@HISTORIES
def test_plot_history_has_a_subplot_per_metric_with_lr_last(make_history) -> None:
    figure = plot_history(make_history())

    assert [ax.get_title() for ax in figure.axes] == [
        "Training and validation loss",
        "Training and validation acc",
        "Learning rate",
    ]
    _, acc, lr = figure.axes
    assert [len(ax.get_lines()) for ax in figure.axes] == [2, 2, 1]
    np.testing.assert_allclose(acc.get_lines()[0].get_ydata(), [0.55, 0.70, 0.85])
    np.testing.assert_allclose(lr.get_lines()[0].get_ydata(), [0.01, 0.01, 0.001])
    assert [text.get_text() for text in lr.get_legend().get_texts()] == ["lr"]


def test_plot_history_removes_unused_grid_cells() -> None:
    history = {name: [0.1, 0.2] for name in ["loss", "acc", "auc", "f1", "val_loss"]}

    assert len(plot_history(history).axes) == 4


def test_bad_histories_raise_with_the_fix() -> None:
    with pytest.raises(ValueError, match="no epochs"):
        plot_metric([], "loss")
    with pytest.raises(ValueError, match="no metric columns"):
        plot_history({"epoch": [1, 2]})
    with pytest.raises(LkflowError, match="received int"):
        plot_metric(3, "loss")
