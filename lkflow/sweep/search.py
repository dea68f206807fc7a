"""`lkflow sweep`: a hyperparameter search by Optuna over a task, each trial a run of its own.

    result = run_sweep(SweepSettings("examples/rings.py:task", trials=20, jobs=2,
                                     space=("lr=loguniform(1e-4,1e-1)", "hidden=int(4,64,log)")))
    result.champion  # "rings-net/3": the best trial's net, registered with the alias champion

    $ lkflow sweep examples/rings.py:task --trials 20 --jobs 2 \\
        --space 'lr=loguniform(1e-4,1e-1)' --space 'hidden=int(4,64,log)'

What a sweep does, in order: it checks the space and builds the task once (its monitor, mode
and checkpoint folder; a mistake stops it before any trial), opens the study (created by
exactly one of the processes that start it together) and its parent run, then runs trials in
this process and `jobs - 1` worker processes, until the study holds `trials` trials, all
ended. The same command continues a study that was stopped, and the same command on
several machines (a shared `--storage` and tracking server) adds to one study; each process
ends once every trial of the study has ended, retrying trials whose process died, and then
finishes the parent run: figures, the champion, its status (lkflow/sweep/parent.py).
"""

from __future__ import annotations

import multiprocessing
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from lkflow.errors import LkflowError
from lkflow.sweep.parent import (
    SweepResult,
    finish,
    log_progress,
    log_sweep_params,
    open_sweep,
    outer_run_id,
)
from lkflow.sweep.space import describe, task_space
from lkflow.sweep.study import (
    PRUNERS,
    Gate,
    count_trials,
    default_storage,
    import_optuna,
    make_pruner,
    make_sampler,
    next_step,
    open_storage,
    quiet_experimental,
    study_lock,
)
from lkflow.tasks import TaskOptions, build_task, load_task, task_params

if TYPE_CHECKING:
    import optuna
    from mlflow import MlflowClient

    from lkflow.sweep.trial import TrialSetup
    from lkflow.tasks import Task
    from lkflow.tracking.run import TrackedRun


@dataclass(frozen=True)
class SweepSettings:
    """What `lkflow sweep` is given; None means the default that its comment names."""

    target: str  # the task: path/to/file.py:function or package.module:function
    trials: int  # the trials the study holds when the sweep ends, every process together
    space: tuple[str, ...] = ()  # KEY=SPEC each; () for the task file's space(trial)
    jobs: int = 1  # trials at once in this command: in this process and jobs - 1 workers
    epochs: int = 10
    gpus: str | int | None = None  # as LightModel.fit's
    options: TaskOptions = field(default_factory=TaskOptions)  # fixed --lr, --seed, --param...
    monitor: str | None = None  # None: the task's
    mode: Literal["min", "max"] | None = None  # None: the task's (or guessed from --monitor)
    pruner: str = "median"  # none, median or hyperband
    startup_trials: int = 5  # trials that complete before the median pruner prunes one
    study: str | None = None  # None: the target (under `mlflow run`: target@run id)
    storage: str | None = None  # None: sqlite:///sweep.db beside mlflow.db
    experiment_name: str | None = None
    run_name: str | None = None  # of the sweep's run
    registered_model_name: str | Literal[False] | None = None  # the champion's; False: none
    register_trials: bool = False  # register every trial's net too
    tracking_uri: str | None = None
    heartbeat_s: int = 10  # a trial whose process is silent for twice this is failed, retried


def run_sweep(settings: SweepSettings) -> SweepResult:
    """Runs (or continues) the sweep that `settings` describe; see the module's docstring.

    Args:
        settings: The sweep.

    Returns:
        How it ended: the counts of trials, the best one, its run, the champion.

    Raises:
        LkflowError: A bad setting, a study started with other settings, or every trial
            failed (the first one's error).

    Example:
        >>> run_sweep(SweepSettings("examples/rings.py:task", trials=6, jobs=2,
        ...           space=("lr=loguniform(1e-3,1e-1)",)))  # doctest: +SKIP
    """
    from lkflow.tracking.registry import registered_name
    from lkflow.tracking.store import tracking_client

    plan = _plan(settings)
    client = tracking_client(plan.tracking_uri)
    study, parent = _open(plan, client)
    registered = registered_name(
        settings.registered_model_name, True, parent.experiment_name, plan.net_class
    )
    setup = _trial_setup(plan, parent, registered if settings.register_trials else None)
    job = Job(
        setup,
        plan.storage,
        settings.trials,
        settings.heartbeat_s,
        settings.pruner,
        settings.startup_trials,
    )
    try:
        with _workers(job, settings.jobs - 1):
            work(job, study, wait=False)
        work(job, study, wait=True)
    except BaseException as stop:
        status = "FAILED" if isinstance(stop, Exception) else "KILLED"
        _stopped(client, parent.run_id, study, status)
        raise
    with study_lock(plan.storage):  # one process of this machine registers the champion
        return finish(
            client,
            parent.run_id,
            study,
            monitor=plan.monitor,
            mode=plan.mode,
            registered_model_name=registered,
        )


@dataclass(frozen=True)
class _Plan:
    """The settings resolved and checked, before anything is created."""

    settings: SweepSettings
    tracking_uri: str
    space: dict[str, str]  # as the sweep's run records it
    monitor: str
    mode: Literal["min", "max"]
    storage: str  # the study's database URL
    study: str  # the study's name
    net_class: str  # the task's net, for a default registered name
    ckpt_dir: str  # the task's checkpoint folder
    verbose: int  # the task's verbose


def _plan(settings: SweepSettings) -> _Plan:
    """Every setting checked and resolved: the space parsed, the task built once (its monitor,
    mode, checkpoint folder and net), the storage and the study's name."""
    from mlflow import get_tracking_uri

    from lkflow.sweep.study import check_storage
    from lkflow.tracking.registry import mode as guessed_mode
    from lkflow.tracking.store import check_reachable, check_tracking_uri

    _check(settings)
    import_optuna()
    uri = settings.tracking_uri or get_tracking_uri()
    check_tracking_uri(uri)
    check_reachable(uri)
    function = load_task(settings.target)
    space = task_space(function, settings.space, settings.target)
    where = settings.target.rpartition(":")[0]
    probe = _probe(function, settings)
    kwargs = probe.fit_kwargs
    task_monitor = kwargs.get("monitor") or ("val_loss" if probe.val_data is not None else "loss")
    monitor = settings.monitor or task_monitor
    task_mode = kwargs.get("mode", "min")
    mode = settings.mode or (task_mode if monitor == task_monitor else guessed_mode(monitor))
    storage = settings.storage or default_storage(uri)
    check_storage(storage)
    outer = outer_run_id()
    name = settings.study or (settings.target if outer is None else f"{settings.target}@{outer}")
    return _Plan(
        settings=settings,
        tracking_uri=uri,
        space=describe(space) if isinstance(space, list) else {"space": f"{where}:space"},
        monitor=monitor,
        mode="max" if mode == "max" else "min",
        storage=storage,
        study=name,
        net_class=type(probe.model.net).__name__,
        ckpt_dir=str(kwargs.get("ckpt_dir", "checkpoints")),
        verbose=int(kwargs.get("verbose", 2)) if settings.jobs == 1 else 0,
    )


def _open(plan: _Plan, client: MlflowClient) -> tuple[optuna.Study, TrackedRun]:
    """The study and the sweep's run, found or made, and the run's params checked and logged."""
    from lkflow.credentials import hide_credentials
    from lkflow.sweep.trial import StaleTrials

    settings = plan.settings
    storage = open_storage(plan.storage, settings.heartbeat_s, StaleTrials(plan.tracking_uri))
    sampler, sampler_params = make_sampler()
    pruner, pruner_params = make_pruner(settings.pruner, settings.startup_trials)
    direction: Literal["minimize", "maximize"] = "minimize" if plan.mode == "min" else "maximize"
    with study_lock(plan.storage):  # this machine's processes one at a time
        study, parent = open_sweep(
            client,
            storage,
            plan.study,
            direction,
            sampler,
            pruner,
            experiment_name=settings.experiment_name,
            run_name=settings.run_name,
        )
    params = {
        **task_params(settings.target, settings.options),
        **plan.space,
        **sampler_params,
        **pruner_params,
        "monitor": plan.monitor,
        "mode": plan.mode,
        "epochs": str(settings.epochs),
        "study": plan.study,
        "storage": hide_credentials(plan.storage),
    }
    if settings.options.seed is not None:
        params["seed"] = str(settings.options.seed)
    log_sweep_params(client, parent.run_id, params)
    print(f"Sweep {plan.study!r}: MLflow run {parent.run_id}, storage {params['storage']}")
    return study, parent


def _trial_setup(plan: _Plan, parent: TrackedRun, registered: str | None) -> TrialSetup:
    from lkflow.sweep.trial import TrialSetup

    settings = plan.settings
    return TrialSetup(
        target=settings.target,
        options=settings.options,
        space=settings.space,
        epochs=settings.epochs,
        gpus=settings.gpus,
        monitor=plan.monitor,
        mode=plan.mode,
        ckpt_dir=plan.ckpt_dir,
        verbose=plan.verbose,
        tracking_uri=plan.tracking_uri,
        experiment_id=parent.experiment_id,
        parent_run_id=parent.run_id,
        study=plan.study,
        registered_model_name=registered,
    )


def _check(settings: SweepSettings) -> None:
    """The settings that no later step checks, before any work."""
    numbers = {
        "trials": (settings.trials, 1),
        "jobs": (settings.jobs, 1),
        "epochs": (settings.epochs, 1),
        "startup_trials": (settings.startup_trials, 0),
        "heartbeat_s": (settings.heartbeat_s, 1),
    }
    for key, (value, least) in numbers.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise LkflowError(f"Received: {key}={value!r}. Expected an int >= {least}.")
    if settings.pruner not in PRUNERS:
        raise LkflowError(
            f"Received: pruner={settings.pruner!r}. Expected one of {', '.join(PRUNERS)}."
        )
    if settings.mode not in (None, "min", "max"):
        raise LkflowError(f"Received: mode={settings.mode!r}. Expected 'min' or 'max'.")


def _probe(function: Callable[[TaskOptions], Task], settings: SweepSettings) -> Task:
    """The task built once with the command's options: its monitor, mode, checkpoint folder
    and net, and any mistake in it, before the study or a run is touched. Unseeded: each
    trial seeds before it builds its own."""
    return build_task(function, settings.options, settings.target)


@dataclass(frozen=True)
class Job:
    """What a process that runs trials needs, sent to worker processes."""

    setup: TrialSetup
    storage: str
    trials: int
    heartbeat_s: int
    pruner: str
    startup_trials: int


def work(job: Job, study: optuna.Study, *, wait: bool) -> None:
    """Runs trials of `study` until it holds `job.trials`; with `wait`, also waits while other
    processes' trials run (retrying those whose process died), until every trial has ended."""
    from optuna.storages import fail_stale_trials

    from lkflow.sweep.trial import Objective
    from lkflow.tracking.params import sanitize_key
    from lkflow.tracking.registry import BEST_PREFIX

    gate = Gate(job.storage)
    objective = Objective(job.setup, on_start=gate.open)  # the trial exists: others may count
    metric = f"{BEST_PREFIX}{sanitize_key(job.setup.monitor)}"
    while True:
        with gate:
            with quiet_experimental():
                fail_stale_trials(study)
            step = next_step(count_trials(study.get_trials(deepcopy=False)), job.trials)
            if step == "run":
                study.optimize(objective, n_trials=1, catch=(Exception,))
        if step == "run":
            log_progress(objective.client, job.setup.parent_run_id, study, metric)
        elif step == "done" or not wait:
            return
        else:
            time.sleep(job.heartbeat_s)


def _worker(job: Job) -> None:
    """A worker process: its own storage, study and objective, then `work` without waiting."""
    from lkflow.sweep.study import open_storage
    from lkflow.sweep.trial import StaleTrials

    import_optuna()
    import optuna

    storage = open_storage(job.storage, job.heartbeat_s, StaleTrials(job.setup.tracking_uri))
    sampler, _ = make_sampler()
    pruner, _ = make_pruner(job.pruner, job.startup_trials)
    study = optuna.load_study(
        study_name=job.setup.study, storage=storage, sampler=sampler, pruner=pruner
    )
    work(job, study, wait=False)


@contextmanager
def _workers(job: Job, count: int) -> Iterator[None]:
    """`count` worker processes (spawned: fresh interpreters) running trials beside this one,
    awaited at the end. Ctrl-C reaches them with the terminal's; SIGTERM to this process is
    passed on to them. Each ends its own trial as stopped; a worker that fails otherwise (not a
    trial: an error of the sweep itself) is an error here."""
    if count == 0:
        yield
        return
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=_worker, args=(job,), name=f"lkflow-sweep-{i}") for i in range(count)
    ]

    def stop_all(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signal.SIGTERM)  # the workers get it on the way out

    previous = signal.signal(signal.SIGTERM, stop_all)
    try:
        for process in workers:
            process.start()
        yield
        for process in workers:
            process.join()
    except BaseException as stop:
        if isinstance(stop, KeyboardInterrupt):  # the terminal's Ctrl-C reached them too
            for process in workers:
                process.join(timeout=30)
        for process in workers:
            if process.is_alive():
                process.terminate()  # SIGTERM: each ends its trial as stopped, then exits
        for process in workers:
            process.join(timeout=120)
            if process.is_alive():
                process.kill()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    failed = [p.exitcode for p in workers if p.exitcode != 0]
    if failed:
        raise LkflowError(
            f"{len(failed)} of the sweep's {count} worker processes ended with exit status "
            f"{failed[0]}; their error is printed above. An error of a trial's task does not "
            "end a worker: this one is an error of the sweep itself."
        )


def _stopped(client: Any, run_id: str, study: optuna.Study, status: str) -> None:
    """This process stopped (KILLED: Ctrl-C, SIGTERM; FAILED: an error of the sweep itself):
    the sweep's run ends so unless other processes still run trials (they end it); the same
    command continues the sweep."""
    from mlflow.exceptions import MlflowException

    try:
        if count_trials(study.get_trials(deepcopy=False)).running == 0:
            client.set_terminated(run_id, status)
    except MlflowException:
        pass  # the stop that brought us here is what the user must see
