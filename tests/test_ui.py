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


# The README's "Browsing runs", claim by claim, in MLflow's own UI (one browser for the module).
VIEWPORT = {"width": 1280, "height": 720}


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    page = browser.new_page(viewport=VIEWPORT)
    page.set_default_timeout(60_000)
    yield page
    page.close()


RUNS = "/#/experiments/1/runs?workflowType=machine_learning"
ASSISTANT_CLOSE = '[data-component-id="mlflow.assistant.chat_panel.close"]'


def open_runs(page, url: str, query: str = "", close_assistant: bool = True):
    page.goto(f"{url}{RUNS}{query}")
    page.get_by_text("slow-lr").first.wait_for(timeout=120_000)
    if close_assistant:
        page.locator(ASSISTANT_CLOSE).click()
        page.get_by_placeholder("Ask a question...").wait_for(state="hidden")


def headers(page) -> list[str]:
    """The table's column headers left to right, each once."""
    names = [h.inner_text().strip() for h in page.get_by_role("columnheader").all()]
    return list(dict.fromkeys(name for name in names if name))


def box(locator) -> dict:
    return locator.bounding_box()


def test_the_ui_opens_in_the_genai_view_and_the_toggle_leads_to_the_runs(ui, page):
    _, url = ui
    page.goto(f"{url}/")
    page.get_by_role("link", name="fashion-mnist-softmax").first.click()
    page.get_by_text("No data available").first.wait_for()  # GenAI view: an Overview of traces
    assert "workflowType=genai" in page.url and "/overview" in page.url
    page.goto(f"{url}/")
    page.get_by_text("Model training", exact=True).first.click()  # the toggle at the top of the sidebar
    page.get_by_role("link", name="Experiments").first.click()
    page.get_by_role("link", name="fashion-mnist-softmax").first.click()
    page.get_by_text("slow-lr").first.wait_for()
    assert "/experiments/1/runs" in page.url and "workflowType=machine_learning" in page.url


def test_the_readme_link_opens_the_runs_with_the_columns_and_sort_it_names(ui, page):
    project, url = ui
    (link,) = re.findall(r"http://127\.0\.0\.1:5000/#/experiments/1/runs\S*", (ROOT / "README.md").read_text())
    assert link.endswith(RUNS)
    open_runs(page, url)
    assert page.get_by_text(re.compile(r"^repro-[0-9a-f]{7}-lr0\.1-bs64-ep1-")).count() == 1
    assert headers(page) == ["Run Name", "Created", "Dataset", "Duration", "Source", "Models"]
    assert page.get_by_text("train.py", exact=True).count() == 2 and page.get_by_text("v1", exact=True).count() == 1
    page.get_by_role("button", name="Columns").click()
    menu = page.locator("[data-radix-popper-content-wrapper]").last.inner_text().splitlines()
    assert "Attributes" in menu and "Dataset" in menu[menu.index("Attributes") :]
    metrics = next(i for i, line in enumerate(menu) if re.fullmatch(r"Metrics \(\d+\)", line))
    parameters = next(i for i, line in enumerate(menu) if re.fullmatch(r"Parameters \(\d+\)", line))
    assert metrics < menu.index("test_acc") < parameters < menu.index("batch_size") < menu.index("lr")
    for name in ("Dataset", "test_acc", "lr", "batch_size"):
        page.get_by_text(name, exact=True).last.click()
    page.keyboard.press("Escape")
    shown = headers(page)
    assert {"test_acc", "lr", "batch_size"} <= set(shown) and "Dataset" not in shown
    test_acc = json.loads((project / "reports/eval/metrics.json").read_text())["test_acc"]
    page.get_by_text(f"{test_acc:.4f}".rstrip("0").rstrip("."), exact=True).first.wait_for()  # as the UI writes it
    best, worse = page.get_by_role("link", name=re.compile(r"^repro-")), page.get_by_role("link", name="slow-lr")
    assert box(best)["y"] > box(worse)["y"]  # newest first: slow-lr (0.96) above the repro run (1.0)
    page.get_by_role("button", name=re.compile("^Sort")).click()
    page.locator("[data-radix-popper-content-wrapper]").last.get_by_text("test_acc", exact=True).click()
    page.get_by_role("button", name="Sort: test_acc").wait_for()
    page.wait_for_function("() => location.hash.includes('orderByKey=metrics.%60test_acc%60')")
    assert "orderByAsc=false" in page.url  # the down arrow, selected by default: the best first
    page.wait_for_timeout(500)  # the rows re-ordering
    assert box(best)["y"] < box(worse)["y"]


def test_the_assistant_panel_and_the_registry_dialog_close_as_the_readme_says(ui, page):
    _, url = ui
    open_runs(page, url, close_assistant=False)
    panel = page.get_by_placeholder("Ask a question...")
    close = page.locator(ASSISTANT_CLOSE)
    assert box(close)["x"] > 0.9 * VIEWPORT["width"] and box(close)["y"] < 0.1 * VIEWPORT["height"]  # × top right
    assert 0.2 * VIEWPORT["width"] < VIEWPORT["width"] - box(panel)["x"] < 0.3 * VIEWPORT["width"]  # a quarter
    close.click()
    panel.wait_for(state="hidden")
    reopen = page.get_by_role("button", name="MLflow Assistant")  # the round button, bottom right
    assert box(reopen)["x"] > 0.9 * VIEWPORT["width"] and box(reopen)["y"] > 0.9 * VIEWPORT["height"]
    reopen.click()
    panel.wait_for()
    page.goto(f"{url}/#/models")  # the sidebar's Model registry
    dialog = page.get_by_role("dialog")
    dialog.wait_for()
    assert dialog.inner_text().splitlines()[0] == "Flexible, governed deployments with the new Model Registry UI"
    dialog.get_by_role("button", name="Close").click()
    dialog.wait_for(state="hidden")
    assert "Aliased versions" in headers(page)
    page.get_by_text(re.compile(r"^@\s*champion$")).first.wait_for()
    page.get_by_role("link", name="fashion-mnist-softmax", exact=True).last.click()
    page.get_by_text("Version 1", exact=True).first.wait_for()
    version_1 = page.get_by_role("row").filter(has_text="Version 1").inner_text().replace("\xa0", " ")
    assert "test_acc" in version_1 and "@ champion" in version_1
    assert "test_acc" in page.get_by_role("row").filter(has_text="Version 2").inner_text()


def test_the_chart_view_is_the_middle_icon_and_overlays_the_epoch_curves(ui, page):
    _, url = ui
    open_runs(page, url, close_assistant=False)
    icons = [page.locator(f"label:has(input[value={mode}])") for mode in ("TABLE", "CHART", "ARTIFACT")]
    search = page.get_by_placeholder(re.compile("metrics.rmse"))
    assert box(icons[0])["x"] < box(icons[1])["x"] < box(icons[2])["x"]
    assert all(box(icon)["y"] + box(icon)["height"] <= box(search)["y"] for icon in icons)  # above it
    for icon, tip in zip(icons, ("Table view", "Chart view", "Artifact evaluation"), strict=True):
        page.mouse.move(600, 650)
        icon.hover()
        page.get_by_role("tooltip", name=tip).wait_for()
    page.locator(ASSISTANT_CLOSE).click()
    page.get_by_placeholder("Ask a question...").wait_for(state="hidden")
    page.wait_for_timeout(500)  # the toolbar re-flowing into one row
    assert all(box(icon)["x"] + box(icon)["width"] <= box(search)["x"] for icon in icons)  # left of it
    assert all(abs(box(icon)["y"] - box(search)["y"]) < box(search)["height"] for icon in icons)
    icons[1].click()
    for chart in ("epoch/test_acc", "epoch/train_acc", "epoch/train_loss"):
        page.get_by_text(chart, exact=True).first.wait_for()
    page.get_by_text("epoch", exact=True).first.wait_for()  # the section's heading
    page.get_by_text("Model metrics", exact=True).first.wait_for()
    page.get_by_text("Step", exact=True).first.wait_for()
    page.get_by_test_id("experiment-view-compare-runs-card-menu").first.click()  # a chart's ⋮
    page.get_by_role("menuitem", name="Configure").click()
    editor = page.get_by_role("dialog")
    editor.get_by_text("Time (wall)", exact=True).wait_for()
    editor.get_by_role("button", name="Cancel").click()
    legend = page.get_by_text("slow-lr (epoch/test_acc)", exact=True)
    legend.first.wait_for()
    page.get_by_role("row").filter(has_text="slow-lr").locator("label", has_text="Hide run").click()  # its eye
    legend.first.wait_for(state="hidden")


def test_compare_puts_runs_side_by_side_with_the_four_plots(ui, page):
    _, url = ui
    open_runs(page, url)
    boxes = page.locator("input[type=checkbox]:visible")
    boxes.nth(1).check()
    boxes.nth(2).check()
    page.get_by_role("button", name="Compare").click()
    page.get_by_text("Comparing 2 Runs from 1 Experiment").wait_for()
    for section in ("Parameters", "Metrics"):
        page.get_by_role("switch", name=f"{section} - Show diff only").wait_for()
    for plot in ("Parallel Coordinates Plot", "Scatter Plot", "Box Plot", "Contour Plot"):
        page.get_by_text(plot, exact=True).first.wait_for()
    page.get_by_role("link", name="Training runs").click()  # the GenAI view's sidebar
    page.get_by_text("slow-lr").first.wait_for()
    assert "/experiments/1/runs" in page.url


def test_a_runs_page_has_the_tabs_and_sections_the_readme_lists(ui, page):
    _, url = ui
    open_runs(page, url)
    page.get_by_role("link", name="slow-lr").first.click()
    page.get_by_role("tab", name="Overview").wait_for()
    page.get_by_role("link", name="Training runs").wait_for()  # the GenAI view's sidebar, as on Compare
    tabs = [tab.inner_text() for tab in page.get_by_role("tab").all()]
    assert tabs == ["Overview", "Model metrics", "System metrics", "Traces", "Artifacts"]
    for section in ("Metrics (", "Parameters (", "Logged models (1)", "Registered models", "Tags"):
        page.get_by_text(section).first.wait_for()
    for tag in ("git.commit", "git.dirty", "dvc.exp_name", "dvc.model_md5"):
        page.get_by_text(tag, exact=True).first.wait_for()
    test_acc = page.get_by_role("row").filter(has=page.get_by_text("test_acc", exact=True))
    assert test_acc.inner_text().split()[-1] == "model"  # its Models column: the logged model
    page.get_by_role("tab", name="Model metrics").click()
    page.get_by_text("epoch", exact=True).first.wait_for()
    page.get_by_role("tab", name="Artifacts").click()
    page.get_by_text("history.json", exact=True).wait_for()
    assert page.get_by_text("evaluation", exact=True).count() == 1
    assert page.get_by_text("model", exact=True).count() == 0  # the model is under Models


def test_the_models_tab_lists_the_logged_models_with_metric_columns_to_the_right(ui, page):
    _, url = ui
    open_runs(page, url)
    page.get_by_role("link", name="Models", exact=True).click()  # the experiment's sidebar
    names = ["Model name", "Status", "Created", "Logged from", "Source run", "Registered models", "Dataset"]
    for name in names:  # the grid draws its columns one after another
        page.get_by_role("columnheader", name=name, exact=True).first.wait_for()
    shown = headers(page)
    assert [name for name in shown if name in names] == names
    assert page.get_by_text("v1", exact=True).count() == 1 and page.get_by_text("v2", exact=True).count() == 1
    test_acc = page.get_by_role("columnheader", name="test_acc")
    assert test_acc.count() == 0 or box(test_acc.first)["x"] > VIEWPORT["width"]  # off-screen
    sideways = page.locator(".ag-body-horizontal-scroll-viewport")
    for _ in range(40):  # scroll the table sideways until the column shows
        if test_acc.count() and 0 < box(test_acc.first)["x"] < VIEWPORT["width"]:
            break
        sideways.evaluate("e => { e.scrollLeft += 200 }")
        page.wait_for_timeout(100)
    assert test_acc.count() and 0 < box(test_acc.first)["x"] < VIEWPORT["width"]
