"""Reliability: a killed fit resumed into its run, and concurrent writers of one sqlite store.

Fits in separate processes run `fit_worker.py` (written by the `worker` fixture of conftest.py);
every check of what a run holds goes through `MlflowClient`. Resuming from the last checkpoint
and loading with weights only are tested in test_checkpoints.py, SIGTERM in test_fit.py, bad
input in test_checks.py, param pairs in test_tasks.py and servers on localhost in test_cli.py.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
from helpers import Worker, finished, only_run, steps, wait_for
from mlflow import MlflowClient

# ---- fits in processes of their own -------------------------------------------------------


@pytest.mark.slow
def test_a_killed_fit_resumes_into_the_same_run_without_gaps_or_duplicates(
    tracking_uri: str, worker: Worker, tmp_path: Path, processes: list[subprocess.Popen]
) -> None:
    folder = tmp_path / "fit"
    first = worker.start(folder, uri=tracking_uri, epochs=6, stall_epoch=3, stall_s=600)
    processes.append(first)
    model, train, valid = worker.module().build()  # meanwhile: the same fit, never stopped
    reference = model.fit(train, valid, epochs=6, gpus=0, verbose=0, track=False, ckpt_dir="ref")
    wait_for(folder / "marker", first)  # in epoch 3, after epoch 2's checkpoint
    first.send_signal(signal.SIGKILL)
    first.wait()
    client = MlflowClient(tracking_uri)
    killed = only_run(client)
    assert killed.info.status == "RUNNING"  # nobody could end it
    assert steps(client, killed.info.run_id, "loss") == [1, 2, 3]

    second = worker.start(folder, uri=tracking_uri, epochs=6, ckpt_path="last")
    processes.append(second)
    resumed = finished(second, folder)
    assert resumed["run_id"] == killed.info.run_id
    history = resumed["history"]
    assert [row["epoch"] for row in history] == list(range(1, 7))
    # weights, optimizer momentum, the schedule and the epoch counter all went on
    for row, expected in zip(history, reference.to_dict("records"), strict=True):
        assert row == pytest.approx(expected, rel=1e-5)
    run = client.get_run(killed.info.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["epochs"] == "6"
    for key in ("loss", "val_loss", "lr"):
        logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert logged == [(row["epoch"], pytest.approx(row[key])) for row in history], key


@pytest.mark.slow
def test_three_fits_at_once_write_one_sqlite_store(
    worker: Worker, tmp_path: Path, processes: list[subprocess.Popen]
) -> None:
    # a user's first sweep: every process finds the file without tables, creates them or waits
    # for them, then writes beside the others
    uri = f"sqlite:///{tmp_path / 'sweep' / 'mlflow.db'}"
    settings = {"uri": uri, "epochs": 2, "experiment": "sweep", "registered": "sweep"}
    folders = [tmp_path / f"fit{i}" for i in range(3)]
    processes += [worker.start(folder, **settings) for folder in folders]
    outputs = [
        finished(process, folder) for process, folder in zip(processes, folders, strict=True)
    ]

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("sweep").experiment_id])
    assert sorted(run.info.run_id for run in runs) == sorted(out["run_id"] for out in outputs)
    for run, out in zip(
        sorted(runs, key=lambda run: run.info.run_id),
        sorted(outputs, key=lambda out: out["run_id"]),
        strict=True,
    ):
        assert run.info.status == "FINISHED"
        for key in ("loss", "val_loss", "lr"):
            logged = sorted(
                (m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)
            )
            assert logged == [(row["epoch"], pytest.approx(row[key])) for row in out["history"]]
    versions = client.search_model_versions("name = 'sweep'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3]
    assert {v.run_id for v in versions} == {run.info.run_id for run in runs}


# ---- bad input, tried on purpose ------------------------------------------------------------
# Covered elsewhere: a batch that is not (x, y) and shapes that do not fit the net (the layer
# named) (test_model.py); a metrics dict with a non-metric, epochs of 0, -1, 2.5 or "3", a
# monitor never logged and checkpoint folders no file can be created in (test_checks.py);
# every form of gpus, with hypothesis (test_devices.py); -P values of the wrong type under
# `mlflow run` (test_mlproject.py); a CLI target that does not exist or returns the wrong
# thing, param pairs (test_cli.py, test_tasks.py).
