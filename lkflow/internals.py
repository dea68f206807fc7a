"""The parts of Lightning that lkflow relies on and Lightning does not publish, in one place.

Each one has a test in tests/test_internals.py that fails on a Lightning release that changes
it, so that an upgrade breaks there, by name, rather than somewhere in a fit.

    loader = with_sampler(loader, sampler)  # a DataLoader rebuilt around another sampler
    trains_in_child_processes(trainer)  # ddp_spawn, ddp_notebook: workers train, not this process
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, Sampler


def with_sampler(loader: DataLoader[Any], sampler: Sampler[Any] | Iterable[Any]) -> DataLoader[Any]:
    """`loader` rebuilt with `sampler`, every other argument (and subclass) kept.

    Lightning's `_update_dataloader` re-creates a DataLoader from the arguments it was built with,
    as Lightning does itself when it adds a distributed sampler.
    """
    from pytorch_lightning.utilities.data import _update_dataloader

    return _update_dataloader(loader, sampler)


def trains_in_child_processes(trainer: pl.Trainer) -> bool:
    """Whether the fit runs in processes that this one starts and waits for (spawn or fork).

    Those processes send back only the weights and the best checkpoint's path; `ddp` started
    as a script (or torchrun) trains in this process too.
    """
    from pytorch_lightning.strategies.launchers import _MultiProcessingLauncher

    return isinstance(trainer.strategy.launcher, _MultiProcessingLauncher)
