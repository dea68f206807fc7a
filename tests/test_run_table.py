"""lkflow.run_table: the table of runs that `lkflow runs` prints, sorted."""

from __future__ import annotations

import pandas as pd
from mlflow import MlflowClient

from lkflow.run_table import runs_frame, sort_runs


def test_sorting_reads_numeric_params_as_numbers_and_flips_with_a_minus() -> None:
    table = pd.DataFrame({"run": ["a", "b", "c"], "epochs": ["10", "2", None]})
    assert list(sort_runs(table, "epochs")["run"]) == ["b", "a", "c"]
    assert list(sort_runs(table, "-epochs")["run"]) == ["a", "b", "c"]
    assert list(sort_runs(table, "-run")["run"]) == ["c", "b", "a"]


def test_every_run_shows_its_status_and_lr_also_before_the_fit_logged_its_optimizer(
    tracking_uri: str,
) -> None:
    client = MlflowClient(tracking_uri)
    runs = {  # name: (status, params): as `mlflow run -P lr=...` leaves a fit that failed early
        "failed": ("FAILED", {"lr": "0.02", "epochs": "5"}),
        "stuck": ("RUNNING", {"lr": "0.1"}),
        "done": ("FINISHED", {"lr": "0.01", "optimizer.lr": "0.010"}),
        "killed": ("KILLED", {}),
    }
    for name, (status, params) in runs.items():
        run_id = client.create_run("0", run_name=name).info.run_id
        for key, value in params.items():
            client.log_param(run_id, key, value)
        if status != "RUNNING":
            client.set_terminated(run_id, status)
    table = runs_frame(client.search_runs(["0"]), {}).set_index("run")
    assert table["status"].to_dict() == {name: status for name, (status, _) in runs.items()}
    lrs = {name: lr for name, lr in table["lr"].items() if pd.notna(lr)}
    assert lrs == {"failed": "0.02", "stuck": "0.1", "done": "0.010"}  # killed: no lr at all
