"""`lkflow sweep` end to end: a real sweep of the rings task into a real sqlite store and study (one
parent run with a child run per trial, pruning, the champion served), a sweep under `mlflow run`,
failed trials, bad input. Processes sharing a study, and stops: test_processes.py."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner, Result
from helpers import SQLITE_ONLY, Sweep, fresh_store, start_sweep, sweep_ended, sweep_of
from mlflow import MlflowClient
from optuna.trial import TrialState
from servers import bin_path_env, models_serve, post

from lkflow.cli import main

ROOT = Path(__file__).resolve().parents[2]
RINGS = f"{ROOT}/examples/rings.py:task"
SPACE = ("--space", "lr=loguniform(1e-4,1e-1)", "--space", "hidden=int(4,32,log)")
QUICK = ("--epochs", "2", "--gpus", "0", "--seed", "0", "--heartbeat", "1")
ROWS = ("--param", "rows=400")


def _invoke(*args: str) -> Result:
    return CliRunner().invoke(main, ["sweep", *args])


# ---- the rings task: 6 trials, 2 at a time, median pruning, the champion served -------------


@pytest.fixture(scope="module")
def rings_sweep(tmp_path_factory: pytest.TempPathFactory, migrated_store: Path) -> Iterator[Sweep]:
    """`lkflow sweep` of the rings task: 6 trials, 2 at a time, lr and hidden sampled, the median
    pruner after 1 complete trial. The study is created first with three trials enqueued, as
    Optuna users do: two good ones, then one whose lr barely moves, so that one trial surely
    falls behind the median at its first epoch, whatever the sampled ones do."""
    folder = tmp_path_factory.mktemp("rings-sweep")
    uri, storage = fresh_store(folder, migrated_store), f"sqlite:///{folder / 'sweep.db'}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="rings", storage=storage, direction="minimize")
    for lr, hidden in ((0.05, 16), (0.03, 8), (1e-4, 16)):
        study.enqueue_trial({"lr": lr, "hidden": hidden})
    args = ("--trials", "6", "--jobs", "2", "--startup-trials", "1", "--study", "rings")
    more = ("--experiment-name", "rings", "--registered-model-name", "rings-sweep")
    process = start_sweep(folder, uri, RINGS, *args, *SPACE, *QUICK, "--param", "rows=2000", *more)
    output = sweep_ended(process, folder)
    assert "Registered rings-sweep/1, alias champion: lkflow serve rings-sweep@champion" in output
    yield sweep_of(uri, storage, "rings")


@pytest.mark.slow
def test_one_parent_run_with_a_complete_child_run_per_trial(rings_sweep: Sweep) -> None:
    parent, children, study = rings_sweep.parent, rings_sweep.children, rings_sweep.study
    assert parent.info.status == "FINISHED" and len(children) == len(study.trials) == 6
    assert {run.data.tags["mlflow.parentRunId"] for run in children} == {parent.info.run_id}
    assert {run.info.experiment_id for run in children} == {parent.info.experiment_id}
    params = parent.data.params
    assert (
        params["space.lr"] == "loguniform(1e-4,1e-1)" and params["space.hidden"] == "int(4,32,log)"
    )
    assert params["pruner"] == "median" and params["startup_trials"] == "1"
    assert params["sampler"].startswith("TPESampler") and params["study"] == "rings"
    assert params["storage"].endswith("/sweep.db") and params["monitor"] == "val_loss"
    artifacts = {a.path for a in rings_sweep.client.list_artifacts(parent.info.run_id)}
    assert {"optimization_history.png", "parallel_coordinate.png"} <= artifacts
    for trial, run in zip(study.trials, children, strict=True):
        assert trial.user_attrs["lkflow.run_id"] == run.info.run_id
        assert run.data.params["task.hidden"] == str(trial.params["hidden"])
        assert float(run.data.params["optimizer.lr"]) == trial.params["lr"]
        files = {a.path for a in rings_sweep.client.list_artifacts(run.info.run_id)}
        assert {"checkpoints", "history.csv", "net", "summary.txt"} <= files


@pytest.mark.slow
def test_pruned_trials_keep_their_history_and_say_so(rings_sweep: Sweep) -> None:
    client, study = rings_sweep.client, rings_sweep.study
    states = [trial.state for trial in study.trials]
    assert states[2] == TrialState.PRUNED  # the lr that barely moves, behind at once
    for trial, run in zip(study.trials, rings_sweep.children, strict=True):
        steps = sorted(p.step for p in client.get_metric_history(run.info.run_id, "val_loss"))
        assert run.info.status == "FINISHED"
        if trial.state == TrialState.PRUNED:
            assert run.data.tags["lkflow.trial_state"] == "pruned"
            assert run.data.tags["lkflow.pruned_epoch"] == str(steps[-1])
            assert sorted(trial.intermediate_values) == steps  # reported at the history's epochs
            assert len(steps) < int(rings_sweep.parent.data.params["epochs"])
            assert "best_val_loss" in run.data.metrics
            checkpoints = client.list_artifacts(run.info.run_id, "checkpoints")
            assert any(a.path.endswith(".ckpt") and "last" not in a.path for a in checkpoints)
        else:
            assert trial.state == TrialState.COMPLETE and len(steps) == 2
            assert run.data.tags["lkflow.trial_state"] == "complete"
            assert trial.value == run.data.metrics["best_val_loss"]


@pytest.mark.slow
def test_the_best_is_the_lowest_best_val_loss_and_its_version_is_the_champion(
    rings_sweep: Sweep,
) -> None:
    client, parent = rings_sweep.client, rings_sweep.parent
    complete = [r for r in rings_sweep.children if r.data.tags["lkflow.trial_state"] == "complete"]
    best = min(complete, key=lambda run: run.data.metrics["best_val_loss"])
    assert parent.data.metrics["best_val_loss"] == best.data.metrics["best_val_loss"]
    assert rings_sweep.study.best_value == best.data.metrics["best_val_loss"]
    assert parent.data.tags["lkflow.sweep.best_run_id"] == best.info.run_id
    assert parent.data.tags["best.hidden"] == best.data.params["task.hidden"]
    (version,) = client.search_model_versions("name = 'rings-sweep'")  # the trials registered none
    assert version.run_id == best.info.run_id
    assert client.get_model_version_by_alias("rings-sweep", "champion").version == version.version
    assert version.tags["monitor"] == "val_loss" and version.tags["mode"] == "min"
    assert float(version.tags["monitor_value"]) == best.data.metrics["best_val_loss"]
    assert parent.data.tags["lkflow.sweep.champion"] == "rings-sweep/1"


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_the_champion(rings_sweep: Sweep, tmp_path: Path) -> None:
    env = {**bin_path_env(), "MLFLOW_TRACKING_URI": rings_sweep.client.tracking_uri}
    with models_serve("models:/rings-sweep@champion", tmp_path, env) as url:
        status, answer = post(f"{url}/invocations", {"inputs": [[5.0, 0.3], [8.1, -0.2]]})
    assert status == 200, answer
    assert len(answer["predictions"]) == 2
    assert all(0.0 <= row[0] <= 1.0 for row in answer["predictions"])


# ---- mlflow run, failures and bad input ----------------------------------------------------


@pytest.mark.slow
@SQLITE_ONLY
def test_under_mlflow_run_the_parent_is_the_run_mlflow_created(
    tmp_path: Path, tracking_uri: str, hooked: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = MlflowClient(tracking_uri)
    outer = client.create_run("0").info.run_id  # what `mlflow run` makes, then passes on
    client.log_param(outer, "epochs", "2")  # `mlflow run -P epochs=2` logs its params first
    monkeypatch.setenv("MLFLOW_RUN_ID", outer)
    result = _invoke(hooked, "--trials", "1", "--pruner", "hyperband", *SPACE, *QUICK, *ROWS)
    assert result.exit_code == 0, result.output
    sweep = sweep_of(tracking_uri, f"sqlite:///{tmp_path / 'sweep.db'}", f"{hooked}@{outer}")
    assert sweep.parent.info.run_id == outer and sweep.parent.data.params["space.lr"]
    assert sweep.parent.data.params["pruner"] == "hyperband"
    (child,) = sweep.children
    assert child.data.tags["mlflow.parentRunId"] == outer and child.info.run_id != outer
    assert "val_loss" in child.data.metrics and "val_loss" not in sweep.parent.data.metrics


@pytest.mark.slow
@SQLITE_ONLY
def test_failed_trials_end_failed_with_their_traceback_and_the_sweep_goes_on(
    tmp_path: Path, tracking_uri: str, hooked: str
) -> None:
    (tmp_path / "fail").touch()
    args = (hooked, "--study", "failing", *SPACE, *QUICK, *ROWS)
    failed = _invoke(*args, "--trials", "1")
    assert failed.exit_code == 1
    error = failed.output.strip().splitlines()[-1]
    assert error.startswith("Error: Every trial of sweep 'failing' failed. The first, trial 0")
    assert "ZeroDivisionError: the task failed on purpose. Its traceback" in error
    (tmp_path / "fail").unlink()
    assert _invoke(*args, "--trials", "2").exit_code == 0
    sweep = sweep_of(tracking_uri, f"sqlite:///{tmp_path / 'sweep.db'}", "failing")
    first, second = sweep.children
    assert (first.info.status, first.data.tags["lkflow.trial_state"]) == ("FAILED", "failed")
    assert first.data.tags["lkflow.error"] == "ZeroDivisionError: the task failed on purpose"
    traceback = Path(sweep.client.download_artifacts(first.info.run_id, "traceback.txt"))
    assert "raise ZeroDivisionError" in traceback.read_text()
    assert second.data.tags["lkflow.trial_state"] == "complete"
    assert (
        sweep.parent.info.status == "FINISHED" and sweep.parent.data.metrics["trials_failed"] == 1
    )
    assert "lkflow.error" not in sweep.parent.data.tags
    assert sweep.parent.data.tags["lkflow.previous_error"].startswith("Every trial of sweep")


@pytest.mark.slow
@SQLITE_ONLY
def test_a_best_trial_whose_model_cannot_answer_its_example_is_no_champion(
    tmp_path: Path, tracking_uri: str, hooked: str
) -> None:
    (tmp_path / "unservable").touch()
    args = (hooked, "--study", "unservable", "--trials", "1", *SPACE, *QUICK, *ROWS)
    with pytest.warns(UserWarning, match="no champion is registered") as warned:
        result = _invoke(*args, "--registered-model-name", "noisy")
    assert result.exit_code == 0, result.output
    assert any("Noisy is logged but not registered" in str(w.message) for w in warned)
    sweep = sweep_of(tracking_uri, f"sqlite:///{tmp_path / 'sweep.db'}", "unservable")
    (child,) = sweep.children
    assert child.data.tags["lkflow.trial_state"] == "complete"
    assert sweep.client.search_registered_models() == []
    assert "lkflow.sweep.champion" not in sweep.parent.data.tags


@SQLITE_ONLY
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--space", "lr=logunifrm(1e-4,1e-1)"), "unknown kind 'logunifrm'. Did you mean"),
        (("--space", "hidden=int(4,2)"), "Received: --space hidden=int(4,2): low=4 is not below"),
        ((), "no --space, and hooked.py has no space(trial) function"),
        (("--space", "lr=uniform(0,1)", "--storage", "sweep.db"), "Expected a database URL"),
    ],
)
def test_bad_input_is_one_line_before_any_run_or_study(
    tmp_path: Path, tracking_uri: str, hooked: str, args: tuple[str, ...], message: str
) -> None:
    result = _invoke(hooked, "--trials", "2", *args)
    assert result.exit_code == 1
    (line,) = result.output.strip().splitlines()
    assert line.startswith("Error: Received: ") and message in line
    assert MlflowClient(tracking_uri).search_runs(["0"]) == []
    assert not (tmp_path / "sweep.db").exists()


def test_import_lkflow_and_its_help_leave_optuna_unloaded() -> None:
    code = (
        "import sys, lkflow, lkflow.cli, lkflow.sweep\n"
        "from lkflow.cli import main\n"
        "for args in (['--help'], ['sweep', '--help']):\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('optuna' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "False"
    assert (
        "--space KEY=SPEC" in done.stdout and "lkflow sweep examples/rings.py:task" in done.stdout
    )


def test_without_optuna_the_command_says_how_to_install_it(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "sys.modules['optuna'] = None  # as where Optuna is not installed\n"
        "from lkflow.cli import main\n"
        f"main(['sweep', {RINGS!r}, '--trials', '1', '--space', 'lr=uniform(0.1,0.2)'])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "Error: lkflow sweep needs Optuna, which is not installed. Install it with "
        "pip install 'lkflow[sweep]' (or pip install optuna)."
    ]
    assert not (tmp_path / "mlflow.db").exists()
