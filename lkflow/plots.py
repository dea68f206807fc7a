"""Curves of a training history: ``plot_metric(history, "loss")`` and ``plot_history(history)``.

``history`` is what ``LightModel.fit`` returns (a DataFrame), ``model.history`` (a list of per-epoch
dicts) or a dict of lists. Train columns are bare (``loss``), validation columns carry ``val_``.
Figures are built with matplotlib's object API and never shown: leave one as a notebook cell's last
value to display it, or call ``figure.savefig("loss.png")``. Works with the Agg backend.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, TypeAlias

from lkflow.errors import LkflowError

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

History: TypeAlias = "pd.DataFrame | Sequence[Mapping[str, float]] | Mapping[str, Sequence[float]]"


def plot_metric(history: History, metric: str, *, ax: Axes | None = None) -> Figure:
    """Plot the train curve of ``metric`` and, when present, its ``val_`` curve over the epochs.

    The x axis is the ``epoch`` column (counted from 1) when there is one, else 1..n.

    Args:
        history: Per-epoch metrics: a DataFrame, a list of per-epoch dicts, or a dict of lists.
        metric: Metric name without ``val_``, e.g. ``"loss"`` or ``"acc"``.
        ax: Axes to draw on, e.g. one subplot of your own figure. Defaults to None (a new figure).

    Returns:
        The figure holding the plot (the figure of ``ax`` when given).

    Raises:
        LkflowError: ``metric`` is not in ``history`` (the message lists the available names),
            ``history`` has no epochs, or it is none of the accepted types.

    Example:
        >>> history = [{"epoch": 1, "loss": 0.9, "val_loss": 1.0},
        ...            {"epoch": 2, "loss": 0.5, "val_loss": 0.7}]
        >>> plot_metric(history, "loss").savefig("loss.png")
    """
    frame = _to_frame(history)
    available = _metric_names(frame)
    if metric not in available:
        raise LkflowError(
            f"Unknown metric {metric!r}; the history has metrics {available}. Pass one of "
            f"these names (without 'val_': its validation curve is drawn alongside)."
        )
    if ax is None:
        ax = _new_figure().subplots()
    _draw(ax, frame, metric)
    return ax.figure.figure  # the root Figure, also when ax lies in a SubFigure


def plot_history(history: History) -> Figure:
    """Plot every metric of ``history`` in its own subplot, train and validation curves together.

    ``epoch`` is the x axis, not a metric; the learning rate ``lr`` gets the last subplot.

    Args:
        history: Per-epoch metrics: a DataFrame, a list of per-epoch dicts, or a dict of lists.

    Returns:
        The figure, one subplot per metric, up to three per row.

    Raises:
        LkflowError: ``history`` holds no metric columns.

    Example:
        >>> history = {"loss": [0.9, 0.5], "val_loss": [1.0, 0.7], "acc": [0.6, 0.8],
        ...            "lr": [0.01, 0.01]}
        >>> len(plot_history(history).axes)
        3
    """
    frame = _to_frame(history)
    names = sorted(_metric_names(frame), key=lambda name: name == "lr")  # stable sort: lr last
    if not names:
        raise LkflowError(
            f"history has no metric columns, only {list(frame.columns)}; expected e.g. 'loss'."
        )
    ncols = min(len(names), 3)
    nrows = math.ceil(len(names) / ncols)
    figure = _new_figure(figsize=(4.8 * ncols, 3.6 * nrows))
    axes = figure.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, name in zip(axes, names, strict=False):  # more cells than names: extras removed below
        _draw(ax, frame, name)
    for ax in axes[len(names) :]:
        ax.remove()
    return figure


def _new_figure(figsize: tuple[float, float] = (6.4, 4.8)) -> Figure:
    """A figure outside pyplot's state: nothing is shown or kept open behind the caller's back."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained")


def _to_frame(history: History) -> pd.DataFrame:
    """``history`` as a DataFrame with one row per epoch."""
    import pandas as pd

    if isinstance(history, pd.DataFrame):
        frame = history
    elif isinstance(history, Mapping):
        frame = pd.DataFrame(dict(history))
    elif isinstance(history, Sequence) and not isinstance(history, str):
        frame = pd.DataFrame(list(history))
    else:
        raise LkflowError(
            f"history must be a pandas DataFrame, a list of per-epoch dicts or a dict of lists; "
            f"received {type(history).__name__}. Pass the DataFrame that fit() returns or "
            f"model.history."
        )
    if frame.empty:
        raise LkflowError("history has no epochs to plot; train for at least one epoch first.")
    return frame


def _metric_names(frame: pd.DataFrame) -> list[str]:
    """Metric names in column order, ``val_`` stripped, ``epoch`` left out: ["loss", "acc"]."""
    names: list[str] = []
    for column in frame.columns:
        name = str(column).removeprefix("val_")
        if name != "epoch" and name not in names:
            names.append(name)
    return names


def _draw(ax: Axes, frame: pd.DataFrame, metric: str) -> None:
    """Draw the train and validation curves of ``metric`` that ``frame`` holds on ``ax``."""
    from matplotlib.ticker import MaxNLocator

    epochs = frame["epoch"].to_numpy() if "epoch" in frame.columns else range(1, len(frame) + 1)
    train_label = "lr" if metric == "lr" else f"train_{metric}"
    curves = [(metric, train_label, "bo--"), (f"val_{metric}", f"val_{metric}", "ro-")]
    drawn = [(column, label, style) for column, label, style in curves if column in frame.columns]
    for column, label, style in drawn:
        ax.plot(epochs, frame[column].to_numpy(dtype=float), style, label=label)
    if metric == "lr":
        title = "Learning rate"
    elif len(drawn) == 2:
        title = f"Training and validation {metric}"
    else:
        title = f"{'Training' if drawn[0][0] == metric else 'Validation'} {metric}"
    ax.set_title(title)
    ax.set_xlabel("Epochs")
    ax.set_ylabel(metric)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend()
