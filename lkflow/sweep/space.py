"""A sweep's search space: `KEY=SPEC` from the command line, or a task file's `space(trial)`.

    space = parse_space(["lr=loguniform(1e-4,1e-1)", "hidden=int(16,256,log)",
                         "dropout=uniform(0,0.5)", "optimizer=choice(adam,sgd)"])
    values = sample(space, trial)                # {"lr": 0.0031, "hidden": 37, ...}
    options = trial_options(TaskOptions(), values)  # lr=0.0031, params={"hidden": "37", ...}

The specs, each checked before any trial runs:
- `uniform(low,high)` and `loguniform(low,high)`: a float (log-scaled: low above 0); `uniform`
  takes `step=S` too;
- `int(low,high)`, `int(low,high,log)`, `int(low,high,step=N)`: an int, both bounds included;
- `choice(a,b,...)`: one of the values, each read as an int, a float, else a string.

A task reads the values as it reads `lkflow train`'s options: `lr` and `batch_size` arrive as
`options.lr` and `options.batch_size`, any other key through `options.param(key, default)`.
A `space(trial)` function beside the task returns `{key: value}` (None: `trial.params`) from
Optuna's `trial.suggest_*` calls, for anything these specs do not say (conditions, derived
values). Nothing here imports Optuna: `sample` is handed the trial.
"""

from __future__ import annotations

import difflib
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, cast

from lkflow.errors import LkflowError
from lkflow.numbers import parse_float, parse_int

if TYPE_CHECKING:
    import optuna

    from lkflow.tasks import TaskOptions

Value = int | float | str
SpaceFunction = Callable[["optuna.Trial"], Mapping[str, Any] | None]

_KINDS = {
    "uniform": "uniform(low,high)",
    "loguniform": "loguniform(low,high)",
    "int": "int(low,high[,log][,step=N])",
    "choice": "choice(a,b,...)",
}
_EXAMPLE = "lr=loguniform(1e-4,1e-1)"
_SPEC = re.compile(r"(?P<kind>[A-Za-z_]\w*)\s*\((?P<args>.*)\)", re.S)
_KEY = re.compile(r"[A-Za-z_][\w.-]*")
# TaskOptions fields a space may set, and the type each must be.
_OPTION_TYPES: dict[str, type] = {"lr": float, "batch_size": int}


@dataclass(frozen=True)
class Param:
    """One dimension of the space, as `KEY=SPEC` said it."""

    name: str  # the key: `lr`, `batch_size`, or a task param such as `hidden`
    spec: str  # the spec as typed, spaces removed: `loguniform(1e-4,1e-1)`
    kind: Literal["float", "int", "choice"]
    low: float = 0.0  # the bounds of a float or an int, both included
    high: float = 0.0
    log: bool = False  # sampled on a log scale
    step: float | None = None  # the grid of a float or an int; None: continuous (1 for an int)
    choices: tuple[Value, ...] = ()  # the values of a choice

    def sample(self, trial: optuna.Trial) -> Value:
        """This dimension's value for `trial`, through `trial.suggest_*` (recorded by Optuna)."""
        if self.kind == "choice":
            return cast(Value, trial.suggest_categorical(self.name, list(self.choices)))
        if self.kind == "int":
            step = 1 if self.step is None else int(self.step)
            return trial.suggest_int(
                self.name, int(self.low), int(self.high), step=step, log=self.log
            )
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)


def parse_space(specs: Sequence[str]) -> list[Param]:
    """The `--space KEY=SPEC` values as the space's dimensions, each checked.

    Args:
        specs: The `--space` values, such as `["lr=loguniform(1e-4,1e-1)", "hidden=int(16,256)"]`.

    Returns:
        One `Param` a key, in the order given.

    Raises:
        LkflowError: A spec that is malformed, of an unknown kind, with bad bounds, or a key
            given twice; the message names the spec and shows the forms that work.

    Example:
        >>> [p.kind for p in parse_space(["lr=loguniform(1e-4,1e-1)", "act=choice(relu,gelu)"])]
        ['float', 'choice']
    """
    space: list[Param] = []
    for text in specs:
        param = parse_param(text)
        if any(other.name == param.name for other in space):
            raise LkflowError(
                f"Received: --space {param.name}=... twice. Give each key one spec, such as "
                f"--space {param.name}={param.spec}."
            )
        space.append(param)
    return space


def parse_param(text: str) -> Param:
    """One `KEY=SPEC` as a `Param`; see `parse_space`.

    Example:
        >>> param = parse_param("hidden=int(16,256,log)")
        >>> param.kind, param.low, param.high, param.log
        ('int', 16, 256, True)
    """
    key, sep, spec = text.partition("=")
    key, spec = key.strip(), re.sub(r"\s+", "", spec)
    if not sep or not _KEY.fullmatch(key):
        raise LkflowError(
            f"Received: --space {text!r}. Expected KEY=SPEC with KEY a name, such as {_EXAMPLE}."
        )
    match = _SPEC.fullmatch(spec)
    if match is None:
        raise _bad(
            key,
            spec,
            "not of the form KIND(ARGS).",
            f"A fixed value goes in --param {key}={spec} (or --lr, --batch-size) instead.",
        )
    kind, args = match["kind"], match["args"].split(",") if match["args"] else []
    if kind not in _KINDS:
        close = difflib.get_close_matches(kind, list(_KINDS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise _bad(key, spec, f"unknown kind {kind!r}.{hint}")
    param = _choice(key, spec, args) if kind == "choice" else _range(key, spec, kind, args)
    _check_option_type(param)
    return param


def _bad(key: str, spec: str, problem: str, fix: str = "") -> LkflowError:
    forms = ", ".join(_KINDS.values())
    return LkflowError(
        f"Received: --space {key}={spec}: {problem} Expected one of {forms}, such as "
        f"{_EXAMPLE}. {fix}".strip()
    )


def _range(key: str, spec: str, kind: str, args: list[str]) -> Param:
    numbers = [a for a in args if a != "log" and not a.startswith("step=")]
    steps = [a.removeprefix("step=") for a in args if a.startswith("step=")]
    log = "log" in args
    if len(numbers) != 2 or len(steps) > 1 or args.count("log") > 1:
        raise _bad(key, spec, f"not of the form {_KINDS[kind]}.")
    if log and kind != "int":
        raise _bad(key, spec, "'log' is for int; loguniform(low,high) is the log-scaled float.")
    texts = [*numbers, *steps]
    parsed = [parse_int(t) if kind == "int" else parse_float(t) for t in texts]
    bad = next((t for t, v in zip(texts, parsed, strict=True) if v is None), None)
    if bad is not None:
        raise _bad(key, spec, f"{bad!r} is not {'an int' if kind == 'int' else 'a number'}.")
    low, high, step = float(parsed[0] or 0), float(parsed[1] or 0), parsed[2] if steps else None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise _bad(key, spec, f"low={numbers[0]} is not below high={numbers[1]}.")
    if kind == "loguniform" and (low <= 0 or steps):
        raise _bad(key, spec, "a log scale needs low > 0 and no step.")
    if step is not None and (step <= 0 or log):
        raise _bad(key, spec, "step must be above 0, and without log.")
    if kind == "int":
        return Param(key, spec, "int", int(low), int(high), log, step)
    return Param(key, spec, "float", low, high, kind == "loguniform", step)


def _choice(key: str, spec: str, args: list[str]) -> Param:
    if not args or any(not a for a in args):
        raise _bad(key, spec, "a choice is empty.")
    choices = tuple(_value(a) for a in args)
    if len(set(choices)) < len(choices):
        raise _bad(key, spec, "a value is given twice.")
    return Param(key, spec, "choice", choices=choices)


def _value(text: str) -> Value:
    whole = parse_int(text)
    if whole is not None:
        return whole
    number = parse_float(text)
    return text if number is None else number


def _check_option_type(param: Param) -> None:
    """`lr` must be a number and `batch_size` an int of at least 1: they fill TaskOptions."""
    expected = _OPTION_TYPES.get(param.name)
    if expected is None:
        return
    values = list(param.choices) if param.kind == "choice" else [param.low, param.high]
    if (param.kind == "float" and expected is int) or not all(_is(v, expected) for v in values):
        form = "int(low,high) or a choice of ints >= 1" if expected is int else "numbers"
        example = "batch_size=choice(32,64,128)" if expected is int else _EXAMPLE
        raise LkflowError(
            f"Received: --space {param.name}={param.spec}. {param.name} becomes "
            f"TaskOptions.{param.name}, so it takes {form}, such as {example}."
        )


def task_space(
    function: Callable[..., Any], specs: Sequence[str], target: str
) -> list[Param] | SpaceFunction:
    """The sweep's space: the `--space` specs parsed, else the `space(trial)` function that the
    task's file or module holds.

    Raises:
        LkflowError: A bad spec, or no spec and no callable `space` beside the task.
    """
    if specs:
        return parse_space(specs)
    function_space = getattr(sys.modules.get(function.__module__), "space", None)
    if not callable(function_space):
        where = target.rpartition(":")[0]
        raise LkflowError(
            f"Received: no --space, and {where} has no space(trial) function. Pass the space "
            f"as --space KEY=SPEC (such as --space {_EXAMPLE}), or define space(trial) there."
        )
    return cast(SpaceFunction, function_space)


def describe(space: Sequence[Param]) -> dict[str, str]:
    """The space as params of the sweep's run: `{"space.lr": "loguniform(1e-4,1e-1)", ...}`.

    Example:
        >>> describe(parse_space(["lr=loguniform(1e-4,1e-1)"]))
        {'space.lr': 'loguniform(1e-4,1e-1)'}
    """
    return {f"space.{param.name}": param.spec for param in space}


def sample(
    space: Sequence[Param] | SpaceFunction, trial: optuna.Trial, where: str = "space"
) -> dict[str, Any]:
    """The trial's values: each dimension sampled, or what the task's `space(trial)` returns.

    Args:
        space: The parsed `--space` dimensions, or the task file's `space` function.
        trial: The Optuna trial.
        where: The function's name for messages. Defaults to "space".

    Returns:
        `{key: value}`.

    Raises:
        LkflowError: The function returned anything but a dict (or None), or a value that
            `lr` or `batch_size` cannot take.
    """
    if not callable(space):
        return {param.name: param.sample(trial) for param in space}
    values = space(trial)
    if values is None:
        values = trial.params
    if not isinstance(values, Mapping):
        raise LkflowError(
            f"Received: {where}(trial) returned {type(values).__name__}. Expected a dict of "
            "values, such as return {'lr': trial.suggest_float('lr', 1e-4, 1e-1, log=True)}."
        )
    for key, expected in _OPTION_TYPES.items():
        value = values.get(key)
        if value is not None and not _is(value, expected):
            raise LkflowError(
                f"Received: {where}(trial) returned {key}={value!r}. {key} becomes "
                f"TaskOptions.{key}: return {'an int >= 1' if expected is int else 'a float'}."
            )
    return dict(values)


def _is(value: Any, expected: type) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) and value >= 1 if expected is int else True


def trial_options(base: TaskOptions, values: Mapping[str, Any]) -> TaskOptions:
    """The options a trial's task receives: `base` (the command's) with the sampled values.

    Args:
        base: The command's options: `--lr`, `--batch-size`, `--seed`, `--param`.
        values: The trial's values; `lr` and `batch_size` fill those fields, every other key
            joins `params` as text that `options.param(key, default)` reads back.

    Returns:
        The trial's options.

    Example:
        >>> from lkflow.tasks import TaskOptions
        >>> trial_options(TaskOptions(params={"x": "1"}), {"lr": 0.01, "hidden": 37, "bn": True})
        TaskOptions(lr=0.01, batch_size=None, seed=None, params={'x': '1', 'hidden': '37', 'bn': 'true'})
    """  # noqa: E501
    rest = {key: _text(value) for key, value in values.items() if key not in _OPTION_TYPES}
    return replace(
        base,
        lr=float(values["lr"]) if "lr" in values else base.lr,
        batch_size=int(values["batch_size"]) if "batch_size" in values else base.batch_size,
        params={**base.params, **rest},
    )


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)
