"""Tracking a fit in MLflow: `MLflowCallback` and the parts it delegates to, one concept a file.

    from lkflow.tracking import MLflowCallback

    callback.py   the Lightning hooks of MLflowCallback
    run.py        the run's lifecycle: find, open, reopen, take over a killed run, end; its error
    writes.py     one typed write into a run, `deliver`, and the fit's `Writer`
    rows.py       where the epoch rows come from: a LightModel's history, or what a module logs
    metrics.py    the epoch rows as metric points at step=epoch, and the best epoch's
    outbox.py     the writes kept on disk while the server is away, and `sync_run`
    artifacts.py  the files a fit leaves: history, curves, summary, datasets, checkpoints
    example.py    the served net's input example, from the first training batch
    export.py     which net is served; the servable model by its layout, checked on its example
    served.py     the pyfunc of a torch.export program, for nets of several inputs or outputs
    served_model.py  that pyfunc's self-contained loader, copied into each such model
    logger.py     the Trainer's logger into the fit's run: step values, callbacks' values
    registry.py   registration, its tag names, the best version and its example request
    params.py     what a fit is configured with, made MLflow-safe
    store.py      tracking URIs, reachability, retries, the sqlite lock

`MLflowCallback` loads on first use, so that importing this package (as the command line does
for its run table, registry and outbox) stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lkflow.tracking.callback import MLflowCallback

__all__ = ["MLflowCallback"]


def __getattr__(name: str) -> Any:
    if name != "MLflowCallback":
        raise AttributeError(f"module 'lkflow.tracking' has no attribute {name!r}")
    value = importlib.import_module("lkflow.tracking.callback").MLflowCallback
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
