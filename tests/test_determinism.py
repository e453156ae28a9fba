"""Portable reproducibility: the same params and data give the same bytes whatever the machine's
thread count and instruction set, and the committed dvc.lock is a contract a fresh clone meets."""

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helpers import DVC, REAL_DATA, ROOT, copy_project, git_commit_all, lock_md5, run, stage_command

pytestmark = pytest.mark.slow


def offered_capabilities() -> list[str]:
    """The ATEN_CPU_CAPABILITY values this CPU can run: default always, avx2/avx512 if present."""
    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    return ["default"] + [cap for cap, flag in (("avx2", "avx2"), ("avx512", "avx512f")) if flag in flags]


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def set_determinism(project: Path, mode: str) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["determinism"] = mode
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def train_as_user(project: Path, threads: int, capability: str, evaluate: bool = False, **more) -> dict[str, str]:
    """Run the train stage as a user whose environment asks for other settings; md5 of its outputs."""
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "ATEN_CPU_CAPABILITY": capability}
    env["MKL_CBWR"] = "AUTO"  # what portable mode must override
    run(stage_command("train"), project, **env, **more)
    outputs = ["models/model.pt", "reports/train/history.json", "reports/train/run.json"]
    if evaluate:
        run(stage_command("evaluate"), project, **env, **more)
        outputs += ["reports/eval/metrics.json", "reports/eval/classification_report.json"]
    return {path: md5(project / path) for path in outputs}


def test_portable_bytes_are_the_same_for_every_thread_count_and_capability(tiny_project):
    run([DVC, "repro", "download"], tiny_project)
    # Opposite corners: one thread and the plainest kernels; two threads and the widest this CPU has.
    capabilities = offered_capabilities()
    corners = [(1, "default"), (2, capabilities[-1])]
    assert corners[1][1] != "default", "this CPU offers no vector kernels to compare against"
    reference, other = (train_as_user(tiny_project, *corner, evaluate=True) for corner in corners)
    assert other == reference
    # Four threads (MKL splits the products otherwise: portable pins the count) and MKL told the CPU
    # has no AVX-512 or no AVX (MKL_ENABLE_INSTRUCTIONS, as on an older or another vendor's CPU).
    for isa in ("AVX2", "SSE4_2"):
        older_cpu = train_as_user(tiny_project, 4, capabilities[1], MKL_ENABLE_INSTRUCTIONS=isa)
        assert older_cpu == {path: reference[path] for path in older_cpu}, isa

    # The same corners in `fast` mode do differ: the test above is not passing by luck.
    set_determinism(tiny_project, "fast")
    fast = {train_as_user(tiny_project, *corner)["models/model.pt"] for corner in corners}
    assert len(fast) == 2

    # A `--temp` experiment (as queued ones, it runs in a copy under .dvc/tmp) trains the same bytes.
    set_determinism(tiny_project, "portable")
    run([DVC, "exp", "run", "--temp", "-n", "elsewhere"], tiny_project, OMP_NUM_THREADS="2")
    shown = json.loads(run([DVC, "exp", "show", "--json"], tiny_project).stdout)
    (experiment,) = [e for rev in shown for e in (rev.get("experiments") or []) if e["name"] == "elsewhere"]
    metrics = experiment["revs"][0]["data"]["metrics"]["reports/train/run.json"]["data"]
    assert metrics["model_md5"] == reference["models/model.pt"]


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_a_fresh_clone_reproduces_the_committed_dvc_lock(tmp_path):
    """`make pipeline` in a fresh clone: the model and metrics hash as committed, git stays clean."""
    project = copy_project(tmp_path / "clone", skip=("tests/", "benchmarks/"))
    run(["git", "init", "-q", "-b", "main"], project)
    git_commit_all(project, "fresh clone")
    run([DVC, "repro"], project, OMP_NUM_THREADS="4", MKL_NUM_THREADS="4")  # portable pins its own count
    committed = yaml.safe_load((ROOT / "dvc.lock").read_text())
    for stage, path in (("train", "models/model.pt"), ("evaluate", "reports/eval/metrics.json")):
        expected = next(out["md5"] for out in committed["stages"][stage]["outs"] if out["path"] == path)
        assert lock_md5(project, stage, path) == expected == md5(project / path), path
    status = subprocess.run(["git", "status", "--porcelain"], cwd=project, capture_output=True, text=True).stdout
    assert status == "", status
