"""What a person reads in MLflow's UI about a tracked fit, and the REST API answers it is built on.

One `mlflow ui` on 127.0.0.1 and one finished fit of the rings (3 epochs, system metrics
sampled every 0.1 s, registered as rings-net) serve every test here. The REST tests read the
run, its logged model, its registered version and its experiment through the server; the
browser tests open, in headless Chromium (Debian's `chromium` and `chromium-driver`, driven by
Selenium), the run link the fit printed, the model's page and the registered model's pages,
and assert what is on the screen. Screenshots of those pages go to the git-ignored
`screenshots/` folder of the checkout.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from helpers import ROOT, fresh_store, make_model
from mlflow import MlflowClient
from servers import mlflow_server
from torch.utils.data import DataLoader, random_split

from lkflow.datasets import rings
from lkflow.tracking import MLflowCallback

pytestmark = pytest.mark.slow

EPOCHS = 3
SCREENSHOTS = ROOT / "screenshots"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
WAIT_S = 90  # the UI is a React app: a page's parts arrive one request at a time


@dataclass
class UiRun:
    """The server, the fit's run in it, and what the fit printed."""

    url: str
    client: MlflowClient
    run: Any
    model_id: str
    printed: str
    history: list[dict[str, Any]]


@pytest.fixture(scope="module")
def ui(tmp_path_factory: pytest.TempPathFactory, migrated_store: Path) -> Iterator[UiRun]:
    folder = tmp_path_factory.mktemp("ui")
    backend = fresh_store(folder, migrated_store)
    with mlflow_server(backend, folder / "artifacts", folder, subcommand="ui") as url:
        model, printed = _fit(folder, url)
        client = MlflowClient(url)
        run = client.get_run(model.run_id)
        (output,) = run.outputs.model_outputs
        yield UiRun(url, client, run, output.model_id, printed, model.history)


def _fit(folder: Path, url: str) -> tuple[Any, str]:
    """The article's split of the rings, fitted and tracked as a user does; what it printed."""
    pl.seed_everything(0, verbose=False)
    split = torch.Generator().manual_seed(0)
    train, valid = random_split(rings(320, seed=1), [224, 96], generator=split)
    tracker = MLflowCallback(
        experiment_name="rings",
        registered_model_name="rings-net",
        tracking_uri=url,
        system_metrics_interval=0.1,
    )
    model, printed, here = make_model(), io.StringIO(), os.getcwd()
    os.chdir(folder)
    try:
        with contextlib.redirect_stdout(printed):
            model.fit(
                DataLoader(train, batch_size=64, shuffle=True),
                DataLoader(valid, batch_size=64),
                epochs=EPOCHS,
                gpus=0,
                verbose=0,
                track=tracker,
            )
    finally:
        os.chdir(here)
    return model, printed.getvalue()


def _datasets(ui: UiRun) -> dict[str, tuple[str, str]]:
    """The run's datasets by context: (name, digest)."""
    return {
        next(tag.value for tag in data.tags if tag.key == "mlflow.data.context"): (
            data.dataset.name,
            data.dataset.digest,
        )
        for data in ui.run.inputs.dataset_inputs
    }


# ---- the REST API --------------------------------------------------------------------------


def test_the_fit_prints_its_run_experiment_version_and_link(ui: UiRun) -> None:
    name, run_id = ui.run.info.run_name, ui.run.info.run_id
    link = f"{ui.url}/#/experiments/{ui.run.info.experiment_id}/runs/{run_id}"
    assert ui.printed.splitlines() == [
        f"Logged run {name} to experiment 'rings'; registered rings-net version 1.",
        f"View run {name} at: {link}?workflowType=machine_learning",
    ]


def test_the_logged_model_names_its_registered_version(ui: UiRun) -> None:
    with urllib.request.urlopen(f"{ui.url}/api/2.0/mlflow/logged-models/{ui.model_id}") as answer:
        model = json.load(answer)["model"]
    tags = {tag["key"]: tag["value"] for tag in model["info"]["tags"]}
    assert json.loads(tags["mlflow.modelVersions"]) == [{"name": "rings-net", "version": 1}]
    version = ui.client.get_model_version("rings-net", "1")
    assert version.source == f"models:/{ui.model_id}" and version.run_id == ui.run.info.run_id
    # A sqlite registry keeps no model_id (MLflow 3.14 to 3.17): the tag above is the link.
    assert version.model_id is None


def test_the_models_metrics_name_the_data_they_were_computed_on(ui: UiRun) -> None:
    datasets = _datasets(ui)
    linked = {
        metric.key: (metric.dataset_name, metric.dataset_digest)
        for metric in ui.client.get_logged_model(ui.model_id).metrics
    }
    assert linked == {
        "loss": datasets["training"],
        "acc": datasets["training"],
        "val_loss": datasets["validation"],
        "val_acc": datasets["validation"],
        "best_val_loss": datasets["validation"],
        "lr": (None, None),
        "best_epoch": (None, None),
    }


def test_datasets_are_named_after_the_data_not_the_split(ui: UiRun) -> None:
    datasets = _datasets(ui)
    assert {context: name for context, (name, _) in datasets.items()} == {
        "training": "rings",
        "validation": "rings",
    }
    assert datasets["training"][1] != datasets["validation"][1]


def test_the_experiment_is_one_of_model_training(ui: UiRun) -> None:
    experiment = ui.client.get_experiment(ui.run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_epochs_count_from_one_in_metrics_tags_and_file_names(ui: UiRun) -> None:
    run_id = ui.run.info.run_id
    for key in ("loss", "val_loss", "lr"):
        assert [m.step for m in ui.client.get_metric_history(run_id, key)] == [1, 2, 3], key
    best = min(ui.history, key=lambda row: row["val_loss"])
    version = ui.client.get_model_version("rings-net", "1")
    assert version.tags["best_epoch"] == str(best["epoch"])
    assert ui.run.data.metrics["best_epoch"] == best["epoch"]
    assert {m.step for m in ui.client.get_logged_model(ui.model_id).metrics} == {best["epoch"]}
    files = [a.path for a in ui.client.list_artifacts(run_id, "checkpoints")]
    assert f"checkpoints/epoch={best['epoch']}-val_loss={best['val_loss']:.4f}.ckpt" in files


def test_system_metrics_are_sampled_while_the_run_is_open(ui: UiRun) -> None:
    run = ui.run
    system = {key for key in run.data.metrics if key.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system
    points = ui.client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    assert sorted(point.step for point in points) == list(range(len(points))) and len(points) >= 2
    assert all(run.info.start_time <= p.timestamp <= run.info.end_time for p in points)


# ---- the browser ---------------------------------------------------------------------------


def _missing_browser() -> str | None:
    """What a browser test lacks here, named; None when all is installed."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.is_file()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e '.[test]')")
    if not missing:
        return None
    return f"no {', '.join(missing)}: apt-get install chromium chromium-driver (as .ci/run does)"


@pytest.fixture(scope="module")
def browser(ui: UiRun) -> Iterator[Any]:
    """Headless Chromium at 1280x800, MLflow's assistant panel closed, on a fresh profile."""
    reason = _missing_browser()
    if reason is not None:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium's driver manager downloads nothing
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    flags = "--headless --no-sandbox --disable-gpu --disable-dev-shm-usage --no-first-run"
    flags += " --disable-background-networking --disable-component-update --disable-sync"
    for flag in flags.split():
        options.add_argument(flag)
    profile = ui.url.rsplit(":", 1)[-1]  # one profile per server, beside nothing of the user's
    folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"lkflow-chromium-{profile}"
    options.add_argument(f"--user-data-dir={folder}")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        metrics = {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False}
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
        SCREENSHOTS.mkdir(exist_ok=True)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(folder, ignore_errors=True)


def _open(driver: Any, url: str, *shown: str) -> str:
    """Opens `url`, waits until the page's text matches every regular expression in `shown`
    (failing with the page's text if it never does), and returns that text."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    text = ""

    def showing(d: Any) -> bool:
        nonlocal text
        text = d.find_element(By.TAG_NAME, "body").text
        return all(re.search(pattern, text) for pattern in shown)

    try:
        WebDriverWait(driver, WAIT_S).until(showing)
    except TimeoutException:
        missing = [pattern for pattern in shown if not re.search(pattern, text)]
        raise AssertionError(f"{url} never showed {missing}; it shows:\n{text}") from None
    _close_assistant(driver)
    return text


def _close_assistant(driver: Any) -> None:
    """MLflow 3.17 opens an assistant over a third of the page on its first visit: a person
    closes it (and the UI remembers)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    close = 'button[data-component-id="mlflow.assistant.chat_panel.close"]'
    for button in driver.find_elements(By.CSS_SELECTOR, close):
        button.click()
    WebDriverWait(driver, WAIT_S).until(lambda d: not d.find_elements(By.CSS_SELECTOR, close))


def _shot(driver: Any, name: str) -> None:
    driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))


def _charts(driver: Any, metric: str) -> dict[str, list[Any]]:
    """The metric charts on the page after searching for `metric`: title -> the x values of
    the first line, as the chart draws them."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    search = driver.find_element(By.CSS_SELECTOR, 'input[placeholder="Search metric charts"]')
    search.send_keys(metric)
    script = """
        return Array.from(document.querySelectorAll(
            '[data-testid="experiment-view-compare-runs-card"]')).map(card => {
          const plot = card.querySelector('.js-plotly-plot');
          return [card.innerText.split('\\n')[0], plot && plot.data ? plot.data[0].x : null];
        });"""

    def drawn(d: Any) -> dict[str, list[Any]] | None:
        charts = {title: x for title, x in d.execute_script(script) if x}
        return charts if metric in charts else None

    charts: dict[str, list[Any]] = WebDriverWait(driver, WAIT_S).until(drawn)
    return charts


def test_the_printed_link_opens_the_run_in_the_training_view(ui: UiRun, browser: Any) -> None:
    link = ui.printed.splitlines()[-1].split(" at: ")[1]
    training = _datasets(ui)["training"]
    text = _open(
        browser,
        link,
        rf"\n{ui.run.info.run_name}\n",
        r"Registered models\s+rings-net\s+v1",
        rf"Datasets\s+rings \({training[1]}\)\s+Training",
        r"Registered prompts\s+—",  # the last part of the page to arrive
    )
    _shot(browser, "run")
    assert "Model training" in text and "Runs\nModels" in text  # not the GenAI overview
    assert "Detect Issues" not in text and "Training runs" not in text
    assert "Subset" not in text


def test_the_runs_charts_show_every_epoch(ui: UiRun, browser: Any) -> None:
    base = ui.printed.splitlines()[-1].split(" at: ")[1]
    _open(browser, base.replace("?", "/model-metrics?"), "Model metrics")
    charts = _charts(browser, "val_loss")
    _shot(browser, "run-model-metrics")
    assert charts["val_loss"] == [1, 2, 3]


def test_the_runs_system_metrics_tab_has_charts(ui: UiRun, browser: Any) -> None:
    base = ui.printed.splitlines()[-1].split(" at: ")[1]
    _open(browser, base.replace("?", "/system-metrics?"), "System metrics")
    charts = _charts(browser, "cpu_utilization_percentage")
    _shot(browser, "run-system-metrics")
    assert len(charts["cpu_utilization_percentage"]) >= 2


def test_the_models_page_shows_it_registered_with_its_datasets(ui: UiRun, browser: Any) -> None:
    experiment_id = ui.run.info.experiment_id
    page = f"{ui.url}/#/experiments/{experiment_id}/models/{ui.model_id}"
    datasets = _datasets(ui)
    training, validation = datasets["training"][1], datasets["validation"][1]
    text = _open(
        browser,
        f"{page}?workflowType=machine_learning",
        r"Model versions\s+rings-net\s+v1",
        rf"Datasets used\s+rings \(#({training}|{validation})\)",
        rf"\nval_loss\s+rings \(#{validation}\)",
        rf"\nloss\s+rings \(#{training}\)",
        r"\nbest_epoch\s+-\s",
    )
    _shot(browser, "model")
    assert "Not registered" not in text


def test_the_registered_models_versions_read_in_one_line(ui: UiRun, browser: Any) -> None:
    best = min(ui.history, key=lambda row: row["val_loss"])
    first_line = f"val_loss {best['val_loss']:.4f} at epoch {best['epoch']}"
    text = _open(browser, f"{ui.url}/#/models/rings-net", rf"Version 1\s[^`]*\n{first_line}\n")
    _shot(browser, "registered-model")
    assert "```" not in text
    text = _open(
        browser,
        f"{ui.url}/#/models/rings-net/versions/1",
        rf"\n{first_line}\nNet with the weights of its best epoch by val_loss \(min\)\.\nLayers:",
        r"Total params: 115",
        rf"Source Run\s*:\s*{ui.run.info.run_name}\s",
    )
    _shot(browser, "model-version")
    assert "```" not in text
