"""The tracking store: URIs checked before a fit, a server that does not answer, and the
sqlite lock that lets several processes open one store."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import make_loaders, make_model
from servers import free_port

from lkflow.errors import LkflowError
from lkflow.tracking.store import check_tracking_uri


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
