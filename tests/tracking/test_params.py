"""lkflow.tracking.params: what a fit logs as params; flattening, masking, truncation and key
cleaning, checked against MLflow's rules."""

from __future__ import annotations

import re
import warnings
from typing import Any

import pytest
import torch
from helpers import Tracked
from hypothesis import given
from hypothesis import strategies as st
from mlflow.utils import validation

from lkflow.credentials import MASK
from lkflow.tracking.params import (
    MAX_KEY_LENGTH,
    MAX_VALUE_LENGTH,
    flatten,
    prepare_params,
    same_value,
    sanitize_key,
    sanitize_keys,
    stringify,
    truncate,
)


def test_params(tracked: Tracked) -> None:
    params = tracked.client.get_run(tracked.run_id).data.params
    assert (
        params
        | {
            "epochs": "3",
            "batch_size": "64",
            "train_size": "320",
            "val_size": "250",
            "net": "Net",
            "net.params": "115",
            "precision": "32-true",
            "devices": "1",
            "accelerator": "cpu",
            "strategy": "single_device",
            "seed": "0",
            "optimizer": "SGD",
            "optimizer.lr": "0.05",
            "optimizer.momentum": "0.9",
            "lr_scheduler": "StepLR",
            "lr_scheduler.step_size": "2",
            "lr_scheduler.gamma": "0.5",
            "lr_scheduler.interval": "epoch",
        }
        == params
    )


def test_limits_are_mlflows() -> None:
    assert MAX_VALUE_LENGTH == validation.MAX_PARAM_VAL_LENGTH
    assert MAX_KEY_LENGTH == validation.MAX_ENTITY_KEY_LENGTH


def test_flatten_nests_with_dots_and_keeps_other_values() -> None:
    params = {"optim": {"name": "Adam", "args": {"lr": 0.01}}, "betas": (0.9, 0.99), "empty": {}}
    assert flatten(params) == {
        "optim.name": "Adam",
        "optim.args.lr": 0.01,
        "betas": (0.9, 0.99),
        "empty": {},
    }
    assert flatten({"lr": 1}, prefix="model") == {"model.lr": 1}


def test_masking_hides_text_secrets_and_keeps_numbers() -> None:
    params = {"hf_token": "hf_abc", "db": {"password": "hunter2"}, "token_dim": 64, "monkey": "x"}
    assert prepare_params(params) == {
        "hf_token": MASK,
        "db.password": MASK,
        "token_dim": "64",
        "monkey": "x",
    }


def test_uri_credentials_are_hidden_in_any_param() -> None:
    assert prepare_params({"data": "https://u:p@h/x"}) == {"data": "https://***@h/x"}


def test_stringify_plain_values() -> None:
    assert stringify(torch.tensor(0.5)) == "0.5"
    assert stringify(torch.tensor([1, 2])) == "tensor([1, 2])"
    assert stringify(None) == "None"
    assert stringify((0.9, 0.999)) == "(0.9, 0.999)"


def test_long_values_truncated_at_mlflows_limit() -> None:
    value = "x" * (MAX_VALUE_LENGTH + 10)
    (kept,) = prepare_params({"long": value}).values()
    assert len(kept) == MAX_VALUE_LENGTH and kept.endswith("...")
    assert truncate("short") == "short"
    assert len(prepare_params({"ok": "y" * 300})["ok"]) == 300  # not Lightning's old 250


@pytest.mark.parametrize(
    ("logged", "new", "same"),
    [
        ("10", "10", True),
        ("10", "10.0", True),
        ("1e-2", "0.01", True),
        ("0.1", "0.01", False),
        ("true", "True", True),
        ("True", "False", False),
        ("Adam", "adam", False),
        ("nan", "nan", True),
        ("10", "ten", False),
    ],
)
def test_same_value(logged: str, new: str, same: bool) -> None:
    assert same_value(logged, new) is same


@given(st.text(max_size=300))
def test_sanitized_keys_pass_mlflows_validation(key: str) -> None:
    name = sanitize_key(key)
    validation._validate_metric_name(name)
    validation._validate_param_name(name)
    assert len(name) <= MAX_KEY_LENGTH
    # MLflow's own `^...$` check lets a trailing newline through; lkflow replaces it too.
    valid = re.fullmatch(r"[/\w.\- :]*", key) and not validation.path_not_unique(key)
    if valid and len(key) <= MAX_KEY_LENGTH:
        assert name == key


@given(st.lists(st.text(max_size=20), unique=True, max_size=8))
def test_sanitize_keys_never_merges_two_keys(keys: list[str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        names = sanitize_keys(keys)
    assert list(names) == keys
    assert len(set(names.values())) == len(keys)


def test_sanitize_keys_warns_with_every_rename() -> None:
    with pytest.warns(UserWarning, match=r"'acc@1' -> 'acc_1', 'acc#1' -> 'acc_1_2'"):
        names = sanitize_keys(["acc@1", "acc#1", "loss"])
    assert names == {"acc@1": "acc_1", "acc#1": "acc_1_2", "loss": "loss"}


@given(
    st.recursive(
        st.one_of(st.integers(), st.floats(allow_nan=False), st.text(max_size=10), st.none()),
        lambda children: st.dictionaries(st.text(min_size=1, max_size=5), children, max_size=4),
        max_leaves=12,
    ).filter(lambda value: isinstance(value, dict))
)
def test_prepared_params_are_valid_for_mlflow(params: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_params(params)
    for key, value in prepared.items():
        validation._validate_param(key, value)
        assert isinstance(value, str)


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        level = nested
        for parent in parents:
            level = level.setdefault(parent, {})
        level[leaf] = value
    return nested


_NESTED = st.recursive(
    st.one_of(st.integers(), st.text(max_size=5), st.none(), st.just({})),
    lambda children: st.dictionaries(
        st.text(alphabet="abcxyz_-", min_size=1, max_size=4), children, min_size=1, max_size=4
    ),
    max_leaves=15,
).filter(lambda value: isinstance(value, dict))


@given(_NESTED)
def test_flattening_keeps_every_leaf_under_its_dotted_path(params: dict[str, Any]) -> None:
    flat = flatten(params)
    assert all(not isinstance(v, dict) or v == {} for v in flat.values())
    assert _unflatten(flat) == params
