"""MLflowCallback against real MLflow: what a fit logs, where, and the callback's arguments.

Every check goes through `MlflowClient`, never by listing files.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from helpers import Net, Tracked, fit, fresh_store, make_loaders, plain_fit
from helpers import make_scheduled_model as make_model
from mlflow import MlflowClient
from servers import mlflow_server

import lkflow
from lkflow.errors import LkflowError
from lkflow.tracking import MLflowCallback

EPOCHS = 3


def test_metrics_one_value_per_epoch(tracked: Tracked) -> None:
    history = tracked.model.history
    assert [row["epoch"] for row in history] == list(range(1, EPOCHS + 1))
    for key in ("loss", "acc", "val_loss", "val_acc", "lr"):
        logged = sorted(
            (m.step, m.value) for m in tracked.client.get_metric_history(tracked.run_id, key)
        )
        assert logged == [(row["epoch"], pytest.approx(row[key])) for row in history]
    best = min(history, key=lambda row: row["val_loss"])
    metrics = tracked.client.get_run(tracked.run_id).data.metrics
    assert metrics["best_val_loss"] == pytest.approx(best["val_loss"])
    assert metrics["best_epoch"] == best["epoch"]


def test_datasets_and_tags(tracked: Tracked) -> None:
    run = tracked.client.get_run(tracked.run_id)
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation"}
    assert json.loads(inputs["training"].profile) == {"num_rows": 320}
    assert json.loads(inputs["validation"].profile) == {"num_rows": 250}
    assert inputs["training"].digest != inputs["validation"].digest
    assert run.data.tags["lkflow.version"] == lkflow.__version__
    assert run.data.tags["mlflow.user"]
    assert run.info.status == "FINISHED"
    assert tracked.client.get_experiment(run.info.experiment_id).name == "rings"


@pytest.mark.slow
def test_fit_logs_to_a_tracking_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, migrated_store: Path
) -> None:
    (tmp_path / "server").mkdir()
    backend = fresh_store(tmp_path / "server", migrated_store)
    with mlflow_server(backend, tmp_path / "served", tmp_path) as url:
        model = fit(make_model(), experiment_name="served", tracking_uri=url)
        client = MlflowClient(url)
        run = client.get_run(model.run_id)
        assert run.info.status == "FINISHED" and run.data.params["epochs"] == "2"
        assert [m.step for m in client.get_metric_history(model.run_id, "val_loss")] == [1, 2]
        assert {a.path for a in client.list_artifacts(model.run_id)} >= {
            "checkpoints",
            "net",
            "history.csv",
        }
        version = client.get_model_version("served", "1")
        assert version.run_id == model.run_id
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        info = mlflow.models.get_model_info(version.source)
        assert info.run_id == model.run_id and "python_function" in info.flavors
    assert not (tmp_path / "mlruns").exists()  # artifacts went through the server


def test_plain_trainer_logs_to_mlflow_db_in_the_working_folder(
    tmp_path: Path, migrated_store: Path
) -> None:
    uri = fresh_store(tmp_path, migrated_store)  # what MLflow's default URI finds: ./mlflow.db
    tracker = MLflowCallback(experiment_name="plain", run_name="first", tags={"team": "rings"})
    plain_fit(tracker, tmp_path, monitor=None)
    client = MlflowClient(uri)
    run = client.get_run(tracker.run_id_)
    assert run.info.run_name == "first" and run.data.tags["team"] == "rings"
    assert run.info.artifact_uri.startswith(str(tmp_path / "mlruns"))
    assert "best_epoch" not in run.data.metrics  # the checkpoint monitors nothing
    assert tracker.model_version_.name == "plain" and tracker.model_version_.tags == {
        "run_id": run.info.run_id
    }
    assert tracker.model_uri_ == tracker.model_version_.source


def test_a_net_that_is_no_submodule_fails_before_any_run(tracking_uri: str) -> None:
    class Plain(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = Net()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.encoder(batch[0]).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = pl.Trainer(
        max_epochs=1,
        callbacks=[MLflowCallback(net="encodr")],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    with pytest.raises(LkflowError, match=r"net='encodr'.*\['encoder'\].*net='encoder'"):
        trainer.fit(Plain(), make_loaders()[0])
    assert MlflowClient(tracking_uri).search_runs(["0"]) == []


def test_importing_tracking_does_not_import_mlflow(tmp_path: Path) -> None:
    code = "import sys, lkflow.tracking.callback, lkflow.tracking.params; print(sorted(m for m in sys.modules if m.startswith('mlflow')))"
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert done.stdout.strip() == "[]"


def test_arguments_are_kept_as_passed() -> None:
    callback = MLflowCallback(experiment_name="e", registered_model_name=False, tags={"k": "v"})
    assert callback.experiment_name == "e" and callback.registered_model_name is False
    assert callback.tags == {"k": "v"} and callback.run_id is None
    assert callback.run_id_ is None and callback.client_ is None


def test_a_fit_without_checkpoints_logs_the_net_of_its_last_epoch(tracking_uri: str) -> None:
    tracker = MLflowCallback(registered_model_name=False)
    trainer = pl.Trainer(
        max_epochs=2,
        callbacks=[tracker],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(make_model(), *make_loaders())
    client = MlflowClient(tracking_uri)
    run = client.get_run(tracker.run_id_)
    assert run.info.status == "FINISHED" and "best_epoch" not in run.data.metrics
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"net", "history.csv"}
    assert [output.step for output in run.outputs.model_outputs] == [2]  # the last epoch


class Tokens(torch.nn.Module):
    """Token ids and their mask in, by name; one logit a row out."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.out = torch.nn.Linear(4, 1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).float()
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.out(pooled)


class DictBatches(lkflow.LightModel):
    """Batches as Hugging Face collators yield them: the inputs by name, and "labels"."""

    def shared_step(self, batch: Any) -> dict[str, Any]:
        logits = self.net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return {
            "loss": torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["labels"])
        }

    def example_input(self, batch: Any) -> Any:
        return {key: batch[key] for key in ("input_ids", "attention_mask")}

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class TokenRows(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        generator = torch.Generator().manual_seed(n)
        self.ids = torch.randint(0, 10, (n, 6), generator=generator)
        self.mask = (torch.rand(n, 6, generator=generator) > 0.3).long()
        self.labels = (self.ids[:, 0] > 4).float().unsqueeze(1)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def test_a_dict_batch_gives_the_model_its_named_input_example(tracking_uri: str) -> None:
    from mlflow.models import Model

    train = torch.utils.data.DataLoader(TokenRows(40), batch_size=16)
    valid = torch.utils.data.DataLoader(TokenRows(24), batch_size=16)
    model = DictBatches(Tokens())
    model.fit(train, valid, epochs=1, gpus=0, verbose=0, registered_model_name="tokens")
    version = MlflowClient(tracking_uri).get_model_version("tokens", "1")
    path = mlflow.artifacts.download_artifacts(version.source)
    example = Model.load(path).load_input_example(path)
    first = next(iter(train))
    assert sorted(example) == ["attention_mask", "input_ids"]
    for key in example:
        assert (example[key] == first[key][:5].numpy()).all()
    predicted = mlflow.pyfunc.load_model("models:/tokens/1").predict(example)
    with torch.no_grad():
        expected = model.net.eval()(**{k: torch.from_numpy(v) for k, v in example.items()})
    np.testing.assert_allclose(predicted, expected.numpy(), rtol=1e-5, atol=1e-6)
