"""lkflow.credentials: secret keys and URI passwords, and what a run and lkflow's output keep."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from helpers import Net, fresh_store
from mlflow import MlflowClient
from servers import BIN, bin_path_env, free_port, mlflow_server
from torch import nn
from torch.utils.data import DataLoader

from lkflow import LightModel
from lkflow.credentials import MASK, hide_credentials, is_secret_key
from lkflow.datasets import rings

ROOT = Path(__file__).parents[1]


def make_loaders() -> tuple[DataLoader, DataLoader]:
    return DataLoader(rings(192, seed=1), batch_size=64, shuffle=True), DataLoader(
        rings(128, seed=2), 64
    )


@pytest.mark.parametrize(
    "key",
    [
        "token",
        "hf_token",
        "db.password",
        "PASSWORD",
        "client_secret",
        "api_key",
        "apiKey",
        "aws.secretKey",
        "wandb-api-key",
        "AUTH_TOKEN",
        "privatekey",
        "user.passwd",
    ],
)
def test_secret_keys(key: str) -> None:
    assert is_secret_key(key)


@pytest.mark.parametrize(
    "key",
    ["monkey", "keyboard", "hotkeys", "tokenizer", "max_tokens", "secretary", "lr", "donkey.kong"],
)
def test_keys_that_only_contain_a_secret_word(key: str) -> None:
    assert not is_secret_key(key)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("https://alice:s3cret@host:5000/path", "https://***@host:5000/path"),
        ("http://token@host", "http://***@host"),
        ("postgresql+psycopg2://u:p@db/mlflow", "postgresql+psycopg2://***@db/mlflow"),
        ("see s3://k:s@bucket and https://x:y@h", "see s3://***@bucket and https://***@h"),
        ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
        ("alice@example.com", "alice@example.com"),
    ],
)
def test_hide_credentials(text: str, shown: str) -> None:
    assert hide_credentials(text) == shown


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
    link = f"{url}/#/experiments/0/runs/{run.info.run_id}?workflowType=machine_learning"
    assert re.search(rf"^View run {run.info.run_name} at: {re.escape(link)}$", printed, re.M)


class _WithToken(LightModel):
    def __init__(self, net: nn.Module, api_token: str, hidden: int = 6, **kwargs: Any) -> None:
        super().__init__(net, **kwargs)


@pytest.mark.slow
def test_secrets_never_become_params_or_tags(
    tmp_path: Path, migrated_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "abc123"
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", secret)
    (tmp_path / "server").mkdir()
    port = free_port()
    backend = fresh_store(tmp_path / "server", migrated_store)
    with mlflow_server(backend, tmp_path / "served", tmp_path, port):
        uri = f"http://alice:{secret}@127.0.0.1:{port}"
        net = Net()
        model = _WithToken(net, api_token=secret, loss_fn=nn.BCEWithLogitsLoss())
        model.fit(*make_loaders(), epochs=1, gpus=0, verbose=0, tracking_uri=uri)
        client = MlflowClient(f"http://127.0.0.1:{port}")
        run = client.get_run(model.run_id)
        version = client.get_model_version("Net", "1")
        (output,) = run.outputs.model_outputs
        logged_model = client.get_logged_model(output.model_id)
    assert run.data.params["api_token"] == MASK and run.data.params["hidden"] == "6"
    texts = {
        "params": run.data.params,
        "tags": run.data.tags,
        "model params": logged_model.params,
        "model tags": logged_model.tags,
        "version tags": version.tags,
        "version": {"description": version.description or "", "source": version.source},
    }
    for what, values in texts.items():
        leaks = {k: v for k, v in values.items() if secret in k or secret in str(v)}
        assert not leaks, what
