"""The outbox: what a fit could not deliver to a tracking server that went away, for `lkflow sync`.

    lkflow sync                                    # every run kept in ./mlruns-outbox
    lkflow sync --tracking-uri http://mlflow.internal:5000

A fit sends each write through its `Writer` (lkflow/tracking/writes.py). Once one fails
because the server does not answer (`lkflow.tracking.store.is_unreachable`), that write and
every later write of the run are appended, in order, to `mlruns-outbox/<run_id>/` in the
folder the fit ran in (the callback's `outbox_dir` moves it), and training goes on:

    run.json        {"run_id", "experiment_id", "tracking_uri" (credentials hidden),
                     "has_credentials"}
    journal.jsonl   one write a line, in the order the fit made them (below)
    files/<n>/      the files of line n, copied when it was written: artifacts, checkpoints,
                    the saved MLflow model
    progress.json   kept by `lkflow sync`: {"delivered": lines delivered, "model_id": the
                    logged model, once created, "registered": "name version n"}
    .lock           the outbox's lock: it has one owner at a time
    owner.json      who took the lock last: {"pid", "by": "fit" or "sync"}

Each line of the journal is a JSON object with an "op", one of the writes that
lkflow/tracking/writes.py types; paths are relative to the run's folder:

    {"op": "batch", "params": {}, "tags": {}, "metrics": [[key, value, time_ms, step]],
     "to_model": false, "datasets": {key: [name, digest]}}
                                         log_batch; to_model links the metrics to the model,
                                         datasets those keys to a dataset of the run
    {"op": "inputs", "datasets": [{"name", "digest", "source_type", "source", "profile",
     "context"}]}                        log_inputs
    {"op": "artifacts", "paths": [], "artifact_path": null}   files and folders
    {"op": "model", "path": "files/n/model", "experiment_id", "params", "step",
     "model_id": null}                   a LoggedModel: created, uploaded, finalized, output
    {"op": "register", "name", "tags", "description"}         a version of that model
    {"op": "end", "status": "FINISHED", "end_time": ms}       the status the fit ended with
    {"op": "delete_tag", "key": "lkflow.error"}               a tag removed, if the run has it

`sync_run` delivers the lines after `delivered` in order into the same run, records each
line as MLflow accepts it, and removes the run's folder when all are in: a second sync has
nothing to deliver. Only the first line a sync sends can have reached MLflow already (its
answer lost as the server went away); its metric points that the run holds are dropped and a
version of the model already registered is kept, so nothing is recorded twice.

An outbox has one owner at a time, the holder of its `.lock` (a `filelock.FileLock`; the
operating system lets go of it when its process dies, kill -9 included). The fit takes it as
it opens or continues the outbox and keeps it until the run's "end" line is written (or the
fit fails); a sync takes it for as long as it delivers and removes. A sync does not wait for
a run whose lock is held: it raises `OutboxBusy` and delivers nothing of that run, which its
fit goes on writing (`wait=True` waits for the lock instead). So a sync never removes what a
fit still writes, and two syncs never deliver the same line.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lkflow.credentials import hide_credentials
from lkflow.errors import LkflowError
from lkflow.tracking.store import HTTP_RETRIES, check_reachable, env_defaults, is_unreachable

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from lkflow.tracking.writes import State, Write

DEFAULT_DIR = "mlruns-outbox"
_LOCK = ".lock"  # the outbox's lock file, in the run's folder


# ---- the journal ---------------------------------------------------------------------------


class Outbox:
    """The writes of one run kept on disk, in `folder` (laid out as the module docstring says).

    Args:
        folder: The run's folder, `<outbox dir>/<run_id>`.

    Example:
        >>> outbox = Outbox.open("mlruns-outbox", run_id, "0", uri)  # doctest: +SKIP
        >>> outbox.append({"op": "end", "status": "FINISHED", "end_time": 0})  # doctest: +SKIP
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        from filelock import FileLock

        self.folder = Path(folder)
        self.journal = self.folder / "journal.jsonl"
        self._lock = FileLock(self.folder / _LOCK)
        self._lines = 0

    @classmethod
    def open(
        cls, root: str | os.PathLike[str], run_id: str, experiment_id: str, tracking_uri: str
    ) -> Outbox:
        """The outbox of `run_id` under `root`, its lock taken for the fit (waiting while a
        sync delivers it); made when new, continued when it is there."""
        folder = Path(root) / run_id
        outbox = cls(folder)
        outbox.take("fit", wait=True)
        if not (folder / "run.json").exists():
            hidden = hide_credentials(tracking_uri)
            meta = {
                "run_id": run_id,
                "experiment_id": experiment_id,
                "tracking_uri": hidden,
                "has_credentials": hidden != tracking_uri,
            }
            _write_json(folder / "run.json", meta)
        return outbox

    @property
    def held(self) -> bool:
        """Whether this process owns the outbox now."""
        return self._lock.is_locked

    def take(self, by: str, wait: bool) -> None:
        """Takes the outbox's lock for the fit or a sync (`by`); reentrant.

        Args:
            by: Who takes it, "fit" or "sync", as a busy message names it.
            wait: Wait while another process holds it; else raise at once.

        Raises:
            OutboxBusy: Another process holds the lock and `wait` is False.
        """
        from filelock import Timeout

        while not self.held:
            self.folder.mkdir(parents=True, exist_ok=True)
            try:
                self._lock.acquire(timeout=-1 if wait else 0)
            except FileNotFoundError:  # a sync removed the folder meanwhile: make it again
                continue
            except Timeout:
                raise OutboxBusy(self.folder) from None
        self._lines = len(self.journal.read_text().splitlines()) if self.journal.exists() else 0
        _write_json(self.folder / "owner.json", {"pid": os.getpid(), "by": by})

    def release(self) -> None:
        """Lets go of the outbox's lock, if held: a sync may deliver it now."""
        if self.held:
            self._lock.release(force=True)

    def remove(self) -> None:
        """Deletes the delivered outbox, then lets go of its lock; the lock must be held.

        The journal goes first: a removal cut short leaves no line to deliver twice.
        """
        self.journal.unlink(missing_ok=True)
        for path in self.folder.iterdir():
            if path.is_dir():
                shutil.rmtree(path)
            elif path.name != _LOCK:
                path.unlink()
        with contextlib.suppress(OSError):  # Windows keeps a held file: FileLock unlinks it
            (self.folder / _LOCK).unlink()  # anyone waiting on it then takes a new one
        self.release()
        for folder in (self.folder, self.folder.parent):
            with contextlib.suppress(OSError):  # not empty: a fit began an outbox meanwhile
                folder.rmdir()

    def append(self, write: Write) -> None:
        """Adds a write at the journal's end; its files are copied to `files/<n>/` now."""
        line: dict[str, Any] = dict(write)
        if "paths" in line:
            line["paths"] = [self._keep(path) for path in line["paths"]]
        if "path" in line:
            line["path"] = self._keep(line["path"])
        with open(self.journal, "a") as file:
            file.write(json.dumps(line) + "\n")
        self._lines += 1

    def _keep(self, path: str) -> str:
        source = Path(path)
        target = self.folder / "files" / str(self._lines) / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy2(source, target)
        return target.relative_to(self.folder).as_posix()

    def meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = json.loads((self.folder / "run.json").read_text())
        return meta

    def entries(self) -> list[Write]:
        """The journal's writes in order, their paths made absolute."""
        lines = self.journal.read_text().splitlines() if self.journal.exists() else []
        entries: list[Any] = [json.loads(line) for line in lines if line.strip()]
        for entry in entries:
            if "paths" in entry:
                entry["paths"] = [str(self.folder / path) for path in entry["paths"]]
            if "path" in entry:
                entry["path"] = str(self.folder / entry["path"])
        return entries

    def progress(self) -> State:
        path = self.folder / "progress.json"
        state: State = {"delivered": 0, "model_id": None}
        state.update(json.loads(path.read_text()) if path.exists() else {})
        return state

    def save_progress(self, state: State) -> None:
        _write_json(self.folder / "progress.json", state)


def _write_json(path: Path, value: Mapping[str, Any]) -> None:
    """`value` as JSON at `path`, replaced whole (never half written) from a file of this
    write's own, so that no two writes share a partial file."""
    with tempfile.NamedTemporaryFile(
        "w", dir=path.parent, prefix=f"{path.name}.", suffix=".partial", delete=False
    ) as partial:
        partial.write(json.dumps(value, indent=1) + "\n")
    os.replace(partial.name, path)


class OutboxBusy(LkflowError):
    """Another process owns a run's outbox: its fit, still running, or another sync.

    Args:
        folder: The run's outbox folder.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        try:
            owner = json.loads((folder / "owner.json").read_text())
        except (OSError, ValueError):
            owner = {"pid": "unknown", "by": ""}
        if owner["by"] == "fit":
            holds = f"its fit (process {owner['pid']}) is still running and owns the outbox"
            then = "after the fit ends"
        else:
            holds = f"another `lkflow sync` (process {owner['pid']}) is delivering it"
            then = "after that sync"
        super().__init__(
            f"Run {folder.name}: {holds}, {folder}. Nothing of it was delivered; it stays "
            f"there. Run `lkflow sync` again {then}, or `lkflow sync --wait`."
        )


# ---- lkflow sync ---------------------------------------------------------------------------


def run_folders(root: str | os.PathLike[str]) -> list[Path]:
    """The runs kept under `root`, one folder each; [] when there is none."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(folder for folder in root.iterdir() if (folder / "run.json").is_file())


def sync_run(
    folder: str | os.PathLike[str], tracking_uri: str | None = None, wait: bool = False
) -> str:
    """Delivers a run's outbox into the run, then removes the outbox; says what was delivered.

    Args:
        folder: The run's outbox folder, `<outbox dir>/<run_id>`.
        tracking_uri: Where the run is. Defaults to None: the tracking URI the fit logged to
            (taken from `MLFLOW_TRACKING_URI` when the recorded one had credentials).
        wait: Wait while the run's fit or another sync owns the outbox. Defaults to False:
            raise `OutboxBusy` then, delivering nothing of the run.

    Returns:
        One line: the run, the store, and what went into the run.

    Raises:
        OutboxBusy: The run's fit is still running, or another sync delivers the run.
        LkflowError: The server cannot be reached, or went away during the sync (what was
            delivered stays delivered: the next sync goes on from there), or the run is not
            in the store.
    """
    outbox = Outbox(folder)
    outbox.take("sync", wait)
    try:
        if not (outbox.folder / "run.json").exists():  # delivered by the sync it waited for
            outbox.remove()
            return f"Run {outbox.folder.name}: nothing to deliver, another sync delivered it."
        return _deliver_all(outbox, tracking_uri)
    finally:
        outbox.release()


def _deliver_all(outbox: Outbox, tracking_uri: str | None) -> str:
    """`sync_run` once it owns the outbox."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from lkflow.tracking.writes import deliver  # which sends to the outbox: imported here

    run_id = outbox.meta()["run_id"]
    uri = _target_uri(outbox.meta(), tracking_uri)
    check_reachable(uri)
    client = MlflowClient(uri)
    entries, state = outbox.entries(), outbox.progress()
    start = state["delivered"]
    with env_defaults(HTTP_RETRIES):  # the "end" write keeps MLflow's own run link unprinted
        try:
            _check_run(client, run_id)
            for index in range(start, len(entries)):
                deliver(client, run_id, entries[index], state, maybe_sent=index == start)
                state["delivered"] = index + 1
                outbox.save_progress(state)
        except MlflowException as err:
            if not is_unreachable(err):
                raise
            raise LkflowError(
                f"The tracking server at {hide_credentials(uri)} went away during the sync of "
                f"run {run_id}: {state['delivered']} of {len(entries)} writes delivered, the "
                f"rest kept in {outbox.folder}. Run `lkflow sync` again once it is back."
            ) from err
        finally:
            outbox.save_progress(state)  # with a LoggedModel created before a failure
    line = _summary(run_id, hide_credentials(uri), entries[start:], state)
    outbox.remove()
    return line


def _target_uri(meta: Mapping[str, Any], tracking_uri: str | None) -> str:
    if tracking_uri:
        return tracking_uri
    variable = os.environ.get("MLFLOW_TRACKING_URI")
    if variable and hide_credentials(variable) == meta["tracking_uri"]:
        return variable
    if meta["has_credentials"]:
        raise LkflowError(
            f"Run {meta['run_id']} was logged to {meta['tracking_uri']}, whose credentials "
            "the outbox does not keep. Pass --tracking-uri with them, or set "
            "MLFLOW_TRACKING_URI to that URI."
        )
    return str(meta["tracking_uri"])


def _check_run(client: MlflowClient, run_id: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise LkflowError(
            f"Received: run {run_id}, which is not at {hide_credentials(client.tracking_uri)}. "
            "Pass --tracking-uri of the store the fit logged to."
        ) from err


def _summary(run_id: str, uri: str, writes: Sequence[Write], state: State) -> str:
    """`Run <id> at <uri>: delivered 9 params, 24 metric values, ..., ended FINISHED.`"""
    batches = [write for write in writes if write["op"] == "batch"]
    counts = {
        "params": sum(len(write.get("params", {})) for write in batches),
        "tags": sum(len(write.get("tags", {})) for write in batches),
        "metric values": sum(len(write.get("metrics", [])) for write in batches),
        "datasets": sum(len(write["datasets"]) for write in writes if write["op"] == "inputs"),
        "artifact files": sum(
            _files(path)
            for write in writes
            if write["op"] == "artifacts"
            for path in write["paths"]
        ),
    }
    parts = [f"{count} {what}" for what, count in counts.items() if count]
    ops = {write["op"]: write for write in writes}
    if "model" in ops:
        parts.append(f"model {state['model_id']}")
    if "register" in ops:
        parts.append(f"registered as {state['registered']}")
    ends = [write["status"] for write in writes if write["op"] == "end"]
    if ends:
        parts.append(f"ended {ends[-1]}")
    return f"Run {run_id} at {uri}: delivered {', '.join(parts) or 'nothing (all was in)'}."


def _files(path: str) -> int:
    return sum(1 for p in Path(path).rglob("*") if p.is_file()) if os.path.isdir(path) else 1
