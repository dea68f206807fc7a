"""Search spaces: `KEY=SPEC` parsed and checked, sampled by a real Optuna study, handed to the task
as TaskOptions; a task file's `space(trial)`."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lkflow import LkflowError
from lkflow.sweep.space import describe, parse_space, sample, task_space, trial_options
from lkflow.tasks import TaskOptions, load_task

ROOT = Path(__file__).resolve().parents[2]
SPECS = [
    "lr=loguniform(1e-4,1e-1)",
    "hidden=int(16,256,log)",
    "dropout=uniform(0,0.5)",
    "optimizer=choice(adam,sgd)",
    "width=int(8,64,step=8)",
    "batch_size=choice(32,64)",
]


def _study() -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))


def test_specs_become_optuna_distributions_and_values_in_their_bounds() -> None:
    space = parse_space(SPECS)
    study = _study()
    for _ in range(20):
        trial = study.ask()
        values = sample(space, trial)
        study.tell(trial, 0.0)
        assert 1e-4 <= values["lr"] <= 1e-1 and isinstance(values["lr"], float)
        assert 16 <= values["hidden"] <= 256 and isinstance(values["hidden"], int)
        assert 0 <= values["dropout"] <= 0.5
        assert values["optimizer"] in ("adam", "sgd")
        assert values["width"] % 8 == 0 and 8 <= values["width"] <= 64
        assert values["batch_size"] in (32, 64)
    distributions = study.trials[0].distributions
    assert distributions["lr"] == optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)
    assert distributions["hidden"] == optuna.distributions.IntDistribution(16, 256, log=True)
    assert distributions["width"] == optuna.distributions.IntDistribution(8, 64, step=8)
    assert distributions["optimizer"].choices == ("adam", "sgd")
    assert describe(space)["space.hidden"] == "int(16,256,log)"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("lr", "Received: --space 'lr'. Expected KEY=SPEC"),
        ("lr=0.01", "lr=0.01: not of the form KIND(ARGS). Expected one of uniform(low,high)"),
        ("lr=logunifrm(1e-4,1e-1)", "unknown kind 'logunifrm'. Did you mean 'loguniform'?"),
        ("lr=loguniform(0,1)", "a log scale needs low > 0"),
        ("lr=uniform(0.5,0.1)", "low=0.5 is not below high=0.1"),
        ("lr=uniform(a,1)", "'a' is not a number"),
        ("hidden=int(1.5,8)", "'1.5' is not an int"),
        ("hidden=int(1,8,3)", "not of the form int(low,high[,log][,step=N])"),
        ("dropout=uniform(0,1,log)", "'log' is for int"),
        ("act=choice()", "a choice is empty"),
        ("act=choice(relu,relu)", "a value is given twice"),
        ("lr=choice(adam,sgd)", "lr becomes TaskOptions.lr, so it takes numbers"),
        ("batch_size=uniform(16,64)", "batch_size becomes TaskOptions.batch_size"),
        ("batch_size=int(0,64)", "choice of ints >= 1"),
    ],
)
def test_a_bad_spec_is_named_with_the_forms_that_work(spec: str, message: str) -> None:
    with pytest.raises(LkflowError, match="^Received: --space ") as error:
        parse_space([spec])
    assert message in str(error.value)


def test_a_key_given_twice_is_an_error() -> None:
    with pytest.raises(LkflowError, match=r"--space lr=\.\.\. twice"):
        parse_space(["lr=uniform(0.1,0.2)", "lr=loguniform(1e-3,1e-1)"])


def test_sampled_values_reach_the_task_as_its_options_read_them() -> None:
    base = TaskOptions(lr=0.5, seed=3, params={"rows": "400", "hidden": "8"})
    values = {"lr": 0.0123, "hidden": 37, "dropout": 1e-05, "bn": True, "act": "gelu"}
    options = trial_options(base, values)
    assert options.lr == 0.0123 and options.batch_size is None and options.seed == 3
    assert options.param("hidden", 16) == 37 and options.param("rows", 0) == 400
    assert options.param("dropout", 0.0) == 1e-05
    assert options.param("bn", False) is True and options.param("act", "relu") == "gelu"
    assert trial_options(base, {"batch_size": 64}).batch_size == 64


@given(st.floats(allow_nan=False, allow_infinity=False), st.integers(-(10**12), 10**12))
def test_numbers_reach_the_task_unchanged(number: float, whole: int) -> None:
    options = trial_options(TaskOptions(), {"x": number, "n": whole})
    assert options.param("x", 0.0) == number and options.param("n", 0) == whole


def test_the_task_files_space_function_is_the_space_without_specs() -> None:
    function = load_task(f"{ROOT}/examples/rings.py:task")
    space = task_space(function, (), "examples/rings.py:task")
    trial = _study().ask()
    values = sample(space, trial)
    assert set(values) == {"lr", "hidden"} and trial.params == values
    assert isinstance(task_space(function, ("lr=uniform(0.1,0.2)",), "x"), list)


def test_no_specs_and_no_space_function_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "plain.py").write_text("def task(options):\n    return None\n")
    function = load_task("plain.py:task")
    with pytest.raises(LkflowError, match=r"no --space, and plain.py has no space\(trial\)"):
        task_space(function, (), "plain.py:task")


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        ([1, 2], "returned list. Expected a dict"),
        ({"lr": "fast"}, "returned lr='fast'. lr becomes TaskOptions.lr"),
        ({"batch_size": 0.5}, "returned batch_size=0.5. batch_size becomes"),
    ],
)
def test_a_space_function_returning_what_a_task_cannot_take_is_named(
    returned: object, message: str
) -> None:
    def space(trial: optuna.Trial) -> object:
        trial.suggest_float("lr", 0.1, 0.2)
        return returned

    with pytest.raises(LkflowError) as error:
        sample(space, _study().ask())
    assert str(error.value).startswith("Received: space(trial) returned") and message in str(
        error.value
    )


def test_a_space_function_returning_none_gives_the_trials_params() -> None:
    def space(trial: optuna.Trial) -> None:
        trial.suggest_float("lr", 0.1, 0.2)
        trial.suggest_int("layers", 1, 3)

    values = sample(space, _study().ask())
    assert set(values) == {"lr", "layers"} and math.isfinite(values["lr"])
