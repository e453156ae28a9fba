"""The README's browsing guide, followed in the real MLflow UI with headless Chromium."""

import json
import re
import subprocess

import pytest

from tests.helpers import BIN, DVC, ROOT, cli_env, free_port, make_project, run, shrunk_params, wait_for

pytestmark = pytest.mark.slow
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def ui(tmp_path_factory, tiny_source):
    """A project after `dvc repro` and one `dvc exp run`, its store in `mlflow ui` on a free port."""
    source, sums = tiny_source
    project = make_project(tmp_path_factory.mktemp("ui") / "project", shrunk_params(source), sums)
    run([DVC, "repro"], project)
    run([DVC, "exp", "run", "-n", "slow-lr", "-S", "lr=0.01"], project)
    port = free_port()
    cmd = [str(BIN / "mlflow"), "ui", "--backend-store-uri", f"sqlite:///{project / 'mlflow.db'}"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    # One worker and no job runner (the default is 4 + 7): less load on the tests running beside this one.
    env = cli_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(f"http://127.0.0.1:{port}/health", server)
        yield project, f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_readme_link_opens_the_runs_and_the_columns_show_test_acc(ui):
    sync_api = pytest.importorskip("playwright.sync_api")
    project, url = ui
    (link,) = re.findall(r"http://127\.0\.0\.1:5000/#/experiments/1/runs\S*", (ROOT / "README.md").read_text())
    test_acc = json.loads((project / "reports/eval/metrics.json").read_text())["test_acc"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1600, "height": 800})
        page.goto(link.replace("http://127.0.0.1:5000", url))
        page.get_by_text("slow-lr").first.wait_for(timeout=120_000)  # Model training view: the runs are listed
        assert page.get_by_text(re.compile(r"^repro-[0-9a-f]{7}-lr0\.1-bs64-ep1-")).count() == 1
        page.get_by_role("button", name="Columns").click()
        for name in ("test_acc", "lr", "batch_size"):
            page.get_by_text(name, exact=True).last.click()
        page.keyboard.press("Escape")
        shown = f"{test_acc:.4f}".rstrip("0").rstrip(".")  # as the UI writes numbers: 0.345, 1
        page.get_by_text(shown, exact=True).first.wait_for(timeout=60_000)
        page.goto(f"{url}/#/experiments/1/runs?workflowType=machine_learning&compareRunsMode=CHART")
        page.get_by_text("epoch/test_acc").first.wait_for(timeout=120_000)  # the chart view's curves
        browser.close()
