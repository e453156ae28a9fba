"""Retake the README's MLflow screenshots: docs/runs.png and docs/compare.png.

    python docs/screenshots.py            # about 3 minutes: three runs on the real dataset, then the UI

Runs the pipeline three times (`dvc repro` and two `dvc exp run`s) in a throwaway copy of the
project, opens its store in the real MLflow UI on a free loopback port and drives headless
Chromium (Debian's /usr/bin/chromium, through Playwright) the way the README's browsing guide
says: its link (Model training view), the Assistant panel closed, `test_acc`, `lr` and
`batch_size` columns, Sort > `test_acc`; then Chart view with the runs' `epoch/*` curves
overlaid. Nothing leaves this machine.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers import (  # noqa: E402  (the project root first, for a script run by path)
    BIN,
    DVC,
    REAL_DATA,
    cli_env,
    free_port,
    make_project,
    run,
    shrunk_params,
    wait_for,
    write_dataset,
)

CHROMIUM = "/usr/bin/chromium"
VIEWPORT = {"width": 1280, "height": 720}
EXPERIMENTS = (
    ["repro"],
    ["exp", "run", "-n", "lr-0.3", "-S", "lr=0.3"],
    ["exp", "run", "-n", "bs-64", "-S", "batch_size=64"],
)


def make_runs(workdir: Path, epochs: int) -> Path:
    if REAL_DATA.is_dir():
        params, checksums = shrunk_params(REAL_DATA, num_epochs=epochs, batch_size=256), None
    else:  # no Fashion-MNIST here: the tests' synthetic clothes
        checksums = write_dataset(workdir / "data")
        params = shrunk_params(workdir / "data", num_epochs=epochs, batch_size=256)
    project = make_project(workdir / "project", params, checksums)
    for args in EXPERIMENTS:
        print("dvc", *args, flush=True)
        run([DVC, *args], project)
    return project


def screenshots(url: str, out: Path) -> None:
    from playwright.sync_api import sync_playwright

    runs_page = f"{url}/#/experiments/1/runs?workflowType=machine_learning"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport=VIEWPORT)
        page.goto(runs_page)  # the README's link, then its steps 2 and 3
        page.get_by_text("lr-0.3").first.wait_for(timeout=120_000)
        page.locator('[data-component-id="mlflow.assistant.chat_panel.close"]').click()  # its ×
        page.get_by_role("button", name="Columns").click()
        for name in ("Dataset", "test_acc", "lr", "batch_size"):  # Dataset off: room for the others
            page.get_by_text(name, exact=True).last.click()
        page.keyboard.press("Escape")
        page.get_by_role("button", name=re.compile("^Sort")).click()
        page.locator("[data-radix-popper-content-wrapper]").last.get_by_text("test_acc", exact=True).click()
        page.keyboard.press("Escape")
        page.wait_for_timeout(1500)
        page.screenshot(path=out / "runs.png")
        page.locator("label:has(input[value=CHART])").click()  # the middle icon: Chart view
        for chart in range(3):  # the three epoch/* charts, drawn once their data arrives
            page.get_by_text("Step", exact=True).nth(chart).wait_for(timeout=120_000)
        page.mouse.move(VIEWPORT["width"] - 1, VIEWPORT["height"] - 1)  # no hover toolbar over a chart
        page.wait_for_timeout(1000)
        page.screenshot(path=out / "compare.png")
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="screenshots-") as tmp:
        project = make_runs(Path(tmp), args.epochs)
        port = free_port()
        cmd = [str(BIN / "mlflow"), "ui", "--backend-store-uri", f"sqlite:///{project / 'mlflow.db'}"]
        cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # as `make ui` runs it
        env = cli_env(MLFLOW_DISABLE_TELEMETRY="true", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
        try:
            wait_for(f"http://127.0.0.1:{port}/health", server)
            screenshots(f"http://127.0.0.1:{port}", args.out)
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(f"wrote {args.out / 'runs.png'} and {args.out / 'compare.png'}")


if __name__ == "__main__":
    main()
