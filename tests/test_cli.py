"""The `lkflow` command: train, runs, compare and serve on a real store; every user error."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from helpers import SQLITE_ONLY, STORES
from mlflow import MlflowClient
from servers import BIN, MIGRATED, Server, free_port, mlflow_server

from lkflow import LkflowError
from lkflow.cli import main

ROOT = Path(__file__).resolve().parents[1]
RINGS = f"{ROOT}/examples/rings.py:task"
HEAVY = ("torch", "pytorch_lightning", "mlflow", "pandas", "matplotlib")


def _invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def _one_error_line(result: Result) -> str:
    """The only output line of a failed command, which starts with 'Error: '."""
    assert result.exit_code != 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


@pytest.fixture(scope="module", params=STORES)
def store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """Two tracked runs of the rings task (lr 0.01 and 0.03), registered as rings-cli: in a
    sqlite file, and on an `mlflow server` of the module's own over a PostgreSQL database."""
    folder = tmp_path_factory.mktemp("store")
    with contextlib.ExitStack() as stack:
        if request.param == "sqlite":
            uri = f"sqlite:///{folder / 'mlflow.db'}"
        else:
            backend = request.getfixturevalue("postgres").create("cli", MIGRATED)
            uri = stack.enter_context(mlflow_server(backend, folder / "artifacts", folder))
        yield _trained(uri, folder)


def _trained(uri: str, folder: Path) -> str:
    """`uri`, once `lkflow train` has made the two runs in it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
            patch.delenv(name, raising=False)
        for run, lr in (("run-a", "0.01"), ("run-b", "0.03")):
            result = _invoke(
                "train", RINGS, "--epochs", "2", "--gpus", "0", "--lr", lr, "--seed", "1",
                "--run-name", run, "--experiment-name", "cli", "--tracking-uri", uri,
                "--registered-model-name", "rings-cli", "--param", f"note={run}",
            )  # fmt: skip
            assert result.exit_code == 0, result.output
            assert "Epoch 2/2" in result.output and "MLflow run " not in result.output
            _said_where_the_run_is(result.output, run, uri)
    return uri


def _said_where_the_run_is(output: str, run: str, uri: str) -> None:
    """The fit's last two lines, once: the run, its experiment and version, and its page."""
    version = "1" if run == "run-a" else "2"
    local = uri.startswith("sqlite:")
    store = f" in {uri}" if local else ""
    said = f"Logged run {run} to experiment 'cli'{store}; registered rings-cli version {version}."
    assert output.count(said) == 1, output
    base, how = ("http://127.0.0.1:5000", " with `mlflow ui`") if local else (uri, "")
    page = rf"{re.escape(base)}/#/experiments/\d+/runs/[0-9a-f]{{32}}\?workflowType="
    assert re.search(rf"\n{re.escape(said)}\nView run {run}{how} at: {page}", output), output


# ---- start-up -----------------------------------------------------------------------------


def test_the_command_imports_nothing_heavy_and_answers_help_at_once() -> None:
    code = "import sys, lkflow.cli; print([m for m in sys.argv[1:] if m in sys.modules])"
    loaded = subprocess.run([sys.executable, "-c", code, *HEAVY], capture_output=True, text=True)
    assert loaded.stdout.strip() == "[]", loaded.stderr
    command = (
        [str(BIN / "lkflow")] if (BIN / "lkflow").exists() else [sys.executable, "-m", "lkflow"]
    )
    start = time.perf_counter()
    done = subprocess.run([*command, "--help"], capture_output=True, text=True, check=True)
    elapsed = time.perf_counter() - start
    assert all(name in done.stdout for name in ("train", "runs", "compare", "serve"))
    assert elapsed < 2.0  # about 0.05 s on an idle machine; the bound leaves room for load


# ---- runs and compare ---------------------------------------------------------------------


def test_runs_lists_the_runs_with_params_and_best_metric(store: str) -> None:
    result = _invoke("runs", "cli", "--tracking-uri", store)
    assert result.exit_code == 0, result.output
    header, *rows = result.output.strip().splitlines()
    assert header.split() == [
        "run", "id", "status", "start", "duration", "task", "epochs", "batch_size", "lr",
        "seed", "task.note", "monitor", "best",
    ]  # fmt: skip
    assert [row.split()[0] for row in rows] == ["run-b", "run-a"]  # newest first
    assert all("FINISHED" in row and "val_loss" in row for row in rows)


def test_runs_as_csv_sorted_by_best_or_by_a_param(store: str) -> None:
    def table(*args: str) -> list[dict[str, str]]:
        result = _invoke("runs", "--csv", "--tracking-uri", store, *args)
        assert result.exit_code == 0, result.output
        return list(csv.DictReader(io.StringIO(result.output)))

    best_first = table("--sort", "best")
    assert [float(r["best"]) for r in best_first] == sorted(float(r["best"]) for r in best_first)
    assert [r["lr"] for r in table("--sort=-lr")] == ["0.03", "0.01"]
    assert [r["run"] for r in table("--max", "1")] == ["run-b"]
    assert float(best_first[0]["duration"]) > 0 and best_first[0]["epochs"] == "2"


def test_compare_writes_the_figure_and_marks_differing_params(store: str, tmp_path: Path) -> None:
    out = tmp_path / "figures" / "cmp.png"
    result = _invoke(
        "compare", "run-a", "run-b", "--metric", "val_acc", "--out", str(out),
        "--tracking-uri", store,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 10_000 and out.read_bytes()[:4] == b"\x89PNG"
    lines = result.output.splitlines()
    assert lines[0].split() == ["param", "run-a", "run-b"]
    assert re.search(r"^\* optimizer\.lr\s+0\.01\s+0\.03", result.output, re.MULTILINE)
    assert re.search(r"^\* task\.note\s+run-a\s+run-b", result.output, re.MULTILINE)
    assert re.search(r"^  epochs\s+2\s+2", result.output, re.MULTILINE)


def test_compare_finds_a_run_by_id_prefix(store: str) -> None:
    run = MlflowClient(store).search_runs(["1"], "attributes.run_name = 'run-a'")[0]
    result = _invoke("compare", run.info.run_id[:8], "--tracking-uri", store)
    assert result.exit_code == 0, result.output
    assert "Wrote val_loss curves of 1 runs to compare.png" in result.output


# ---- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "nowhere.py:task"], "target file 'nowhere.py', which does not exist"),
        (["train", "tasks.py:task"], r"tasks.py:task returned int. Expected lkflow.tasks.Task"),
        (["train", "tasks.py:tsk"], "tasks.py has no 'tsk'. Its functions and classes: task"),
        (["train", RINGS, "--epochs", "abc"], "Invalid value for '--epochs': 'abc' is not a valid"),
        (["train", RINGS, "--epochs", "١٠"], "Invalid value for '--epochs': '١٠' is not a valid"),
        (["train", RINGS, "--lr", "²"], "Invalid value for '--lr': '²' is not a valid float"),
        (["train", RINGS, "--param", "oops"], "Received: --param 'oops'. Expected key=value"),
        (["runs", "nope"], "experiment 'nope', which is not at STORE"),
        (["runs", "--sort", "nope"], "--sort 'nope'. Expected a column: run, id, status"),
        (["compare", "nope"], "run 'nope', which is no run name or id at STORE"),
        (["compare", "run-a", "--metric", "f1"], "'f1', which run run-a did not log. Its metrics"),
        (["serve", "nope"], "model 'nope', which is not registered at .* Registered .*rings-cli"),
        (["serve", "rings-cli/9"], "rings-cli has no such version or alias .* versions: 1, 2;"),
        (["serve", "rings-cli@best"], "rings-cli has no such version or alias"),
        (["serve", "a/b/c"], "Expected NAME, NAME/VERSION or NAME@ALIAS"),
        (["trian"], "No such command 'trian'. Did you mean 'train'?"),
    ],
)
def test_user_errors_print_one_line_and_exit_non_zero(
    store: str, tmp_path: Path, args: list[str], message: str
) -> None:
    (tmp_path / "tasks.py").write_text("def task(options):\n    return 3\n")
    result = _invoke(*args, *(["--tracking-uri", store] if args[0] != "trian" else []))
    assert re.search(message.replace("STORE", re.escape(store)), _one_error_line(result))


def test_a_missing_store_is_named_and_not_created(tmp_path: Path) -> None:
    result = _invoke("runs", "--tracking-uri", f"sqlite:///{tmp_path}/none.db")
    assert f"{tmp_path}/none.db does not exist" in _one_error_line(result)
    assert not (tmp_path / "none.db").exists()


@pytest.mark.parametrize("command", ["runs", "train", "serve"])
def test_an_unreachable_server_is_one_line_with_credentials_hidden(command: str) -> None:
    uri = f"http://alice:s3cret@127.0.0.1:{free_port()}"
    args = {"runs": [], "train": [RINGS], "serve": ["rings-cli"]}[command]
    line = _one_error_line(_invoke(command, *args, "--tracking-uri", uri))
    assert "Cannot reach the MLflow tracking server at http://***@127.0.0.1:" in line
    assert "s3cret" not in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@SQLITE_ONLY
def test_gpus_without_cuda_is_one_line(tracking_uri: str) -> None:
    line = _one_error_line(_invoke("train", RINGS, "--gpus", "1", "--epochs", "1"))
    assert "gpus='1', but CUDA is not available" in line and "gpus=0" in line


def test_debug_shows_the_traceback(store: str) -> None:
    result = _invoke("--debug", "runs", "nope", "--tracking-uri", store)
    assert isinstance(result.exception, LkflowError)


# ---- serve --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("store", ["sqlite"], indirect=True)  # the store's part: test_team.py
def test_serve_answers_the_example_request_with_thebest_version(store: str, tmp_path: Path) -> None:
    client = MlflowClient(store)
    runs = client.search_runs(["1"], order_by=["metrics.best_val_loss ASC"])
    port = free_port()
    env = {**os.environ, "PATH": "/usr/bin:/bin"}  # the command puts its own bin dir first
    command = [str(BIN / "lkflow"), "serve", "rings-cli", "--port", str(port)]
    server = Server(
        [*command, "--tracking-uri", store], tmp_path, f"http://127.0.0.1:{port}/ping", env
    )
    with server:
        printed = server.output()
        assert f"run {runs[0].info.run_id}) at http://127.0.0.1:{port}/invocations" in printed
        payload = re.search(r"-d '(.+)'", printed).group(1)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=payload.encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            predictions = json.load(response)["predictions"]
        assert len(predictions) == 1 and 0.0 <= predictions[0][0] <= 1.0


def test_servers_lkflow_starts_listen_on_localhost_by_default() -> None:
    from lkflow.cli import serve

    (host,) = [option for option in serve.params if option.name == "host"]
    assert host.default == "127.0.0.1"
    for path in (ROOT / "lkflow").rglob("*.py"):
        assert "0.0.0.0" not in path.read_text(), path.name
