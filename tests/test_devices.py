"""gpus= parsing: every accepted form round-trips, every other form is named in the error."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import fit_quietly, keras_model
from hypothesis import given
from hypothesis import strategies as st

from lkflow.devices import parse_gpus, trainer_device_kwargs
from lkflow.errors import LkflowError


@given(st.integers(min_value=-1, max_value=64))
def test_counts_pass_as_ints_and_as_strings(count):
    assert parse_gpus(count) == count
    assert parse_gpus(str(count)) == count
    assert parse_gpus(f" {count} ") == count


@given(st.lists(st.integers(min_value=0, max_value=15), min_size=1, max_size=8, unique=True))
def test_device_lists_pass_as_lists_and_comma_strings(indices):
    assert parse_gpus(indices) == indices
    assert parse_gpus(tuple(indices)) == indices
    assert parse_gpus(", ".join(map(str, indices)) + ",") == indices
    if len(indices) > 1:  # a lone "2" is a count, as in Lightning; "2," is device 2
        assert parse_gpus(",".join(map(str, indices))) == indices


@given(st.integers(max_value=-2))
def test_negative_counts_other_than_minus_one_are_refused(count):
    with pytest.raises(LkflowError, match=re.escape(f"Received: gpus={count!r}")):
        parse_gpus(count)


@given(
    st.text().filter(lambda s: not re.fullmatch(r"\s*(-1|[0-9]+)\s*|[0-9,\s]*[0-9][0-9,\s]*", s))
)
def test_other_strings_are_refused_with_the_accepted_forms(text):
    with pytest.raises(LkflowError, match="Expected 0 \\(CPU\\), N > 0"):
        parse_gpus(text)


@pytest.mark.parametrize(
    "gpus",
    [True, 1.0, [], [0, 0], [-1], ["0"], {"0": 1}, "1,1", "²", "١", "1,²", "-0", "+1", "1_0"],
)
def test_other_values_are_refused(gpus):
    with pytest.raises(LkflowError, match=re.escape(f"Received: gpus={gpus!r}")):
        parse_gpus(gpus)


def test_cpu_processes_and_explicit_accelerators_pass_through():
    assert trainer_device_kwargs(0, {}) == {"accelerator": "cpu", "devices": 1}
    assert trainer_device_kwargs(0, {"devices": 2}) == {"accelerator": "cpu", "devices": 2}
    assert trainer_device_kwargs(None, {}) == {"accelerator": "auto", "devices": 1}
    assert trainer_device_kwargs(None, {"accelerator": "cpu", "devices": 3}) == {
        "accelerator": "cpu",
        "devices": 3,
    }


def test_gpus_and_a_conflicting_accelerator():
    with pytest.raises(LkflowError, match="gpus=0 means the CPU"):
        trainer_device_kwargs(0, {"accelerator": "gpu"})
    with pytest.raises(LkflowError, match="not both"):
        trainer_device_kwargs(1, {"devices": 2})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where CUDA is absent")
@pytest.mark.parametrize("gpus", [1, -1, [0], "0,1"])
def test_gpu_requests_fail_at_once_without_cuda(gpus):
    with pytest.raises(LkflowError, match="CUDA is not available.*Run on the CPU with gpus=0"):
        trainer_device_kwargs(gpus, {})


@pytest.mark.gpu
def test_one_gpu_where_cuda_is_present():
    assert trainer_device_kwargs(1, {}) == {"accelerator": "gpu", "devices": 1}
    too_many = torch.cuda.device_count() + 1
    with pytest.raises(LkflowError, match=f"has {too_many - 1} CUDA device"):
        trainer_device_kwargs(too_many, {})


@pytest.mark.parametrize("gpus", ["x", -2, 1.5, [0, 0], "0,a", True])
def test_unknown_gpus_forms(loaders, gpus):
    with pytest.raises(LkflowError, match=re.escape(f"gpus={gpus!r}")):
        fit_quietly(keras_model(), *loaders, gpus=gpus)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where CUDA is absent")
def test_asking_for_a_gpu_without_cuda_says_how_to_run_on_the_cpu(loaders):
    with pytest.raises(LkflowError, match="CUDA is not available.*Run on the CPU with gpus=0"):
        keras_model().fit(*loaders, epochs=1, gpus=1, track=False, verbose=0)
