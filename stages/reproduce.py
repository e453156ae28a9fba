"""Rebuild a model from what its lineage records, in a throwaway clean clone, and compare the bytes.

fmnist-reproduce models:/fashion-mnist-softmax@champion     # or any name fmnist-lineage takes
fmnist-reproduce tuned --git-remote https://git.example.internal/fmnist.git --dvc-remote s3://fmnist/dvc

The clone is of the commit the training run recorded, with the params the run logged; it trains
for real (`dvc repro --force --no-run-cache`) and logs to an MLflow store inside the clone, so
nothing reaches your store, workspace or `git status`. The data comes from params' local
directories, else from this project's DVC cache (or `--dvc-remote`). One verdict line; exit 0
only when the rebuilt model is bit-identical to the recorded one.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from stages import ArgumentParser, PipelineError, check_interrupt, project_root, run_stage
from stages.git import git_or_none
from stages.lineage import MODEL_PATH, Lineage, Resolver
from stages.tracking.store import one_line_errors

STORED_MODEL_FILE = "artifacts/model.pt"  # the logged model's checkpoint: the bytes of models/model.pt


class NotReproducible(PipelineError):
    """A model that cannot be rebuilt exactly, or was rebuilt and differs; the message says why."""


def _step(cmd: list[str], cwd: Path, env: dict[str, str], what: str) -> str:
    """Run one command in the clone, in its own process group so that Ctrl-C or SIGTERM stops it
    here (then the clone is removed); a failure is one line naming the step and DVC's reason."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        while proc.poll() is None:
            try:
                check_interrupt()
            except PipelineError:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
                raise
            time.sleep(0.2)
    finally:
        out = proc.stdout.read() if proc.stdout else ""
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    if proc.returncode != 0:
        errors = [line for line in out.splitlines() if line.startswith(("error:", "ERROR:"))]
        reason = errors[-1] if errors else (out.strip().splitlines() or ["no output"])[-1]
        raise NotReproducible(f"{what} failed in the clone: {reason[:300]}")
    return out


def refusal(lineage: Lineage) -> str | None:
    """Why the recorded lineage cannot give the same bytes, before trying; None when it can."""
    if lineage.run is None:
        return f"no MLflow run in this store trained it (md5 {lineage.model_md5}), so no params or commit are recorded"
    if not lineage.commit:
        return f"run {lineage.run.info.run_id} records no git commit"
    if lineage.dirty:
        return (
            f"run {lineage.run.info.run_name} was made from a dirty tree: its code differed from commit "
            f"{lineage.commit[:7]}, and that code is recorded nowhere"
        )
    return None


def recorded_params(lineage: Lineage, committed: dict) -> dict:
    """params.yaml at the commit with every param the run logged put back, and evaluate.* from its tags."""
    params = json.loads(json.dumps(committed))
    recorded = dict(lineage.run.data.params)
    recorded |= {k: v for k, v in lineage.tags.items() if k.startswith("evaluate.")}
    for key, text in recorded.items():
        section, _, name = key.rpartition(".")
        target = params.setdefault(section, {}) if section else params
        target[name] = json.loads(text) if text.startswith("[") else yaml.safe_load(text)
    return params


def _md5(path: Path) -> str | None:
    return hashlib.md5(path.read_bytes()).hexdigest() if path.is_file() else None


def stored_model_md5(resolver: Resolver, lineage: Lineage, dest: Path) -> str | None:
    """The md5 of the weights file the store holds for this model: the registered version's, else the run's."""
    with one_line_errors(resolver.uri, "failed finding the logged model"):
        model_id = getattr(lineage.versions[-1], "model_id", None) if lineage.versions else None
        if model_id:
            source = resolver.client.get_logged_model(model_id).artifact_location
        else:
            found = resolver.client.search_logged_models(
                [lineage.run.info.experiment_id], filter_string=f"source_run_id = '{lineage.run.info.run_id}'"
            )
            source = found[0].artifact_location if found else None
    if source is None:
        return None
    with one_line_errors(resolver.uri, "failed giving the model's files"):
        uri = f"{source}/{STORED_MODEL_FILE}"
        path = resolver.mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest))
    return _md5(Path(path))


def clone_commit(source: str, commit: str, clone: Path, env: dict[str, str]) -> None:
    _step(["git", "clone", "-q", "--no-checkout", source, str(clone)], clone.parent, env, "git clone")
    # Experiments' commits live under refs/exps (`dvc exp push` sends them there); a plain clone skips them.
    fetch_exps = ["git", "fetch", "-q", "origin", "+refs/exps/*:refs/exps/*"]
    subprocess.run(fetch_exps, cwd=clone, env=env, capture_output=True)
    if git_or_none("cat-file", "-e", f"{commit}^{{commit}}", cwd=clone) is None:
        raise NotReproducible(f"the recorded commit {commit[:7]} is not in {source}")
    _step(["git", "checkout", "-q", "--detach", commit], clone, env, "git checkout")


def rebuild(lineage: Lineage, work: Path, git_remote: str | None, dvc_remote: str | None) -> Path:
    """Clone, set the recorded params, get the data, train and evaluate; returns the clone."""
    clone = work / "clone"
    bin_dir = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"  # a throwaway store: nothing reaches yours
    env["DVC_NO_ANALYTICS"] = "1"
    clone_commit(git_remote or str(project_root()), lineage.commit, clone, env)
    committed = yaml.safe_load((clone / "params.yaml").read_text())
    (clone / "params.yaml").write_text(yaml.safe_dump(recorded_params(lineage, committed), sort_keys=False))
    dvc = [str(Path(bin_dir) / "dvc")]
    # The data: this project's DVC cache (or the team's remote) when it has it, else the download
    # stage's own sources (params' local directories, then mirrors); a remote's keys from config.local.
    if (project_root() / ".dvc" / "config.local").is_file():
        shutil.copy2(project_root() / ".dvc" / "config.local", clone / ".dvc" / "config.local")
    quiet = dict(cwd=clone, env=env, capture_output=True, text=True)
    remote = dvc_remote or subprocess.run([*dvc, "cache", "dir"], **{**quiet, "cwd": project_root()}).stdout.strip()
    if remote:  # best effort: when it gives nothing, the download stage gets the data itself
        name = remote if "/" not in remote else "lineage-source"  # a remote the project names, or a URL
        if name != remote:
            subprocess.run([*dvc, "remote", "add", "--local", "--force", name, remote], **quiet)
        subprocess.run([*dvc, "pull", "-q", "-r", name, "download"], **quiet)
    check_interrupt()
    _step([*dvc, "repro", "--no-run-cache", "download"], clone, env, "the download stage")
    _step([*dvc, "repro", "--no-run-cache", "--force", "--downstream", "train"], clone, env, "training")
    return clone


def verdict(resolver: Resolver, lineage: Lineage, clone: Path, work: Path) -> tuple[bool, str]:
    title, recorded_md5 = lineage.title(), lineage.model_md5
    rebuilt_md5 = _md5(clone / MODEL_PATH)
    metrics = json.loads((clone / "reports" / "eval" / "metrics.json").read_text())
    rebuilt_acc, logged_acc = metrics.get("test_acc"), lineage.run.data.metrics.get("test_acc")
    acc = (
        f"test_acc {rebuilt_acc:.4f} equal"
        if rebuilt_acc == logged_acc
        else f"test_acc {rebuilt_acc} against the logged {logged_acc}"
    )
    stored = stored_model_md5(resolver, lineage, work / "stored")
    rebuilt_stored = _rebuilt_stored_md5(clone)
    if rebuilt_md5 == recorded_md5 and rebuilt_acc == logged_acc:
        if stored is not None and stored != rebuilt_stored:
            return False, (
                f"not reproduced: {title}: the rebuilt model is bit-identical to dvc.model_md5 {recorded_md5}, "
                f"but the model file the MLflow store holds differs ({STORED_MODEL_FILE} md5 {stored}, "
                f"rebuilt {rebuilt_stored}): it was changed after it was logged"
            )
        return True, f"reproduced: {title} is bit-identical (md5 {recorded_md5}), {acc}"
    why = []
    rebuilt_sha = _clone_run_tag(work, "data.sha256")
    recorded_sha, host = lineage.tags.get("data.sha256", "none"), lineage.tags.get("process.host")
    if rebuilt_sha and rebuilt_sha != recorded_sha:
        why.append(f"data SHA-256 differs ({rebuilt_sha[:12]} here, {recorded_sha[:12]} recorded)")
    if lineage.run.data.params.get("determinism") == "fast" and host != socket.gethostname():
        why.append(f"`determinism: fast` was trained on another machine ({host}): bits depend on the CPU")
    because = f"; {', '.join(why)}" if why else ""
    return False, f"not reproduced: {title}: rebuilt md5 {rebuilt_md5}, recorded {recorded_md5}; {acc}{because}"


def _clone_run_tag(work: Path, tag: str) -> str | None:
    import sqlite3

    with sqlite3.connect(work / "mlflow.db") as db:
        row = db.execute("SELECT value FROM tags WHERE key = ? LIMIT 1", (tag,)).fetchone()
    return row[0] if row else None


def _rebuilt_stored_md5(clone: Path) -> str | None:
    found = sorted((clone / "mlruns").glob(f"models/*/artifacts/{STORED_MODEL_FILE}"))  # the clone's own store
    return _md5(found[0]) if found else None


def reproduce(target: str, git_remote: str | None = None, dvc_remote: str | None = None, log: bool = False) -> str:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one verdict line, no bars
    resolver = Resolver()
    lineage = resolver.resolve(target)
    reason = refusal(lineage)
    if reason:
        raise NotReproducible(f"cannot reproduce {lineage.title()} exactly: {reason}")
    run_name = lineage.run.info.run_name
    print(f"rebuilding {lineage.title()} from commit {lineage.commit[:7]} in a clean clone (run {run_name})")
    work = Path(tempfile.mkdtemp(prefix="fmnist-reproduce-"))
    try:
        clone = rebuild(lineage, work, git_remote, dvc_remote)
        ok, line = verdict(resolver, lineage, clone, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not ok:
        raise NotReproducible(line)
    if log:
        today = datetime.date.today().isoformat()
        with one_line_errors(resolver.uri, "failed tagging the version"):
            for version in lineage.versions:
                resolver.client.set_model_version_tag(version.name, version.version, "reproduced", today)
            if not lineage.versions:
                resolver.client.set_tag(lineage.run.info.run_id, "reproduced", today)
    return line


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="a DVC experiment, registered version or alias, MLflow run id or model md5")
    parser.add_argument("--git-remote", help="clone the commit from this git URL (default: this project)")
    parser.add_argument("--dvc-remote", help="a DVC remote (name or URL) for the data (default: this project's cache)")
    parser.add_argument("--log", action="store_true", help="tag the version reproduced=<date> when bit-identical")
    args = parser.parse_args(argv)
    print(reproduce(args.name, args.git_remote, args.dvc_remote, args.log))


def cli() -> None:
    run_stage(main, entry_point=True)


if __name__ == "__main__":  # `python -m stages.reproduce`: the checkout this code lives in
    run_stage(main)
