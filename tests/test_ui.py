"""What a user sees in a browser (headless Chromium): the README's browsing guide in the real MLflow UI,
and the charts of `dvc plots show` / `dvc plots diff` drawn with the network off."""

import json
import re
import subprocess

import pytest

from tests.helpers import BIN, DVC, ROOT, cli_env, free_port, make_project, run, shrunk_params, wait_for

pytestmark = pytest.mark.slow
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_source):
    """A project after `dvc repro` and one `dvc exp run`, with the node_modules/ that `make setup` installs."""
    source, sums = tiny_source
    project = make_project(tmp_path_factory.mktemp("ui") / "project", shrunk_params(source), sums)
    run([DVC, "repro"], project)
    run([DVC, "exp", "run", "-n", "slow-lr", "-S", "lr=0.01"], project)
    (project / "node_modules").symlink_to(ROOT / "node_modules")  # ignored by git, so not in the copy
    return project


@pytest.fixture(scope="module")
def ui(project):
    """The project's store in `mlflow ui` on a free port."""
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


def drawn_marks(page_path) -> dict[str, dict[str, int]]:
    """Open a `dvc plots` page offline (every request but file:// refused) and count each chart's marks."""
    sync_api = pytest.importorskip("playwright.sync_api")
    assert (ROOT / "node_modules" / "vega").is_dir(), "node_modules/ is missing: run `make setup` (npm ci)"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        context = browser.new_context()
        refused = []

        def file_only(route):
            if route.request.url.startswith("file:"):
                return route.continue_()
            refused.append(route.request.url)
            return route.abort()

        context.route("**/*", file_only)
        page = context.new_page()
        page.goto(page_path.as_uri())
        page.locator(".vega-embed svg.marks").last.wait_for(timeout=60_000)
        marks = page.evaluate("""() => Object.fromEntries([...document.querySelectorAll('body > div')].map(chart =>
            [chart.id, Object.fromEntries(['line', 'rect', 'symbol'].map(kind =>
                [kind, chart.querySelectorAll(`svg.marks g.mark-${kind} > path`).length]))]))""")
        browser.close()
    assert refused == [], "the page asked the network for something"
    return marks


def test_dvc_plots_show_draws_the_vega_charts_offline(project):
    out = run([DVC, "plots", "show"], project).stdout
    assert "dvc_plots/index.html" in out
    marks = drawn_marks(project / "dvc_plots" / "index.html")
    assert marks["Training_curves"]["line"] >= 3  # train_loss, train_acc, test_acc
    assert marks["reports_eval_confusion_json"]["rect"] >= 10  # the confusion matrix's cells
    assert {"reports_eval_curves_png", "reports_eval_confusion_png"} <= marks.keys()  # the PNGs too


def test_dvc_plots_diff_overlays_the_experiments_curves_offline(project):
    names = run([DVC, "exp", "ls", "--name-only"], project).stdout.split()
    assert names == ["slow-lr"]
    run([DVC, "plots", "diff", *names], project)  # the README's `dvc plots diff $(dvc exp ls --name-only)`
    marks = drawn_marks(project / "dvc_plots" / "index.html")
    assert marks["Training_curves"]["line"] >= 3 * 2  # the workspace's and slow-lr's curves in one chart


def test_make_exps_fits_160_columns_with_the_changed_params_and_key_metrics(project):
    table = run(["make", "-s", "exps"], project, COLUMNS="160").stdout
    lines = [line.rstrip() for line in table.splitlines() if line.strip()]
    assert max(map(len, lines)) <= 160 and "…" not in table
    header = lines[1].split()
    assert {"test_acc", "f1_macro", "epochs_run", "lr"} <= set(header)  # lr differs: 0.1 and slow-lr's 0.01
    assert "batch_size" not in header and "model_md5" not in header  # the same in every row; an md5
    assert any("[slow-lr]" in line for line in lines)


def test_the_assistant_panel_and_the_registry_dialog_close_as_the_readme_says(ui):
    sync_api = pytest.importorskip("playwright.sync_api")
    _, url = ui
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 720})
        page.goto(f"{url}/#/experiments/1/runs?workflowType=machine_learning")
        assistant = page.get_by_placeholder("Ask a question...")  # the MLflow Assistant panel's input
        assistant.wait_for(timeout=120_000)
        page.get_by_role("button", name="Close").click()  # the × at its top right
        assistant.wait_for(state="hidden", timeout=10_000)
        page.goto(f"{url}/#/models")  # the sidebar's Model registry
        dialog = page.get_by_role("dialog")
        dialog.wait_for(timeout=60_000)
        assert "new Model Registry UI" in dialog.inner_text()
        dialog.get_by_role("button", name="Close").click()
        dialog.wait_for(state="hidden", timeout=10_000)
        page.get_by_text("fashion-mnist-softmax").first.wait_for(timeout=30_000)
        browser.close()
