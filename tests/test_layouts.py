"""Every batch and output layout end to end: a real tiny net trained 2 epochs and tracked, its
history recomputed over the validation rows, and its registered model loaded where lkflow cannot
be imported, answering with the net's own outputs.

Layouts: several inputs `(x_num, x_cat, y)`, a dict batch `{"x", "y"}`, a Hugging Face-style
dict `{"input_ids", "attention_mask", "labels"}`, a tuple output, a dict output; and around them a
MetricCollection, a second fit of one model, and a LearningRateMonitor inside fit.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from helpers import fresh_store
from mlflow import MlflowClient
from servers import (
    Loader,
    lkflow_free_env,
    lkflow_free_python,
    models_serve,
    post,
    tensors,
)
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, default_collate
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryAccuracy, BinaryF1Score, MulticlassAccuracy

from lkflow import LightModel
from lkflow.datasets import rings, tabular

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}  # the served program may fuse operations
_MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME")


def _example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        f"layouts_{name}", ROOT / "examples" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# ---- nets and data --------------------------------------------------------------------------


class Prob(nn.Module):
    """Rings in, a probability out; `forward(x)`, so a dict batch passes `x=` by name."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(2, 8), nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc2(torch.relu(self.fc1(x))))


class TextNet(nn.Module):
    """An embedding bag over the unmasked tokens, then a linear layer to 2 class logits."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(VOCAB, 8), nn.Linear(8, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).float()
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.head(pooled)


class TwoHeads(nn.Module):
    """Rings in; a tuple out: class logits and a score regressed on the label."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.cls, self.score = nn.Linear(2, 8), nn.Linear(8, 1), nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = torch.relu(self.body(x))
        return self.cls(hidden), self.score(hidden)


class DictHeads(nn.Module):
    """Rings in; a dict out: the logits and the probability."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(2, 8), nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.head(torch.relu(self.body(x)))
        return {"logits": logits, "prob": torch.sigmoid(logits)}


def two_head_loss(outputs: tuple[torch.Tensor, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    logits, score = outputs
    return F.binary_cross_entropy_with_logits(logits, y) + F.mse_loss(score, y)


def two_head_acc(outputs: tuple[torch.Tensor, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    return ((outputs[0] > 0).float() == y).float().mean()


def dict_loss(outputs: dict[str, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(outputs["logits"], y)


def dict_acc(outputs: dict[str, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    return ((outputs["prob"] > 0.5).float() == y).float().mean()


class Keyed(Dataset):
    """Rows as dicts, `{name: tensor[i]}`: DataLoader batches are dicts of the same keys."""

    def __init__(self, **tensors: torch.Tensor) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {name: tensor[i] for name, tensor in self.tensors.items()}


VOCAB, LENGTH = 16, 8


def token_rows(n: int, seed: int) -> Keyed:
    """Padded token sequences (0 is padding) labelled 1 where tokens >= 8 outnumber the rest."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, LENGTH + 1, (n, 1), generator=generator)
    mask = (torch.arange(LENGTH) < lengths).long()
    ids = torch.randint(1, VOCAB, (n, LENGTH), generator=generator) * mask
    high = ((ids >= VOCAB // 2) & (mask == 1)).sum(1)
    labels = (2 * high > mask.sum(1)).long()
    return Keyed(input_ids=ids, attention_mask=mask, labels=labels)


def ring_loaders(keyed: bool = False) -> tuple[DataLoader, DataLoader]:
    """Train (256 rows) and validation (128 rows, two batches) loaders of the rings."""
    train, valid = rings(256, seed=1), rings(128, seed=2)
    if keyed:
        train, valid = (Keyed(x=d.tensors[0], y=d.tensors[1]) for d in (train, valid))
    return DataLoader(train, batch_size=64, shuffle=True), DataLoader(valid, batch_size=64)


def all_rows(loader: DataLoader) -> Any:
    """Every row of the loader's data set in one batch, collated as its batches are."""
    return default_collate([loader.dataset[i] for i in range(len(loader.dataset))])


# ---- fits, tracked into a store of this module -------------------------------------------------


@dataclass
class Fitted:
    """One tracked fit: the model, the validation loader, the run and the store it is in."""

    model: LightModel
    valid: DataLoader
    run_id: str
    uri: str
    name: str | None = None  # the registered model's name, when registered

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(self.uri)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, migrated_store: Path) -> str:
    """One store for the module's fits, as the `tracking_uri` fixture makes one per test."""
    return fresh_store(tmp_path_factory.mktemp("layouts_store"), migrated_store)


@pytest.fixture(scope="module")
def fit_in(tmp_path_factory: pytest.TempPathFactory, store: str) -> Callable[..., Fitted]:
    """`fit_in(model, train, valid, name=..., **fit_kwargs)`: a seeded 2-epoch tracked fit on
    the CPU in a folder of its own, registered as `name` (or not, without it)."""

    def fit(
        model: LightModel, train: DataLoader, valid: DataLoader, name: str | None = None, **kwargs
    ) -> Fitted:
        folder = tmp_path_factory.mktemp(name or "fit")
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(folder)
            for variable in _MLFLOW_ENV:
                patch.delenv(variable, raising=False)
            model.fit(
                train,
                valid,
                epochs=2,
                gpus=0,
                verbose=0,
                tracking_uri=store,
                registered_model_name=name or False,
                ckpt_dir=folder / "checkpoints",
                **kwargs,
            )
        return Fitted(model, valid, model.run_id, store, name)

    return fit


def check_history(fitted: Fitted, recompute: Callable[[nn.Module], dict[str, float]]) -> None:
    """The run is FINISHED and holds the history at steps 1 and 2; the best epoch's `val_`
    values are what `recompute(net)` finds over every validation row with the kept weights."""
    history = fitted.model.history_frame()
    assert history["epoch"].tolist() == [1, 2]
    run = fitted.client.get_run(fitted.run_id)
    assert run.info.status == "FINISHED"
    for key in history.columns.drop("epoch"):
        logged = fitted.client.get_metric_history(fitted.run_id, key)
        assert [m.step for m in logged] == [1, 2], key
        assert [m.value for m in logged] == pytest.approx(history[key].tolist(), rel=1e-6), key
    best = history.loc[history["val_loss"].idxmin()]
    net = fitted.model.net.eval()
    with torch.no_grad():
        expected = recompute(net)
    assert set(expected) <= set(history.columns)
    for key, value in expected.items():
        assert best[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


# ---- the registered model, loaded where lkflow cannot be imported -----------------------------


@pytest.fixture(scope="module")
def free_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return lkflow_free_python(tmp_path_factory.mktemp("lkflow_free"))


@pytest.fixture(scope="module")
def loader(free_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loader]:
    """One Python without lkflow that loads every registered model of this module."""
    with Loader(free_python, tmp_path_factory.mktemp("loader")) as started:
        yield started


def assert_answers(answer: Any, expected: Any) -> None:
    """A served answer (`plain`'s form) is the net's own output, tensor or named tensors."""
    if isinstance(expected, torch.Tensor):
        np.testing.assert_allclose(tensors(answer).numpy(), expected.numpy(), **TOLERANCE)
        return
    named = (
        expected
        if isinstance(expected, dict)
        else {f"output_{i}": t for i, t in enumerate(expected)}
    )
    assert sorted(answer) == sorted(named)
    for key, tensor in named.items():
        np.testing.assert_allclose(tensors(answer[key]).numpy(), tensor.numpy(), **TOLERANCE)


def check_served(
    fitted: Fitted, rows: dict[str, torch.Tensor], loader: Loader, inputs: list[str]
) -> None:
    """Loaded without lkflow, the registered model takes `inputs` by name and answers `rows` and
    its own input example with the net's outputs."""
    loaded = loader.load(f"models:/{fitted.name}/1", fitted.uri, rows)
    assert loaded["flavors"] == ["python_function"]  # the pyfunc of the program, no pickle
    assert loaded["inputs"] == inputs
    net = fitted.model.net.eval()
    with torch.no_grad():
        assert_answers(loaded["answer"], net(**rows))
        example = tensors(loaded["example"])
        assert sorted(example) == sorted(inputs)
        assert_answers(loaded["example_answer"], net(**example))


# ---- several inputs: (x_num, x_cat, y) ---------------------------------------------------------


@pytest.fixture(scope="module")
def tabular_fit(fit_in: Callable[..., Fitted]) -> Fitted:
    pl.seed_everything(0, verbose=False)
    example = _example("tabular")
    train = DataLoader(tabular(1024, seed=1), batch_size=64, shuffle=True)
    valid = DataLoader(tabular(200, seed=2), batch_size=128)
    model = example.build_model(hidden=8, embedding=3, lr=0.05)
    return fit_in(model, train, valid, name="tabular")


def test_several_inputs_train_predict_and_serve_by_name(
    tabular_fit: Fitted, loader: Loader
) -> None:
    x_num, x_cat, y = tabular_fit.valid.dataset.tensors

    def recompute(net: nn.Module) -> dict[str, float]:
        p = net(x_num, x_cat)
        acc = ((p > 0.5).float() == y).float().mean()
        return {"val_loss": F.binary_cross_entropy(p, y).item(), "val_acc": acc.item()}

    check_history(tabular_fit, recompute)
    assert tabular_fit.model.history[-1]["val_acc"] > 0.7  # chance is 0.5
    with torch.no_grad():
        expected = tabular_fit.model.net(x_num, x_cat)
    torch.testing.assert_close(tabular_fit.model.predict(tabular_fit.valid), expected)
    rows = {"x_num": x_num[:5], "x_cat": x_cat[:5]}
    check_served(tabular_fit, rows, loader, ["x_num", "x_cat"])


# ---- a dict batch {"x", "y"} ------------------------------------------------------------------


def test_dict_batch_passes_x_by_name_and_serves_it(
    fit_in: Callable[..., Fitted], loader: Loader
) -> None:
    pl.seed_everything(0, verbose=False)
    train, valid = ring_loaders(keyed=True)
    net = Prob()
    model = LightModel(
        net,
        loss_fn=nn.BCELoss(),
        metrics={"acc": BinaryAccuracy()},
        optimizer=torch.optim.Adam(net.parameters(), lr=0.05),
    )
    fitted = fit_in(model, train, valid, name="keyed")
    rows = all_rows(valid)

    def recompute(net: nn.Module) -> dict[str, float]:
        p = net(rows["x"])
        acc = ((p > 0.5).float() == rows["y"]).float().mean()
        return {"val_loss": F.binary_cross_entropy(p, rows["y"]).item(), "val_acc": acc.item()}

    check_history(fitted, recompute)
    with torch.no_grad():
        torch.testing.assert_close(model.predict(valid), net(rows["x"]))
    check_served(fitted, {"x": rows["x"][:5]}, loader, ["x"])


# ---- a Hugging Face-style dict {"input_ids", "attention_mask", "labels"} ------------------------


def test_hugging_face_style_batch_leaves_labels_out_of_the_inputs(
    fit_in: Callable[..., Fitted], loader: Loader
) -> None:
    pl.seed_everything(0, verbose=False)
    train = DataLoader(token_rows(256, seed=1), batch_size=64, shuffle=True)
    valid = DataLoader(token_rows(100, seed=2), batch_size=64)
    net = TextNet()
    model = LightModel(
        net,
        loss_fn=nn.CrossEntropyLoss(),
        metrics={"acc": MulticlassAccuracy(num_classes=2, average="micro")},
        optimizer=torch.optim.Adam(net.parameters(), lr=0.05),
    )
    fitted = fit_in(model, train, valid, name="tokens")
    rows = all_rows(valid)
    inputs = {"input_ids": rows["input_ids"], "attention_mask": rows["attention_mask"]}

    def recompute(net: nn.Module) -> dict[str, float]:
        logits = net(**inputs)
        acc = (logits.argmax(1) == rows["labels"]).float().mean()
        return {"val_loss": F.cross_entropy(logits, rows["labels"]).item(), "val_acc": acc.item()}

    check_history(fitted, recompute)
    with torch.no_grad():
        torch.testing.assert_close(model.predict(valid), net(**inputs))
    served = {k: t[:6] for k, t in inputs.items()}
    check_served(fitted, served, loader, ["input_ids", "attention_mask"])


# ---- a tuple output, one loss over both heads --------------------------------------------------


def test_tuple_output_is_predicted_as_a_tuple_and_served_as_named_outputs(
    fit_in: Callable[..., Fitted], loader: Loader
) -> None:
    pl.seed_everything(0, verbose=False)
    train, valid = ring_loaders()
    net = TwoHeads()
    model = LightModel(
        net,
        loss_fn=two_head_loss,
        metrics={"acc": two_head_acc},
        optimizer=torch.optim.Adam(net.parameters(), lr=0.05),
    )
    fitted = fit_in(model, train, valid, name="two-heads")
    x, y = valid.dataset.tensors

    def recompute(net: nn.Module) -> dict[str, float]:
        outputs = net(x)
        return {
            "val_loss": two_head_loss(outputs, y).item(),
            "val_acc": two_head_acc(outputs, y).item(),
        }

    check_history(fitted, recompute)
    predicted = model.predict(valid)
    assert isinstance(predicted, tuple) and len(predicted) == 2
    with torch.no_grad():
        torch.testing.assert_close(predicted, net(x))
    check_served(fitted, {"x": x[:5]}, loader, ["x"])


# ---- a dict output ------------------------------------------------------------------------------


def test_dict_output_is_predicted_as_a_dict_and_served_by_its_keys(
    fit_in: Callable[..., Fitted], loader: Loader
) -> None:
    pl.seed_everything(0, verbose=False)
    train, valid = ring_loaders()
    net = DictHeads()
    model = LightModel(
        net,
        loss_fn=dict_loss,
        metrics={"acc": dict_acc},
        optimizer=torch.optim.Adam(net.parameters(), lr=0.05),
    )
    fitted = fit_in(model, train, valid, name="dict-heads")
    x, y = valid.dataset.tensors

    def recompute(net: nn.Module) -> dict[str, float]:
        outputs = net(x)
        return {"val_loss": dict_loss(outputs, y).item(), "val_acc": dict_acc(outputs, y).item()}

    check_history(fitted, recompute)
    predicted = model.predict(valid)
    assert isinstance(predicted, dict) and list(predicted) == ["logits", "prob"]
    with torch.no_grad():
        torch.testing.assert_close(predicted, net(x))
    check_served(fitted, {"x": x[:5]}, loader, ["x"])


# ---- a MetricCollection ------------------------------------------------------------------------


def test_metric_collection_is_computed_over_each_epoch_under_its_names(
    fit_in: Callable[..., Fitted],
) -> None:
    pl.seed_everything(0, verbose=False)
    train, valid = ring_loaders()
    net = Prob()
    model = LightModel(
        net,
        loss_fn=nn.BCELoss(),
        metrics=MetricCollection({"acc": BinaryAccuracy(), "f1": BinaryF1Score()}),
        optimizer=torch.optim.Adam(net.parameters(), lr=0.05),
    )
    fitted = fit_in(model, train, valid)
    x, y = valid.dataset.tensors

    def recompute(net: nn.Module) -> dict[str, float]:
        p = net(x)
        predicted = (p > 0.5).float()
        tp = float((predicted * y).sum())
        fp, fn = float((predicted * (1 - y)).sum()), float(((1 - predicted) * y).sum())
        return {
            "val_loss": F.binary_cross_entropy(p, y).item(),
            "val_acc": (predicted == y).float().mean().item(),
            "val_f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0,
        }

    check_history(fitted, recompute)
    assert {"acc", "f1", "val_acc", "val_f1"} <= set(model.history[0])


# ---- a second fit of the same model --------------------------------------------------------------


def test_second_fit_starts_a_new_run_with_a_history_of_its_own(
    fit_in: Callable[..., Fitted],
) -> None:
    pl.seed_everything(0, verbose=False)
    train, valid = ring_loaders()
    net = Prob()
    model = LightModel(
        net,
        loss_fn=nn.BCELoss(),
        metrics={"acc": BinaryAccuracy()},
        optimizer=torch.optim.Adam(net.parameters(), lr=0.05),
    )
    first = fit_in(model, train, valid)
    first_history = model.history_frame()
    second = fit_in(model, train, valid)
    assert second.run_id != first.run_id and model.run_id == second.run_id
    x, y = valid.dataset.tensors

    def recompute(net: nn.Module) -> dict[str, float]:
        p = net(x)
        acc = ((p > 0.5).float() == y).float().mean()
        return {"val_loss": F.binary_cross_entropy(p, y).item(), "val_acc": acc.item()}

    check_history(second, recompute)  # two rows, epochs 1 and 2, logged at steps 1 and 2
    logged = first.client.get_metric_history(first.run_id, "val_loss")
    assert [(m.step, m.value) for m in logged] == [
        (epoch, pytest.approx(value, rel=1e-6))
        for epoch, value in zip(first_history["epoch"], first_history["val_loss"], strict=True)
    ]
    assert not model.history_frame()["val_loss"].equals(first_history["val_loss"])
    csv = Path(second.client.download_artifacts(second.run_id, "history.csv")).read_text()
    assert len(csv.strip().splitlines()) == 1 + 2  # the header and the second fit's two rows


# ---- a callback that needs a logger ------------------------------------------------------------


def test_learning_rate_monitor_logs_into_the_fits_run(fit_in: Callable[..., Fitted]) -> None:
    pl.seed_everything(0, verbose=False)
    train, valid = ring_loaders()
    net = Prob()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    model = LightModel(
        net,
        loss_fn=nn.BCELoss(),
        metrics={"acc": BinaryAccuracy()},
        optimizer=optimizer,
        lr_scheduler=torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5),
    )
    monitor = pl.callbacks.LearningRateMonitor(logging_interval="epoch")
    fitted = fit_in(model, train, valid, callbacks=[monitor])
    x, y = valid.dataset.tensors

    def recompute(net: nn.Module) -> dict[str, float]:
        p = net(x)
        acc = ((p > 0.5).float() == y).float().mean()
        return {"val_loss": F.binary_cross_entropy(p, y).item(), "val_acc": acc.item()}

    check_history(fitted, recompute)  # lkflow's own keys stay at step = epoch
    assert model.history_frame()["lr"].tolist() == pytest.approx([0.05, 0.025])
    logged = fitted.client.get_metric_history(fitted.run_id, "lr-SGD")
    # Lightning logs the lr at the start of each epoch, at the optimizer steps taken so far
    assert [(m.step, m.value) for m in logged] == [
        (0, pytest.approx(0.05)),
        (len(train), pytest.approx(0.025)),
    ]


# ---- served by `mlflow models serve`, the README's request ---------------------------------------


def readme_request() -> dict[str, Any]:
    """The JSON body of the README's request to the two-input net."""
    readme = (ROOT / "README.md").read_text()
    (body,) = re.findall(r"-d '(\{\"inputs\": \{\"x_num\".*?)'\n", readme)
    return json.loads(body)


@pytest.fixture
def served_tabular(tabular_fit: Fitted, free_python: Path, tmp_path: Path) -> Iterator[str]:
    """`mlflow models serve` of the two-input net, run by a Python without lkflow."""
    env = {**lkflow_free_env(free_python), "MLFLOW_TRACKING_URI": tabular_fit.uri}
    with models_serve("models:/tabular/1", tmp_path, env, free_python) as url:
        yield url


@pytest.mark.slow
def test_models_serve_answers_the_readmes_request(tabular_fit: Fitted, served_tabular: str) -> None:
    body = readme_request()
    status, answer = post(f"{served_tabular}/invocations", body)
    assert status == 200, answer
    x_num = torch.tensor(body["inputs"]["x_num"], dtype=torch.float32)
    x_cat = torch.tensor(body["inputs"]["x_cat"], dtype=torch.int64)
    with torch.no_grad():
        expected = tabular_fit.model.net.eval()(x_num, x_cat)
    predictions = np.array(answer["predictions"])
    assert predictions.shape == (len(x_cat), 1)  # one probability per row, as the README shows
    np.testing.assert_allclose(predictions, expected.numpy(), **TOLERANCE)
    status, answer = post(
        f"{served_tabular}/invocations", {"inputs": {"x_num": body["inputs"]["x_num"]}}
    )
    assert 400 <= status < 500, answer
