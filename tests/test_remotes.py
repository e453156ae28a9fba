"""Team scale: DVC remote storage of three kinds (a shared directory, SSH, S3), each against a real
server this module starts on loopback; a teammate's fresh clone gets data, model and reports
without running anything; experiments travel through a bare git remote plus the DVC remote; and
no credential reaches git, MLflow or any command's output.

One pipeline run in clone A (tiny data, one epoch) and one experiment serve every test."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tests.helpers import (
    DVC,
    EXPERIMENT,
    all_runs,
    client_for,
    free_port,
    git_commit_all,
    lock_md5,
    make_project,
    mlflow_server,
    ran,
    restored,
    run,
    run_git,
    s3_server,
    shrunk_params,
)

pytestmark = pytest.mark.slow
KINDS = ("shared", "ssh", "s3")
OUTPUTS = ("data", "models", "reports")
EXPERIMENT_LR = "0.05"
LOGS: list[str] = []  # what every command printed, searched for secrets at the end


def dvc(project: Path, *args: str, check: bool = True, **env) -> subprocess.CompletedProcess:
    proc = run([DVC, *args], project, check=check, **env)
    LOGS.append(proc.stdout + proc.stderr)
    return proc


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def outputs(project: Path) -> dict[str, str]:
    """Every file under data/, models/ and reports/ -> md5 of its bytes."""
    return {
        str(path.relative_to(project)): md5(path)
        for top in OUTPUTS
        for path in sorted((project / top).rglob("*"))
        if path.is_file()
    }


def cache(project: Path) -> dict[str, str]:
    root = project / ".dvc" / "cache"
    return {str(path.relative_to(root)): md5(path) for path in sorted(root.rglob("*")) if path.is_file()}


# --- an OpenSSH server ------------------------------------------------------------------------


def wait_for_port(port: int, proc: subprocess.Popen, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.2)
    raise TimeoutError(f"port {port}")


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", path], check=True)
    return path


@contextlib.contextmanager
def sshd(home: Path):
    """Debian's OpenSSH server on a free loopback port with its own host key, letting root in with
    one key only; yields (port, that key, a key it does not know) and stops the server by PID."""
    home.mkdir(parents=True)
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    host_key, key, stranger = (keygen(home / name) for name in ("host_key", "team_key", "stranger_key"))
    (home / "authorized_keys").write_text(Path(f"{key}.pub").read_text())
    port = free_port()
    config = home / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\nPidFile {home / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {home / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nStrictModes no\nUsePAM no\n"
        "Subsystem sftp internal-sftp\n"
    )
    with open(home / "sshd.log", "w") as log:
        proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", config], stdout=log, stderr=log)
        try:
            wait_for_port(port, proc)
            yield SimpleNamespace(port=port, key=key, stranger=stranger)
        finally:
            proc.terminate()
            proc.wait(timeout=30)


# --- the team: servers, a bare git remote, clone A that ran the pipeline -----------------------


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    if not Path("/usr/sbin/sshd").exists():
        pytest.skip("openssh-server not installed")
    home = tmp_path_factory.mktemp("servers")
    with (
        sshd(home / "ssh") as ssh,
        s3_server() as s3,
        mlflow_server(
            f"sqlite:///{home / 'mlflow.db'}", home / "mlflow-artifacts", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"
        ) as mlflow_url,
    ):
        s3.client().create_bucket(Bucket="team-dvc")
        urls = {
            "shared": str(home / "nfs" / "dvc-store"),
            "ssh": f"ssh://root@127.0.0.1:{ssh.port}{home / 'ssh-store'}",
            "s3": "s3://team-dvc/store",
        }
        yield SimpleNamespace(home=home, ssh=ssh, s3=s3, mlflow=mlflow_url, urls=urls)


def add_remote(project: Path, name: str, url: str, **settings: str) -> None:
    """Where the data lives, in .dvc/config (committed); no credentials."""
    dvc(project, "remote", "add", "-f", name, url)
    for option, value in settings.items():
        dvc(project, "remote", "modify", name, option, value)


def add_credentials(project: Path, name: str, **credentials: str) -> None:
    """A teammate's own credentials, in .dvc/config.local (ignored by git)."""
    for option, value in credentials.items():
        dvc(project, "remote", "modify", "--local", name, option, value)


def credentials(servers, kind: str) -> dict[str, str]:
    return {
        "shared": {},
        "ssh": {"keyfile": str(servers.ssh.key)},
        "s3": {"access_key_id": servers.s3.access_key_id, "secret_access_key": servers.s3.secret_access_key},
    }[kind]


def teammate_clone(team, dest: str, kind: str | None = None) -> Path:
    """A fresh clone of the shared git remote with its own empty DVC cache."""
    clone = team.root / dest
    run(["git", "clone", "-q", str(team.origin), str(clone)], team.root)
    if kind:
        add_credentials(clone, kind, **credentials(team.servers, kind))
    return clone


@pytest.fixture(scope="module")
def team(servers, tiny_source, tmp_path_factory):
    root = tmp_path_factory.mktemp("team")
    source, sums = tiny_source
    a = make_project(root / "a", shrunk_params(source), sums)
    # verify: a pull re-hashes what it downloads, as README's admin commands set it
    add_remote(a, "shared", servers.urls["shared"], verify="true")
    add_remote(a, "ssh", servers.urls["ssh"], verify="true")
    add_remote(a, "s3", servers.urls["s3"], endpointurl=servers.s3.endpoint, verify="true")
    for kind in KINDS:
        add_credentials(a, kind, **credentials(servers, kind))
    git_commit_all(a, "Remote storage for the team")
    dvc(a, "repro", MLFLOW_TRACKING_URI=servers.mlflow)
    git_commit_all(a, "Run the pipeline")
    origin = root / "origin.git"
    run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], root)
    run_git(a, "remote", "add", "origin", str(origin))
    run_git(a, "push", "-q", "origin", "main")
    return SimpleNamespace(root=root, a=a, origin=origin, servers=servers)


@pytest.fixture(scope="module")
def experiment(team):
    """A's experiment, run in a temporary copy so A's workspace stays at its commit."""
    name = "lr-small"
    dvc(
        team.a, "exp", "run", "--temp", "-n", name, "-S", f"lr={EXPERIMENT_LR}", MLFLOW_TRACKING_URI=team.servers.mlflow
    )
    ref = run_git(team.a, "for-each-ref", "--format=%(refname)", "refs/exps")
    lock = yaml.safe_load(run_git(team.a, "show", f"{ref}:dvc.lock"))
    model = next(out["md5"] for out in lock["stages"]["train"]["outs"] if out["path"] == "models/model.pt")
    return SimpleNamespace(name=name, model_md5=model)


# --- 1. remote storage -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_teammate_pulls_data_model_and_reports_and_has_nothing_to_run(team, kind):
    dvc(team.a, "push", "-r", kind, "--run-cache")
    b = teammate_clone(team, f"b-{kind}", kind)
    assert not (b / "models").exists()

    dvc(b, "pull", "-r", kind, "--run-cache")

    assert outputs(b) == outputs(team.a)
    assert md5(b / "models" / "model.pt") == lock_md5(b, "train", "models/model.pt")
    assert ran(dvc(b, "repro", MLFLOW_TRACKING_URI=team.servers.mlflow).stdout) == set()


@contextlib.contextmanager
def one_byte_flipped(servers, kind: str, md5_hex: str):
    """The remote's copy of one object with its last byte flipped, straight in the storage (as a
    failing disk or a bad upload would leave it); put back afterwards for the module's other tests."""
    key = f"files/md5/{md5_hex[:2]}/{md5_hex[2:]}"
    if kind == "s3":
        bucket, prefix = servers.urls["s3"].removeprefix("s3://").split("/", 1)
        s3 = servers.s3.client()
        good = s3.get_object(Bucket=bucket, Key=f"{prefix}/{key}")["Body"].read()
        write = lambda data: s3.put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=data)  # noqa: E731
    else:  # the directory and the SSH server's directory are on this machine
        path = Path(servers.urls[kind].split("127.0.0.1:", 1)[-1].lstrip("0123456789")) / key
        good = path.read_bytes()
        write = path.write_bytes
    write(good[:-1] + bytes([good[-1] ^ 0xFF]))
    try:
        yield
    finally:
        write(good)


@pytest.mark.parametrize("kind", KINDS)
def test_a_corrupted_object_on_the_remote_is_refused_and_never_reaches_the_workspace(team, kind):
    dvc(team.a, "push", "-r", kind)
    model_md5 = lock_md5(team.a, "train", "models/model.pt")
    b = teammate_clone(team, f"corrupt-{kind}", kind)

    with one_byte_flipped(team.servers, kind, model_md5):
        pull = dvc(b, "pull", "-r", kind, check=False)

    assert pull.returncode != 0, pull.stdout + pull.stderr
    assert "ERROR: failed to pull data from the cloud" in pull.stderr, pull.stderr
    assert "models/model.pt" in pull.stderr + pull.stdout, pull.stderr  # the culprit is named
    model = b / "models" / "model.pt"
    assert not model.exists() or md5(model) == model_md5  # never the corrupt bytes
    assert md5(b / "data" / "fashion-mnist" / "train-images-idx3-ubyte") == md5(
        team.a / "data" / "fashion-mnist" / "train-images-idx3-ubyte"
    )  # the good objects still came


# --- 2. experiments shared ---------------------------------------------------------------------


def shown_experiments(project: Path) -> dict[str, dict]:
    """`dvc exp show --json`: experiment name -> {"params": ..., "metrics": ...} of its results."""
    found = {}
    for baseline in json.loads(dvc(project, "exp", "show", "--json").stdout):
        for exp in baseline.get("experiments") or []:
            for rev in exp["revs"]:
                data = rev["data"]
                found[rev["name"]] = {
                    "params": data["params"]["params.yaml"]["data"],
                    "metrics": data["metrics"]["reports/eval/metrics.json"]["data"],
                }
    return found


def pull_experiment(team, experiment, kind: str, dest: str) -> Path:
    """A pushes its experiment (git refs to origin, outputs and run-cache to the DVC remote); a
    teammate's fresh clone pulls it."""
    dvc(team.a, "exp", "push", "origin", experiment.name, "--run-cache", "-r", kind)
    b = teammate_clone(team, dest, kind)
    dvc(b, "exp", "pull", "origin", "--run-cache", "-r", kind)  # every experiment on B's commit
    return b


@pytest.mark.parametrize("kind", ["ssh"])  # the S3 remote carries the rerun below; one run each keeps the module short
def test_a_teammate_sees_and_applies_an_experiment_without_training(team, experiment, kind):
    runs_before = len(all_runs(client_for(team.servers.mlflow)))
    b = pull_experiment(team, experiment, kind, f"exp-{kind}")

    shown = shown_experiments(b)[experiment.name]
    assert shown["params"]["lr"] == float(EXPERIMENT_LR)
    assert 0 < shown["metrics"]["test_acc"] <= 1

    dvc(b, "exp", "apply", experiment.name)
    assert md5(b / "models" / "model.pt") == lock_md5(b, "train", "models/model.pt") == experiment.model_md5
    assert len(all_runs(client_for(team.servers.mlflow))) == runs_before


def test_a_teammate_rerunning_an_experiment_gets_it_from_the_run_cache_and_its_mlflow_run(team, experiment):
    mlflow = client_for(team.servers.mlflow)
    b = pull_experiment(team, experiment, "s3", "exp-rerun")
    runs_before = len(all_runs(mlflow))

    out = dvc(b, "exp", "run", "-S", f"lr={EXPERIMENT_LR}", MLFLOW_TRACKING_URI=team.servers.mlflow).stdout

    assert {"train", "evaluate"} <= restored(out) and not {"train", "evaluate"} & ran(out), out
    assert md5(b / "models" / "model.pt") == experiment.model_md5
    assert len(all_runs(mlflow)) == runs_before  # a cache hit runs no command, so no new MLflow run
    model_md5 = json.loads((b / "reports" / "train" / "run.json").read_text())["model_md5"]
    (original,) = mlflow.search_runs(
        [mlflow.get_experiment_by_name(EXPERIMENT).experiment_id],
        filter_string=f"tags.\"dvc.model_md5\" = '{model_md5}'",
    )
    assert original.data.tags["dvc.exp_name"] == experiment.name


# --- 5. bad input and faults -------------------------------------------------------------------
# Each fault: a remote that cannot work, the settings (in .dvc/config.local) that break it, and the
# repair. DVC must fail with its own message, touch nothing, and complete once repaired. (As root
# no directory is unwritable, so the shared directory's fault is a path that is not a directory.)


def blocked_directory(servers, tmp: Path):
    mount = tmp / "mnt"
    mount.write_text("a file where the shared directory should be")
    url = str(mount / "dvc-store")
    return SimpleNamespace(url=url, settings={}, repair={}, fix=mount.unlink, reason="Not a directory")


def ssh_closed_port(servers, tmp: Path):
    url = f"ssh://root@127.0.0.1:{{}}{tmp / 'ssh-store'}"
    settings, repair = {"keyfile": str(servers.ssh.key)}, {"url": url.format(servers.ssh.port)}
    return SimpleNamespace(url=url.format(free_port()), settings=settings, repair=repair, reason="Connect call failed")


def ssh_wrong_key(servers, tmp: Path):
    url = f"ssh://root@127.0.0.1:{servers.ssh.port}{tmp / 'ssh-store'}"
    settings, repair = {"keyfile": str(servers.ssh.stranger)}, credentials(servers, "ssh")
    return SimpleNamespace(url=url, settings=settings, repair=repair, reason="Permission denied for user root")


def s3_closed_port(servers, tmp: Path):
    settings = {**credentials(servers, "s3"), "endpointurl": f"http://127.0.0.1:{free_port()}"}
    repair, reason = {"endpointurl": servers.s3.endpoint}, "Could not connect to the endpoint URL"
    return SimpleNamespace(url=f"s3://team-dvc/{tmp.name}", settings=settings, repair=repair, reason=reason)


def s3_wrong_keys(servers, tmp: Path):
    settings = {**credentials(servers, "s3"), "endpointurl": servers.s3.endpoint, "secret_access_key": "not-the-key"}
    repair = credentials(servers, "s3")
    return SimpleNamespace(url=f"s3://team-dvc/{tmp.name}", settings=settings, repair=repair, reason="Forbidden")


def s3_no_such_bucket(servers, tmp: Path):
    bucket = f"not-made-yet-{free_port()}"
    settings = {**credentials(servers, "s3"), "endpointurl": servers.s3.endpoint}
    return SimpleNamespace(
        url=f"s3://{bucket}/store",
        settings=settings,
        repair={},
        fix=lambda: servers.s3.client().create_bucket(Bucket=bucket),
        reason="The specified bucket does not exist",
    )


FAULTS = {
    "shared-path-not-a-directory": blocked_directory,
    "ssh-closed-port": ssh_closed_port,
    "ssh-wrong-key": ssh_wrong_key,
    "s3-closed-port": s3_closed_port,
    "s3-wrong-keys": s3_wrong_keys,
    "s3-no-such-bucket": s3_no_such_bucket,
}


@pytest.mark.parametrize("fault", FAULTS)
def test_a_broken_remote_fails_push_and_pull_touches_nothing_and_a_retry_completes(team, fault, tmp_path):
    broken = FAULTS[fault](team.servers, tmp_path)
    a = team.a
    dvc(a, "remote", "add", "--local", "-f", "broken", broken.url)
    add_credentials(a, "broken", **broken.settings)
    c = teammate_clone(team, f"fault-{fault}")
    shutil.copy(a / ".dvc" / "config.local", c / ".dvc" / "config.local")
    a_before = outputs(a), cache(a)

    push = dvc(a, "push", "-r", "broken", check=False, timeout=300)
    pull = dvc(c, "pull", "-r", "broken", check=False, timeout=300)

    assert push.returncode != 0 and push.stderr.startswith("ERROR: ") and broken.reason in push.stderr, push.stderr
    assert pull.returncode != 0 and pull.stderr.startswith("ERROR: "), pull.stderr
    assert (outputs(a), cache(a)) == a_before
    assert outputs(c) == {k: v for k, v in outputs(a).items() if k in git_files(c)}  # only what git holds
    assert run_git(c, "status", "--porcelain") == ""

    getattr(broken, "fix", lambda: None)()
    add_credentials(a, "broken", **broken.repair)
    shutil.copy(a / ".dvc" / "config.local", c / ".dvc" / "config.local")
    dvc(a, "push", "-r", "broken")
    dvc(c, "pull", "-r", "broken")
    assert outputs(c) == outputs(a)
    dvc(a, "remote", "remove", "--local", "broken")


def git_files(project: Path) -> set[str]:
    return set(run_git(project, "ls-files").splitlines())


# --- 4. secrets --------------------------------------------------------------------------------


def test_no_credential_reaches_git_mlflow_or_any_output(team):
    secret = team.servers.s3.secret_access_key
    assert secret in (team.a / ".dvc" / "config.local").read_text()  # used, from the file git ignores
    for repo in (team.a, team.origin):
        revs = run_git(repo, "rev-list", "--all").split()
        found = run(["git", "grep", "-I", "-l", "-F", secret, *revs], repo, check=False)
        assert found.returncode == 1 and found.stdout == "", found.stdout
    for logged in all_runs(client_for(team.servers.mlflow)):
        assert secret not in json.dumps([logged.data.params, logged.data.tags])
    assert LOGS and not [log for log in LOGS if secret in log]
