"""lkflow.run_table: the table of runs that `lkflow runs` prints, sorted."""

from __future__ import annotations

import pandas as pd

from lkflow.run_table import sort_runs


def test_sorting_reads_numeric_params_as_numbers_and_flips_with_a_minus() -> None:
    table = pd.DataFrame({"run": ["a", "b", "c"], "epochs": ["10", "2", None]})
    assert list(sort_runs(table, "epochs")["run"]) == ["b", "a", "c"]
    assert list(sort_runs(table, "-epochs")["run"]) == ["a", "b", "c"]
    assert list(sort_runs(table, "-run")["run"]) == ["c", "b", "a"]
