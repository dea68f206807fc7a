"""One write into a run: `deliver` of each kind into a real sqlite store, and the `Writer` that
keeps the writes of a server that does not answer in the run's outbox, in order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient
from servers import free_port

from lkflow.tracking.run import TrackedRun
from lkflow.tracking.writes import State, Writer, deliver


def _new_run(client: MlflowClient) -> str:
    return str(client.create_run("0").info.run_id)


def test_each_kind_of_write_lands_in_the_run(tracking_uri: str, tmp_path: Path) -> None:
    client = MlflowClient(tracking_uri)
    run_id = _new_run(client)
    (tmp_path / "report.txt").write_text("kept\n")
    state: State = {"model_id": None}
    deliver(
        client,
        run_id,
        {
            "op": "batch",
            "params": {"lr": "0.1"},
            "tags": {"team": "rings"},
            "metrics": [("loss", 0.5, 1000, 0), ("loss", 0.25, 2000, 1)],
        },
        state,
    )
    record = {"name": "Rings", "digest": "ab12", "source_type": "code", "source": "{}"}
    dataset = {**record, "profile": json.dumps({"num_rows": 3}), "context": "training"}
    deliver(client, run_id, {"op": "inputs", "datasets": [dataset]}, state)
    paths = [str(tmp_path / "report.txt")]
    deliver(client, run_id, {"op": "artifacts", "paths": paths, "artifact_path": "notes"}, state)
    deliver(client, run_id, {"op": "end", "status": "KILLED", "end_time": 3000}, state)

    run = client.get_run(run_id)
    assert run.data.params == {"lr": "0.1"} and run.data.tags["team"] == "rings"
    points = [(m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, "loss")]
    assert sorted(points) == [(0, 0.5, 1000), (1, 0.25, 2000)]
    (used,) = run.inputs.dataset_inputs
    assert used.dataset.name == "Rings" and used.tags[0].value == "training"
    assert [a.path for a in client.list_artifacts(run_id, "notes")] == ["notes/report.txt"]
    assert run.info.status == "KILLED" and run.info.end_time == 3000


def test_a_server_that_does_not_answer_sends_this_write_and_the_later_ones_to_the_outbox(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # refused at once, not in 6 s
    uri = f"http://127.0.0.1:{free_port()}"
    run = TrackedRun(MlflowClient(uri), "0123abcd", "0", "Default", {}, True, None)
    writer = Writer(tmp_path / "mlruns-outbox")
    writer.open(run)
    with pytest.warns(UserWarning, match="stopped answering") as warned:
        writer.send({"op": "batch", "tags": {"first": "1"}})
        writer.send({"op": "end", "status": "FINISHED", "end_time": 5})
    assert len(warned) == 1  # one warning for the outage, not one a write
    assert writer.outbox is not None and writer.outbox.held
    journal = (tmp_path / "mlruns-outbox" / "0123abcd" / "journal.jsonl").read_text()
    assert [json.loads(line)["op"] for line in journal.splitlines()] == ["batch", "end"]
    writer.release()
    assert not writer.outbox.held


def test_deleting_a_tag_through_deliver_passes_when_it_is_gone(tracking_uri: str) -> None:
    client = MlflowClient(tracking_uri)
    run_id = client.create_run("0").info.run_id
    client.set_tag(run_id, "lkflow.error", "RuntimeError: boom")
    entry = {"op": "delete_tag", "key": "lkflow.error"}
    deliver(client, run_id, entry, {"model_id": None})
    assert "lkflow.error" not in client.get_run(run_id).data.tags
    deliver(client, run_id, entry, {"model_id": None}, maybe_sent=True)  # already deleted


def test_writes_before_the_run_opens_wait_for_it_in_order(tracking_uri: str) -> None:
    client = MlflowClient(tracking_uri)
    run_id = _new_run(client)
    writer = Writer(Path("mlruns-outbox").resolve())
    writer.send({"op": "batch", "params": {"lr": "0.1"}})
    writer.send({"op": "batch", "tags": {"stage": "before the run opened"}})
    assert client.get_run(run_id).data.params == {}  # nothing sent yet
    writer.open(TrackedRun(client, run_id, "0", "Default", {}, True, None))
    run = client.get_run(run_id)
    assert run.data.params == {"lr": "0.1"} and run.data.tags["stage"] == "before the run opened"
    assert writer.outbox is None
