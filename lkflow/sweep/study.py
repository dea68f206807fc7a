"""The Optuna side of a sweep: its storage, study, sampler and pruner, and which trials count.

    storage = open_storage("sqlite:///sweep.db", heartbeat_s=10, on_stale=end_killed)
    study = find_study(storage, "rings", "minimize", sampler, pruner)  # None: not there yet
    study = create_study(storage, "rings", "minimize", sampler, pruner)  # None: made meanwhile
    with study_lock("sqlite:///sweep.db"):  # one process of this machine at a time
        counts = count_trials(study.get_trials(deepcopy=False))

A study lives in a database (`sqlite:///sweep.db` by default, beside `mlflow.db`; a server's
`postgresql://...` for workers on several machines), so every `lkflow sweep` that names the
same study and storage adds trials to it. Of processes that start a new study at the same
moment, the database lets exactly one create it.

`--trials N` is the study's total. It counts every trial but the killed ones: a trial that
completed, was pruned, failed with an error of its task, or is running or waiting. A trial
whose process was stopped (Ctrl-C, SIGTERM, or killed outright: its heartbeat stops, and after
the grace period Optuna fails it) is run again with the same params, as a new trial that
carries `lkflow.retry_of`; the killed one no longer counts. Processes of one machine count and
start trials one at a time (a file lock), so together they run exactly N; processes on
several machines may start one more each when they count at the same instant.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lkflow.credentials import hide_credentials
from lkflow.errors import LkflowError
from lkflow.tracking.store import check_sqlite_file, sqlite_path

if TYPE_CHECKING:
    import optuna
    from filelock import FileLock
    from optuna.trial import FrozenTrial

# Study and trial user attributes: how a study and its trials find their MLflow runs.
PARENT_ATTR = "lkflow.parent_run_id"  # the study's: the sweep's parent run
RUN_ATTR = "lkflow.run_id"  # a trial's: its child run
MODEL_ATTR = "lkflow.model_uri"  # a trial's: the model its run logged, if it may be registered
STATE_ATTR = "lkflow.trial_state"  # a trial's end, where Optuna's state says less: failed, killed
ERROR_ATTR = "lkflow.error"  # a failed trial's exception, one line
RETRY_ATTR = "lkflow.retry_of"  # the number of the killed trial that this one runs again

PRUNERS = ("none", "median", "hyperband")
Step = Literal["run", "wait", "done"]


def import_optuna() -> Any:
    """Optuna, or an error that says how to install it (it is the `sweep` extra)."""
    try:
        import optuna
    except ModuleNotFoundError as err:
        raise LkflowError(
            "lkflow sweep needs Optuna, which is not installed. Install it with "
            "pip install 'lkflow[sweep]' (or pip install optuna)."
        ) from err
    return optuna


def default_storage(tracking_uri: str) -> str:
    """`sqlite:///sweep.db` beside a `sqlite:///` tracking store's file, else in the working
    folder.

    Example:
        >>> default_storage("sqlite:////data/mlflow.db"), default_storage("http://host:5000")
        ('sqlite:////data/sweep.db', 'sqlite:///sweep.db')
    """
    path = sqlite_path(tracking_uri)
    return "sqlite:///sweep.db" if path is None else f"sqlite:///{path.with_name('sweep.db')}"


def check_storage(url: str) -> None:
    """Fails at once on a storage that is no database URL, or a sqlite file that can't be one.

    Raises:
        LkflowError: Naming the URL (its credentials hidden) and the fix.
    """
    scheme = url.partition("://")[0]
    if "://" not in url or not scheme.replace("+", "").isalnum():
        raise LkflowError(
            f"Received: --storage {hide_credentials(url)!r}. Expected a database URL, such as "
            "sqlite:///sweep.db or postgresql://user@db-host/optuna."
        )
    path = sqlite_path(url)
    if url.startswith("sqlite:") and path is None:
        raise LkflowError(
            f"Received: --storage {url!r}. Expected a sqlite file that every process of the "
            "sweep shares, such as sqlite:///sweep.db (three slashes, then the path)."
        )
    if path is not None:
        check_sqlite_file(url)
        if not path.parent.is_dir():
            raise LkflowError(
                f"Received: --storage {url!r}, but the folder {path.parent} does not exist. "
                "Create it, or name a file in an existing folder."
            )


def study_lock(url: str) -> FileLock:
    """The lock that the processes of this machine take to count trials and start one, and to
    create a sqlite storage's tables: `sweep.db.lock` beside a sqlite file, else one in the
    temporary folder per storage."""
    from filelock import FileLock

    path = sqlite_path(url)
    if path is not None:
        return FileLock(path.with_name(f"{path.name}.lock"))
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    user = os.getuid() if hasattr(os, "getuid") else "user"
    return FileLock(Path(tempfile.gettempdir()) / f"lkflow-sweep-{user}-{digest}.lock")


@contextmanager
def quiet_experimental() -> Iterator[None]:
    """Optuna's heartbeats, stale trials, constant liar and figures are marked experimental;
    lkflow relies on them knowingly, so their warnings stay out of the user's way."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def open_storage(
    url: str, heartbeat_s: int, on_stale: Callable[[optuna.Study, FrozenTrial], None]
) -> optuna.storages.RDBStorage:
    """The study's database, with heartbeats: a trial whose process stops beating for
    `2 * heartbeat_s` seconds is failed by the next process that looks, which calls `on_stale`.

    Raises:
        LkflowError: The database's driver is not installed, or it cannot be reached.
    """
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite:") else {}
    try:
        with study_lock(url), quiet_experimental():
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine,
                heartbeat_interval=heartbeat_s,
                heartbeat_stale_trial_callback=on_stale,
            )
    except (ImportError, SQLAlchemyError) as err:
        raise LkflowError(
            f"Cannot open the study storage {hide_credentials(url)} ({type(err).__name__}: "
            f"{hide_credentials(str(err).splitlines()[0])}). Install its driver and check that it "
            "answers: for PostgreSQL, psycopg 3 with a postgresql+psycopg:// URL (pip install "
            "'psycopg[binary]'), or psycopg2 with postgresql://; for MySQL, pip install pymysql."
        ) from err


def make_pruner(name: str, startup_trials: int) -> tuple[optuna.pruners.BasePruner, dict[str, str]]:
    """The pruner `--pruner` names, and how the sweep's run records it.

    Example:
        >>> make_pruner("median", 5)[1]  # doctest: +SKIP
        {'pruner': 'median', 'startup_trials': '5'}
    """
    import optuna

    if name == "median":
        pruner = optuna.pruners.MedianPruner(n_startup_trials=startup_trials)
        return pruner, {"pruner": name, "startup_trials": str(startup_trials)}
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(), {"pruner": name}
    if name == "none":
        return optuna.pruners.NopPruner(), {"pruner": name}
    raise LkflowError(f"Received: --pruner {name!r}. Expected one of {', '.join(PRUNERS)}.")


def make_sampler() -> tuple[optuna.samplers.BaseSampler, dict[str, str]]:
    """Optuna's TPE, with the constant liar: trials running in parallel are taken as bad
    results while they run, so that processes do not all sample the same region."""
    optuna = import_optuna()
    with quiet_experimental():
        sampler = optuna.samplers.TPESampler(constant_liar=True)
    return sampler, {"sampler": "TPESampler(constant_liar=True)"}


def find_study(
    storage: optuna.storages.RDBStorage,
    name: str,
    direction: Literal["minimize", "maximize"],
    sampler: optuna.samplers.BaseSampler,
    pruner: optuna.pruners.BasePruner,
) -> optuna.Study | None:
    """The study `name` of `storage`, or None where there is none.

    Raises:
        LkflowError: The study optimises the other way (its monitor's mode).
    """
    import optuna

    try:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    except KeyError:  # Optuna's "Record does not exist."
        return None
    if study.direction.name.lower() != direction:
        raise LkflowError(
            f"Received: study {name!r}, which {study.direction.name.lower()}s its value, but this "
            f"sweep would {direction} it (--mode). Pass the study's mode, or --study NEW_NAME."
        )
    return study


def create_study(
    storage: optuna.storages.RDBStorage,
    name: str,
    direction: Literal["minimize", "maximize"],
    sampler: optuna.samplers.BaseSampler,
    pruner: optuna.pruners.BasePruner,
) -> optuna.Study | None:
    """The study `name`, created; None where another process created it first (the database
    lets exactly one of them create it)."""
    import optuna

    try:
        return optuna.create_study(
            storage=storage, study_name=name, direction=direction, sampler=sampler, pruner=pruner
        )
    except optuna.exceptions.DuplicatedStudyError:
        return None


@dataclass(frozen=True)
class Counts:
    """A study's trials by how they ended, as the sweep counts them."""

    counted: int  # toward --trials: every trial but the killed ones
    running: int
    waiting: int  # enqueued: killed trials to run again, or trials a user enqueued
    complete: int
    pruned: int
    failed: int  # an error in the task
    killed: int  # stopped with their process; run again


def count_trials(trials: Iterable[FrozenTrial]) -> Counts:
    """The study's trials counted; see the module's docstring."""
    from optuna.trial import TrialState

    trials = list(trials)
    retried = {t.user_attrs[RETRY_ATTR] for t in trials if RETRY_ATTR in t.user_attrs}
    killed = {
        t.number
        for t in trials
        if t.number in retried
        or (t.state == TrialState.FAIL and t.user_attrs.get(STATE_ATTR) == "killed")
    }
    states = [t.state for t in trials if t.number not in killed]
    failed = states.count(TrialState.FAIL)
    return Counts(
        counted=len(states),
        running=states.count(TrialState.RUNNING),
        waiting=states.count(TrialState.WAITING),
        complete=states.count(TrialState.COMPLETE),
        pruned=states.count(TrialState.PRUNED),
        failed=failed,
        killed=len(killed),
    )


def next_step(counts: Counts, trials: int) -> Step:
    """What a process does next: run a trial (one waits, or fewer than `trials` count), wait
    while others run, or stop: the study holds `trials` and all of them ended."""
    if counts.waiting or counts.counted < trials:
        return "run"
    return "wait" if counts.running else "done"


def retry(study: optuna.Study, killed: FrozenTrial | optuna.Trial) -> None:
    """Enqueues a trial with the killed trial's params, marked as its retry."""
    params = killed.params
    study.enqueue_trial(params, user_attrs={RETRY_ATTR: killed.number})


class Gate:
    """The study lock, held from counting the trials until the trial this process decided to
    start exists: `open()` lets the others in as soon as it does."""

    def __init__(self, url: str) -> None:
        self.lock = study_lock(url)
        self.held = False

    def __enter__(self) -> Gate:
        self.lock.acquire()
        self.held = True
        return self

    def open(self) -> None:
        if self.held:
            self.held = False
            self.lock.release()

    def __exit__(self, *exc: object) -> None:
        self.open()
