"""`make serve`: the real `mlflow models serve` for the champion, on a free loopback port."""

import json
import os
import re
import signal
import subprocess
import urllib.error
import urllib.request

import numpy as np
import pytest

from stages.data import CLASSES
from tests.helpers import DVC, ROOT, cli_env, free_port, make_project, run, shrunk_params, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_source):
    """A project after `dvc repro` (its model is the champion) and `make serve` on a free port."""
    source, sums = tiny_source
    project = make_project(tmp_path_factory.mktemp("serving") / "project", shrunk_params(source), sums)
    run([DVC, "repro"], project)
    port = free_port()
    log_path = project / "serve.log"
    with open(log_path, "w") as log:
        # Its own process group: make, mlflow and the uvicorn worker stop together, by this PID.
        proc = subprocess.Popen(
            ["make", "-o", "setup", "serve", f"SERVE_PORT={port}"],
            cwd=project, env=cli_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_for(f"http://127.0.0.1:{port}/ping", proc, seconds=240)
        yield project, f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def post(url: str, body: bytes) -> tuple[int, bytes]:
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_test_images_get_the_pipelines_own_predictions(served):
    import torch

    from stages.data import load_split
    from stages.model import load_checkpoint

    project, url = served
    images, _ = load_split(project / "data/fashion-mnist", "test")
    batch = images[:32].astype(np.float32) / 255
    status, body = post(url, json.dumps({"inputs": batch.tolist()}).encode())
    assert status == 200, body[:500]
    rows = json.loads(body)["predictions"]  # one object per image: class name -> probability
    assert len(rows) == 32 and all(list(row) == list(CLASSES) for row in rows)
    probabilities = np.asarray([[row[name] for name in CLASSES] for row in rows])
    np.testing.assert_allclose(probabilities.sum(1), 1, atol=1e-5)
    model, _ = load_checkpoint(project / "models/model.pt")
    with torch.inference_mode():
        ours = model(torch.from_numpy(batch)).argmax(1).numpy()
    np.testing.assert_array_equal(probabilities.argmax(1), ours)


def test_the_readme_curl_returns_probabilities(served):
    project, url = served
    block = (ROOT / "README.md").read_text().split("### Serving", 1)[1].split("```sh", 2)[2].split("```")[0]
    (command,) = [line for line in block.replace("\\\n", " ").splitlines() if "curl" in line]
    command = re.sub(r"#.*$", "", command).replace("http://127.0.0.1:5001", url)
    proc = subprocess.run(["bash", "-c", command], cwd=project, env=cli_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    (probabilities,) = json.loads(proc.stdout)["predictions"]
    assert list(probabilities) == list(CLASSES) and abs(sum(probabilities.values()) - 1) < 1e-5
    section = (ROOT / "README.md").read_text().split("### Serving", 1)[1]
    shown = section.split("It answers", 1)[1].split("```")[1]  # the reply's shape, as the README shows it
    assert shown.strip().startswith('{"predictions": [{"T-shirt/top": ') and '"Ankle boot": ' in shown


@pytest.mark.parametrize(
    "body",
    [
        json.dumps({"inputs": np.zeros((2, 28, 27)).tolist()}).encode(),  # wrong shape
        json.dumps({"inputs": [[["a"] * 28] * 28]}).encode(),  # strings
        b"",  # empty body
        b'{"inputs": "' + b"x" * 50_000_000 + b'"}',  # 50 MB
    ],
    ids=["wrong-shape", "strings", "empty", "50MB"],
)
def test_bad_payloads_get_a_4xx_with_a_message_and_the_server_keeps_serving(served, body):
    _, url = served
    status, answer = post(url, body)
    assert 400 <= status < 500, answer[:500]
    assert json.loads(answer)["message"]
    assert_still_serving(url)


def assert_still_serving(url: str) -> None:
    good = json.dumps({"inputs": np.zeros((1, 28, 28)).tolist()}).encode()
    status, answer = post(url, good)
    assert status == 200 and list(json.loads(answer)["predictions"][0]) == list(CLASSES)


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_nan_or_infinite_pixels_get_a_400_that_names_them(served, value):
    """Python's JSON reads NaN and Infinity; the model refuses them rather than answer NaN probabilities."""
    _, url = served
    rows = [["0.5"] * 28 for _ in range(28)]
    rows[3][4] = value
    body = ('{"inputs": [[' + ", ".join("[" + ", ".join(row) + "]" for row in rows) + "]]}").encode()
    status, answer = post(url, body)
    assert status == 400, answer[:500]
    message = json.loads(answer)["message"]
    assert "NaN or infinite" in message and "image 0, row 3, column 4" in message
    assert_still_serving(url)


def test_a_100000_deep_json_body_is_mlflows_500_and_the_server_keeps_serving(served):
    """MLflow's server parses the body before the model sees it and answers a RecursionError with a
    bare 500 (README, "When something goes wrong" says so); the next request is served."""
    _, url = served
    status, _ = post(url, b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert status == 500
    assert_still_serving(url)
