"""The served model of nets with several inputs or outputs: saved, loaded back and served."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
import torch
from helpers import Net, TokenNet
from mlflow.models import Model
from servers import lkflow_free_env, lkflow_free_python, models_serve, post
from torch import nn

from lkflow.errors import LkflowError
from lkflow.tracking.export import save_model
from lkflow.tracking.served import (
    answers_its_example,
    net_outputs,
    save_structured_model,
    served_flavor,
)

REQUIREMENTS = ["mlflow==3.17.2", "torch==2.13.0"]
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


class Tabular(nn.Module):
    """Four float features and a categorical (an embedding) in; logits and probabilities out."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.head = nn.Linear(4 + 3, 2)

    def forward(self, x_num: torch.Tensor, x_cat: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.head(torch.cat([x_num, self.embed(x_cat)], dim=1))
        return {"logits": logits, "prob": logits.softmax(dim=1)}


def tabular_rows(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 4, generator=generator), torch.randint(
        0, 5, (rows,), generator=generator
    )


def token_rows(rows: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    mask = (torch.rand(rows, 6, generator=generator) > 0.3).long()
    return {
        "input_ids": torch.randint(0, 11, (rows, 6), generator=generator),
        "attention_mask": mask,
    }


def as_arrays(example: Any, names: list[str]) -> dict[str, np.ndarray]:
    values = example.values() if isinstance(example, dict) else example
    return {name: t.numpy() for name, t in zip(names, values, strict=True)}


def assert_outputs(predicted: dict[str, np.ndarray], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(predicted) == sorted(expected)
    for name, tensor in expected.items():
        np.testing.assert_allclose(
            np.asarray(predicted[name]), tensor.detach().numpy(), **TOLERANCE
        )


@pytest.fixture(scope="module")
def tabular(tmp_path_factory: pytest.TempPathFactory) -> tuple[Tabular, Path]:
    """A Tabular net saved on a 4-row example."""
    torch.manual_seed(0)
    net = Tabular().eval()
    path = tmp_path_factory.mktemp("tabular") / "model"
    save_structured_model(net, tabular_rows(4, seed=1), path, pip_requirements=REQUIREMENTS)
    return net, path


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> tuple[TokenNet, Path]:
    """A TokenNet saved on a 3-row dict example."""
    torch.manual_seed(0)
    net = TokenNet().eval()
    path = tmp_path_factory.mktemp("tokens") / "model"
    save_structured_model(net, token_rows(3, seed=1), path, pip_requirements=REQUIREMENTS)
    return net, path


# ---- saved and loaded back in this process ----------------------------------------------------


@pytest.mark.parametrize("rows", [1, 9])
def test_two_input_net_answers_any_number_of_rows(tabular: tuple[Tabular, Path], rows: int) -> None:
    net, path = tabular
    x_num, x_cat = tabular_rows(rows, seed=rows)
    predicted = mlflow.pyfunc.load_model(str(path)).predict(
        {"x_num": x_num.numpy(), "x_cat": x_cat.numpy()}
    )
    assert_outputs(predicted, net(x_num, x_cat))


@pytest.mark.parametrize("rows", [1, 9])
def test_keyword_input_net_answers_any_number_of_rows(
    tokens: tuple[TokenNet, Path], rows: int
) -> None:
    net, path = tokens
    example = token_rows(rows, seed=rows)
    predicted = mlflow.pyfunc.load_model(str(path)).predict(
        {k: t.numpy() for k, t in example.items()}
    )
    logits, pooled = net(**example)
    assert_outputs(predicted, {"output_0": logits, "output_1": pooled})


def test_dataframe_split_rows_are_cast_to_the_signature(tabular: tuple[Tabular, Path]) -> None:
    net, path = tabular
    x_num, x_cat = tabular_rows(5, seed=3)
    # as `dataframe_split` arrives: float64 lists, python ints
    frame = pd.DataFrame({"x_num": x_num.double().tolist(), "x_cat": x_cat.tolist()})
    predicted = mlflow.pyfunc.load_model(str(path)).predict(frame)
    assert_outputs(predicted, net(x_num, x_cat))


def test_signature_names_dtypes_and_batch_dimension(
    tabular: tuple[Tabular, Path], tokens: tuple[TokenNet, Path]
) -> None:
    def specs(schema: Any) -> list[tuple[str, str, tuple[int, ...]]]:
        return [(s.name, str(s.type), s.shape) for s in schema.inputs]

    signature = Model.load(tabular[1]).signature
    assert specs(signature.inputs) == [("x_num", "float32", (-1, 4)), ("x_cat", "int64", (-1,))]
    assert specs(signature.outputs) == [
        ("logits", "float32", (-1, 2)),
        ("prob", "float32", (-1, 2)),
    ]
    signature = Model.load(tokens[1]).signature
    assert specs(signature.inputs) == [
        ("input_ids", "int64", (-1, 6)),
        ("attention_mask", "int64", (-1, 6)),
    ]
    assert specs(signature.outputs) == [
        ("output_0", "float32", (-1, 3)),
        ("output_1", "float32", (-1, 4)),
    ]


def test_saved_model_holds_its_loader_program_and_example(tabular: tuple[Tabular, Path]) -> None:
    _, path = tabular
    assert {"served_model.py", "artifacts", "serving_input_example.json"} <= {
        p.name for p in path.iterdir()
    }
    assert (path / "artifacts" / "program.pt2").is_file()
    tree = ast.parse((path / "served_model.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    outside = {name.split(".")[0] for name in imported} - set(sys.stdlib_module_names)
    assert outside == {"mlflow", "numpy", "torch"}
    request = json.loads((path / "serving_input_example.json").read_text())
    assert sorted(request["inputs"]) == ["x_cat", "x_num"] and len(request["inputs"]["x_cat"]) == 4


def test_loader_casts_requests_and_refuses_fractional_categories(
    tabular: tuple[Tabular, Path],
) -> None:
    net, path = tabular
    loader = mlflow.pyfunc.load_model(str(path)).unwrap_python_model()
    x_num, x_cat = tabular_rows(3, seed=4)
    # what a client without a schema check sends: float64 features, float categories
    predicted = loader.predict(
        None, {"x_num": x_num.double().numpy(), "x_cat": x_cat.double().numpy()}
    )
    assert_outputs(predicted, net(x_num, x_cat))
    with pytest.raises(ValueError, match="'x_cat' with fractional values"):
        loader.predict(None, {"x_num": x_num.numpy(), "x_cat": x_cat.numpy() + 0.5})
    with pytest.raises(ValueError, match=r"\['x_cat'\] missing"):
        loader.predict(None, {"x_num": x_num.numpy()})
    with pytest.raises(ValueError, match=r"'x_num' of shape \(3, 5\)"):
        loader.predict(None, {"x_num": np.zeros((3, 5), "float32"), "x_cat": x_cat.numpy()})


def test_one_row_example_still_serves_many_rows(tmp_path: Path) -> None:
    net = Tabular().eval()
    save_structured_model(
        net, tabular_rows(1, seed=1), tmp_path / "model", pip_requirements=REQUIREMENTS
    )
    x_num, x_cat = tabular_rows(6, seed=2)
    predicted = mlflow.pyfunc.load_model(str(tmp_path / "model")).predict(
        as_arrays((x_num, x_cat), ["x_num", "x_cat"])
    )
    assert_outputs(predicted, net(x_num, x_cat))


def test_exported_in_eval_mode_and_the_net_left_in_its_mode(tmp_path: Path) -> None:
    class Dropped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)
            self.drop = nn.Dropout(0.5)

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.drop(self.fc(a)), b * 2

    net = Dropped().train()
    example = (torch.randn(4, 3), torch.randn(4, 1))
    save_structured_model(net, example, tmp_path / "model", pip_requirements=REQUIREMENTS)
    assert net.training and net.drop.training
    expected = net_outputs(net.eval(), example)
    assert answers_its_example(tmp_path / "model", example, expected) is None


def test_unnamed_positional_inputs_are_input_0_and_so_on(tmp_path: Path) -> None:
    class Summed(nn.Module):
        def forward(self, *xs: torch.Tensor) -> torch.Tensor:
            return torch.stack(xs).sum(0)

    example = (torch.randn(3, 2), torch.randn(3, 2))
    save_structured_model(Summed(), example, tmp_path / "model", pip_requirements=REQUIREMENTS)
    model = mlflow.pyfunc.load_model(str(tmp_path / "model"))
    assert model.metadata.get_input_schema().input_names() == ["input_0", "input_1"]
    assert model.metadata.get_output_schema().input_names() == [0]  # one unnamed output
    predicted = model.predict(as_arrays(example, ["input_0", "input_1"]))
    np.testing.assert_allclose(predicted, (example[0] + example[1]).numpy(), **TOLERANCE)


# ---- answers_its_example -----------------------------------------------------------------------


def test_answers_its_example_says_why_not(tabular: tuple[Tabular, Path]) -> None:
    net, path = tabular
    example = tabular_rows(4, seed=1)
    expected = net_outputs(net, example)
    assert isinstance(expected, dict)
    assert answers_its_example(path, example, expected) is None
    shifted = {**expected, "prob": expected["prob"] + 0.01}
    assert (
        answers_its_example(path, example, shifted)
        == "output 'prob' differs from the net's by up to 0.01"
    )
    renamed = {"scores": expected["logits"]}
    assert "output 'scores' is missing" in str(answers_its_example(path, example, renamed))
    assert (
        answers_its_example(path, example[:1], expected)
        == "the model takes the inputs ['x_num', 'x_cat'], the example 1"
    )
    assert answers_its_example(path.parent / "absent", example, expected) is not None


def test_answers_its_example_checks_a_pytorch_flavor_model(tmp_path: Path) -> None:
    net, example = Net().eval(), torch.randn(5, 2)
    save_model(net, example, tmp_path / "model", Model())
    assert answers_its_example(tmp_path / "model", example, net_outputs(net, example)) is None
    wrong = net_outputs(net, example) * 2 + 1
    assert "differs" in str(answers_its_example(tmp_path / "model", example, wrong))


# ---- which flavor, and what is refused ---------------------------------------------------------


def test_served_flavor_is_pytorch_only_for_one_tensor_in_and_out() -> None:
    x = torch.zeros(2, 3)
    assert served_flavor(x, x) == "pytorch"
    assert served_flavor((x,), x) == "pyfunc"
    assert served_flavor((x, x), x) == "pyfunc"
    assert served_flavor({"x": x}, x) == "pyfunc"
    assert served_flavor(x, (x, x)) == "pyfunc"
    assert served_flavor(x, {"logits": x}) == "pyfunc"


@pytest.mark.parametrize(
    ("example", "match"),
    [
        ([torch.zeros(2, 4), torch.zeros(2)], "an example of type list"),
        ((torch.zeros(2, 4), [1, 2]), r"tuple \{'x_cat': 'list'\}"),
        ((torch.zeros(2, 4), torch.zeros(3, dtype=torch.long)), r"\{'x_num': 2, 'x_cat': 3\} rows"),
        ((torch.zeros(2, 4), torch.tensor(1)), r"\{'x_num': 2, 'x_cat': None\} rows"),
    ],
)
def test_bad_example_is_refused_before_anything_is_saved(
    tmp_path: Path, example: Any, match: str
) -> None:
    with pytest.raises(LkflowError, match=match):
        save_structured_model(Tabular(), example, tmp_path / "model", pip_requirements=REQUIREMENTS)
    assert not (tmp_path / "model").exists()


def test_net_that_cannot_export_with_a_batch_dimension_is_refused(tmp_path: Path) -> None:
    class ByRows(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return a + b if a.shape[0] > 2 else a - b

    with pytest.raises(LkflowError, match="ByRows that torch.export cannot export") as caught:
        save_structured_model(
            ByRows(),
            (torch.zeros(4, 2), torch.zeros(4, 2)),
            tmp_path / "model",
            pip_requirements=REQUIREMENTS,
        )
    assert "Fix:" in str(caught.value)
    assert not (tmp_path / "model").exists()


def test_example_the_net_fails_on_is_refused_with_its_reason(tmp_path: Path) -> None:
    example = {**token_rows(2, seed=1), "labels": torch.zeros(2, dtype=torch.long)}
    with pytest.raises(
        LkflowError,
        match=r"\['input_ids', 'attention_mask', 'labels'\]\) that TokenNet fails on \(TypeError: .*'labels'",
    ) as caught:
        save_structured_model(
            TokenNet(), example, tmp_path / "model", pip_requirements=REQUIREMENTS
        )
    assert "forward takes, (input_ids, attention_mask)." in str(caught.value)
    assert not (tmp_path / "model").exists()


def test_bfloat16_net_is_served_in_float32_and_called_in_bfloat16(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = nn.Linear(3, 2).to(torch.bfloat16).eval()
    example = (torch.randn(4, 3).to(torch.bfloat16),)
    save_structured_model(net, example, tmp_path / "model", pip_requirements=REQUIREMENTS)
    model = mlflow.pyfunc.load_model(str(tmp_path / "model"))
    assert [str(s.type) for s in model.metadata.signature.inputs.inputs] == ["float32"]
    x = torch.randn(5, 3)
    predicted = model.predict({"input": x.numpy()})
    assert predicted.dtype == np.float32
    np.testing.assert_allclose(predicted, net(x.to(torch.bfloat16)).detach().float().numpy())


def test_net_that_returns_nested_outputs_is_refused(tmp_path: Path) -> None:
    class Nested(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> Any:
            return {"sum": a + b, "parts": (a, b)}

    with pytest.raises(LkflowError, match=r"returns dict \{'parts': 'tuple'\}"):
        save_structured_model(
            Nested(),
            (torch.zeros(2, 2), torch.zeros(2, 2)),
            tmp_path / "model",
            pip_requirements=REQUIREMENTS,
        )
    assert not (tmp_path / "model").exists()


# ---- served by `mlflow models serve`, where lkflow cannot be imported -------------------------


@pytest.mark.slow
def test_models_serve_answers_both_request_forms_without_lkflow(
    tabular: tuple[Tabular, Path], tmp_path: Path
) -> None:
    net, path = tabular
    python = lkflow_free_python(tmp_path / "env")
    env = lkflow_free_env(python)
    probe = "import mlflow, torch\ntry:\n import lkflow\nexcept ImportError:\n print('no lkflow')"
    done = subprocess.run(
        [str(python), "-c", probe],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.stdout.strip() == "no lkflow", done.stdout + done.stderr[-2000:]

    x_num, x_cat = tabular_rows(7, seed=5)
    expected = net(x_num, x_cat)
    with models_serve(str(path), tmp_path, env, python) as url:
        status, answer = post(
            f"{url}/invocations", {"inputs": {"x_num": x_num.tolist(), "x_cat": x_cat.tolist()}}
        )
        assert status == 200, answer
        assert_outputs(answer["predictions"], expected)
        frame = {
            "columns": ["x_num", "x_cat"],
            "data": [[n, c] for n, c in zip(x_num.tolist(), x_cat.tolist(), strict=True)],
        }
        status, answer = post(f"{url}/invocations", {"dataframe_split": frame})
        assert status == 200, answer
        assert_outputs(answer["predictions"], expected)
        status, answer = post(f"{url}/invocations", {"inputs": {"x_num": x_num.tolist()}})
        assert 400 <= status < 500, answer
