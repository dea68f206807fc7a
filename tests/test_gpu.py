"""On a CUDA device: one-GPU fits, mixed precision, and no host synchronisation per step.

Skipped where CUDA is absent (conftest marks `gpu` tests); `benchmarks/gpu_check.sh` runs them.
"""

from __future__ import annotations

import pytest
import torch
from helpers import Net
from torch import nn

from lkflow import LightModel

pytestmark = pytest.mark.gpu


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((logits > 0).float() == y).float().mean()


class _SyncsAreErrors(LightModel):
    """Every host synchronisation inside the training step raises (CUDA's sync debug mode)."""

    def training_step(self, batch, batch_idx):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return super().training_step(batch, batch_idx)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_the_training_step_never_waits_for_the_gpu(loaders):
    model = _SyncsAreErrors(Net(), loss_fn=nn.BCEWithLogitsLoss(), metrics={"acc": accuracy})
    history = model.fit(*loaders, epochs=2, gpus=1, track=False, verbose=0)
    assert len(history) == 2 and history["val_acc"].notna().all()


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_on_one_gpu_is_logged(loaders, tracking_uri, precision):
    from mlflow import MlflowClient

    model = LightModel(Net(), loss_fn=nn.BCEWithLogitsLoss(), metrics={"acc": accuracy})
    model.fit(*loaders, epochs=2, gpus=1, precision=precision, verbose=0)
    params = MlflowClient(tracking_uri).get_run(model.run_id).data.params
    assert params["precision"] == precision
    assert model.evaluate(loaders[1], gpus=1)["loss"] == pytest.approx(
        model.history_frame()["val_loss"].min(), rel=1e-3
    )


def test_predictions_come_back_on_the_cpu(loaders):
    model = LightModel(Net(), loss_fn=nn.BCEWithLogitsLoss())
    model.fit(*loaders, epochs=1, gpus=1, track=False, verbose=0)
    assert model.predict(loaders[1]).device.type == "cpu"


def test_gpu_use_is_among_the_system_metrics(loaders, tracking_uri, monkeypatch):
    pytest.importorskip("pynvml", reason="needs nvidia-ml-py: pip install 'lkflow[gpu]'")
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")
    model = LightModel(Net(), loss_fn=nn.BCEWithLogitsLoss())
    model.fit(*loaders, epochs=2, gpus=1, verbose=0, registered_model_name=False)
    metrics = MlflowClient(tracking_uri).get_run(model.run_id).data.metrics
    for key in ("gpu_0_utilization_percentage", "gpu_0_memory_usage_megabytes"):
        assert f"system/{key}" in metrics, sorted(metrics)
