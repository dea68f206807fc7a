"""Sweeps across processes: two `lkflow sweep` processes on one study (on a sqlite file and on a
PostgreSQL study with a PostgreSQL-backed tracking server), one of them killed mid-trial, and a
sweep stopped with Ctrl-C that the same command continues."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from helpers import SQLITE_ONLY, start_sweep, sweep_ended, sweep_of, wait_for
from optuna.trial import TrialState

from lkflow.cli import main

SPACE = ("--space", "lr=loguniform(1e-4,1e-1)", "--space", "hidden=int(4,32,log)")
QUICK = ("--epochs", "2", "--gpus", "0", "--seed", "0", "--heartbeat", "1")
ROWS = ("--param", "rows=400")


def _invoke(*args: str) -> Result:
    return CliRunner().invoke(main, ["sweep", *args])


def _study_storage(request: pytest.FixtureRequest, tracking_uri: str, folder: Path) -> str:
    """The study's database: sqlite beside a sqlite store; beside the PostgreSQL-backed
    tracking server, a PostgreSQL database of the same cluster, as a team would share it."""
    if not tracking_uri.startswith("http"):
        return f"sqlite:///{folder / 'sweep.db'}"
    postgres = request.getfixturevalue("postgres")
    uri = postgres.create(f"optuna_{folder.name.lower()}"[:63])
    return uri.replace("postgresql://", "postgresql+psycopg://", 1)


@pytest.mark.slow
def test_two_processes_share_a_study_and_one_retries_the_trial_of_the_other_killed(
    tmp_path: Path, tracking_uri: str, hooked: str, request: pytest.FixtureRequest
) -> None:
    """Both start at once, each starts a trial (the barrier), one is killed mid-trial: the other
    finds its trial silent, ends its run KILLED, runs it again, and finishes the study."""
    storage = _study_storage(request, tracking_uri, tmp_path)
    args = (hooked, "--trials", "2", "--study", "shared", "--storage", storage)
    args += (*SPACE, *QUICK, *ROWS)
    killed = start_sweep(tmp_path, tracking_uri, *args, SWEEP_BARRIER="2", SWEEP_STALL="1")
    other = start_sweep(tmp_path, tracking_uri, *args, SWEEP_BARRIER="2")
    wait_for(tmp_path / "stalled", killed)
    killed.send_signal(signal.SIGKILL)  # its run and its trial are left RUNNING
    killed.wait()
    output = sweep_ended(other, tmp_path)
    sweep = sweep_of(tracking_uri, storage, "shared")
    assert len(list(tmp_path.glob("started-*"))) == 2  # each process started a trial
    lost = next(t for t in sweep.study.trials if t.state == TrialState.FAIL)
    assert f"Trial {lost.number} stopped with its process (no heartbeat)" in output
    (retry,) = [t for t in sweep.study.trials if t.user_attrs.get("lkflow.retry_of") == lost.number]
    assert retry.params == lost.params and retry.state == TrialState.COMPLETE
    assert sorted(t.state for t in sweep.study.trials) == sorted(
        [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL]
    )
    assert {r.data.tags["mlflow.parentRunId"] for r in sweep.children} == {sweep.parent.info.run_id}
    states = {
        r.data.tags["lkflow.sweep.trial"]: r.data.tags["lkflow.trial_state"] for r in sweep.children
    }
    assert states.pop(str(lost.number)) == "killed" and set(states.values()) == {"complete"}
    lost_run = sweep.client.get_run(lost.user_attrs["lkflow.run_id"])
    assert lost_run.info.status == "KILLED"
    assert (
        sweep.parent.info.status == "FINISHED" and sweep.parent.data.metrics["trials_killed"] == 1
    )
    assert len(sweep.client.search_model_versions("name = 'Net'")) == 1


@pytest.mark.slow
@SQLITE_ONLY
def test_ctrl_c_ends_the_trial_and_the_sweep_killed_and_the_same_command_continues(
    tmp_path: Path, tracking_uri: str, hooked: str
) -> None:
    args = (hooked, "--trials", "1", "--study", "ctrl-c", *SPACE, *QUICK, *ROWS)
    (tmp_path / "interrupt").touch()
    sigint = signal.getsignal(signal.SIGINT)
    try:
        stopped = _invoke(*args)
    finally:
        signal.signal(signal.SIGINT, sigint)  # Lightning ignores SIGINT after a Ctrl-C
    assert stopped.exit_code == 1 and "Aborted!" in stopped.output
    storage = f"sqlite:///{tmp_path / 'sweep.db'}"
    sweep = sweep_of(tracking_uri, storage, "ctrl-c")
    (child,) = sweep.children
    assert (child.info.status, child.data.tags["lkflow.trial_state"]) == ("KILLED", "killed")
    assert sweep.parent.info.status == "KILLED"
    assert [t.state for t in sweep.study.trials] == [TrialState.FAIL, TrialState.WAITING]

    (tmp_path / "interrupt").unlink()
    assert _invoke(*args).exit_code == 0
    sweep = sweep_of(tracking_uri, storage, "ctrl-c")
    assert sweep.parent.info.status == "FINISHED"
    assert [t.state for t in sweep.study.trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert sweep.study.trials[1].params == sweep.study.trials[0].params
