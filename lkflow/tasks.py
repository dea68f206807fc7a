"""Training tasks: what `lkflow train TARGET` receives, calls and fits.

A task is a function in a Python file or module that takes the command's options and returns
the model with its data:

    # my_task.py (examples/rings.py and examples/digits.py are two more)
    from lkflow import LightModel
    from lkflow.tasks import Task, TaskOptions

    def task(options: TaskOptions) -> Task:
        net = Net()
        lr = 1e-2 if options.lr is None else options.lr
        model = LightModel(net, loss_fn=nn.BCELoss(),
                           optimizer=torch.optim.Adam(net.parameters(), lr=lr))
        dl_train = DataLoader(ds_train, batch_size=options.batch_size or 100, shuffle=True)
        dl_valid = DataLoader(ds_valid, batch_size=100)
        return Task(model, dl_train, dl_valid, fit_kwargs={"monitor": "val_loss"})

    $ lkflow train my_task.py:task --epochs 10 --lr 0.02 --param hidden=32

TARGET names the function as uvicorn names an app: `path/to/file.py:function` (the file is
run as a script would be, with its folder first on `sys.path`) or `package.module:function`
(imported from `sys.path`, where the working folder comes first under `python -m lkflow`).

The contract:
- The command seeds every generator with `pl.seed_everything(seed)` before it calls the task
  (`--seed`, else a drawn seed that the run records as the `seed` param).
- The task receives a `TaskOptions`: `lr`, `batch_size` and `seed` as given on the command line,
  None where not given (the task then uses its own default), and `params`, the
  `--param key=value` pairs as strings (`options.param("hidden", 16)` reads one as an int).
- It returns a `Task`: a `LightModel`, the training DataLoader, optionally the validation one,
  `fit_kwargs` for `LightModel.fit` (such as `monitor="val_acc", mode="max"`, `patience=3`),
  and optionally `report(model) -> {"name.png": Figure}`: figures logged to the run after fit.
- The command fits it with `epochs`, `gpus` and the MLflow settings from the command line
  (so `fit_kwargs` may not hold those), logs the target as the `task` param, each
  `--param` as `task.<key>`, and the report's figures under `report/` in the run.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

from lkflow.errors import LkflowError
from lkflow.numbers import parse_float, parse_int

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from pytorch_lightning.callbacks import Callback
    from torch.utils.data import DataLoader

    from lkflow.model import LightModel
    from lkflow.tracking import MLflowCallback

_T = TypeVar("_T", str, int, float, bool)

# fit arguments the command line sets; a task's fit_kwargs may not set them too.
COMMAND_FIT_ARGS = (
    "epochs",
    "gpus",
    "experiment_name",
    "run_name",
    "registered_model_name",
    "tracking_uri",
    "track",
)
_EXAMPLE = "examples/rings.py:task"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True)
class TaskOptions:
    """The command-line options a task receives; None means "the task's own default".

    Example:
        >>> options = TaskOptions(lr=0.02, params={"hidden": "32"})
        >>> options.lr, options.batch_size, options.param("hidden", 16)
        (0.02, None, 32)
    """

    lr: float | None = None  # --lr: the learning rate
    batch_size: int | None = None  # --batch-size: rows per training batch
    seed: int | None = None  # --seed, already applied with pl.seed_everything
    params: Mapping[str, str] = field(default_factory=dict)  # --param key=value, as strings

    def param(self, key: str, default: _T) -> _T:
        """The `--param key=value` value converted to the type of `default`, else `default`.

        Args:
            key: The parameter's name.
            default: Returned when the parameter was not given; its type (str, int, float
                or bool) is the type the value is converted to.

        Returns:
            The converted value, or `default`.

        Raises:
            LkflowError: When the value does not convert, naming the key and the type.

        Example:
            >>> TaskOptions(params={"dropout": "0.1", "bn": "yes"}).param("dropout", 0.0)
            0.1
            >>> TaskOptions(params={"bn": "yes"}).param("bn", False)
            True
        """
        if key not in self.params:
            return default
        text = self.params[key]
        if isinstance(default, bool):
            if text.lower() not in (*_TRUE, *_FALSE):
                raise _bad_param(key, text, f"true or false ({', '.join(_TRUE + _FALSE)})")
            return text.lower() in _TRUE
        if isinstance(default, str):
            return text
        value = parse_int(text) if isinstance(default, int) else parse_float(text)
        if value is None:
            name = type(default).__name__
            raise _bad_param(key, text, f"{'an' if name == 'int' else 'a'} {name}")
        return type(default)(value)


def _bad_param(key: str, text: str, expected: str) -> LkflowError:
    return LkflowError(
        f"Received: --param {key}={text}. Expected {expected}, such as --param {key}=..."
    )


@dataclass
class Task:
    """What a task returns: the model, its data, and how to fit and report on it.

    Example:
        >>> Task(model, dl_train, dl_valid, fit_kwargs={"monitor": "val_acc", "mode": "max"})
        ... # doctest: +SKIP
    """

    model: LightModel  # the model to fit
    train_data: DataLoader[Any]  # the training batches
    val_data: DataLoader[Any] | None = None  # the validation batches, if any
    fit_kwargs: dict[str, Any] = field(default_factory=dict)  # more LightModel.fit arguments
    # Figures about the fitted model, by file name, logged to the run under report/.
    report: Callable[[LightModel], Mapping[str, Figure]] | None = None


def parse_params(pairs: tuple[str, ...] | list[str]) -> dict[str, str]:
    """`key=value` strings as a dict; the value may hold `=`, the key may not be empty.

    Args:
        pairs: The `--param` values.

    Returns:
        `{key: value}`, the last value winning for a repeated key.

    Example:
        >>> parse_params(["hidden=32", "note=a=b"])
        {'hidden': '32', 'note': 'a=b'}
    """
    params: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise LkflowError(f"Received: --param {pair!r}. Expected key=value, such as hidden=32.")
        params[key.strip()] = value
    return params


def load_task(target: str) -> Callable[[TaskOptions], Task]:
    """The task function that `target` names: `path/to/file.py:name` or `package.module:name`.

    Args:
        target: Where the function is, as uvicorn names an app.

    Returns:
        The function (not called yet).

    Raises:
        LkflowError: A malformed target, a missing file, module or attribute, or an
            attribute that is not callable.

    Example:
        >>> task = load_task("examples/rings.py:task")  # doctest: +SKIP
    """
    where, sep, name = target.rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise LkflowError(
            f"Received: target {target!r}. Expected 'path/to/file.py:function' or "
            f"'package.module:function', such as {_EXAMPLE!r}."
        )
    module = _load_file(where) if _is_path(where) else _import_module(where)
    function = getattr(module, name, None)
    if function is None:
        available = sorted(
            key for key, value in vars(module).items() if callable(value) and key[0] != "_"
        )
        raise LkflowError(
            f"Received: target {target!r}, but {where} has no {name!r}. "
            f"Its functions and classes: {', '.join(available) or 'none'}."
        )
    if not callable(function):
        raise LkflowError(
            f"Received: target {target!r}, which is not callable ({type(function).__name__}). "
            "Expected a function task(options: TaskOptions) -> Task."
        )
    return cast(Callable[[TaskOptions], Task], function)


def _is_path(where: str) -> bool:
    return where.endswith(".py") or "/" in where or "\\" in where


def _load_file(where: str) -> Any:
    path = Path(where).expanduser().resolve()
    if not path.is_file():
        raise LkflowError(
            f"Received: target file {where!r}, which does not exist (looked in {Path.cwd()}). "
            "Pass a path to a .py file, relative to the working folder."
        )
    name = f"lkflow_task_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise LkflowError(f"Received: target file {where!r}, which is not a Python file.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look classes up here
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))  # as `python file.py` does: siblings import
    spec.loader.exec_module(module)
    return module


def _import_module(where: str) -> Any:
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as err:
        if err.name is None or not (where == err.name or where.startswith(f"{err.name}.")):
            raise  # the module exists but imports something missing: the user's traceback
        raise LkflowError(
            f"Received: target module {where!r}, which cannot be imported: no module named "
            f"{err.name!r} on sys.path. Pass 'package.module:function' importable from "
            f"{Path.cwd()}, or a file path such as {_EXAMPLE!r}."
        ) from err


def build_task(function: Callable[[TaskOptions], Task], options: TaskOptions, target: str) -> Task:
    """Calls the task function and checks what it returns.

    Args:
        function: What `load_task` returned.
        options: The options to pass.
        target: The target's text, for messages.

    Returns:
        The task.

    Raises:
        LkflowError: When the function returns anything but a valid `Task`.

    Example:
        >>> task = build_task(load_task(target), TaskOptions(lr=0.01), target)  # doctest: +SKIP
    """
    from lkflow.model import LightModel

    task = function(options)
    if not isinstance(task, Task):
        raise LkflowError(
            f"Received: {target} returned {type(task).__name__}. Expected lkflow.tasks.Task, "
            "such as return Task(model, train_loader, val_loader)."
        )
    if not isinstance(task.model, LightModel):
        raise LkflowError(
            f"Received: {target} returned Task(model={type(task.model).__name__}). Expected "
            "an lkflow.LightModel, such as LightModel(net, loss_fn=nn.BCELoss())."
        )
    reserved = sorted(set(task.fit_kwargs) & set(COMMAND_FIT_ARGS))
    if reserved:
        raise LkflowError(
            f"Received: {target} returned fit_kwargs with {', '.join(reserved)}. The command "
            "line sets those (--epochs, --gpus, ...); leave them out of fit_kwargs."
        )
    if task.report is not None and not callable(task.report):
        raise LkflowError(
            f"Received: {target} returned Task(report={task.report!r}). Expected None or a "
            "function report(model) -> {'name.png': figure}."
        )
    return task


def run_task(
    target: str,
    options: TaskOptions,
    *,
    epochs: int = 10,
    gpus: str | int | None = None,
    experiment_name: str | None = None,
    run_name: str | None = None,
    registered_model_name: str | Literal[False] | None = None,
    tracking_uri: str | None = None,
) -> Task:
    """Loads the task, seeds, builds it, fits it tracked, and logs its params and report.

    Args:
        target: `path/to/file.py:function` or `package.module:function`.
        options: What the task receives; `options.seed` (else a drawn seed) seeds first.
        epochs: Epochs to train. Defaults to 10.
        gpus: As in `LightModel.fit`. Defaults to None (a GPU when there is one).
        experiment_name: MLflow experiment. Defaults to None (MLflow's default).
        run_name: MLflow run name. Defaults to None (MLflow picks one).
        registered_model_name: Name to register the net under, or False not to. Defaults
            to None (the experiment's name).
        tracking_uri: MLflow tracking URI. Defaults to None (`MLFLOW_TRACKING_URI`, else
            `sqlite:///mlflow.db`).

    Returns:
        The fitted task; `task.model.run_id` is the run.

    Example:
        >>> task = run_task("examples/rings.py:task", TaskOptions(), epochs=2)  # doctest: +SKIP
    """
    from lkflow.tracking import MLflowCallback

    function = load_task(target)
    tracker = MLflowCallback(
        experiment_name=experiment_name,
        run_name=run_name,
        registered_model_name=registered_model_name,
        tracking_uri=tracking_uri,
        params=task_params(target, options),
    )
    return fit_task(function, target, options, tracker, epochs=epochs, gpus=gpus)


def task_params(target: str, options: TaskOptions) -> dict[str, str]:
    """The params a task's run logs besides the fit's own: the target, each param as
    `task.<key>`.

    Example:
        >>> task_params("examples/rings.py:task", TaskOptions(params={"hidden": "32"}))
        {'task': 'examples/rings.py:task', 'task.hidden': '32'}
    """
    return {"task": target, **{f"task.{key}": value for key, value in options.params.items()}}


def fit_task(
    function: Callable[[TaskOptions], Task],
    target: str,
    options: TaskOptions,
    tracker: MLflowCallback,
    *,
    epochs: int = 10,
    gpus: str | int | None = None,
    callbacks: Sequence[Callback] = (),
    **fit_kwargs: Any,
) -> Task:
    """Seeds, builds the task, fits it into `tracker`'s run, and logs its report there.

    Args:
        function: What `load_task` returned.
        target: The target's text, for messages.
        options: What the task receives; `options.seed` (else a drawn seed) seeds first.
        tracker: The fit's MLflow callback.
        epochs: Epochs to train. Defaults to 10.
        gpus: As in `LightModel.fit`. Defaults to None (a GPU when there is one).
        callbacks: Lightning callbacks added to the task's own. Defaults to ().
        **fit_kwargs: `LightModel.fit` arguments that replace the task's (`monitor`, `mode`,
            `ckpt_dir`, `verbose`).

    Returns:
        The fitted task.

    Example:
        >>> fit_task(load_task(target), target, TaskOptions(), MLflowCallback())  # doctest: +SKIP
    """
    import pytorch_lightning as pl

    pl.seed_everything(_draw_seed() if options.seed is None else options.seed, verbose=False)
    task = build_task(function, options, target)
    settings = {**task.fit_kwargs, **fit_kwargs}
    settings["callbacks"] = [*task.fit_kwargs.get("callbacks", ()), *callbacks]
    task.model.fit(
        task.train_data, task.val_data, epochs=epochs, gpus=gpus, track=tracker, **settings
    )
    if task.report is not None:
        tracker.log_figures(task.report(task.model))
    return task


def _draw_seed() -> int:
    import random

    return random.SystemRandom().randrange(2**31)
