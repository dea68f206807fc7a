"""The tracking store: URIs checked before a fit, a server that does not answer, and the
sqlite lock that lets several processes open one store."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import make_loaders, make_model
from servers import free_port

from lkflow.cli import main
from lkflow.errors import LkflowError
from lkflow.tracking.store import (
    check_sqlite_file,
    check_tracking_uri,
    run_url,
    tracking_client,
    ui_command,
)


@pytest.mark.parametrize(
    ("uri", "meant"),
    [
        ("sqlite:/mlflow.db", "sqlite:///mlflow.db"),
        ("sqlite://mlflow.db", "sqlite:///mlflow.db"),
        ("sqllite:///mlflow.db", "sqlite:///mlflow.db"),
        ("mlflow.db", "sqlite:///mlflow.db"),
        ("htp://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("http:/127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("http//127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("localhost:5000", "http://localhost:5000"),
        ("htps://alice:s3cret@mlflow.example.com", "https://***@mlflow.example.com"),
        ("file:./mlruns", None),
        ("./mlruns", None),
    ],
)
def test_a_tracking_uri_typo_is_one_line_naming_it_and_the_accepted_forms(
    uri: str, meant: str | None
) -> None:
    with pytest.raises(LkflowError) as raised:
        check_tracking_uri(uri)
    message = str(raised.value)
    assert "\n" not in message and "s3cret" not in message
    shown = uri.replace("alice:s3cret", "***")
    assert message.startswith(f"Received: tracking URI {shown!r}. Expected sqlite:///mlflow.db")
    assert "http://host:port" in message and "MLFLOW_TRACKING_URI" in message
    if meant is None:
        assert "MLFLOW_ALLOW_FILE_STORE=true" in message
    else:
        assert f"Did you mean {meant!r}?" in message


@pytest.mark.parametrize(
    "uri",
    [
        "sqlite:///mlflow.db",
        "sqlite:////tmp/runs/mlflow.db",
        "http://127.0.0.1:5000",
        "https://alice:s3cret@mlflow.example.com/prefix",
        "postgresql://mlflow@db.example.com/mlflow",
        "mysql+pymysql://mlflow@db/mlflow",
        "databricks",
        "databricks://profile",
    ],
)
def test_tracking_uris_mlflow_opens_pass(uri: str) -> None:
    check_tracking_uri(uri)


def test_a_file_store_passes_where_mlflow_is_told_to_open_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    check_tracking_uri("file:./mlruns")


def test_a_tracking_uri_typo_fails_the_fit_before_training(tmp_path: Path) -> None:
    model = make_model()
    with pytest.raises(LkflowError, match=r"tracking URI 'sqlite:/mlflow\.db'.*sqlite:///"):
        model.fit(*make_loaders(), epochs=1, gpus=0, verbose=0, tracking_uri="sqlite:/mlflow.db")
    assert model.history == []
    assert not list(tmp_path.glob("*.db"))


def test_an_unreachable_server_stops_the_fit_before_training(tmp_path: Path) -> None:
    port = free_port()
    model = make_model()
    uri = f"http://user:secret@127.0.0.1:{port}"
    with pytest.raises(
        LkflowError, match=rf"Cannot reach .* at http://\*\*\*@127\.0\.0\.1:{port}"
    ) as raised:
        model.fit(*make_loaders(), epochs=2, gpus=0, verbose=0, tracking_uri=uri)
    assert "secret" not in str(raised.value) and "tracking_uri=" in str(raised.value)
    assert model.history == [] and list(tmp_path.rglob("*.ckpt")) == []
    assert not (tmp_path / "mlruns-outbox").exists()


@pytest.mark.slow
def test_the_sqlite_migration_lock_is_one_file_beside_each_store(
    tmp_path: Path, migrated_store: Path
) -> None:
    temporary, work = tmp_path / "tmp", tmp_path / "work"
    for folder in (temporary, work / "b"):
        folder.mkdir(parents=True)
    shutil.copy(migrated_store, work / "a.db")
    shutil.copy(migrated_store, work / "b" / "b.db")
    code = (
        "from lkflow.tracking.store import tracking_client\n"
        "for uri in ('sqlite:///a.db', 'sqlite:///b/b.db', 'sqlite:///a.db'):\n"
        "    tracking_client(uri).search_experiments()\n"
    )
    for _ in range(2):
        subprocess.run(
            [sys.executable, "-c", code],
            cwd=work,
            env={**os.environ, "TMPDIR": str(temporary)},
            check=True,
        )
    assert list(temporary.iterdir()) == []
    locks = sorted(p.relative_to(work).as_posix() for p in work.rglob("*.lock"))
    assert locks == ["a.db.lock", "b/b.db.lock"]


def _not_a_database(path: Path, kind: str) -> None:
    if kind == "folder":
        path.mkdir()
    else:
        path.write_text("run,loss\n1,0.5\n")


@pytest.mark.parametrize("kind", ["folder", "text file"])
def test_a_mlflow_db_that_is_not_a_sqlite_database_fails_the_fit_at_once(
    tmp_path: Path, kind: str
) -> None:
    path = tmp_path / "mlflow.db"  # the default store, sqlite:///mlflow.db
    _not_a_database(path, kind)
    model = make_model()
    started = time.monotonic()
    with pytest.raises(LkflowError) as raised:
        model.fit(*make_loaders(), epochs=1, gpus=0, verbose=0)
    assert time.monotonic() - started < 30  # not MLflow's 100 seconds of retries
    message = str(raised.value)
    found = "a folder" if kind == "folder" else "a file that is not a sqlite database"
    assert f"but {path} is {found}" in message
    assert "Move it out of the way" in message and "MLFLOW_TRACKING_URI" in message
    assert model.history == [] and not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize("kind", ["folder", "text file"])
def test_lkflow_runs_on_a_mlflow_db_that_is_not_a_sqlite_database_is_one_line(
    tmp_path: Path, kind: str
) -> None:
    _not_a_database(tmp_path / "mlflow.db", kind)
    result = CliRunner().invoke(main, ["runs"])
    assert result.exit_code == 1
    (line,) = result.output.splitlines()
    assert line.startswith("Error: Received: tracking URI 'sqlite:///")
    assert f"{tmp_path / 'mlflow.db'} is a " in line and "Move it out of the way" in line


def test_an_empty_or_real_sqlite_file_passes_the_store_check(
    tmp_path: Path, migrated_store: Path
) -> None:
    (tmp_path / "empty.db").touch()  # MLflow makes its tables in it
    check_sqlite_file(f"sqlite:///{tmp_path / 'empty.db'}")
    check_sqlite_file(f"sqlite:///{migrated_store}")
    check_sqlite_file(f"sqlite:///{tmp_path / 'missing.db'}")


def test_a_store_is_opened_in_a_new_folder_or_names_the_folder_it_cannot_make(
    tmp_path: Path,
) -> None:
    client = tracking_client(f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}")
    assert [e.name for e in client.search_experiments()] == ["Default"]
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["mlflow.db", "mlflow.db.lock"]
    (tmp_path / "file").write_text("")
    with pytest.raises(LkflowError, match=r"whose folder .*file/sub cannot be created"):
        tracking_client(f"sqlite:///{tmp_path / 'file' / 'sub' / 'mlflow.db'}")


def test_the_run_page_is_named_for_a_server_and_for_a_local_store(tmp_path: Path) -> None:
    assert run_url("https://bob:pw@mlflow.example/base/", "2", "ab") == (
        "https://mlflow.example/base/#/experiments/2/runs/ab?workflowType=machine_learning"
    )
    assert run_url(f"sqlite:///{tmp_path / 'mlflow.db'}", "2", "ab") is None
    assert ui_command("sqlite:///mlflow.db") == "mlflow ui"  # the working folder's: the default
    assert ui_command(f"sqlite:///{tmp_path / 'mlflow.db'}") == "mlflow ui"  # the same file
    other = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert ui_command(other) == f"mlflow ui --backend-store-uri {other}"
    assert ui_command("postgresql://bob:pw@db/mlflow") == (
        "mlflow ui --backend-store-uri postgresql://***@db/mlflow"
    )
    assert ui_command("http://127.0.0.1:5000") is None
