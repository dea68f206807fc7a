"""lkflow: train PyTorch nets Keras-style on Lightning, with every fit tracked and served by MLflow.

Example:
    >>> import lkflow
    >>> model = lkflow.LightModel(net, loss_fn=nn.BCEWithLogitsLoss())  # doctest: +SKIP
    >>> history = model.fit(dl_train, dl_valid, epochs=10, gpus=0)  # doctest: +SKIP

The names below load on first use, so that `import lkflow` and `lkflow --help` stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from lkflow.errors import LkflowError
    from lkflow.model import LightModel
    from lkflow.plots import plot_history, plot_metric
    from lkflow.summary_table import Summary, summary
    from lkflow.tasks import Task, TaskOptions
    from lkflow.tracking import MLflowCallback

_EXPORTS = {
    "LightModel": "lkflow.model",
    "MLflowCallback": "lkflow.tracking",
    "summary": "lkflow.summary_table",
    "Summary": "lkflow.summary_table",
    "plot_metric": "lkflow.plots",
    "plot_history": "lkflow.plots",
    "LkflowError": "lkflow.errors",
    "Task": "lkflow.tasks",
    "TaskOptions": "lkflow.tasks",
}

__all__ = [
    "LightModel",
    "LkflowError",
    "MLflowCallback",
    "Summary",
    "Task",
    "TaskOptions",
    "__version__",
    "datasets",
    "plot_history",
    "plot_metric",
    "summary",
]


def __getattr__(name: str) -> Any:
    if name == "datasets":
        return importlib.import_module("lkflow.datasets")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lkflow' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
