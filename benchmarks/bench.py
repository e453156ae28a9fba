"""Benchmark: our training loop and pipeline against the book's, measured side by side.

    python -m benchmarks.bench [--reps 3] [--out benchmarks/RESULTS.md]

Needs the data in data/fashion-mnist (run the pipeline once). Pipeline timings run in a temporary
copy of the project, so your experiments and MLflow store are left alone.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "fashion-mnist"
STAGES = ("download", "train", "evaluate")


def median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_process(cmd: list[str], cwd: Path, env: dict | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def epoch_probe(mode: str, reps: int) -> None:
    """Child process: the train epoch under one determinism mode (it must be set before torch loads)."""
    import json

    from stages import determinism

    determinism.apply(mode)
    import torch

    from stages.config import load_params
    from stages.data import load_split
    from stages.model import build_model, to_inputs
    from stages.training import train_epoch

    determinism.threads(mode)
    params = load_params()
    images, labels = load_split(DATA, "train")
    inputs, targets = to_inputs(torch.from_numpy(images)), torch.from_numpy(labels).long()
    torch.manual_seed(params.seed)
    model = build_model(params.init_std)
    loss, sgd = torch.nn.CrossEntropyLoss(reduction="none"), torch.optim.SGD(model.parameters(), lr=params.lr)
    generator = torch.Generator().manual_seed(params.seed)
    step = lambda: train_epoch(model, loss, sgd, inputs, targets, batch_size=params.batch_size, generator=generator)  # noqa: E731
    step()  # warm-up
    print(json.dumps({"epoch": median_time(step, max(reps, 5)), "threads": torch.get_num_threads()}))


def epoch_by_mode(reps: int) -> dict:
    import json

    out = {}
    for mode in ("portable", "fast"):
        cmd = [sys.executable, "-m", "benchmarks.bench", "--epoch-probe", mode, "--reps", str(reps)]
        out[mode] = json.loads(subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout)
    return out


def epoch_timings(reps: int) -> dict:
    import torch

    from benchmarks import book
    from stages.config import load_params
    from stages.data import load_split
    from stages.model import build_model, to_inputs
    from stages.training import train_epoch

    params = load_params()
    images, labels = load_split(DATA, "train")
    inputs, targets = to_inputs(torch.from_numpy(images)), torch.from_numpy(labels).long()

    def ours():
        torch.manual_seed(params.seed)
        model = build_model(params.init_std)
        loss = torch.nn.CrossEntropyLoss(reduction="none")
        sgd = torch.optim.SGD(model.parameters(), lr=params.lr)
        generator = torch.Generator().manual_seed(params.seed)
        step = lambda: train_epoch(model, loss, sgd, inputs, targets, batch_size=params.batch_size, generator=generator)  # noqa: E731
        return step, model

    step, _ = ours()
    step()  # warm-up
    ours_s = median_time(step, max(reps, 5))

    flat = inputs.reshape(len(inputs), -1)
    weight, grad = torch.randn(784, 10), torch.randn(len(inputs), 10)
    median_time(lambda: (flat @ weight, flat.T @ grad), 3)
    bound_s = median_time(lambda: (flat @ weight, flat.T @ grad), 9)

    train_iter, _ = book.load_data_fashion_mnist(params.batch_size, DATA)
    net, loss, trainer = book.build(params.seed)
    book_s = median_time(lambda: book.train_epoch_ch3(net, train_iter, loss, trainer), reps)

    # Speed may not change the numbers: the same epoch, the plainest way (advanced indexing).
    step, fast_model = ours()
    step()
    torch.manual_seed(params.seed)
    plain = build_model(params.init_std)
    sgd = torch.optim.SGD(plain.parameters(), lr=params.lr)
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(params.seed))
    for batch in order.split(params.batch_size):
        sgd.zero_grad()
        torch.nn.functional.cross_entropy(plain(inputs[batch]), targets[batch], reduction="none").mean().backward()
        sgd.step()
    same = _bytes(fast_model) == _bytes(plain)
    return {"ours": ours_s, "bound": bound_s, "book": book_s, "identical": same}


def _bytes(model) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()


def project_copy() -> Path:
    """A git repo holding the project, reading the already-verified data as its local source."""
    from tests.helpers import copy_project, git_commit_all, run

    dest = copy_project(Path(tempfile.mkdtemp(prefix="bench-project-")), skip=("tests/", "benchmarks/"))
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["data"]["local_dirs"] = [str(DATA)]
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], dest)
    git_commit_all(dest, "bench")
    return dest


def pipeline_timings(reps: int) -> dict:
    project = project_copy()
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}
    env.update(GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="b@localhost", GIT_COMMITTER_NAME="bench")
    env["GIT_COMMITTER_EMAIL"] = "b@localhost"
    env.pop("MLFLOW_TRACKING_URI", None)
    dvc = str(bindir / "dvc")
    try:
        run_process([dvc, "repro"], project, env)  # first run: creates the store, fills the cache
        stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
        commands = {name: [sys.executable, *stages[name]["cmd"].split()[1:]] for name in STAGES}
        stage_rss = {name: run_process(cmd, project, env)[1] for name, cmd in commands.items()}
        # Side by side in one run: the train stage as a process under each determinism mode.
        stage_wall = {}
        for mode in ("portable", "fast"):
            set_param(project, "determinism", mode)
            stage_wall[mode] = statistics.median(run_process(commands["train"], project, env)[0] for _ in range(reps))
        set_param(project, "determinism", "portable")
        run_process([dvc, "repro"], project, env)
        repro = [run_process([dvc, "repro", "-f"], project, env)[0] for _ in range(reps)]
        experiments = [[dvc, "exp", "run", "-S", f"lr={0.05 + i / 1000}"] for i in range(reps)]
        exp = [run_process(cmd, project, env)[0] for cmd in experiments]
        # Back to a param set already run: DVC restores train and evaluate from its run-cache.
        restore = [run_process(cmd, project, env)[0] for cmd in experiments]
        book = [
            run_process([sys.executable, "-m", "benchmarks.book", "--data", str(DATA)], ROOT, env)[0]
            for _ in range(reps)
        ]
    finally:
        shutil.rmtree(project, ignore_errors=True)
    return {
        "repro": statistics.median(repro),
        "exp": statistics.median(exp),
        "book": statistics.median(book),
        "rss": stage_rss,
        "restore": statistics.median(restore),
        "stage_wall": stage_wall,
    }


def set_param(project: Path, key: str, value) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params[key] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def machine() -> str:
    import torch

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?")
    gpu = f"CUDA {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads, {gpu}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    parser.add_argument("--epoch-probe", choices=["portable", "fast"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.epoch_probe:
        return epoch_probe(args.epoch_probe, args.reps)
    if not DATA.is_dir():
        raise SystemExit(f"error: {DATA} missing; run the pipeline first (make pipeline)")
    p = pipeline_timings(args.reps)  # first, while this process is small: a forked child starts at its size
    e = epoch_timings(args.reps)
    modes = epoch_by_mode(args.reps)
    ok = lambda good: "met" if good else "not met"  # noqa: E731
    book_ratio = f"ours is {e['book'] / e['ours']:.0f}x faster"
    rows = [
        ("Train epoch, ours", f"{e['ours'] * 1000:.0f} ms", ""),
        ("Train epoch, the book's DataLoader loop", f"{e['book'] * 1000:.0f} ms", book_ratio),
        ("Matrix-product lower bound (X·W and Xᵀ·G, whole set)", f"{e['bound'] * 1000:.0f} ms",
         f"ours = {e['ours'] / e['bound']:.2f}x the bound (goal ≤ 1.5: {ok(e['ours'] / e['bound'] <= 1.5)})"),
        ("Same model bytes as the plain loop", "yes" if e["identical"] else "NO", ""),
        ("Book's script, 10 epochs + test accuracy (process)", f"{p['book']:.1f} s", ""),
        ("`dvc repro -f` (download, train, evaluate, MLflow)", f"{p['repro']:.1f} s",
         f"{p['repro'] / p['book']:.2f}x the book (goal ≤ 0.15: {ok(p['repro'] / p['book'] <= 0.15)})"),
        ("`dvc exp run -S lr=...` (train, evaluate, MLflow)", f"{p['exp']:.1f} s",
         f"{p['exp'] / p['book']:.2f}x the book (goal ≤ 0.12: {ok(p['exp'] / p['book'] <= 0.12)})"),
    ] + [
        ("`dvc exp run` back to a param set already run (run-cache restore)", f"{p['restore']:.1f} s",
         f"{p['restore'] / p['exp']:.2f}x a real `dvc exp run`"),
        ("Train epoch, `determinism: portable`", f"{modes['portable']['epoch'] * 1000:.0f} ms",
         f"{modes['portable']['threads']} thread(s); {modes['portable']['epoch'] / modes['fast']['epoch']:.2f}x fast"),
        ("Train epoch, `determinism: fast`", f"{modes['fast']['epoch'] * 1000:.0f} ms",
         f"{modes['fast']['threads']} thread(s)"),
        ("Train stage wall, `portable`", f"{p['stage_wall']['portable']:.1f} s",
         f"+{p['stage_wall']['portable'] / p['stage_wall']['fast'] - 1:.0%} over fast "
         f"(goal ≤ +15%: {ok(p['stage_wall']['portable'] <= 1.15 * p['stage_wall']['fast'])})"),
        ("Train stage wall, `fast`", f"{p['stage_wall']['fast']:.1f} s", ""),
    ] + [
        (f"Peak RSS, {stage} stage", f"{rss:.0f} MiB", f"goal ≤ 1536 MiB: {ok(rss <= 1536)}")
        for stage, rss in p["rss"].items()
    ]  # fmt: skip
    table = "| measure | median | comparison |\n| --- | --- | --- |\n"
    table += "".join(f"| {a} | {b} | {c} |\n" for a, b, c in rows)
    text = (
        f"# Benchmark results\n\nMachine: {machine()}.\n"
        f"Medians over {args.reps} runs (epochs: over {max(args.reps, 5)} for ours), "
        f"measured {time.strftime('%Y-%m-%d')} with `python -m benchmarks.bench`.\n\n{table}"
    )
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
