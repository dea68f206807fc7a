"""The batch rule and its overrides, calling a net, and structures of tensors, on real tensors."""

from __future__ import annotations

from collections import namedtuple
from typing import Any

import numpy as np
import pytest
import torch
from helpers import TokenNet
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lkflow.batches import (
    call_net,
    concat,
    describe,
    head,
    inputs_of,
    names,
    rows_of,
    split_batch,
    to_device,
    to_numpy,
)
from lkflow.errors import LkflowError


class TwoInputs(nn.Module):
    """`forward(x_num, x_cat)` -> `{"logits", "score"}`, as a tabular net with two heads."""

    def __init__(self) -> None:
        super().__init__()
        self.num = nn.Linear(3, 4)
        self.cat = nn.Embedding(5, 4)
        self.logits = nn.Linear(4, 2)

    def forward(self, x_num: torch.Tensor, x_cat: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = torch.relu(self.num(x_num) + self.cat(x_cat).sum(1))
        return {"logits": self.logits(hidden), "score": hidden.sum(1)}


def tabular(rows: int = 10) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.randn(rows, 3), torch.randint(0, 5, (rows, 2)), torch.randn(rows)


def text(rows: int = 8) -> dict[str, torch.Tensor]:
    mask = (torch.rand(rows, 6) > 0.3).long()
    return {
        "input_ids": torch.randint(0, 11, (rows, 6)),
        "attention_mask": mask,
        "labels": torch.randint(0, 3, (rows,)),
    }


def assert_same(a: Any, b: Any) -> None:
    """Equal structures: the same container types and keys, and equal tensors."""
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_same(a[key], b[key])
    else:
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)


# The default rule


def test_a_tensor_alone_is_inputs_without_a_target() -> None:
    x = torch.randn(4, 3)
    inputs, target = split_batch(x)
    assert inputs is x
    assert target is None
    assert inputs_of(x) is x


@pytest.mark.parametrize("container", [tuple, list])
def test_a_pair_is_x_and_y(container: type) -> None:
    x, y = torch.randn(4, 3), torch.randn(4)
    inputs, target = split_batch(container([x, y]))
    assert inputs is x
    assert target is y


def test_three_items_are_two_inputs_and_the_target_last() -> None:
    x_num, x_cat, y = tabular()
    inputs, target = split_batch((x_num, x_cat, y))
    assert isinstance(inputs, tuple)
    assert inputs[0] is x_num
    assert inputs[1] is x_cat
    assert target is y


def test_a_collated_tuple_dataset_gives_the_same_split() -> None:
    x_num, x_cat, y = tabular()
    batch = next(iter(DataLoader(TensorDataset(x_num, x_cat, y), batch_size=4)))
    assert isinstance(batch, list)
    inputs, target = split_batch(batch)
    assert_same(inputs, (x_num[:4], x_cat[:4]))
    assert_same(target, y[:4])


def test_a_hugging_face_dict_passes_all_but_labels_by_name() -> None:
    batch = text()
    inputs, target = split_batch(batch)
    assert isinstance(inputs, dict)
    assert list(inputs) == ["input_ids", "attention_mask"]
    assert inputs["attention_mask"] is batch["attention_mask"]
    assert target is batch["labels"]
    logits, _ = call_net(TokenNet(), inputs)
    assert logits.shape == (8, 3)


@pytest.mark.parametrize("key", ["y", "target", "targets", "label", "labels"])
def test_a_dict_takes_its_target_from_any_target_key(key: str) -> None:
    x, y = torch.randn(4, 3), torch.randn(4)
    inputs, target = split_batch({key: y, "x": x})
    assert_same(inputs, {"x": x})
    assert target is y


def test_the_first_target_key_in_order_wins_and_the_others_are_inputs() -> None:
    x, y, labels = torch.randn(4, 3), torch.randn(4), torch.randn(4)
    inputs, target = split_batch({"labels": labels, "x": x, "y": y})
    assert target is y
    assert_same(inputs, {"labels": labels, "x": x})


def test_a_nested_input_item_is_the_inputs_whole() -> None:
    x_num, x_cat, y = tabular()
    inputs, target = split_batch([[x_num, x_cat], y])
    assert_same(inputs, (x_num, x_cat))
    inputs, target = split_batch(({"x_num": x_num, "x_cat": x_cat}, y))
    assert_same(inputs, {"x_num": x_num, "x_cat": x_cat})
    assert target is y


# Overrides


def test_tuple_overrides_choose_inputs_and_target_by_index() -> None:
    x_num, x_cat, y = tabular()
    weight = torch.rand(10)
    inputs, target = split_batch((x_num, x_cat, y, weight), inputs=[0, 1], target=2)
    assert_same(inputs, (x_num, x_cat))
    assert target is y
    inputs, target = split_batch((x_num, y, weight), target=1)
    assert_same(inputs, (x_num, weight))
    inputs, target = split_batch((x_num, y, weight), inputs=0, target=-2)
    assert inputs is x_num
    assert target is y
    inputs, target = split_batch((x_num, x_cat, y), inputs=[1, 0])
    assert_same(inputs, (x_cat, x_num))


def test_target_none_makes_every_item_an_input() -> None:
    x_num, x_cat, _ = tabular()
    inputs, target = split_batch((x_num, x_cat), target=None)
    assert_same(inputs, (x_num, x_cat))
    assert target is None
    inputs, target = split_batch((x_num,), target=None)
    assert inputs is x_num
    batch = text()
    inputs, target = split_batch(batch, target=None)
    assert_same(inputs, batch)
    assert target is None


def test_dict_overrides_choose_inputs_and_target_by_key() -> None:
    batch = {"x": torch.randn(4, 3), "price": torch.randn(4), "id": torch.arange(4)}
    inputs, target = split_batch(batch, inputs=["x"], target="price")
    assert_same(inputs, {"x": batch["x"]})
    assert target is batch["price"]
    inputs, target = split_batch(batch, inputs="x", target="price")
    assert inputs is batch["x"]


def test_a_net_that_takes_its_labels_gets_them_with_target_none() -> None:
    batch = text()
    inputs, target = split_batch(batch, inputs=["input_ids", "labels"], target=None)
    assert_same(inputs, {"input_ids": batch["input_ids"], "labels": batch["labels"]})
    assert target is None


def test_inputs_of_takes_batches_without_a_target_whole() -> None:
    batch = text()
    del batch["labels"]
    assert_same(inputs_of(batch), batch)
    assert_same(inputs_of(batch, target="labels"), batch)
    x_num, x_cat, _ = tabular()
    assert_same(inputs_of((x_num, x_cat), target=2), (x_num, x_cat))
    with pytest.raises(LkflowError, match="target='y'"):
        inputs_of((x_num, x_cat), target="y")
    x = torch.randn(4, 3)
    assert inputs_of((x,)) is x
    assert inputs_of(x, target="labels") is x
    labelled = text()
    assert list(inputs_of(labelled)) == ["input_ids", "attention_mask"]


# Errors: the layout (never values) and both fixes


def _message(batch: Any, **choice: Any) -> str:
    with pytest.raises(LkflowError) as caught:
        split_batch(batch, **choice)
    message = str(caught.value)
    assert message.startswith("Received: ")
    assert "target=" in message
    assert "inputs=[...]" in message
    assert "LightModel" in message
    assert "shared_step(batch)" in message
    return message


def test_a_dict_without_a_target_key_names_its_layout_and_the_fixes() -> None:
    ids = torch.full((8, 16), 12345)
    message = _message({"input_ids": ids, "attention_mask": ids, "label_ids": ids[:, 0]})
    assert (
        "dict: input_ids Tensor(8, 16) int64, attention_mask Tensor(8, 16) int64, "
        "label_ids Tensor(8,) int64" in message
    )
    assert "'y', 'target', 'targets', 'label', 'labels'" in message
    assert "12345" not in message


def test_a_one_item_tuple_is_refused() -> None:
    message = _message((torch.randn(4, 3),))
    assert "tuple of 1: Tensor(4, 3) float32" in message
    assert "at least 2 items" in message


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"target": 3}, "target=3 for a batch tuple of 3"),
        ({"target": "y"}, "Expected an index from -3 to 2"),
        ({"inputs": [0, 7]}, "inputs=7"),
        ({"inputs": [0, 2]}, "Expected the target 2 outside the inputs"),
        ({"inputs": [], "target": 2}, "at least one item"),
    ],
)
def test_a_bad_tuple_choice_names_the_value(choice: dict[str, Any], expected: str) -> None:
    assert expected in _message(tabular(), **choice)


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"target": "label_ids"}, "target='label_ids' for a batch dict"),
        ({"target": 0}, "one of its keys 'input_ids', 'attention_mask', 'labels'"),
        ({"inputs": ["input_ids", "mask"]}, "inputs='mask'"),
        ({"inputs": ["input_ids", "labels"]}, "Expected the target 'labels' outside the inputs"),
    ],
)
def test_a_bad_dict_choice_names_the_value(choice: dict[str, Any], expected: str) -> None:
    assert expected in _message(text(), **choice)


@pytest.mark.parametrize(
    ("batch", "expected"),
    [
        ({"x": torch.ones(2, 3), "text": ["a", "b"], "y": torch.ones(2)}, "'text' is not one"),
        (((torch.ones(2), "a"), torch.ones(2)), "tuple of 2 (Tensor(2,) float32, str)"),
        ({0: torch.ones(2), "y": torch.ones(2)}, "string keys"),
        ("some text", "a batch str."),
        (torch.ones(2, 3), "A tensor alone"),
    ],
)
def test_batches_that_fit_no_rule_are_refused(batch: Any, expected: str) -> None:
    choice = {"target": "y"} if isinstance(batch, torch.Tensor) else {}
    assert expected in _message(batch, **choice)


# Calling the net


def test_call_net_passes_a_tensor_a_tuple_and_a_dict() -> None:
    x = torch.randn(4, 3)
    linear = nn.Linear(3, 2)
    assert torch.equal(call_net(linear, x), linear(x))
    net = TwoInputs()
    x_num, x_cat, _ = tabular()
    whole = net(x_num, x_cat)
    assert_same(call_net(net, (x_num, x_cat)), whole)
    assert_same(call_net(net, {"x_cat": x_cat, "x_num": x_num}), whole)
    with pytest.raises(LkflowError, match="Received: inputs str"):
        call_net(net, "x")


# Structures of tensors


def test_concat_of_dict_outputs_equals_the_net_on_the_whole_data() -> None:
    net = TwoInputs().eval()
    x_num, x_cat, y = tabular(10)
    loader = DataLoader(TensorDataset(x_num, x_cat, y), batch_size=3)
    with torch.no_grad():
        outputs = [call_net(net, split_batch(batch)[0]) for batch in loader]
        whole = net(x_num, x_cat)
    joined = concat(outputs)
    assert list(joined) == ["logits", "score"]
    torch.testing.assert_close(joined, whole)
    assert rows_of(joined) == 10


def test_concat_of_tuple_outputs_equals_the_net_on_the_whole_data() -> None:
    net = TokenNet().eval()
    data = text(9)
    rows = [{key: value[i] for key, value in data.items()} for i in range(9)]
    with torch.no_grad():
        outputs = [call_net(net, inputs_of(batch)) for batch in DataLoader(rows, batch_size=4)]
        whole = net(data["input_ids"], data["attention_mask"])
    joined = concat(outputs)
    assert isinstance(joined, tuple)
    torch.testing.assert_close(joined, whole)


def test_concat_refuses_outputs_that_change_structure_or_shape() -> None:
    with pytest.raises(LkflowError, match=r"batch 1 is tuple of 1: .* where batch 0 is tuple of 2"):
        concat([(torch.ones(2), torch.ones(2)), (torch.ones(2),)])
    with pytest.raises(LkflowError, match=r"batch 1 is dict: b Tensor"):
        concat([{"a": torch.ones(2)}, {"b": torch.ones(2)}])
    with pytest.raises(LkflowError, match=r"batch 1 is Tensor\(2, 5\) float32 at \['a'\]"):
        concat([{"a": torch.ones(2, 4)}, {"a": torch.ones(2, 5)}])
    with pytest.raises(LkflowError, match=r"0-dim tensor at \['loss'\]"):
        concat([{"loss": torch.tensor(1.0)}, {"loss": torch.tensor(2.0)}])
    with pytest.raises(LkflowError, match="non-empty list"):
        concat([])


def test_rows_of_counts_the_shared_leading_dimension() -> None:
    assert rows_of(text(8)) == 8
    assert rows_of(torch.ones(5)) == 5
    with pytest.raises(LkflowError, match=r"6 rows in \[0\] and 3 in \[1\]\['b'\]"):
        rows_of((torch.ones(6, 2), {"b": torch.ones(3)}))
    with pytest.raises(LkflowError, match="at least one tensor"):
        rows_of(())
    with pytest.raises(LkflowError, match="0-dim tensor at the tensor"):
        rows_of(torch.tensor(3.0))


def test_head_keeps_the_first_rows_detached_and_cloned() -> None:
    x = torch.randn(6, 3, requires_grad=True)
    ids = torch.arange(6)
    first = head({"x": x, "ids": ids}, 2)
    assert not first["x"].requires_grad
    assert torch.equal(first["x"], x[:2].detach())
    first["ids"].add_(100)
    assert torch.equal(ids, torch.arange(6))
    assert rows_of(head(text(8), 3)) == 3
    with pytest.raises(LkflowError, match="n=-1"):
        head(x, -1)


def test_to_device_and_to_numpy_keep_the_structure() -> None:
    Pair = namedtuple("Pair", ["left", "right"])
    structure = (torch.ones(2, 3), {"ids": torch.arange(2)}, Pair(torch.ones(2), torch.zeros(2)))
    moved = to_device(structure, "meta")
    assert moved[0].device.type == "meta"
    assert moved[1]["ids"].device.type == "meta"
    assert isinstance(moved[2], Pair)
    x = torch.randn(2, requires_grad=True)
    arrays = to_numpy({"x": x, "ids": torch.arange(2), "b": torch.ones(2).bfloat16()})
    assert list(arrays) == ["x", "ids", "b"]
    assert isinstance(arrays["x"], np.ndarray)
    np.testing.assert_array_equal(arrays["x"], x.detach().numpy())
    assert arrays["ids"].dtype == np.int64
    assert arrays["b"].dtype == np.float32
    with pytest.raises(LkflowError, match=r"str at \[1\]"):
        to_device((torch.ones(1), "a"), "cpu")


def test_names_are_the_keys_or_numbered_defaults() -> None:
    batch = text()
    assert names(batch) == ["input_ids", "attention_mask", "labels"]
    assert names((torch.ones(1), torch.ones(1))) == ["input_0", "input_1"]
    assert names([torch.ones(1)], "output") == ["output_0"]
    assert names(torch.ones(1)) == ["input"]
    with pytest.raises(LkflowError, match="string keys"):
        names({1: torch.ones(1)})
    with pytest.raises(LkflowError, match=r"tuple of 2: Tensor\(1,\) float32, tuple of 1"):
        names((torch.ones(1), (torch.ones(1),)))


def test_describe_writes_the_layout() -> None:
    x_num, x_cat, y = torch.ones(64, 4), torch.ones(64).long(), torch.ones(64)
    assert (
        describe((x_num, x_cat, y))
        == "tuple of 3: Tensor(64, 4) float32, Tensor(64,) int64, Tensor(64,) float32"
    )
    assert describe(text(8)).startswith("dict: input_ids Tensor(8, 6) int64, attention_mask")
    assert describe([]) == "empty list"
    assert describe({f"k{i}": i for i in range(10)}).endswith("k7 int, ...")
    assert describe(np.zeros((2, 3))) == "ndarray(2, 3) float64"


# Properties

_sizes = st.lists(st.integers(min_value=1, max_value=4), min_size=1, max_size=4)


def _structure(rows: int, layout: int) -> Any:
    x = torch.randn(rows, 2)
    ids = torch.randint(0, 9, (rows, 3))
    return [x, (x, ids), {"x": x, "ids": ids}, ({"a": ids}, x[:, 0])][layout]


def _split_rows(structure: Any, sizes: list[int]) -> list[Any]:
    """`structure` cut into consecutive batches of `sizes` rows, tensor by tensor."""
    if isinstance(structure, torch.Tensor):
        return list(torch.split(structure, sizes))
    if isinstance(structure, dict):
        parts = {key: _split_rows(value, sizes) for key, value in structure.items()}
        return [{key: parts[key][i] for key in structure} for i in range(len(sizes))]
    parts_of = [_split_rows(value, sizes) for value in structure]
    return [type(structure)(p[i] for p in parts_of) for i in range(len(sizes))]


@given(sizes=_sizes, layout=st.integers(0, 3))
def test_concat_of_the_batches_is_the_whole(sizes: list[int], layout: int) -> None:
    whole = _structure(sum(sizes), layout)
    batches = _split_rows(whole, sizes)
    assert [rows_of(batch) for batch in batches] == sizes
    assert_same(concat(batches), whole)
    assert_same(head(whole, sizes[0]), batches[0])


@given(sizes=_sizes, layout=st.integers(0, 3), keep=st.integers(0, 20))
def test_head_then_concat_keeps_the_first_rows(sizes: list[int], layout: int, keep: int) -> None:
    whole = _structure(sum(sizes), layout)
    kept = head(concat(_split_rows(whole, sizes)), keep)
    assert rows_of(kept) == min(keep, sum(sizes))
    assert_same(kept, head(whole, keep))
