"""Servers that tests start on 127.0.0.1: `mlflow server` and the scoring servers, and a Python
where lkflow cannot be imported to run them in and to load registered models with."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch

BIN = Path(sys.executable).parent  # the venv's bin: mlflow, uvicorn, lkflow


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bin_path_env() -> dict[str, str]:
    """This environment with the venv's bin first on PATH (`mlflow models serve` runs uvicorn)."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


def lkflow_free_python(folder: Path) -> Path:
    """A venv in `folder` that sees this venv's packages but not its editable lkflow: the
    packages' folder is on its path, but the .pth files in it (lkflow's finder) are not run.
    Its bin holds a `uvicorn`, which `mlflow models serve` runs from PATH."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    python = folder / "bin" / "python"
    own = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    shared = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    (Path(own) / "shared_packages.pth").write_text("".join(f"{p}\n" for p in shared))
    uvicorn = folder / "bin" / "uvicorn"
    uvicorn.write_text(f"#!{python}\nimport sys\nfrom uvicorn.main import main\nsys.exit(main())\n")
    uvicorn.chmod(0o755)
    return python


def lkflow_free_env(python: Path) -> dict[str, str]:
    """This environment with `python`'s bin, not this venv's, first on PATH, and no
    PYTHONPATH or PYTHONHOME: what a process of `lkflow_free_python` runs in."""
    base = bin_path_env()
    env = {k: v for k, v in base.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return {**env, "PATH": f"{python.parent}{os.pathsep}{base['PATH'].replace(f'{BIN}:', '')}"}


class Server:
    """A command started in its own process group and awaited on `ready_url`; stopped on exit.

    Example:
        >>> with Server(["mlflow", "server", ...], tmp_path, url + "/health") as base_url:
        ...     MlflowClient(base_url)
    """

    def __init__(
        self, command: list[str], cwd: Path, ready_url: str, env: dict[str, str] | None = None
    ) -> None:
        self.command, self.cwd, self.ready_url = command, cwd, ready_url
        self.env = env or bin_path_env()
        self.log_path = cwd / f"{Path(command[0]).name}-{ready_url.rsplit(':', 1)[-1][:5]}.log"

    def __enter__(self) -> str:
        self.log = open(self.log_path, "w")  # closed in __exit__
        self.process = subprocess.Popen(
            self.command,
            cwd=self.cwd,
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                with urllib.request.urlopen(self.ready_url, timeout=2):
                    return self.ready_url.rsplit("/", 1)[0]
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise AssertionError(f"{self.command[:3]} did not start:\n{self.output()[-3000:]}")

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL after 20 s."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()

    def output(self) -> str:
        return self.log_path.read_text()


def models_serve(
    model_uri: str, cwd: Path, env: dict[str, str], python: Path | None = None
) -> Server:
    """`mlflow models serve` of `model_uri` on a free port of 127.0.0.1 with one worker and this
    environment's packages (`--env-manager local`), run by `python` where given, else by this
    venv's `mlflow`.

    Example:
        >>> with models_serve("models:/rings-net/1", tmp_path, bin_path_env()) as url:
        ...     post(f"{url}/invocations", {"inputs": [[5.0, 0.3]]})
    """
    port = free_port()
    mlflow = [str(BIN / "mlflow")] if python is None else [str(python), "-m", "mlflow"]
    command = [*mlflow, "models", "serve", "-m", model_uri, "--env-manager", "local"]
    command += ["-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    return Server(command, cwd, f"http://127.0.0.1:{port}/ping", env)


def post(url: str, body: dict[str, Any]) -> tuple[int, Any]:
    """POSTs `body` as JSON to `url`; the status and the JSON answer, also of an error."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def mlflow_server(
    backend_uri: str,
    artifacts: Path,
    cwd: Path,
    port: int | None = None,
    subcommand: str = "server",
) -> Server:
    """`mlflow server` (or `mlflow ui`, the same server under its other name) over
    `backend_uri`, serving artifacts from `artifacts`, on 127.0.0.1, with one worker and
    without MLflow's job runner."""
    port = port or free_port()
    command = [str(BIN / "mlflow"), subcommand, "--backend-store-uri", backend_uri]
    command += ["--artifacts-destination", str(artifacts), "-h", "127.0.0.1", "-p", str(port)]
    # Without MLflow's job runner (7 more processes, for GenAI features that runs don't use)
    env = {**bin_path_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"  # the UI's pages ask for nothing outside
    return Server([*command, "-w", "1"], cwd, f"http://127.0.0.1:{port}/health", env)


# ---- PostgreSQL -----------------------------------------------------------------------------

_PG_BIN_FOLDERS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


def _pg_tool(name: str) -> str | None:
    """The path of PostgreSQL's `name` (initdb, pg_ctl): on PATH, else in Debian's folder."""
    found = shutil.which(name)
    if found:
        return found
    return next((str(f / name) for f in _PG_BIN_FOLDERS if (f / name).is_file()), None)


def postgres_missing() -> str | None:
    """Why a PostgreSQL cluster cannot be started here, or None when it can."""
    missing = [name for name in ("initdb", "pg_ctl") if _pg_tool(name) is None]
    if missing:
        return (
            f"no {' or '.join(missing)} of PostgreSQL on PATH or in /usr/lib/postgresql/*/bin: "
            "install PostgreSQL 15 (apt-get install postgresql) to run the store tests on an "
            "mlflow server over PostgreSQL"
        )
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return (
                "running as root, which PostgreSQL refuses, and there is no 'postgres' user to "
                "run it as: add one (useradd postgres) or run the tests as another user"
            )
        if shutil.which("runuser") is None:
            return (
                "running as root, and runuser, needed to start PostgreSQL as postgres, is missing"
            )
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed: pip install -e '.[test]'"
    return None


class Postgres:
    """A PostgreSQL cluster of its own in a temporary folder, on a free port of 127.0.0.1,
    without durability (no fsync): what one test session's stores live in. As root it runs as
    the `postgres` user, since PostgreSQL refuses to run as root.

    Example:
        >>> with Postgres() as postgres:
        ...     postgres.create("runs")
        ...     MlflowClient(postgres.uri("runs"))
    """

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="lkflow-pg-"))  # /tmp: postgres can reach it
        self.port = free_port()
        self._connection: Any = None

    def _run(self, tool: str, *args: str) -> None:
        command = [_pg_tool(tool) or tool, *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, cwd=self.folder, capture_output=True, text=True)
        if done.returncode != 0:
            raise AssertionError(f"{tool} failed:\n{done.stdout}\n{done.stderr}")

    def __enter__(self) -> Postgres:
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres", "postgres")
        data = str(self.folder / "data")
        self._run("initdb", "-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
        settings = f"-h 127.0.0.1 -p {self.port} -k {self.folder} -F -c full_page_writes=off"
        log = str(self.folder / "postgres.log")
        self._run("pg_ctl", "-D", data, "-l", log, "-o", settings, "-w", "-t", "60", "start")
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._connection is not None:
            self._connection.close()
        with contextlib.suppress(AssertionError):
            self._run("pg_ctl", "-D", str(self.folder / "data"), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.folder, ignore_errors=True)

    def uri(self, database: str) -> str:
        """The SQLAlchemy URI of `database`, as `mlflow server --backend-store-uri` takes it."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def execute(self, *statements: str) -> None:
        """Runs each statement on its own (autocommit), as the `postgres` superuser."""
        import psycopg

        if self._connection is None:
            self._connection = psycopg.connect(
                host="127.0.0.1", port=self.port, user="postgres", dbname="postgres",
                autocommit=True,
            )  # fmt: skip
        for statement in statements:
            self._connection.execute(statement)

    def create(self, database: str, template: str | None = None) -> str:
        """A new database, a copy of `template` if given (milliseconds); its URI."""
        copy = ""
        if template is not None:  # a template must have no connections while it is copied
            copy = f" TEMPLATE {template}"
            self.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                f"WHERE datname = '{template}'"
            )
        self.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        self.execute(f"CREATE DATABASE {database}{copy}")
        return self.uri(database)


MIGRATED = "migrated"  # the database of an empty MLflow store that others are copied from


def migrate(uri: str) -> None:
    """Creates MLflow's tables in the empty database `uri`, whose Default experiment keeps its
    artifacts on the tracking server (`mlflow-artifacts:/0`), and closes its connections."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    SqlAlchemyStore(uri, "mlflow-artifacts:/").engine.dispose()


class PgServer:
    """One `mlflow server` over the PostgreSQL database `served` (artifacts in
    `folder/artifacts`), kept for a test session; `fresh()` makes the database anew from
    `MIGRATED` and empties the artifacts, so each test starts on an empty store. The server's
    pooled connections to the old database are closed, and it opens new ones.

    Example:
        >>> with PgServer(postgres, tmp_path) as server:
        ...     MlflowClient(server.fresh()).search_experiments()
        [<Experiment: ... name='Default' ...>]
    """

    DATABASE = "served"

    def __init__(self, postgres: Postgres, folder: Path) -> None:
        self.postgres, self.artifacts = postgres, folder / "artifacts"
        self.backend = postgres.create(self.DATABASE, MIGRATED)  # the database's own URI
        self.server = mlflow_server(self.backend, self.artifacts, folder)
        self.url = ""

    def __enter__(self) -> PgServer:
        self.url = self.server.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.stop()

    def kill(self) -> None:
        """Kills the server at once (SIGKILL), as a crash would."""
        os.killpg(self.server.process.pid, signal.SIGKILL)
        self.server.stop()

    def start(self) -> None:
        """Starts the server again, on the same port and database."""
        self.server.__enter__()

    def fresh(self) -> str:
        """The server's URL, its store made empty."""
        self.postgres.create(self.DATABASE, MIGRATED)
        shutil.rmtree(self.artifacts, ignore_errors=True)
        return self.url


# ---- a registered model, loaded where lkflow cannot be imported ------------------------------

_LOAD = """
    import json, sys, traceback
    try:
        import lkflow
    except ImportError:
        pass
    else:
        sys.exit("lkflow can be imported here")
    import numpy as np
    import mlflow.pyfunc

    def plain(value):
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        array = np.asarray(value)
        return {"data": array.tolist(), "dtype": str(array.dtype)}

    def answer(job):
        mlflow.set_tracking_uri(job["tracking_uri"])
        model = mlflow.pyfunc.load_model(job["model_uri"])
        request = {k: np.array(v["data"], dtype=v["dtype"]) for k, v in job["rows"].items()}
        example = model.input_example
        return {
            "flavors": sorted(model.metadata.flavors),
            "inputs": model.metadata.get_input_schema().input_names(),
            "answer": plain(model.predict(request)),
            "example": plain(example),
            "example_answer": plain(model.predict(example)),
        }

    for line in sys.stdin:  # a job a line, an answer a line
        try:
            print(ANSWER, json.dumps(answer(json.loads(line))), flush=True)
        except Exception:
            print(ANSWER, json.dumps({"error": traceback.format_exc()}), flush=True)
"""
_ANSWER = "answer:"  # what starts the loader's answer lines; anything else printed is passed over


class Loader:
    """A Python of `lkflow_free_python` that loads registered models with mlflow.pyfunc and
    answers requests with them, started once for many models (its imports take seconds).

    Example:
        >>> with Loader(python, tmp_path) as loader:
        ...     loader.load("models:/tabular/1", tracking_uri, {"x_num": ..., "x_cat": ...})
    """

    def __init__(self, python: Path, cwd: Path) -> None:
        self.python, self.cwd = python, cwd

    def __enter__(self) -> Loader:
        code = f"ANSWER = {_ANSWER!r}\n" + textwrap.dedent(_LOAD)
        self.process = subprocess.Popen(
            [str(self.python), "-c", code],
            cwd=self.cwd,
            env=lkflow_free_env(self.python),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=60)

    def load(
        self, model_uri: str, tracking_uri: str, rows: dict[str, torch.Tensor]
    ) -> dict[str, Any]:
        """What `model_uri` of `tracking_uri` answers for `rows` and for its own input example,
        with its flavors and input names."""
        assert self.process.stdin is not None and self.process.stdout is not None
        plain_rows = {
            k: {"data": t.tolist(), "dtype": str(t.numpy().dtype)} for k, t in rows.items()
        }
        job = {"model_uri": model_uri, "tracking_uri": tracking_uri, "rows": plain_rows}
        self.process.stdin.write(json.dumps(job) + "\n")
        self.process.stdin.flush()
        line = ""
        while not line.startswith(_ANSWER):
            line = self.process.stdout.readline()
            assert line, f"the loader exited with {self.process.wait(timeout=60)}"
        answer: dict[str, Any] = json.loads(line.removeprefix(_ANSWER))
        assert "error" not in answer, answer.get("error")
        return answer


def tensors(plain: dict[str, Any]) -> Any:
    """What `_LOAD`'s `plain` wrote, as tensors again."""
    if set(plain) == {"data", "dtype"}:
        return torch.from_numpy(np.array(plain["data"], dtype=plain["dtype"]))
    return {k: tensors(v) for k, v in plain.items()}
