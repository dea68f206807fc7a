"""The Optuna side of a sweep: the storage's checks, the study's direction, which trials count."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from lkflow import LkflowError
from lkflow.sweep.study import (
    STATE_ATTR,
    check_storage,
    count_trials,
    create_study,
    default_storage,
    find_study,
    make_pruner,
    make_sampler,
    next_step,
    open_storage,
    retry,
)

pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage")


def _storage(url: str) -> optuna.storages.RDBStorage:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return open_storage(url, heartbeat_s=1, on_stale=lambda study, trial: None)


def _open(url: str, direction: str = "minimize") -> optuna.Study:
    storage = _storage(url)
    found = find_study(storage, "s", direction, *_sampler_and_pruner())
    return found or create_study(storage, "s", direction, *_sampler_and_pruner())


def _sampler_and_pruner() -> tuple[optuna.samplers.BaseSampler, optuna.pruners.BasePruner]:
    return make_sampler()[0], make_pruner("median", 5)[0]


def test_killed_trials_do_not_count_and_their_retries_do(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'sweep.db'}"
    study = _open(url)
    assert create_study(_storage(url), "s", "minimize", *_sampler_and_pruner()) is None
    complete, pruned, failed, interrupted, stale, running = (study.ask() for _ in range(6))
    for trial in (complete, pruned, failed, interrupted, stale, running):
        trial.suggest_float("lr", 0.1, 0.2)
    study.tell(complete, 0.5)
    study.tell(pruned, state=TrialState.PRUNED)
    failed.set_user_attr(STATE_ATTR, "failed")
    study.tell(failed, state=TrialState.FAIL)
    interrupted.set_user_attr(STATE_ATTR, "killed")  # as a Ctrl-C'd trial leaves itself
    retry(study, interrupted)
    study.tell(interrupted, state=TrialState.FAIL)
    study.tell(stale, state=TrialState.FAIL)  # as the heartbeat fails it, then retries it
    retry(study, study.trials[stale.number])
    counts = count_trials(study.get_trials(deepcopy=False))
    assert (counts.complete, counts.pruned, counts.failed, counts.killed) == (1, 1, 1, 2)
    assert (counts.running, counts.waiting, counts.counted) == (1, 2, 6)
    assert next_step(counts, trials=3) == "run"  # the retries wait
    again = study.ask()  # a retry: the killed trial's params are what it samples
    assert again.suggest_float("lr", 0.1, 0.2) == interrupted.params["lr"]
    assert again.user_attrs["lkflow.retry_of"] == interrupted.number


def test_a_process_runs_while_fewer_count_waits_while_others_run_then_stops(
    tmp_path: Path,
) -> None:
    study = _open(f"sqlite:///{tmp_path / 'sweep.db'}")
    assert next_step(count_trials(study.trials), 2) == "run"
    first, second = study.ask(), study.ask()
    assert next_step(count_trials(study.trials), 2) == "wait"
    study.tell(first, 0.1)
    study.tell(second, state=TrialState.PRUNED)
    assert next_step(count_trials(study.trials), 2) == "done"
    assert next_step(count_trials(study.trials), 3) == "run"  # the same study, more trials


def test_a_study_keeps_its_direction(tmp_path: Path) -> None:
    _open(f"sqlite:///{tmp_path / 'sweep.db'}", "minimize")
    with pytest.raises(LkflowError, match="'s', which minimizes its value, but this sweep"):
        _open(f"sqlite:///{tmp_path / 'sweep.db'}", "maximize")


def test_the_default_storage_is_beside_a_sqlite_tracking_store(tmp_path: Path) -> None:
    assert default_storage(f"sqlite:///{tmp_path}/mlflow.db") == f"sqlite:///{tmp_path}/sweep.db"
    assert default_storage("http://127.0.0.1:5000") == "sqlite:///sweep.db"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sweep.db", "Expected a database URL, such as sqlite:///sweep.db"),
        ("sqlite://sweep.db", "three slashes"),
        ("sqlite:///no/such/folder/sweep.db", "does not exist"),
    ],
)
def test_a_bad_storage_is_named(url: str, message: str) -> None:
    with pytest.raises(LkflowError) as error:
        check_storage(url)
    assert message in str(error.value)


def test_a_database_that_cannot_be_opened_is_named_without_its_password() -> None:
    # no driver installed, or nothing listening on port 1: either way one clear error
    with pytest.raises(LkflowError, match=r"^Cannot open the study storage") as error:
        _open("postgresql://bob:hunter2@127.0.0.1:1/optuna")
    assert "hunter2" not in str(error.value) and "postgresql://***@127.0.0.1:1/optuna" in str(
        error.value
    )


def test_a_folder_in_place_of_the_sqlite_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "sweep.db").mkdir()
    with pytest.raises(LkflowError, match="is a folder"):
        check_storage(f"sqlite:///{tmp_path / 'sweep.db'}")
