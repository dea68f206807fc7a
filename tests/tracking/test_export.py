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
from typing import Any

import mlflow
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from helpers import SQLITE_ONLY, TRACKED_IN_SQLITE, Tracked, fit
from helpers import make_scheduled_model as make_model
from mlflow import MlflowClient
from mlflow.models import Model
from peers import LitClassifier, LitTabular, autoencoder
from servers import bin_path_env, models_serve
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lkflow import LightModel
from lkflow.errors import LkflowError
from lkflow.tracking.export import best_net, served_attribute

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


@TRACKED_IN_SQLITE
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
@TRACKED_IN_SQLITE
def test_models_serve_answers_invocations(tracked: Tracked, tmp_path: Path) -> None:
    env = {**bin_path_env(), "MLFLOW_TRACKING_URI": tracked.uri}
    with models_serve("models:/rings-net/1", tmp_path, env) as url:
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


@SQLITE_ONLY
def test_unexportable_net_falls_back_to_a_pickle_with_its_code(
    tracking_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "sign_net.py").write_text(_UNEXPORTABLE)
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    net = importlib.import_module("sign_net").SignNet()
    with pytest.warns(UserWarning, match="pickle fallback") as caught:
        model = fit(make_model(net), epochs=1, registered_model_name="sign")
    (message,) = [str(w.message) for w in caught if "pickle" in str(w.message)]
    assert "MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false refuses it" in message
    assert "trace with torch.export" in message and "example_input(batch)" in message
    version = MlflowClient(tracking_uri).get_model_version("sign", "1")
    assert version.run_id == model.run_id
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = _isolated_python(
        _PREDICT,
        elsewhere,
        {"MLFLOW_TRACKING_URI": tracking_uri},  # loads without a setting, as the warning says
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


# ---- nets of other layouts -------------------------------------------------------------------


class TwoHeads(nn.Module):
    """Numeric features and a category in, logits and probabilities out."""

    def __init__(self) -> None:
        super().__init__()
        self.num = nn.Linear(2, 4)
        self.cat = nn.Embedding(3, 4)
        self.out = nn.Linear(4, 1)

    def forward(self, x_num: torch.Tensor, x_cat: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.out(torch.relu(self.num(x_num) + self.cat(x_cat)))
        return {"logits": logits, "prob": torch.sigmoid(logits)}


class ByBatchSize(TwoHeads):
    """A Python branch on the batch size: torch.export cannot export it for any batch."""

    def forward(self, x_num: torch.Tensor, x_cat: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().forward(x_num, x_cat)
        return out if x_num.shape[0] > 3 else {k: -v for k, v in out.items()}


class TwoInputs(LightModel):
    """Batches (x_num, x_cat, y): its own step, and the two inputs as the example."""

    def shared_step(self, batch: Any) -> dict[str, Any]:
        x_num, x_cat, y = batch
        logits = self.net(x_num, x_cat)["logits"]
        return {"loss": nn.functional.binary_cross_entropy_with_logits(logits, y)}

    def example_input(self, batch: Any) -> Any:
        return batch[0], batch[1]

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def two_input_loaders() -> tuple[DataLoader, DataLoader]:
    generator = torch.Generator().manual_seed(0)

    def rows(n: int) -> TensorDataset:
        x_num = torch.randn(n, 2, generator=generator)
        x_cat = torch.randint(0, 3, (n,), generator=generator)
        y = ((x_num[:, 0] > 0) ^ (x_cat == 1)).float().unsqueeze(1)
        return TensorDataset(x_num, x_cat, y)

    return DataLoader(rows(96), batch_size=32), DataLoader(rows(64), batch_size=32)


def two_input_fit(net: nn.Module, name: str) -> LightModel:
    model = TwoInputs(net)
    model.fit(*two_input_loaders(), epochs=2, gpus=0, verbose=0, registered_model_name=name)
    return model


@SQLITE_ONLY
def test_two_input_net_with_dict_output_is_registered_as_a_pyfunc_answering_its_example(
    tracking_uri: str, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    model = two_input_fit(TwoHeads(), "two-heads")
    client = MlflowClient(tracking_uri)
    version = client.get_model_version("two-heads", "1")
    assert version.run_id == model.run_id
    assert version.tags["monitor"] == "val_loss"
    path = mlflow.artifacts.download_artifacts(f"models:/{version.source.removeprefix('models:/')}")
    saved = Model.load(path)
    assert "pytorch" not in saved.flavors  # the pyfunc of the exported program
    assert saved.signature.inputs.input_names() == ["x_num", "x_cat"]
    assert saved.signature.outputs.input_names() == ["logits", "prob"]
    example = saved.load_input_example(path)
    x_num, x_cat, _ = next(iter(two_input_loaders()[0]))  # the first batch, not shuffled
    np.testing.assert_array_equal(example["x_num"], x_num[:5].numpy())
    np.testing.assert_array_equal(example["x_cat"], x_cat[:5].numpy())
    predicted = mlflow.pyfunc.load_model("models:/two-heads/1").predict(example)
    with torch.no_grad():
        expected = model.net.eval()(x_num[:5], x_cat[:5])
    assert sorted(predicted) == ["logits", "prob"]
    for key in ("logits", "prob"):
        np.testing.assert_allclose(predicted[key], expected[key].numpy(), rtol=1e-5, atol=1e-6)
    request = {key: value.tolist() for key, value in example.items()}
    done = _isolated_python(
        _PREDICT_NAMED, tmp_path, {"MLFLOW_TRACKING_URI": tracking_uri}, json.dumps(request)
    )
    assert done.returncode == 0, done.stderr[-3000:]
    elsewhere = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("logits", "prob"):
        np.testing.assert_allclose(elsewhere[key], expected[key].numpy(), rtol=1e-5, atol=1e-6)


_PREDICT_NAMED = """
    import json
    try:
        import lkflow
        sys.exit("lkflow can be imported here")
    except ImportError:
        pass
    import numpy as np
    import mlflow.pyfunc
    model = mlflow.pyfunc.load_model("models:/two-heads/1")
    request = {"x_num": np.array(json.loads(sys.argv[1])["x_num"], dtype=np.float32),
               "x_cat": np.array(json.loads(sys.argv[1])["x_cat"])}
    print(json.dumps({k: v.tolist() for k, v in model.predict(request).items()}))
"""


def test_net_whose_model_cannot_answer_its_example_is_not_registered(
    tracking_uri: str, recwarn: pytest.WarningsRecorder
) -> None:
    model = two_input_fit(ByBatchSize(), "by-size")
    ours = [w for w in recwarn if "registered" in str(w.message) or "export" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    message = str(ours[0].message)
    assert "ByBatchSize is logged but not registered" in message
    assert "torch.export could not export it" in message and "Fix:" in message
    client = MlflowClient(tracking_uri)
    assert client.search_registered_models() == []
    run = client.get_run(model.run_id)
    assert run.info.status == "FINISHED"
    assert "net/state_dict.pt" in [f.path for f in client.list_artifacts(model.run_id, "net")]


class NoPairs(nn.Module):
    """The article's net refusing batches of two rows, as lkflow's layer table feeds it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._check(x.shape[0] != 2, lambda: "two rows are a pair, not a batch")
        return self.fc(x)


class OwnStep(LightModel):
    """A subclass that only overrides shared_step."""

    def shared_step(self, batch: Any) -> dict[str, Any]:
        x, y = batch
        return {"loss": nn.functional.binary_cross_entropy_with_logits(self(x), y)}


def test_a_failing_layer_table_warns_once_and_the_fit_still_registers(
    tracking_uri: str, recwarn: pytest.WarningsRecorder
) -> None:
    net = NoPairs()
    model = fit(OwnStep(net, optimizer=torch.optim.SGD(net.parameters(), lr=0.05)), epochs=1)
    missing = [str(w.message) for w in recwarn if "summary.txt" in str(w.message)]
    assert len(missing) == 1 and "the layer table of NoPairs" in missing[0], missing
    client = MlflowClient(tracking_uri)
    run = client.get_run(model.run_id)
    assert run.info.status == "FINISHED"
    files = {f.path for f in client.list_artifacts(model.run_id)}
    assert {"history.csv", "curves.png", "net", "checkpoints"} <= files
    assert "summary.txt" not in files
    (version,) = client.search_model_versions("name = 'NoPairs'")
    assert version.run_id == model.run_id and "Layers:" not in version.description


class _NetNoForward(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net, self.model = nn.Linear(2, 1), nn.Linear(2, 3)


def test_the_served_net_by_the_modules_layout() -> None:
    assert served_attribute(make_model()) == "net"  # a LightModel's bare net
    assert served_attribute(LitClassifier()) is None  # its forward, on its `model`
    assert served_attribute(LitTabular()) is None
    assert served_attribute(_NetNoForward()) == "net"  # no forward: `net`, then `model`
    assert served_attribute(autoencoder()) is None  # neither: has_forward warns
    assert served_attribute(autoencoder(), "encoder.0") == "encoder.0"
    with pytest.raises(LkflowError, match=r"net='decodr'.*Did you mean net='decoder'"):
        served_attribute(autoencoder(), "decodr")


def test_the_best_weights_are_the_served_submodules() -> None:
    module = autoencoder()
    best = {key: torch.zeros_like(value) for key, value in module.state_dict().items()}
    encoder = best_net(module, best, "encoder")
    assert type(encoder) is type(module.encoder) and not encoder.training
    assert all(not value.any() for value in encoder.state_dict().values())
    assert any(value.any() for value in module.encoder.state_dict().values())  # untouched
