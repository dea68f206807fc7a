"""The MLflow project: its files agree with pyproject.toml; `mlflow run` trains, tracks, fails well."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import SQLITE_ONLY
from mlflow import MlflowClient
from mlflow.models import Model
from servers import BIN

ROOT = Path(__file__).resolve().parents[1]

ENTRY_PARAMS = {
    "epochs": "int",
    "gpus": "string",
    "lr": "float",
    "batch_size": "int",
    "seed": "int",
    "registered_model_name": "string",
}


def _yaml(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def test_conda_env_names_the_dependencies_of_pyproject_and_its_sweep_extra() -> None:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in Python 3.11+")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    conda = _yaml("conda.yaml")["dependencies"]
    pip = next(item["pip"] for item in conda if isinstance(item, dict))
    sweep = project["optional-dependencies"]["sweep"]  # for the sweep entry point
    assert pip == [*project["dependencies"], "scikit-learn>=1.3", *sweep]  # the digits' too
    assert "python=3.11" in conda and "pip" in conda


def test_ci_tests_the_lower_bounds_that_pyproject_allows() -> None:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in Python 3.11+")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    dependencies = project["dependencies"] + project["optional-dependencies"]["sweep"]
    floors = dict(re.findall(r"^([\w-]+)>=([\d.]+)", "\n".join(dependencies), re.M))
    pinned = dict(re.findall(r"([\w-]+)==([\d.]+)", (ROOT / ".ci" / "run").read_text()))
    for name in ("pytorch-lightning", "mlflow", "torchmetrics", "optuna"):
        assert pinned[name] == floors[name] + ".0" * (2 - floors[name].count(".")), name


def test_entry_points_take_typed_params_and_run_the_checkouts_examples() -> None:
    project = _yaml("MLproject")
    assert project["name"] == "lkflow" and project["conda_env"] == "conda.yaml"
    main = project["entry_points"]["main"]["parameters"]
    assert {key: spec["type"] for key, spec in main.items()} == ENTRY_PARAMS
    defaults = {key: spec["default"] for key, spec in main.items()}
    assert defaults == {
        "epochs": 10,
        "gpus": "0",
        "lr": 0.01,
        "batch_size": 100,
        "seed": 123,
        "registered_model_name": "rings-net",
    }
    assert list(project["entry_points"]) == ["main", "digits", "tabular", "sweep"]
    for name, example in (("main", "rings"), ("digits", "digits"), ("tabular", "tabular")):
        entry = project["entry_points"][name]
        command = " ".join(entry["command"].split())
        assert command.startswith(f"python -m lkflow train examples/{example}.py:task --epochs")
        assert set(re.findall(r"{(\w+)}", command)) == set(entry["parameters"]) == set(ENTRY_PARAMS)
        assert (ROOT / "examples" / f"{example}.py").is_file()


def test_the_sweep_entry_point_sweeps_the_rings_task_with_typed_params() -> None:
    sweep = _yaml("MLproject")["entry_points"]["sweep"]
    types = {key: spec["type"] for key, spec in sweep["parameters"].items()}
    assert types == {
        "trials": "int",
        "jobs": "int",
        "epochs": "int",
        "pruner": "string",
        "gpus": "string",
        "registered_model_name": "string",
    }
    command = " ".join(sweep["command"].split())
    assert command.startswith("python -m lkflow sweep examples/rings.py:task --trials {trials}")
    assert set(re.findall(r"{(\w+)}", command)) == set(types)
    assert "--space" not in command  # the task file's space(trial)
    assert callable(getattr(_rings_module(), "space", None))


def _rings_module() -> object:
    import importlib.util

    spec = importlib.util.spec_from_file_location("mlproject_rings", ROOT / "examples" / "rings.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """The project's files, copied, so runs write their checkpoints outside the repository."""
    copy = tmp_path / "checkout"
    for name in ("MLproject", "conda.yaml", "pyproject.toml"):
        shutil.copy(ROOT / name, copy / name if copy.exists() else _mkdir(copy) / name)
    for folder in ("lkflow", "examples"):
        shutil.copytree(ROOT / folder, copy / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def _mlflow_run(checkout: Path, tracking_uri: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])  # `python` of this venv
    command = [str(BIN / "mlflow"), "run", str(checkout), "--env-manager", "local", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.slow
@SQLITE_ONLY
def test_mlflow_run_main_logs_into_one_run_and_registers_the_net(
    checkout: Path, tracking_uri: str
) -> None:
    done = _mlflow_run(checkout, tracking_uri, "--experiment-name", "rings", "-P", "epochs=2")
    assert done.returncode == 0, done.stdout + done.stderr
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("rings")  # MLflow made it; the fit tagged it
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    said = f"Logged run {run.info.run_name} to experiment 'rings' in {tracking_uri}; "
    assert f"\n{said}registered rings-net version 1.\n" in done.stdout
    params = run.data.params
    expected = {"epochs": "2", "gpus": "0", "lr": "0.01", "batch_size": "100", "seed": "123"}
    assert {key: params[key] for key in expected} == expected
    assert params["registered_model_name"] == "rings-net"
    assert params["task"] == "examples/rings.py:task" and params["optimizer.lr"] == "0.01"
    for metric in ("loss", "acc", "val_loss", "val_acc"):
        history = client.get_metric_history(run.info.run_id, metric)
        assert [point.step for point in history] == [1, 2]
    (version,) = client.search_model_versions("name = 'rings-net'")
    assert version.run_id == run.info.run_id and version.tags["monitor"] == "val_loss"
    assert [a.path for a in client.list_artifacts(run.info.run_id, "report")] == [
        "report/predictions.png"
    ]


@pytest.mark.slow
@SQLITE_ONLY
def test_mlflow_run_digits_passes_95_percent_validation_accuracy(
    checkout: Path, tracking_uri: str
) -> None:
    done = _mlflow_run(checkout, tracking_uri, "-e", "digits", "-P", "epochs=6")
    assert done.returncode == 0, done.stdout + done.stderr
    (run,) = MlflowClient(tracking_uri).search_runs(["0"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["best_val_acc"] > 0.95
    assert run.data.params["task"] == "examples/digits.py:task"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("param", "message"),
    [
        ("gpus=1", "Error: Received: gpus='1', but CUDA is not available on this machine"),
        ("epochs=abc", "Error: Invalid value for '--epochs': 'abc' is not a valid integer."),
    ],
)
@SQLITE_ONLY
def test_mlflow_run_with_a_bad_param_fails_with_one_clear_line(
    checkout: Path, tracking_uri: str, param: str, message: str
) -> None:
    if param.startswith("gpus") and torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    done = _mlflow_run(checkout, tracking_uri, "-P", param)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert [line for line in output.splitlines() if line.startswith("Error: ")] == [
        next(line for line in output.splitlines() if line.startswith(message))
    ]
    assert "Traceback" not in output
    (run,) = MlflowClient(tracking_uri).search_runs(["0"])
    assert run.info.status == "FAILED"


def _torch_wheels() -> Path | None:
    """A folder of this torch's wheels that pip's own configuration finds (`find-links`)."""
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True
    ).stdout
    version = torch.__version__.split("+")[0]
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        if key.endswith("find-links"):
            for folder in value.strip("'\"").split():
                if any(Path(folder).glob(f"torch-{version}*.whl")):
                    return Path(folder)
    return None


@pytest.mark.slow
@pytest.mark.network
@SQLITE_ONLY
def test_mlflow_run_with_uv_builds_conda_yamls_environment_where_the_entry_points_run(
    checkout: Path, tracking_uri: str, tmp_path: Path
) -> None:
    wheels = _torch_wheels()
    if wheels is None:
        pytest.skip(
            "pip's configuration names no folder of torch wheels (find-links): uv would "
            "download a CUDA build of torch of several GB"
        )
    if not (BIN / "uv").exists():
        pytest.skip("uv is not installed: pip install -e '.[test]'")
    constraint = tmp_path / "constraints.txt"
    constraint.write_text(f"torch=={torch.__version__.split('+')[0]}\n")  # this CPU build
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "MLFLOW_ENV_ROOT": str(tmp_path / "envs"),
        "UV_FIND_LINKS": str(wheels),
        "UV_CONSTRAINT": str(constraint),
        "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")]),  # uv, and no conda
    }
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # uv leaves no bytecode: the first run writes it
    # Each part of conda.yaml: lkflow's dependencies (tabular; main imports nothing more and runs
    # with --env-manager local above), scikit-learn's digits, and Optuna's sweep of the rings
    entries = {"tabular": ["epochs=3"], "digits": ["epochs=1"], "sweep": ["epochs=1", "trials=2"]}
    for entry, params in entries.items():
        command = [str(BIN / "mlflow"), "run", str(checkout), "--env-manager", "uv", "-e", entry]
        command += ["--experiment-name", entry, *(f"-P{param}" for param in params)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    client = MlflowClient(tracking_uri)
    runs = {}
    for entry, name in (("tabular", "tabular-net"), ("digits", "digits-cnn")):
        (run,) = client.search_runs([client.get_experiment_by_name(entry).experiment_id])
        assert run.info.status == "FINISHED" and run.data.params["registered_model_name"] == name
        assert run.data.params["task"] == f"examples/{entry}.py:task"
        (version,) = client.search_model_versions(f"run_id = '{run.info.run_id}'")
        assert version.name == name
        runs[entry] = run
    assert runs["tabular"].data.metrics["best_val_acc"] > 0.9  # the README's claim, 3 epochs
    signature = Model.load("models:/tabular-net/1").signature
    assert signature.inputs.input_names() == ["x_num", "x_cat"]  # two named inputs
    runs = client.search_runs([client.get_experiment_by_name("sweep").experiment_id])
    (parent,) = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    children = [run for run in runs if run is not parent]
    assert [run.data.tags["mlflow.parentRunId"] for run in children] == [parent.info.run_id] * 2
    assert all(run.info.status == "FINISHED" for run in runs)
    champion = client.get_model_version_by_alias("rings-net", "champion")
    assert champion.run_id in {run.info.run_id for run in children}
    (environment,) = (tmp_path / "envs").iterdir()  # built once, from conda.yaml alone
    installed = {
        path.name.split("-")[0].lower()
        for path in environment.glob("lib/python*/site-packages/*.dist-info")
    }
    assert {"torch", "pytorch_lightning", "mlflow", "scikit_learn", "optuna"} <= installed
    assert not installed & {"lkflow", "pytest", "hypothesis"}  # not this environment's packages
