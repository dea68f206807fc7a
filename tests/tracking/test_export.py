"""The servable model: it predicts where lkflow is not installed, `mlflow models serve` answers,
and a net torch.export cannot trace falls back to a pickle with its code."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import sysconfig
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import Tracked, fit
from helpers import make_scheduled_model as make_model
from mlflow import MlflowClient
from servers import BIN, Server, bin_path_env, free_port
from torch import nn

X = [[5.0, 0.0], [0.0, -8.0], [3.5, 3.5], [-6.0, 6.0]]


def net_predictions(net: nn.Module) -> np.ndarray:
    with torch.no_grad():
        return net.eval()(torch.tensor(X)).numpy()


def _isolated_python(
    code: str, cwd: Path, env: dict[str, str], *args: str
) -> subprocess.CompletedProcess:
    """`python -I -S`: no site hooks (so no editable lkflow), no PYTHONPATH, no cwd on sys.path."""
    paths = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    prelude = f"import sys; sys.path.extend({paths!r})\n"
    return subprocess.run(
        [sys.executable, "-I", "-S", "-c", prelude + textwrap.dedent(code), *args],
        cwd=cwd,
        env={"PATH": os.environ.get("PATH", ""), **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


_PREDICT = """
    import importlib, json
    for name in sys.argv[2].split(","):
        try:
            importlib.import_module(name)
        except ImportError:
            continue
        sys.exit(f"{name} can be imported here")
    import numpy as np
    import mlflow.pyfunc
    model = mlflow.pyfunc.load_model(sys.argv[1])
    print(json.dumps(model.predict(np.array(json.loads(sys.argv[3]), dtype=np.float32)).tolist()))
"""


def test_registered_model_predicts_without_lkflow(tracked: Tracked, tmp_path: Path) -> None:
    done = _isolated_python(
        _PREDICT,
        tmp_path,
        {"MLFLOW_TRACKING_URI": tracked.uri},
        "models:/rings-net/1",
        "lkflow,conftest,test_export",
        json.dumps(X),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    predicted = np.array(json.loads(done.stdout.strip().splitlines()[-1]))
    np.testing.assert_allclose(predicted, net_predictions(tracked.model.net), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_models_serve_answers_invocations(tracked: Tracked, tmp_path: Path) -> None:
    port = free_port()
    command = [str(BIN / "mlflow"), "models", "serve", "-m", "models:/rings-net/1"]
    command += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    env = {**bin_path_env(), "MLFLOW_TRACKING_URI": tracked.uri}
    with Server(command, tmp_path, f"http://127.0.0.1:{port}/ping", env) as url:
        status, answer = _post(f"{url}/invocations", {"inputs": X})
        assert status == 200, answer
        np.testing.assert_allclose(
            np.array(answer["predictions"]),
            net_predictions(tracked.model.net),
            rtol=1e-5,
            atol=1e-6,
        )
        status, answer = _post(f"{url}/invocations", {"inputs": [[1.0, 2.0, 3.0]]})
        assert 400 <= status < 500
        assert "shape" in answer["message"].lower()


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


_UNEXPORTABLE = '''
import torch
from torch import nn


class SignNet(nn.Module):
    """A data-dependent branch: torch.export cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return self.fc(-x)
'''


def test_unexportable_net_falls_back_to_a_pickle_with_its_code(
    tracking_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "sign_net.py").write_text(_UNEXPORTABLE)
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    net = importlib.import_module("sign_net").SignNet()
    with pytest.warns(UserWarning, match="pickle fallback"):
        model = fit(make_model(net), epochs=1, registered_model_name="sign")
    version = MlflowClient(tracking_uri).get_model_version("sign", "1")
    assert version.run_id == model.run_id
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = _isolated_python(
        _PREDICT,
        elsewhere,
        {"MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "true"},
        "models:/sign/1",
        "lkflow,sign_net",
        json.dumps(X),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    np.testing.assert_allclose(
        np.array(json.loads(done.stdout.strip().splitlines()[-1])),
        net_predictions(model.net),
        rtol=1e-5,
        atol=1e-6,
    )
