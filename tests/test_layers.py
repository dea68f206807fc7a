"""Hooks on a net's layers for one block, and the error that names the layer a pass failed in."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lkflow.errors import LkflowError
from lkflow.layers import first_layer, layer_hooks, naming_the_failing_layer


def _net() -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Sequential(nn.Linear(4, 3), nn.ReLU()), nn.Linear(3, 1))


def test_hooks_see_each_call_in_order_and_are_gone_after_the_block() -> None:
    net, calls = _net(), []
    with layer_hooks(
        [(name, module) for name, module in net.named_modules() if name],
        lambda name, module, args: calls.append(("enter", name, tuple(args[0].shape))),
        lambda name, module, output: calls.append(("leave", name, tuple(output.shape))),
    ):
        net(torch.zeros(5, 2, 2))
    assert [(kind, name) for kind, name, _ in calls] == [
        ("enter", "0"), ("leave", "0"),
        ("enter", "1"), ("enter", "1.0"), ("leave", "1.0"), ("enter", "1.1"), ("leave", "1.1"),
        ("leave", "1"),
        ("enter", "2"), ("leave", "2"),
    ]  # fmt: skip
    assert calls[-1] == ("leave", "2", (5, 1))
    calls.clear()
    net(torch.zeros(5, 2, 2))
    assert calls == []
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())


def test_hooks_are_removed_when_the_pass_fails() -> None:
    net = _net()
    with pytest.raises(RuntimeError), layer_hooks(net.named_modules(), print, print):
        net(torch.zeros(5, 3))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())


def test_the_innermost_running_layer_is_named_with_its_input_and_what_it_expects() -> None:
    net = _net()
    with pytest.raises(LkflowError) as info, naming_the_failing_layer(net):
        net(torch.zeros(5, 3))
    assert str(info.value).startswith(
        "The net's layer '1.0' (Linear) failed on input of shape (5, 3): "
    )
    assert "Linear expects in_features=4 in the last dimension; make the data's" in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())


def test_the_first_layer_is_the_first_linear_or_convolution() -> None:
    net = _net()
    assert first_layer(net) is net[1][0]
    assert isinstance(first_layer(nn.Sequential(nn.ReLU(), nn.Conv2d(3, 4, 3))), nn.Conv2d)
    assert first_layer(nn.Sequential(nn.ReLU())) is None
