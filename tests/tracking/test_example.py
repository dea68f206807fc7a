"""The served net's input example (lkflow/tracking/example.py): which rule gives it, its rows."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from helpers import Net, make_model
from peers import LitTabular, autoencoder

from lkflow.tracking.example import input_example

X, Y = torch.randn(64, 2), torch.ones(64, 1)


class Plain(pl.LightningModule):
    """A module with neither `example_input` nor `example_input_array`."""

    def __init__(self) -> None:
        super().__init__()
        self.net = Net()


def test_a_batch_gives_its_inputs_by_lkflows_batch_rule() -> None:
    module = Plain()
    assert torch.equal(input_example(module, (X, Y)), X[:5])
    assert torch.equal(input_example(module, [X]), X[:5])  # one item: the inputs, no target
    assert torch.equal(input_example(module, X), X[:5])
    x_num, x_cat = torch.randn(64, 4), torch.arange(64)
    first, second = input_example(module, (x_num, x_cat, Y))
    assert torch.equal(first, x_num[:5]) and torch.equal(second, x_cat[:5])
    ids = torch.zeros(64, 7, dtype=torch.long)
    example = input_example(module, {"input_ids": ids, "attention_mask": ids, "labels": Y})
    assert sorted(example) == ["attention_mask", "input_ids"]  # the target key left out


def test_example_input_array_comes_before_the_batch() -> None:
    module = LitTabular()
    x_num, x_cat = input_example(module, (X, Y))
    assert torch.equal(x_num, module.example_input_array[0][:5])
    assert torch.equal(x_cat, module.example_input_array[1][:5])
    module.example_input_array = {"x_num": torch.randn(3, 4), "x_cat": torch.arange(3)}
    assert input_example(module, (X, Y))["x_num"].shape == (3, 4)


def test_a_given_function_comes_first_and_a_lightmodel_uses_its_own_rule() -> None:
    module = autoencoder()
    images = torch.rand(64, 1, 8, 8)
    flat = input_example(module, (images, Y), given=lambda b: b[0].view(len(b[0]), -1))
    assert torch.equal(flat, images[:5].view(5, -1))
    model = make_model()
    model.target = 0  # a LightModel's example_input follows its inputs and target
    assert torch.equal(input_example(model, (Y, X)), X[:5])


def test_one_row_is_taken_twice_so_the_exported_net_keeps_its_batch_dimension() -> None:
    assert torch.equal(input_example(Plain(), (X[:1], Y[:1])), torch.cat([X[:1], X[:1]]))
    module = LitTabular()
    module.example_input_array = (torch.randn(1, 4), torch.tensor([3]))
    x_num, x_cat = input_example(module, None)
    assert x_num.shape == (2, 4) and x_cat.tolist() == [3, 3]


def test_a_batch_that_fits_no_rule_gives_no_example() -> None:
    assert input_example(Plain(), {"text": ["a", "b"], "labels": Y}) is None
    assert input_example(Plain(), ("a string", Y)) is None


def test_a_mistake_in_the_given_function_fails_the_fit_with_its_own_error() -> None:
    def wrong(batch):
        return batch["x"]  # the batch is a tuple

    with pytest.raises(TypeError, match="tuple indices"):
        input_example(Plain(), (X, Y), given=wrong)
