"""Tasks for `lkflow train`: options, loading a target, checking what it returns, a tracked run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mlflow import MlflowClient
from torch import nn
from torch.utils.data import DataLoader

from lkflow import LightModel, LkflowError
from lkflow.tasks import Task, TaskOptions, build_task, load_task, parse_params, run_task

ROOT = Path(__file__).resolve().parents[1]
DIGITS = f"{ROOT}/examples/digits.py:task"


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ---- options ----------------------------------------------------------------------------


def test_param_converts_to_the_type_of_the_default() -> None:
    options = TaskOptions(params={"hidden": "32", "dropout": "0.5", "bn": "Yes", "act": "gelu"})
    assert options.param("hidden", 16) == 32
    assert options.param("dropout", 0.0) == 0.5
    assert options.param("bn", False) is True
    assert options.param("act", "relu") == "gelu"
    assert options.param("missing", 7) == 7


@pytest.mark.parametrize(
    ("text", "default", "expected"),
    [
        ("abc", 16, "an int"),
        ("1.5", 16, "an int"),
        ("x", 0.1, "a float"),
        ("maybe", False, "true or false"),
        ("١٦", 16, "an int"),  # int() would read Arabic-Indic digits as 16
        ("1_000", 16, "an int"),
        ("٠.٥", 0.1, "a float"),
    ],
)
def test_param_names_key_value_and_type_when_it_does_not_convert(
    text: str, default: int | bool, expected: str
) -> None:
    with pytest.raises(LkflowError, match=rf"--param hidden={text}\. Expected {expected}"):
        TaskOptions(params={"hidden": text}).param("hidden", default)


def test_parse_params_keeps_equals_signs_in_values_and_rejects_pairs_without_key() -> None:
    assert parse_params(["a=1", "url=x?y=z", "a=2"]) == {"a": "2", "url": "x?y=z"}
    for bad in ("novalue", "=3"):
        with pytest.raises(LkflowError, match="Expected key=value"):
            parse_params([bad])


# ---- load_task --------------------------------------------------------------------------


def test_load_task_from_a_file_and_from_a_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write(tmp_path / "mytasks" / "helper.py", "FACTOR = 3\n")
    _write(
        tmp_path / "mytasks" / "job.py", "from helper import FACTOR\ndef task(o): return FACTOR\n"
    )
    assert load_task("mytasks/job.py:task")(TaskOptions()) == 3  # its folder joins sys.path
    _write(tmp_path / "pkg" / "__init__.py", "")
    _write(tmp_path / "pkg" / "jobs.py", "def task(o): return 'from module'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_task("pkg.jobs:task")(TaskOptions()) == "from module"


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("examples/rings.py", "Expected 'path/to/file.py:function'"),
        ("rings.py:", "Expected 'path/to/file.py:function'"),
        ("missing.py:task", r"target file 'missing.py', which does not exist"),
        ("nopkg.jobs:task", "no module named 'nopkg' on sys.path"),
        ("jobs.py:taks", r"jobs.py has no 'taks'. Its functions and classes: build, task"),
        ("jobs.py:SIZE", r"which is not callable \(int\)"),
    ],
)
def test_load_task_says_what_is_wrong_with_the_target(
    tmp_path: Path, target: str, message: str
) -> None:
    _write(tmp_path / "jobs.py", "SIZE = 3\ndef task(o): ...\ndef build(): ...\n")
    with pytest.raises(LkflowError, match=message):
        load_task(target)


def test_a_missing_import_inside_the_task_module_keeps_its_own_error(tmp_path: Path) -> None:
    _write(tmp_path / "broken.py", "import not_installed_anywhere\ndef task(o): ...\n")
    with pytest.raises(ModuleNotFoundError, match="not_installed_anywhere"):
        load_task("broken.py:task")


# ---- build_task -------------------------------------------------------------------------


def _model() -> LightModel:
    return LightModel(nn.Linear(2, 1), loss_fn=nn.MSELoss())


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        ({"model": 1}, r"returned dict\. Expected lkflow.tasks.Task"),
        (Task(nn.Linear(2, 1), DataLoader([])), r"Task\(model=Linear\)\. Expected an lkflow"),
        (Task(_model(), DataLoader([]), fit_kwargs={"epochs": 3}), "fit_kwargs with epochs"),
        (Task(_model(), DataLoader([]), report="cm.png"), r"Task\(report='cm.png'\)"),
    ],
)
def test_build_task_rejects_what_breaks_the_contract(returned: object, message: str) -> None:
    with pytest.raises(LkflowError, match=message):
        build_task(lambda options: returned, TaskOptions(), "jobs.py:task")


def test_build_task_passes_the_options() -> None:
    seen: list[TaskOptions] = []
    options = TaskOptions(lr=0.1, batch_size=8, seed=1, params={"k": "v"})
    task = build_task(
        lambda o: seen.append(o) or Task(_model(), DataLoader([])), options, "jobs.py:task"
    )
    assert seen == [options]
    assert isinstance(task.model, LightModel)


# ---- run_task ---------------------------------------------------------------------------


def test_run_task_seeds_fits_tracks_and_logs_params_and_report(tracking_uri: str) -> None:
    options = TaskOptions(lr=0.005, batch_size=128, seed=7, params={"channels": "4"})
    task = run_task(DIGITS, options, epochs=1, gpus=0, run_name="tiny", registered_model_name=False)
    run = MlflowClient(tracking_uri).get_run(task.model.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    params = run.data.params
    assert params["task"] == DIGITS and params["task.channels"] == "4"
    assert params["seed"] == "7" and params["batch_size"] == "128"
    assert float(params["optimizer.lr"]) == 0.005
    assert task.model.net[0].out_channels == 4
    artifacts = [
        a.path for a in MlflowClient(tracking_uri).list_artifacts(run.info.run_id, "report")
    ]
    assert artifacts == ["report/confusion_matrix.png"]


_KEYS = st.text(alphabet=st.characters(blacklist_characters="=", blacklist_categories=["Cs"]))


@given(_KEYS.filter(lambda key: key.strip()), st.text())
def test_param_pairs_split_at_the_first_equals_sign(key: str, value: str) -> None:
    assert parse_params([f"{key}={value}"]) == {key.strip(): value}


@given(st.text().filter(lambda pair: "=" not in pair or not pair.partition("=")[0].strip()))
def test_param_pairs_without_a_key_are_refused_by_name(pair: str) -> None:
    with pytest.raises(LkflowError, match=re.escape(f"--param {pair!r}. Expected key=value")):
        parse_params([pair])
