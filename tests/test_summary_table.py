"""Tests of lkflow.summary(): parameter totals, output shapes, sizes, the printed table and errors."""

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from lkflow.errors import LkflowError
from lkflow.summary_table import LayerRow, Summary, layer_table, summary


class ArticleNet(nn.Module):
    """The net of the article: Linear 2 -> 6 -> 12 -> 1, sigmoid built inside forward."""

    def __init__(self, hidden: tuple[int, int] = (6, 12)) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.fc3 = nn.Linear(hidden[1], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return nn.Sigmoid()(self.fc3(x))


class Wrapper(pl.LightningModule):
    """A LightningModule holding the net as ``.net``, like LightModel."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SharedNet(nn.Module):
    """Applies the same Linear twice."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.shared(torch.relu(self.shared(x))))


class Pair(nn.Module):
    """A leaf module returning a dict of two tensors."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"same": x, "pooled": x.mean(dim=1, keepdim=True)}


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 2))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, kernel_size=3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )


ARTICLE_TABLE = """\
----------------------------------------------------------------
        Layer (type)               Output Shape         Param #
================================================================
            Linear-1                    [-1, 4]              12
            Linear-2                    [-1, 8]              40
            Linear-3                    [-1, 1]               9
================================================================
Total params: 61
Trainable params: 61
Non-trainable params: 0
----------------------------------------------------------------
Input size (MB): 0.000008
Forward/backward pass size (MB): 0.000099
Params size (MB): 0.000233
Estimated Total Size (MB): 0.000340
----------------------------------------------------------------"""


def test_article_net_has_115_params_and_three_linear_rows() -> None:
    result = summary(ArticleNet(), input_shape=(2,), print_fn=None)

    assert result.total_params == 115
    assert result.trainable_params == 115
    assert result.non_trainable_params == 0
    assert result.layers == [
        LayerRow("Linear-1", "Linear", [-1, 6], 18),
        LayerRow("Linear-2", "Linear", [-1, 12], 84),
        LayerRow("Linear-3", "Linear", [-1, 1], 13),
    ]


def test_table_matches_the_article_layout_exactly() -> None:
    result = summary(ArticleNet(hidden=(4, 8)), input_shape=(2,), print_fn=None)

    assert str(result) == ARTICLE_TABLE
    assert result.total_size_mb == pytest.approx(
        result.input_size_mb + result.forward_backward_size_mb + result.params_size_mb
    )


@pytest.mark.parametrize(
    ("make_net", "input_shape"),
    [(mlp, (3,)), (cnn, (3, 8, 8)), (ArticleNet, (2,)), (SharedNet, (4,))],
    ids=["mlp", "cnn", "article", "shared"],
)
def test_totals_equal_parameter_numel(make_net, input_shape: tuple[int, ...]) -> None:
    net = make_net()
    result = summary(net, input_shape=input_shape, print_fn=None)

    total = sum(p.numel() for p in net.parameters())
    assert result.total_params == total
    assert result.trainable_params + result.non_trainable_params == total
    assert sum(row.params for row in result.layers) == total
    assert result.params_size_mb == pytest.approx(total * 4 / 1024**2)


def test_cnn_output_shapes_and_batchnorm_buffers_are_not_params() -> None:
    result = summary(cnn(), input_shape=(3, 8, 8), print_fn=None)

    assert [row.output_shape for row in result.layers] == [
        [-1, 8, 8, 8],
        [-1, 8, 8, 8],
        [-1, 8, 8, 8],
        [-1, 8, 4, 4],
        [-1, 128],
        [-1, 10],
    ]
    types = ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d", "Flatten", "Linear"]
    assert [row.type for row in result.layers] == types
    # BatchNorm: weight and bias; running_mean/var and num_batches_tracked are buffers
    assert result.layers[1].params == 16
    assert result.total_params == (3 * 9 * 8 + 8) + 16 + (128 * 10 + 10)
    assert result.non_trainable_params == 0


def test_frozen_layer_counts_as_non_trainable() -> None:
    net = mlp()
    net[0].requires_grad_(False)

    result = summary(net, input_shape=(3,), print_fn=None)

    assert result.non_trainable_params == 3 * 16 + 16
    assert result.trainable_params == 16 * 2 + 2
    assert result.total_params == sum(p.numel() for p in net.parameters())


def test_shared_layer_gives_a_row_per_call_and_counts_its_params_once() -> None:
    result = summary(SharedNet(), input_shape=(4,), print_fn=None)

    rows = [(row.name, row.params) for row in result.layers]
    assert rows == [("Linear-1", 20), ("Linear-2", 0), ("Linear-3", 5)]
    assert result.total_params == 25


def test_lightning_module_wrapping_a_net_matches_the_bare_net() -> None:
    net = ArticleNet()

    wrapped = summary(Wrapper(net), input_shape=(2,), print_fn=None)

    assert wrapped == summary(net, input_shape=(2,), print_fn=None)
    assert wrapped.total_params == 115


def test_input_data_shows_real_shapes_and_sizes() -> None:
    result = summary(ArticleNet(), input_data=torch.zeros(5, 2), print_fn=None)

    assert [row.output_shape for row in result.layers] == [[5, 6], [5, 12], [5, 1]]
    assert result.input_size_mb == pytest.approx(5 * 2 * 4 / 1024**2)
    assert result.forward_backward_size_mb == pytest.approx(2 * 5 * (6 + 12 + 1) * 4 / 1024**2)


def test_batch_size_is_shown_and_scales_the_sizes() -> None:
    result = summary(ArticleNet(), input_shape=(2,), batch_size=16, print_fn=None)

    assert result.layers[0].output_shape == [16, 6]
    assert result.input_size_mb == pytest.approx(16 * 2 * 4 / 1024**2)
    assert result.forward_backward_size_mb == pytest.approx(2 * 16 * 19 * 4 / 1024**2)


def test_tuple_and_dict_outputs_list_every_tensor_shape() -> None:
    lstm = summary(nn.LSTM(4, 8, batch_first=True), input_shape=(5, 4), print_fn=None)
    pair = summary(nn.Sequential(nn.Linear(2, 3), Pair()), input_shape=(2,), print_fn=None)

    # only a leading batch dimension is shown as -1; h_n and c_n are (num_layers, batch, hidden)
    assert lstm.layers[0].output_shape == [[-1, 5, 8], [1, 2, 8], [1, 2, 8]]
    assert pair.layers[1].output_shape == [[-1, 3], [-1, 1]]


def test_integer_input_dtype_for_embeddings() -> None:
    result = summary(nn.Embedding(10, 4), input_shape=(7,), dtype=torch.long, print_fn=None)

    assert result.layers == [LayerRow("Embedding-1", "Embedding", [-1, 7, 4], 40)]
    assert result.input_size_mb == pytest.approx(7 * 8 / 1024**2)


def test_prints_the_table_with_totals_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    result = summary(cnn(), input_shape=(3, 8, 8))

    printed = capsys.readouterr().out
    assert printed == str(result) + "\n"
    assert f"Total params: {result.total_params:,}" in printed
    assert "Trainable params: 1,530" in printed
    assert "Non-trainable params: 0" in printed
    assert "Conv2d-1" in printed and "[-1, 8, 4, 4]" in printed


def test_print_fn_none_prints_nothing_and_a_custom_one_gets_the_table(
    capsys: pytest.CaptureFixture[str],
) -> None:
    summary(mlp(), input_shape=(3,), print_fn=None)
    assert capsys.readouterr().out == ""

    lines: list[str] = []
    result = summary(mlp(), input_shape=(3,), print_fn=lines.append)
    assert lines == [str(result)]
    assert isinstance(result, Summary)


def test_bad_input_shape_names_the_shape_the_layer_and_the_fix() -> None:
    with pytest.raises(ValueError, match=r"input_shape=\(3,\)") as info:
        summary(ArticleNet(), input_shape=(3,), print_fn=None)

    message = str(info.value)
    assert "'fc1' (Linear)" in message
    assert "mat1 and mat2" in message  # the cause from torch
    assert "input_shape=(2,)" in message  # the fix, from the first Linear's in_features
    assert "input_data" in message
    assert isinstance(info.value.__cause__, RuntimeError)


def test_failure_between_layers_names_the_last_finished_layer() -> None:
    class Reshaping(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x).view(-1, 7)

    with pytest.raises(ValueError, match="after layer Linear-1"):
        summary(Reshaping(), input_shape=(2,), print_fn=None)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, "pass input_shape"),
        ({"input_shape": 2}, r"received input_shape=2\. For example input_shape=\(2,\)"),
        ({"input_shape": (2, 0)}, "positive ints"),
        ({"input_shape": (2,), "input_data": torch.zeros(1, 2)}, "not both"),
        ({"input_shape": (2,), "batch_size": 0}, "batch_size=0"),
    ],
    ids=["no-input", "int-shape", "zero-dim", "both", "zero-batch"],
)
def test_invalid_arguments_raise_value_error(kwargs: dict, expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        summary(ArticleNet(), print_fn=None, **kwargs)


def test_train_and_eval_modes_are_restored_and_hooks_removed() -> None:
    net = cnn()
    net.train()
    net[1].eval()  # a frozen BatchNorm inside a training model stays as it was

    first = summary(net, input_shape=(3, 8, 8), print_fn=None)

    assert net.training and net[0].training and not net[1].training
    # no leftover hooks adding rows on a second call
    assert summary(net.eval(), input_shape=(3, 8, 8), print_fn=None) == first
    assert not any(module.training for module in net.modules())
    assert all(p.grad is None for p in net.parameters())


def test_modes_are_restored_when_the_forward_pass_fails() -> None:
    net = ArticleNet().train()

    with pytest.raises(ValueError):
        summary(net, input_shape=(5,), print_fn=None)

    assert all(module.training for module in net.modules())
    assert summary(net, input_shape=(2,), print_fn=None).total_params == 115


class TwoInputs(nn.Module):
    """`forward(x_num, x_cat)`: numeric features and an embedded category."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.fc = nn.Linear(7, 2)

    def forward(self, x_num: torch.Tensor, x_cat: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([x_num, self.embed(x_cat)], dim=1))


@pytest.mark.parametrize("as_dict", [False, True], ids=["tuple", "dict"])
def test_input_data_may_be_a_tuple_or_a_dict_of_the_nets_inputs(as_dict: bool) -> None:
    x_num, x_cat = torch.randn(6, 4), torch.randint(0, 5, (6,))
    data = {"x_cat": x_cat, "x_num": x_num} if as_dict else (x_num, x_cat)
    result = summary(TwoInputs(), input_data=data, print_fn=None)

    assert [(row.name, row.output_shape) for row in result.layers] == [
        ("Embedding-1", [6, 3]),
        ("Linear-2", [6, 2]),
    ]
    assert result.total_params == 5 * 3 + 7 * 2 + 2
    expected_bytes = x_num.numel() * 4 + x_cat.numel() * 8
    assert result.input_size_mb == pytest.approx(expected_bytes / 1024**2)
    assert "Embedding-1" in layer_table(TwoInputs(), data)
    assert layer_table(TwoInputs(), None) == ""


def test_a_structure_that_does_not_fit_the_net_is_described_in_the_error() -> None:
    with pytest.raises(
        LkflowError, match=r"input_data \(a batch tuple of 1: Tensor\(6, 4\) float32\)"
    ):
        summary(TwoInputs(), input_data=(torch.randn(6, 4),), print_fn=None)
