"""Bad input and interruptions, through the real stages: one clear line, a non-zero exit, and
data, models and the tracking store left as they were."""

import contextlib
import json
import os
import pickle
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import (
    DVC,
    alive,
    all_runs,
    cli_env,
    client_for,
    error_line,
    idx_bytes,
    make_project,
    mlflow_server,
    run,
    runs,
    shrunk_params,
    stage_argv,
    stage_command,
    store_uri,
    synthetic_split,
)

pytestmark = pytest.mark.slow


def snapshot(project) -> dict[str, bytes]:
    paths = ["models/model.pt", "reports/train/history.json", "reports/train/run.json", "reports/eval/metrics.json"]
    return {p: (project / p).read_bytes() for p in paths}


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory, tiny_source) -> Path:
    source, sums = tiny_source
    project = make_project(tmp_path_factory.mktemp("trained") / "project", shrunk_params(source), sums)
    run([DVC, "repro"], project)
    return project


@pytest.fixture
def trained(trained_once, tmp_path) -> Path:
    """A project after one good `dvc repro`: a copy per test of one run (each run costs ~20 s)."""
    return Path(shutil.copytree(trained_once, tmp_path / "project", symlinks=True))


def set_param(project, key, value):
    run([DVC, "exp", "run", "--dry", "-S", f"{key}={value}"], project)  # DVC's own way to edit params.yaml


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda images, labels: (images, np.where(labels == 3, 12, labels)), "label 12 outside 0..9"),
        (lambda images, labels: (images[:, :, :27], labels), "images are 28x27, expected 28x28"),
    ],
)
def test_bad_data_reaching_train_is_named(trained, mutate, message):
    data = trained / "data" / "fashion-mnist"
    images, labels = mutate(*synthetic_split(600, 1))
    for name, array in (("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels)):
        target = data / name
        target.unlink()  # DVC may have linked it from the cache; never write through that link
        target.write_bytes(idx_bytes(np.ascontiguousarray(array)))
    before = snapshot(trained)
    proc = run(stage_command("train"), trained, check=False)
    assert proc.returncode == 1
    assert error_line(proc).startswith("error: data/fashion-mnist/train-") and message in error_line(proc)
    assert snapshot(trained) == before


def test_hand_edited_labels_in_range_are_refused_before_training(trained):
    target = trained / "data" / "fashion-mnist" / "train-labels-idx1-ubyte"
    _, labels = synthetic_split(600, 1)
    target.unlink()  # DVC may have linked it from the cache; never write through that link
    target.write_bytes(idx_bytes((labels + 1) % 10))  # every label still in 0..9
    before = snapshot(trained)
    proc = run(stage_command("train"), trained, check=False)
    assert proc.returncode == 1
    assert error_line(proc).startswith("error: data/fashion-mnist/train-labels-idx1-ubyte: SHA-256 ")
    assert error_line(proc).endswith("(stages/fashion-mnist.sha256); run the download stage (dvc repro download)")
    assert snapshot(trained) == before
    assert len(runs(trained)) == 1  # the run that trained on the pinned data only


def test_divergence_fails_naming_lr_and_writes_no_model(tiny_project):
    params = (tiny_project / "params.yaml").read_text().replace("lr: 0.1", "lr: 1000")
    (tiny_project / "params.yaml").write_text(params)
    proc = run([DVC, "repro"], tiny_project, check=False)
    assert proc.returncode != 0
    assert "error: training diverged: loss" in proc.stderr and "lower lr (now 1000.0)" in proc.stderr
    assert not (tiny_project / "models" / "model.pt").exists()
    (only,) = runs(tiny_project)
    assert only.info.status == "FAILED"


def test_after_a_failed_stage_the_readme_commands_bring_the_outputs_back(trained):
    """DVC deletes a stage's outputs before running it; the README says how to get them back."""
    before = snapshot(trained)
    params = (trained / "params.yaml").read_text()
    (trained / "params.yaml").write_text(params.replace("lr: 0.1", "lr: 1000"))
    assert run([DVC, "repro"], trained, check=False).returncode != 0
    assert not (trained / "models" / "model.pt").exists()
    (trained / "params.yaml").write_text(params)
    run([DVC, "checkout"], trained)  # every output is in DVC's cache
    assert snapshot(trained) == before


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_training_keeps_the_previous_model_and_marks_the_run_killed(trained, signum):
    params = (trained / "params.yaml").read_text().replace("num_epochs: 1", "num_epochs: 100000")
    (trained / "params.yaml").write_text(params)
    before = snapshot(trained)
    proc = subprocess.Popen(
        stage_command("train"),
        cwd=trained,
        env=cli_env(PYTHONUNBUFFERED="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in proc.stdout:  # wait until it is training
        if line.startswith("epoch   2"):
            break
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith("error: interrupted")
    assert snapshot(trained) == before
    statuses = sorted(r.info.status for r in runs(trained))
    assert statuses == ["FINISHED", "KILLED"]
    (trained / "params.yaml").write_text(params.replace("num_epochs: 100000", "num_epochs: 1"))
    run([DVC, "repro"], trained)  # and the next run is clean


# The signal lands exactly as MLflow opens the run: the moment where a handler that raised from
# wherever Python happened to be was swallowed by SQLAlchemy's finalizers (7 times in 13).
SIGNAL_AS_THE_RUN_OPENS = """
import os, signal, sys
import stages.tracking.store as store

real_import = store.import_mlflow

def import_mlflow_and_signal_on_create_run():
    mlflow = real_import()
    create_run = mlflow.MlflowClient.create_run

    def create_run_after_a_signal(self, *args, **kwargs):
        os.kill(os.getpid(), signal.{signal})
        return create_run(self, *args, **kwargs)

    mlflow.MlflowClient.create_run = create_run_after_a_signal
    return mlflow

store.import_mlflow = import_mlflow_and_signal_on_create_run
from stages import run_stage
from stages.train import main
sys.argv = {argv!r}
run_stage(main)
"""


@pytest.mark.parametrize("signal_name, shown", [("SIGTERM", "SIGTERM"), ("SIGINT", "Ctrl-C")])
def test_a_signal_as_the_run_opens_is_never_swallowed(trained, signal_name, shown):
    before = snapshot(trained)
    script = SIGNAL_AS_THE_RUN_OPENS.format(signal=signal_name, argv=stage_argv("train"))
    proc = run(["python", "-c", script], trained, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: interrupted by {shown}; outputs stay the previous complete ones"
    ]
    assert snapshot(trained) == before
    assert sorted(r.info.status for r in runs(trained)) == ["FINISHED", "KILLED"]


@contextlib.contextmanager
def full_disk(directory):
    """`directory` on a nearly full filesystem of its own (a small tmpfs), holding its old files."""
    saved = {p.name: p.read_bytes() for p in directory.iterdir()}
    size = sum(map(len, saved.values())) // 1024 + 64  # KiB: the old files, and room for a little more
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}k", "tmpfs", str(directory)]).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        for name, data in saved.items():
            (directory / name).write_bytes(data)
        with open(directory / "filler", "wb", buffering=0) as filler, contextlib.suppress(OSError):
            while True:
                filler.write(b"\0" * 1024)
        yield
    finally:
        subprocess.run(["umount", str(directory)], check=True)


def test_a_full_disk_is_one_line_and_publishes_none_of_the_outputs(trained):
    """The model would fit; the history behind it does not: neither may replace the old ones."""
    before = snapshot(trained)
    with full_disk(trained / "reports" / "train"):
        proc = run(stage_command("train"), trained, check=False)
        assert proc.returncode == 1
        assert error_line(proc) == "error: reports/train/history.json: cannot write: No space left on device"
        assert "Traceback" not in proc.stderr
        assert snapshot(trained) == before
        leftovers = [p.name for d in ("models", "reports/train") for p in (trained / d).iterdir()]
        assert [name for name in leftovers if name.endswith(".tmp")] == []  # no staged file left behind
    assert sorted(r.info.status for r in runs(trained)) == ["FAILED", "FINISHED"]


@pytest.mark.parametrize("stage, directory", [("train", "models"), ("evaluate", "reports/eval")])
def test_a_full_disk_leaves_the_registry_and_the_champion_as_they_were(trained, stage, directory):
    """MLflow follows DVC: an output that cannot be written registers no version, logs no
    evaluation and moves no alias."""
    client = client_for(store_uri(trained))
    registry = [(v.version, v.tags) for v in client.search_model_versions(f"name = '{MODEL_NAME}'")]
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion").version
    before = {**snapshot(trained), **eval_files(trained)}
    with full_disk(trained / directory):
        proc = run(stage_command(stage), trained, check=False)
        assert proc.returncode == 1
        assert error_line(proc).startswith(f"error: {directory}/") and "No space left on device" in error_line(proc)
        now = {**snapshot(trained), **eval_files(trained)}
        now.pop("filler", None)  # full_disk's own, in reports/eval
        assert now == before
    assert [(v.version, v.tags) for v in client.search_model_versions(f"name = '{MODEL_NAME}'")] == registry
    assert client.get_model_version_by_alias(MODEL_NAME, "champion").version == champion
    assert_mlflow_follows_the_files(client, {md5_of(trained / "models/model.pt")})
    expected = ["FAILED", "FINISHED"] if stage == "train" else ["FINISHED"]  # evaluate reopens no run
    assert sorted(r.info.status for r in runs(trained)) == expected


class WritesAFile:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "not a loadable checkpoint"),  # a crafted pickle
        (b"PK\x03\x04 truncated", "not a loadable checkpoint"),
        ("wrong-shape", "do not match the model's"),
    ],
)
def test_evaluate_refuses_a_bad_model_file_without_running_its_code(trained, content, message):
    model = trained / "models" / "model.pt"
    model.unlink()
    if content is None:
        import io

        buffer = io.BytesIO()
        torch.save({"state_dict": {}, "config": WritesAFile()}, buffer, pickle_module=pickle)
        model.write_bytes(buffer.getvalue())
    elif content == "wrong-shape":
        torch.save({"state_dict": {"1.weight": torch.zeros(5, 784), "1.bias": torch.zeros(5)}, "config": {}}, model)
    else:
        model.write_bytes(content)
    metrics = (trained / "reports/eval/metrics.json").read_bytes()
    proc = run(stage_command("evaluate"), trained, check=False)
    assert proc.returncode == 1
    assert error_line(proc).startswith("error: models/model.pt: ") and message in error_line(proc)
    assert not (trained / "pwned").exists()
    assert (trained / "reports/eval/metrics.json").read_bytes() == metrics


@pytest.mark.parametrize(
    "uri, shown",
    [
        ("nosuch://tracking", "nosuch://tracking"),
        ("http://alice:s3cret@127.0.0.1:9/", "http://alice:***@127.0.0.1:9/"),
    ],
)
def test_bad_tracking_uri_is_one_line_without_secrets(trained, uri, shown):
    before = snapshot(trained)
    start = time.monotonic()
    proc = run(stage_command("train"), trained, check=False, MLFLOW_TRACKING_URI=uri)
    assert proc.returncode == 1
    assert error_line(proc).startswith(f"error: MLflow tracking store {shown} is not usable")
    assert "s3cret" not in proc.stdout + proc.stderr
    assert time.monotonic() - start < 60
    assert snapshot(trained) == before


@pytest.mark.parametrize(
    "break_store, reason",
    [
        (lambda db: db.mkdir(), "(sqlite3.OperationalError) "),
        (lambda db: db.write_bytes(b"not a database, " * 512), "file is not a database"),
    ],
)
def test_a_store_that_cannot_be_opened_fails_within_seconds(trained, break_store, reason):
    before = snapshot(trained)
    db = trained / "mlflow.db"
    db.unlink()
    break_store(db)
    start = time.monotonic()
    proc = run(stage_command("train"), trained, check=False)
    assert proc.returncode == 1
    assert error_line(proc).startswith(f"error: MLflow tracking store sqlite:///{db} is not usable: ")
    assert reason in error_line(proc)
    assert time.monotonic() - start < 60  # MLflow alone retries such a store for ~100 s
    assert snapshot(trained) == before


def test_locked_store_fails_within_seconds(trained):
    before = snapshot(trained)
    holder = sqlite3.connect(trained / "mlflow.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        start = time.monotonic()
        proc = run(stage_command("train"), trained, check=False)
        elapsed = time.monotonic() - start
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert proc.returncode == 1
    assert error_line(proc).startswith(f"error: MLflow tracking store sqlite:///{trained / 'mlflow.db'} ")
    assert "locked" in error_line(proc)
    assert elapsed < 60
    assert snapshot(trained) == before
    assert [r.info.status for r in runs(trained)] == ["FINISHED"]


@contextlib.contextmanager
def read_only(path):
    """A file nobody may write, root included (CI runs as root): the immutable flag."""
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_read_only_store_fails_with_the_databases_reason(trained):
    before = snapshot(trained)
    with read_only(trained / "mlflow.db"):
        proc = run(stage_command("train"), trained, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"error: MLflow tracking store sqlite:///{trained / 'mlflow.db'} is not usable: "
        "(sqlite3.OperationalError) attempt to write a readonly database"
    )
    assert snapshot(trained) == before
    assert [r.info.status for r in runs(trained)] == ["FINISHED"]


def test_ui_command_listens_on_this_machine_only():
    from tests.helpers import ROOT

    # A recipe's command may run over several lines joined by backslashes: read it as make does.
    commands = (ROOT / "Makefile").read_text().replace("\\\n", " ").splitlines()
    ui = [line for line in commands if "mlflow ui" in line]
    assert ui and all("--host 127.0.0.1" in line for line in ui)
    assert "make ui" in (ROOT / "README.md").read_text()


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, their children, ...), from /proc."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            for child in map(int, (task / "children").read_text().split()):
                found += [child, *descendants(child)]
    return found


def registered_versions(project) -> list[str]:
    client = client_for(store_uri(project))
    return sorted(v.version for v in client.search_model_versions("name = 'fashion-mnist-softmax'"))


@pytest.mark.parametrize("shell", ["/bin/sh", "/bin/bash"])
def test_sigterm_to_dvc_stops_its_stage_which_publishes_nothing(trained, shell):
    """`kill -TERM <dvc pid>` mid-training: dvc goes, and so does the train stage it started, at its
    next batch with the usual line; no model, no FINISHED run, no registered version appears.
    dvc runs the stage through `$SHELL -c`: bash execs the stage, dash (`/bin/sh`, used when SHELL
    is unset, as in CI) stays between dvc and the stage and outlives dvc."""
    params = (trained / "params.yaml").read_text().replace("num_epochs: 1", "num_epochs: 100000")
    (trained / "params.yaml").write_text(params)
    versions = registered_versions(trained)
    model = (trained / "models/model.pt").read_bytes()
    dvc_proc = subprocess.Popen(
        [DVC, "repro", "train"], cwd=trained, env=cli_env(PYTHONUNBUFFERED="1", SHELL=shell),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    for line in dvc_proc.stdout:  # wait until it is training
        if line.startswith("epoch   2"):
            break
    stage = [pid for pid in descendants(dvc_proc.pid) if "stages.train" in Path(f"/proc/{pid}/cmdline").read_text()]
    assert stage, "the train stage is not running under dvc"
    dvc_proc.send_signal(signal.SIGTERM)
    _, stderr = dvc_proc.communicate(timeout=60)  # the pipes close when the stage is gone too
    deadline = time.monotonic() + 30
    while any(map(alive, stage)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(map(alive, stage)), "the train stage outlived dvc"
    assert "error: interrupted by SIGTERM; outputs stay the previous complete ones" in stderr
    assert "Traceback" not in stderr
    model_now = trained / "models/model.pt"  # dvc deleted it before running the stage
    assert not model_now.exists() or model_now.read_bytes() == model
    assert registered_versions(trained) == versions
    assert sorted(r.info.status for r in runs(trained)) == ["FINISHED", "KILLED"]


def signal_handler_installed(pid: int, signum: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(caught >> (signum - 1) & 1)


def test_a_sigterm_in_a_stages_first_moments_gets_the_usual_line(trained):
    """The handlers are in place as the `stages` package is imported, before numpy or torch load.
    (SIGINT is not tested so: Python's own SIGINT handler is there from its first instruction.)"""
    signum, shown = signal.SIGTERM, "SIGTERM"
    before = snapshot(trained)
    proc = subprocess.Popen(stage_command("train"), cwd=trained, env=cli_env(), stderr=subprocess.PIPE, text=True)
    while not signal_handler_installed(proc.pid, signum):
        assert proc.poll() is None
    early = "numpy" not in Path(f"/proc/{proc.pid}/maps").read_text()
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert early, "the handler came only after the heavy imports"
    assert proc.returncode == 1
    assert stderr.strip().splitlines() == [f"error: interrupted by {shown}; outputs stay the previous complete ones"]
    assert snapshot(trained) == before


def test_a_closed_stdout_is_one_line_not_a_traceback(trained):
    """`fmnist-predict ... | head -0`: the reader has gone; one line on stderr, no traceback."""
    reader_gone = subprocess.run(
        "fmnist-predict --test-index 0 1 2 | head -0; exit ${PIPESTATUS[0]}",
        shell=True, executable="/bin/bash", cwd=trained, env=cli_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert reader_gone.returncode == 1
    assert reader_gone.stderr.strip().splitlines()[-1] == "error: stdout was closed (broken pipe)"
    assert "Traceback" not in reader_gone.stderr


def test_installed_commands_use_the_project_they_are_run_in(trained, tmp_path):
    """This checkout's `fmnist-predict`/`fmnist-promote`, run inside another clone, use that clone's
    model, data and store, and say so; outside any project they refuse in one line."""
    inside = trained / "reports"  # any directory of the project
    same = run(["python", "-m", "stages.predict", "--test-index", "0", "3"], trained)  # the clone's own code
    predicted = run(["fmnist-predict", "--test-index", "0", "3"], inside)
    answered, *predictions = predicted.stdout.splitlines()
    assert predictions == same.stdout.splitlines()[1:]
    assert answered.startswith(f"model: {trained}/models/model.pt (md5 ")  # the clone's model answered
    assert predicted.stderr.splitlines() == [f"project: {trained}"]
    promoted = run(["fmnist-promote", "no-such-experiment"], inside, check=False)
    assert promoted.returncode == 1
    assert f"in sqlite:///{trained}/mlflow.db" in error_line(promoted)
    for command in (["fmnist-predict", "--test-index", "0"], ["fmnist-promote", "x"]):
        outside = run(command, tmp_path, check=False)
        assert outside.returncode == 1
        assert outside.stderr.splitlines() == [
            f"error: {tmp_path}: not inside a project (no directory above it has dvc.yaml and params.yaml)"
        ]


# MLflow follows DVC: a stage writes to MLflow what its published files back, so an interrupt at
# any point leaves the registry, the champion alias and the run statuses consistent with the files.
# The points are hit exactly by a proxy between the stage and a real `mlflow server`: on the request
# named, it sends SIGTERM to the stage and holds the request until the signal has been delivered.


class SignallingProxy:
    """A loopback HTTP proxy to `upstream` that signals `pid` on the first request matching
    `signal_at` ((method, path, text in the body)), before passing that request on."""

    def __init__(self, upstream: str):
        import http.server
        import threading
        import urllib.parse

        self.upstream = urllib.parse.urlsplit(upstream)
        self.pid, self.signal_at, self.signalled = 0, None, False
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def arm(self, pid: int, method: str, path: str, body_has: str = "") -> None:
        self.pid, self.signal_at, self.signalled = pid, (method, path, body_has), False

    def _maybe_signal(self, method: str, path: str, body: bytes) -> None:
        if self.signal_at is None or self.signalled:
            return
        want_method, want_path, body_has = self.signal_at
        if method == want_method and path.split("?")[0] == want_path and body_has.encode() in body:
            self.signalled = True
            os.kill(self.pid, signal.SIGTERM)
            while signal_pending(self.pid, signal.SIGTERM):  # delivered: the stage has recorded it
                time.sleep(0.01)

    def _handler(self):
        import http.client
        import http.server

        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                proxy._maybe_signal(self.command, self.path, body)
                upstream = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                upstream.request(self.command, self.path, body=body, headers=headers)
                reply = upstream.getresponse()
                data = reply.read()
                self.send_response(reply.status)
                for key, value in reply.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = forward

        return Handler

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def signal_pending(pid: int, signum: int) -> bool:
    """Whether `signum` waits to be delivered to `pid` (sent, not yet taken by a handler)."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    pending = (int(line.split()[1], 16) for line in status if line.startswith(("SigPnd:", "ShdPnd:")))
    return any(mask >> (signum - 1) & 1 for mask in pending)


MODEL_NAME = "fashion-mnist-softmax"


def md5_of(path: Path) -> str:
    import hashlib

    return hashlib.md5(path.read_bytes()).hexdigest()


def eval_files(project) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((project / "reports/eval").iterdir())}


def assert_mlflow_follows_the_files(client, published: set[str]) -> None:
    """Every registered version holds a model the stage published, from a FINISHED run; the champion
    is an evaluated version of a FINISHED run; no run is left RUNNING; every evaluation is complete."""
    for version in client.search_model_versions(f"name = '{MODEL_NAME}'"):
        run = client.get_run(version.run_id)
        assert run.info.status == "FINISHED", f"version {version.version}: run {run.info.status}"
        assert run.data.tags["dvc.model_md5"] in published, f"version {version.version}: model never published"
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert client.get_run(champion.run_id).info.status == "FINISHED" and "test_acc" in champion.tags
    for run in all_runs(client):
        assert run.info.status != "RUNNING"
        assert run.data.tags.get("evaluation.status", "complete") == "complete"


def test_mlflow_follows_dvc_wherever_train_and_evaluate_are_interrupted(trained, tmp_path):
    """SIGTERM before a stage publishes its files leaves MLflow as it was (train's run KILLED, no
    version; evaluate logs nothing); after, the stage finishes what MLflow must say about the files
    it published (the version, the evaluation, the champion) and exits 1 saying so."""
    backend = f"sqlite:///{trained / 'mlflow.db'}"  # the trained project's store, behind a server
    with mlflow_server(backend, tmp_path / "artifacts") as url, SignallingProxy(url) as proxy:
        client = client_for(url)
        published = {md5_of(trained / "models/model.pt")}

        def interrupted(stage, method, path, body_has=""):
            proc = subprocess.Popen(
                stage_command(stage), cwd=trained, env=cli_env(MLFLOW_TRACKING_URI=proxy.url),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            proxy.arm(proc.pid, method, path, body_has)
            _, stderr = proc.communicate(timeout=300)
            assert proxy.signalled, f"{stage} never sent {method} {path}"
            assert proc.returncode == 1 and "Traceback" not in stderr
            published.add(md5_of(trained / "models/model.pt"))
            assert_mlflow_follows_the_files(client, published)
            return stderr.strip().splitlines()[-1]

        def promote(target):
            return run(["python", "-m", "stages.promote", target], trained, check=False, MLFLOW_TRACKING_URI=url)

        # Another seed: a model unlike the published one, so "published" is visible in the files.
        (trained / "params.yaml").write_text((trained / "params.yaml").read_text().replace("seed: 0", "seed: 1"))
        before = snapshot(trained)

        # train, as it logs the model (before publishing): KILLED, no version, files as they were.
        line = interrupted("train", "POST", "/api/2.0/mlflow/logged-models")
        assert line == "error: interrupted by SIGTERM; outputs stay the previous complete ones"
        assert snapshot(trained) == before
        killed = next(r for r in all_runs(client) if r.info.status == "KILLED")
        assert client.search_model_versions(f"run_id = '{killed.info.run_id}'") == []
        refused = promote(killed.info.run_id)
        assert refused.returncode == 1 and "registered no version" in error_line(refused)

        # train, as it registers the model (after publishing): the version of the published model.
        line = interrupted("train", "POST", "/api/2.0/mlflow/model-versions/create")
        assert line == "error: interrupted by SIGTERM after the outputs were written"
        model_md5 = md5_of(trained / "models/model.pt")
        assert (trained / "models/model.pt").read_bytes() != before["models/model.pt"]
        new = max(client.search_model_versions(f"name = '{MODEL_NAME}'"), key=lambda v: int(v.version))
        assert client.get_run(new.run_id).data.tags["dvc.model_md5"] == model_md5
        assert client.get_model_version_by_alias(MODEL_NAME, "champion").version == "1"
        refused = promote(new.version)
        assert refused.returncode == 1 and "was never evaluated" in error_line(refused)

        # evaluate, as it looks for the model's run (before publishing): nothing logged anywhere.
        reports = eval_files(trained)
        line = interrupted("evaluate", "POST", "/api/2.0/mlflow/runs/search", "dvc.model_md5")
        assert line == "error: interrupted by SIGTERM; outputs stay the previous complete ones"
        assert eval_files(trained) == reports
        assert "evaluation.status" not in client.get_run(new.run_id).data.tags
        assert "test_acc" not in client.get_model_version(MODEL_NAME, new.version).tags
        assert promote(new.version).returncode == 1

        # evaluate, part-way through logging (after publishing), with no champion yet: the
        # evaluation is logged whole and the alias lands on the best version all the same.
        client.delete_registered_model_alias(MODEL_NAME, "champion")
        line = interrupted("evaluate", "POST", "/api/2.0/mlflow/model-versions/set-tag")
        assert line == "error: interrupted by SIGTERM after the outputs were written"
        metrics = json.loads((trained / "reports/eval/metrics.json").read_text())
        assert client.get_run(new.run_id).data.metrics["test_acc"] == metrics["test_acc"]
        assert client.get_model_version(MODEL_NAME, new.version).tags["test_acc"] == f"{metrics['test_acc']:.4f}"
        best = max(float(v.tags["test_acc"]) for v in client.search_model_versions(f"name = '{MODEL_NAME}'"))
        assert float(client.get_model_version_by_alias(MODEL_NAME, "champion").tags["test_acc"]) == best
