"""Sweeps: `lkflow sweep`, a hyperparameter search by Optuna, each trial a complete lkflow run.

    from lkflow.sweep import SweepSettings, run_sweep

    result = run_sweep(SweepSettings("examples/rings.py:task", trials=20, jobs=2,
                                     space=("lr=loguniform(1e-4,1e-1)", "hidden=int(4,64,log)")))

    space.py   `KEY=SPEC` search spaces, a task file's `space(trial)`, the trial's TaskOptions
    study.py   Optuna's storage, study, sampler and pruner; which trials count; the study lock
    trial.py   one trial: its child run, the task fitted into it, pruning at epoch ends
    parent.py  the sweep's own run: found by every process, its params, progress and champion
    search.py  `run_sweep`: the checks, the processes, the loop of trials, the end

Optuna is the `sweep` extra (`pip install -e ".[sweep]"`); it loads inside the functions that
need it, so `import lkflow` and `lkflow --help` never import it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lkflow.sweep.parent import SweepResult
    from lkflow.sweep.search import SweepSettings, run_sweep

_EXPORTS = {
    "SweepSettings": "lkflow.sweep.search",
    "run_sweep": "lkflow.sweep.search",
    "SweepResult": "lkflow.sweep.parent",
}
__all__ = ["SweepResult", "SweepSettings", "run_sweep"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lkflow.sweep' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
