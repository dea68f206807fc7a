"""Servers that tests start on 127.0.0.1: `mlflow server` and the scoring servers, and a Python
where lkflow cannot be imported to run them in and to load registered models with."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import sysconfig
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


def mlflow_server(backend_uri: str, artifacts: Path, cwd: Path, port: int | None = None) -> Server:
    """`mlflow server` over `backend_uri`, serving artifacts from `artifacts`, on 127.0.0.1."""
    port = port or free_port()
    command = [str(BIN / "mlflow"), "server", "--backend-store-uri", backend_uri]
    command += ["--artifacts-destination", str(artifacts), "-h", "127.0.0.1", "-p", str(port)]
    return Server([*command, "-w", "1"], cwd, f"http://127.0.0.1:{port}/health")


# ---- a registered model, loaded where lkflow cannot be imported ------------------------------

_LOAD = """
    import json, sys
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

    model = mlflow.pyfunc.load_model(sys.argv[1])
    request = {k: np.array(v["data"], dtype=v["dtype"]) for k, v in json.loads(sys.argv[2]).items()}
    example = model.input_example
    print(json.dumps({
        "flavors": sorted(model.metadata.flavors),
        "inputs": model.metadata.get_input_schema().input_names(),
        "answer": plain(model.predict(request)),
        "example": plain(example),
        "example_answer": plain(model.predict(example)),
    }))
"""


def load_elsewhere(
    model_uri: str, tracking_uri: str, rows: dict[str, torch.Tensor], python: Path, cwd: Path
) -> dict[str, Any]:
    """What `model_uri`, loaded with mlflow.pyfunc by `python` (no lkflow), answers for `rows`
    and for its own input example, with its flavors and input names."""
    request = {k: {"data": t.tolist(), "dtype": str(t.numpy().dtype)} for k, t in rows.items()}
    done = subprocess.run(
        [
            str(python),
            "-c",
            textwrap.dedent(_LOAD),
            model_uri,
            json.dumps(request),
        ],
        cwd=cwd,
        env={**lkflow_free_env(python), "MLFLOW_TRACKING_URI": tracking_uri},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def tensors(plain: dict[str, Any]) -> Any:
    """What `_LOAD`'s `plain` wrote, as tensors again."""
    if set(plain) == {"data", "dtype"}:
        return torch.from_numpy(np.array(plain["data"], dtype=plain["dtype"]))
    return {k: tensors(v) for k, v in plain.items()}
