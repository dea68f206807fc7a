"""The tracking store, as lkflow talks to it: a well-formed URI, a server that answers, a
sqlite file that several processes can share, and how long to wait for a server.

    check_tracking_uri("sqlite:/mlflow.db")  # LkflowError: did you mean 'sqlite:///mlflow.db'?
    check_sqlite_file("sqlite:///mlflow.db")  # LkflowError at once when mlflow.db is a folder
    check_reachable("http://127.0.0.1:5000")  # LkflowError at once when nothing answers
    client = tracking_client("sqlite:///mlflow.db")  # safe from several processes at once
    uri = beside_mlflow_logger(trainer, tracking_uri_as_set())  # not an MLFlowLogger's URI
    with bounded_http_retries():
        client.log_batch(run_id, metrics=metrics)  # a dead server fails in seconds, not minutes

MLflow retries a failed HTTP request 7 times with a backoff that reaches 2 minutes a try
(`MLFLOW_HTTP_REQUEST_MAX_RETRIES`, `..._BACKOFF_FACTOR`, `..._TIMEOUT`): about 4 minutes
before a dead server raises. lkflow's own requests retry briefly instead, unless those
variables are set, and a request that still fails (`is_unreachable`) is kept for later.

MLflow creates and migrates the tables of a sqlite store when a client first opens it. Fits
started together on a new file each run the migrations, and all but one fail with
"duplicate column name" or "Online migration expected to match one row". `tracking_client`
opens a sqlite store under a file lock beside it (`mlflow.db.lock`, one per store, kept): the
first process migrates, the others find the tables made. Writes need no such help: MLflow
waits up to 20 s for a locked database.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
import socket
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from lkflow.credentials import hide_credentials
from lkflow.errors import LkflowError

if TYPE_CHECKING:
    import pytorch_lightning as pl
    from mlflow import MlflowClient

CONNECT_TIMEOUT_S = 3.0
_DEFAULT_STORE_FILE = "mlflow.db"  # the default store of MLflow and `mlflow ui`, here
UI_ADDRESS = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default
_SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every sqlite database
# lkflow's requests to a tracking server: retries, backoff factor (waits 0, 2, 4 s), timeout.
HTTP_RETRIES = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


def is_http(uri: str) -> bool:
    """Whether `uri` names a tracking server (http or https) rather than a local store."""
    parsed = urlparse(uri)
    return parsed.scheme in ("http", "https") and bool(parsed.hostname)


def run_url(uri: str, experiment_id: str, run_id: str) -> str | None:
    """The run's page in the UI of an http(s) tracking server, without the URI's credentials,
    in MLflow's model-training view (`workflowType=machine_learning`: the runs and models,
    not the GenAI overview that MLflow 3.17's UI opens on otherwise).

    Args:
        uri: The tracking URI.
        experiment_id: The run's experiment.
        run_id: The run.

    Returns:
        The page's URL; None for a local store, which has no UI of its own.

    Example:
        >>> run_url("http://alice:pw@127.0.0.1:5000/", "1", "ab12")
        'http://127.0.0.1:5000/#/experiments/1/runs/ab12?workflowType=machine_learning'
    """
    if not is_http(uri):
        return None
    parsed = urlparse(uri)
    host = parsed.netloc.rpartition("@")[2]
    base = parsed._replace(netloc=host, query="", fragment="").geturl().rstrip("/")
    return f"{base}/{ui_route(experiment_id, run_id)}"


def ui_route(experiment_id: str, run_id: str) -> str:
    """The part of a run's UI link after the server's address.

    Example:
        >>> ui_route("1", "ab12")
        '#/experiments/1/runs/ab12?workflowType=machine_learning'
    """
    return f"#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def ui_command(uri: str) -> str | None:
    """The `mlflow ui` command that shows a local store, credentials hidden: plain `mlflow ui`
    for `mlflow.db` in the working folder (its default store); None for a tracking server (its
    UI is at its own address) or a store `mlflow ui` cannot open.

    Example:
        >>> ui_command("sqlite:///mlflow.db"), ui_command("sqlite:////tmp/runs.db")
        ('mlflow ui', 'mlflow ui --backend-store-uri sqlite:////tmp/runs.db')
    """
    scheme = urlparse(uri).scheme.lower()
    if scheme != "sqlite" and scheme.partition("+")[0] not in _DATABASES:
        return None
    if sqlite_path(uri) == Path(_DEFAULT_STORE_FILE).resolve():
        return "mlflow ui"
    return f"mlflow ui --backend-store-uri {hide_credentials(uri)}"


def check_reachable(uri: str) -> None:
    """Fails fast when an http(s) tracking server does not take a TCP connection.

    Args:
        uri: A tracking URI; only http and https ones are checked.

    Raises:
        LkflowError: Nothing answers at the URI's host and port within a few seconds. The
            message names the URI with its credentials hidden, and the fix.

    Example:
        >>> check_reachable("sqlite:///mlflow.db")  # a local store: nothing to check
    """
    if not is_http(uri):
        return
    parsed = urlparse(uri)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise LkflowError(
            f"Cannot reach the MLflow tracking server at {hide_credentials(uri)} ({reason}). "
            "Start it (mlflow server --host 127.0.0.1 --port 5000), or name a reachable store: "
            "--tracking-uri, fit(tracking_uri=...) or MLFLOW_TRACKING_URI."
        ) from err


def is_unreachable(err: BaseException) -> bool:
    """Whether an MLflow error means the tracking server did not answer (gone, hung, 5xx).

    MLflow 3 raises `MlflowException("API request to ... failed with exception ...")`, error
    code INTERNAL_ERROR, while handling the `requests` error that its retries ended with: a
    `ConnectionError` (refused, reset, DNS), a `Timeout`, or a `RetryError` (429/5xx answers
    to the last retry). Any other error, such as a rejected value, is not an outage.

    Args:
        err: An exception raised by an MLflow client call.

    Returns:
        True for an `MlflowException` caused by one of those `requests` errors.
    """
    import requests
    from mlflow.exceptions import MlflowException

    outages = (
        requests.exceptions.ConnectionError,
        requests.exceptions.Timeout,
        requests.exceptions.RetryError,
    )
    cause = err.__cause__ or err.__context__
    return isinstance(err, MlflowException) and isinstance(cause, outages)


def bounded_http_retries() -> contextlib.AbstractContextManager[None]:
    """MLflow's HTTP retry settings set to `HTTP_RETRIES` for a block, where not set already.

    A dead server then fails a request in about 6 seconds and a hung one in about 2 minutes,
    instead of about 4 and 20 minutes.

    Example:
        >>> with bounded_http_retries():
        ...     os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
        '3'
    """
    return env_defaults(HTTP_RETRIES)


@contextlib.contextmanager
def env_defaults(values: Mapping[str, str], *, override: bool = False) -> Iterator[None]:
    """Environment variables set to `values` for the block, then put back as they were.

    Args:
        values: Variable names and the values they take.
        override: Whether a variable the user set takes the value too. Defaults to False:
            those are left alone.
    """
    before = {name: os.environ.get(name) for name in values}
    taken = [name for name in values if override or before[name] is None]
    os.environ.update({name: values[name] for name in taken})
    try:
        yield
    finally:
        for name in taken:
            value = before[name]
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


_TRACKING_URI_FORMS = (
    "sqlite:///mlflow.db (a file in the working folder), sqlite:////abs/path/mlflow.db, "
    "http://host:port or https://host, a database URL such as postgresql://user@host/db, "
    "or databricks"
)
_DATABASES = ("postgresql", "mysql", "mssql")
_SCHEMES = ("sqlite", "http", "https", "file", *_DATABASES, "databricks", "databricks-uc", "uc")


def check_tracking_uri(uri: str) -> None:
    """Fails, in one line naming the URI, on a tracking URI that MLflow cannot open.

    MLflow reports such a typo only at its first call, and in words about something else:
    a SQLAlchemy parse error for `sqlite:/mlflow.db`, "unsupported URI ... for model
    registry" for `htp://host`, "the filesystem backend is in maintenance mode" for
    `mlflow.db`. Schemes of installed MLflow tracking-store plugins pass.

    Args:
        uri: The tracking URI, as given or as MLflow resolved it.

    Raises:
        LkflowError: Naming the URI (credentials hidden), the accepted forms and, where one
            is likely, the URI that was meant.

    Example:
        >>> check_tracking_uri("sqlite:///mlflow.db")
        >>> check_tracking_uri("sqlite:/mlflow.db")
        Traceback (most recent call last):
        ...
        lkflow.errors.LkflowError: Received: tracking URI 'sqlite:/mlflow.db'. Expected ...
    """
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if uri in ("databricks", "databricks-uc", "uc"):
        return
    if scheme == "sqlite":
        valid = uri == "sqlite://" or (uri.startswith("sqlite:///") and uri != "sqlite:///")
    elif scheme in ("http", "https"):
        valid = bool(parsed.hostname)
    elif scheme.partition("+")[0] in _DATABASES:
        valid = bool(parsed.netloc)
    elif scheme in ("", "file") or len(scheme) == 1:  # a path (C: on Windows): a file store
        from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE

        allowed = MLFLOW_ALLOW_FILE_STORE.get()  # type: ignore[no-untyped-call]  # unannotated
        valid = bool(allowed) and not uri.endswith(".db")
    else:
        valid = scheme in _SCHEMES or scheme in _plugin_schemes()
    if valid:
        return
    meant = _meant(uri, parsed.scheme, parsed.path)
    if meant is not None:
        fix = f" Did you mean {hide_credentials(meant)!r}?"
    elif scheme in ("", "file"):
        fix = " MLflow 3.13+ opens a folder of runs only with MLFLOW_ALLOW_FILE_STORE=true."
    else:
        fix = ""
    raise LkflowError(
        f"Received: tracking URI {hide_credentials(uri)!r}. Expected {_TRACKING_URI_FORMS}."
        f"{fix} Fix tracking_uri=, --tracking-uri or MLFLOW_TRACKING_URI."
    )


def _meant(uri: str, scheme: str, path: str) -> str | None:
    """The likely intended URI of a malformed one, or None when there is no good guess."""
    rest = uri[len(scheme) + 1 :] if scheme else uri
    if scheme.lower() not in _SCHEMES and re.fullmatch(r"\d+", path or ""):
        return f"http://{uri}"  # host:port
    if scheme.lower() in ("", "file") or len(scheme) == 1:
        head, slashes, tail = rest.partition("//")
        if slashes and head.isalpha():  # http//host:5000
            scheme, rest = head, tail
        elif uri.endswith(".db"):
            return f"sqlite:///{rest.removeprefix('//')}"
        else:
            return None
    close = difflib.get_close_matches(scheme.lower(), _SCHEMES, n=1, cutoff=0.6)
    if not close:
        return None
    separator = ":///" if close[0] == "sqlite" else "://"
    meant = f"{close[0]}{separator}{rest.lstrip('/')}"
    return meant if meant != uri else None


def _plugin_schemes() -> set[str]:
    """Schemes that installed packages register as MLflow tracking stores."""
    from importlib.metadata import entry_points

    return {entry.name for entry in entry_points(group="mlflow.tracking_store")}


def tracking_client(uri: str) -> MlflowClient:
    """An `MlflowClient` of `uri`, its store opened (and, if new, migrated) by one process at once.

    Args:
        uri: A tracking URI; only `sqlite:///` files are locked, others open as they are.

    Returns:
        The client, its tracking store ready.

    Example:
        >>> tracking_client("sqlite:///mlflow.db").search_experiments()  # doctest: +SKIP
        [<Experiment: ... name='Default' ...>]
    """
    from filelock import FileLock
    from mlflow import MlflowClient

    check_sqlite_file(uri)
    path = sqlite_path(uri)
    if path is None:
        return MlflowClient(uri)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # as MLflow makes it; the lock goes in it
    except OSError as err:
        raise LkflowError(
            f"Received: tracking URI {hide_credentials(uri)!r}, whose folder {path.parent} "
            f"cannot be created ({err.strerror}). Name a store in a folder you can write to: "
            "tracking_uri=, --tracking-uri or MLFLOW_TRACKING_URI."
        ) from err
    with FileLock(_lock_file(path)):
        return MlflowClient(uri)  # builds the tracking store: creates and migrates its tables


def check_sqlite_file(uri: str) -> None:
    """Fails at once when the file of a `sqlite:///` URI is a folder or not a sqlite database.

    MLflow retries opening such a store for about 100 seconds, then speaks of something else
    ("unable to open database file", "file is not a database"). A missing or empty file
    passes: MLflow creates the database in it.

    Args:
        uri: A tracking URI; only `sqlite:///` files are checked.

    Raises:
        LkflowError: Naming the path, what it is, and the fix.

    Example:
        >>> check_sqlite_file("http://127.0.0.1:5000")  # not a sqlite file: nothing to check
    """
    path = sqlite_path(uri)
    if path is None or not path.exists():
        return
    if path.is_dir():
        found = "a folder"
    else:
        try:
            with open(path, "rb") as file:
                head = file.read(len(_SQLITE_HEADER))
        except OSError as err:
            found = f"a file that cannot be read ({err.strerror})"
        else:
            if head in (b"", _SQLITE_HEADER):
                return
            found = "a file that is not a sqlite database"
    raise LkflowError(
        f"Received: tracking URI {hide_credentials(uri)!r}, but {path} is {found}. Expected "
        "a sqlite database file, or no file (MLflow creates it). Move it out of the way, or "
        "name another store: tracking_uri=, --tracking-uri or MLFLOW_TRACKING_URI."
    )


def sqlite_path(uri: str) -> Path | None:
    """The absolute path of the database file of a `sqlite:///` URI; None for other URIs.

    Args:
        uri: A tracking URI.

    Returns:
        The file's path (which may not exist yet), or None.

    Example:
        >>> sqlite_path("sqlite:////tmp/mlflow.db"), sqlite_path("http://127.0.0.1:5000")
        (PosixPath('/tmp/mlflow.db'), None)
    """
    if not uri.startswith("sqlite:///"):
        return None
    name = uri.removeprefix("sqlite:///").partition("?")[0]
    if name in ("", ":memory:"):
        return None
    return Path(name).resolve()


def _lock_file(database: Path) -> Path:
    """The lock file of `database`, beside it: `mlflow.db.lock` for `mlflow.db`."""
    return database.with_name(f"{database.name}.lock")


def tracking_uri_as_set() -> str | None:
    """MLflow's tracking URI now, without importing MLflow: its own where it is imported (one
    set with `mlflow.set_tracking_uri` included), else `MLFLOW_TRACKING_URI`; None for neither."""
    if "mlflow" in sys.modules:
        from mlflow import get_tracking_uri

        return get_tracking_uri()
    return os.environ.get("MLFLOW_TRACKING_URI")


def beside_mlflow_logger(trainer: pl.Trainer, uri_when_made: str | None) -> str | None:
    """`uri_when_made` (`tracking_uri_as_set` when a callback was made), else MLflow's default,
    where the Trainer has an `MLFlowLogger`: it sets MLflow's URI (and `MLFLOW_TRACKING_URI`)
    to its own when the fit sets up, before any callback's `setup`. None without one."""
    from pytorch_lightning.loggers import MLFlowLogger

    if not any(isinstance(logger, MLFlowLogger) for logger in trainer.loggers):
        return None
    return uri_when_made or f"sqlite:///{Path('mlflow.db').resolve()}"
