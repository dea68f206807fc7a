"""What lkflow prints never shows the password of a tracking URI."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from helpers import fresh_store
from mlflow import MlflowClient
from servers import BIN, bin_path_env, mlflow_server

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_lkflow_train_prints_the_run_link_without_the_uris_password(
    tmp_path: Path, migrated_store: Path
) -> None:
    with mlflow_server(fresh_store(tmp_path, migrated_store), tmp_path / "art", tmp_path) as url:
        secret_uri = url.replace("http://", "http://alice:S3cretPW@")
        command = [str(BIN / "lkflow"), "train", str(ROOT / "examples" / "rings.py:task")]
        done = subprocess.run(
            [*command, "--epochs", "1", "--gpus", "0", "--tracking-uri", secret_uri],
            cwd=tmp_path,
            env=bin_path_env(),
            capture_output=True,
            text=True,
            timeout=240,
        )
        printed = done.stdout + done.stderr
        assert done.returncode == 0, printed
        (run,) = MlflowClient(url).search_runs(["0"])
    assert "S3cretPW" not in printed and "alice" not in printed
    link = f"{url}/#/experiments/0/runs/{run.info.run_id}"
    assert re.search(rf"^View run {run.info.run_name} at: {re.escape(link)}$", printed, re.M)
