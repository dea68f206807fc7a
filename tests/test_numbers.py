"""Numbers typed by a user: ASCII digits only, never a bare ValueError."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lkflow.numbers import parse_float, parse_int

_ASCII_INT = re.compile(r"\s*[+-]?[0-9]+\s*")


@given(st.text())
def test_any_text_is_an_ascii_int_or_none(text: str) -> None:
    value = parse_int(text)
    if _ASCII_INT.fullmatch(text):
        assert value == int(text)
    else:
        assert value is None


@given(st.integers())
def test_ints_round_trip(number: int) -> None:
    assert parse_int(str(number)) == number
    assert parse_int(f" {number} ", signed=False) == (number if number >= 0 else None)


@given(st.text())
def test_any_text_is_a_float_or_none(text: str) -> None:
    value = parse_float(text)
    assert value is None or isinstance(value, float)
    if value is not None:
        assert text.strip().isascii()


@given(st.floats(allow_nan=False))
def test_floats_round_trip(number: float) -> None:
    assert parse_float(repr(number)) == number


@pytest.mark.parametrize("text", ["²", "١٢", "１２", "1_0", "0x10", "", "-", "1 2", "1e"])
def test_other_spellings_are_refused(text: str) -> None:
    assert parse_int(text) is None
    assert parse_float(text) is None
