"""Benchmark: a train epoch in the default (portable) mode against fast mode, a lower bound and the book.

    python -m benchmarks.bench                # the figures in benchmarks/RESULTS.md (10-15 min idle)
    python -m benchmarks.bench --quick        # a smoke run of every measure (a few minutes idle)

Needs the data in data/fashion-mnist (run the pipeline once). Every figure comes from this one run
on this machine: the two modes' epochs alternate process by process, so a load change on a shared
machine hits both. It rewrites its own section of benchmarks/RESULTS.md and leaves the others.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import yaml

from benchmarks.host import Others, cpu_probe, load
from benchmarks.results import RESULTS, write_section

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "fashion-mnist"
STAGES = ("download", "train", "evaluate")
SECTION = "## Train epoch"
MODES = ("portable", "fast")


def spread(values: list[float], scale: float = 1.0, unit: str = "") -> str:
    """'median (min-max)' of the values, times `scale`."""
    lo, mid, hi = (scale * v for v in (min(values), statistics.median(values), max(values)))
    digits = 0 if mid >= 100 else 1 if mid >= 10 else 2
    return f"{mid:.{digits}f}{unit} ({lo:.{digits}f}-{hi:.{digits}f})"


def child(*args: str) -> dict:
    """Run this module in a fresh process (a determinism mode must be set before torch loads)."""
    cmd = [sys.executable, "-m", "benchmarks.bench", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def epoch_probe(mode: str, epochs: int) -> None:
    """Child: `epochs` train epochs (after one warm-up) of the pipeline's loop under one mode."""
    from stages import determinism

    determinism.apply(mode)
    import torch

    from stages.config import load_params
    from stages.data import load_split
    from stages.model import build_model, to_inputs
    from stages.training import accuracy, train_epoch

    determinism.threads(mode)
    params = load_params()
    (images, labels), (test_images, test_labels) = load_split(DATA, "train"), load_split(DATA, "test")
    inputs, targets = to_inputs(torch.from_numpy(images)), torch.from_numpy(labels).long()
    test_inputs, test_targets = to_inputs(torch.from_numpy(test_images)), torch.from_numpy(test_labels).long()
    torch.manual_seed(params.seed)
    model = build_model(params.init_std)
    loss, sgd = torch.nn.CrossEntropyLoss(reduction="none"), torch.optim.SGD(model.parameters(), lr=params.lr)
    generator = torch.Generator().manual_seed(params.seed)
    step = lambda: train_epoch(model, loss, sgd, inputs, targets, batch_size=params.batch_size, generator=generator)  # noqa: E731
    passes, whole = [], []
    for _ in range(epochs + 1):  # the first is a warm-up
        start = time.perf_counter()
        step()
        passed = time.perf_counter()
        accuracy(model, test_inputs, test_targets)  # what the stage's epoch adds: `fit` measures it each epoch
        passes.append(passed - start)
        whole.append(time.perf_counter() - start)
    parts = profile_parts(step)
    print(json.dumps({"epochs": passes[1:], "whole": whole[1:], "threads": torch.get_num_threads(), "parts": parts}))


# Where an epoch's time goes: torch.profiler's self CPU time of these ops, grouped.
PARTS = {
    "matrix products: X·Wᵀ + b forward (`addmm`), Gᵀ·X backward (`mm`)": ("aten::addmm", "aten::mm"),
    "gathering each minibatch (`index_select`, inputs and labels)": ("aten::index_select",),
    "softmax and cross-entropy, forward and backward": (
        "aten::_log_softmax",
        "aten::_log_softmax_backward_data",
        "aten::nll_loss_forward",
        "aten::nll_loss_backward",
    ),
    "SGD step and zero_grad": ("Optimizer.step#SGD.step", "Optimizer.zero_grad#SGD.zero_grad"),
    "sums, mean, argmax (the loss and accuracy)": ("aten::sum", "aten::mean", "aten::argmax", "aten::eq", "aten::div"),
}


def profile_parts(step) -> dict[str, float]:
    """Seconds of one epoch by part; 'the rest' is the autograd engine, views and Python."""
    import torch

    start = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    wall = time.perf_counter() - start
    own = {event.key: event.self_cpu_time_total / 1e6 for event in prof.key_averages()}
    parts = {name: sum(own.get(op, 0.0) for op in ops) for name, ops in PARTS.items()}
    parts["the rest (autograd engine, views, Python)"] = wall - sum(parts.values())
    parts["whole epoch under the profiler"] = wall
    return parts


def bound_probe(reps: int) -> None:
    """Child, machine defaults (all threads, widest kernels): what an epoch must cost at the least.

    An epoch reads the training inputs from memory at least once (the batch is then in cache for
    both products) and does two products of 2·n·784·10 flops each (X·Wᵀ forward, Gᵀ·X backward).
    Either alone is a bound, so the larger is: the bytes at the best bandwidth measured, the flops
    at the rate of a large square matrix product (which runs far nearer the peak than these thin
    ones: the bound is one no epoch on this machine can beat, not one it can reach)."""
    import torch

    n, features = 60000, 784
    x = torch.rand(n, features)
    out = torch.empty_like(x)

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    nbytes = x.numel() * x.element_size()
    read_bw = nbytes / best(lambda: x.sum())
    copy_bw = 2 * nbytes / best(lambda: out.copy_(x))  # read + write, not counting write-allocate
    a, b = torch.rand(2048, 2048), torch.rand(2048, 2048)
    gemm_flops = 2 * 2048**3 / best(lambda: a @ b)
    epoch_flops = 2 * (2 * n * features * 10)
    print(
        json.dumps(
            {
                "bytes": nbytes + n * 8,  # inputs as float32, plus the int64 labels
                "bandwidth": max(read_bw, copy_bw),
                "read_bw": read_bw,
                "copy_bw": copy_bw,
                "flops": epoch_flops,
                "gemm_flops_per_s": gemm_flops,
                "threads": torch.get_num_threads(),
            }
        )
    )


def same_bytes_probe() -> None:
    """Child, portable: the pipeline's epoch and the plainest loop (advanced indexing) give one model."""
    from stages import determinism

    determinism.apply("portable")
    import torch

    from stages.config import load_params
    from stages.data import load_split
    from stages.model import build_model, to_inputs
    from stages.training import train_epoch

    determinism.threads("portable")
    params = load_params()
    images, labels = load_split(DATA, "train")
    inputs, targets = to_inputs(torch.from_numpy(images)), torch.from_numpy(labels).long()

    def fresh():
        torch.manual_seed(params.seed)
        model = build_model(params.init_std)
        return model, torch.optim.SGD(model.parameters(), lr=params.lr)

    ours, sgd = fresh()
    loss = torch.nn.CrossEntropyLoss(reduction="none")
    generator = torch.Generator().manual_seed(params.seed)
    train_epoch(ours, loss, sgd, inputs, targets, batch_size=params.batch_size, generator=generator)
    plain, sgd = fresh()
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(params.seed))
    for batch in order.split(params.batch_size):
        sgd.zero_grad()
        torch.nn.functional.cross_entropy(plain(inputs[batch]), targets[batch], reduction="none").mean().backward()
        sgd.step()
    print(json.dumps({"identical": state_bytes(ours) == state_bytes(plain)}))


def state_bytes(model) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()


def timed_process(cmd: list[str], cwd: Path, env: dict | None = None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MiB, stdout) of one process, its stdout read through a file."""
    with tempfile.TemporaryFile() as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.PIPE)
        stderr = proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{stderr.decode()[-2000:]}")
        out.seek(0)
        return wall, usage.ru_maxrss / 1024, out.read().decode()


def book_runs(runs: int, epochs: int) -> dict:
    """The book's script as processes: its train epochs (as it prints them) and its wall times."""
    cmd = [sys.executable, "-m", "benchmarks.book", "--data", str(DATA), "--epochs", str(epochs)]
    walls, train_epochs = [], []
    for _ in range(runs):
        wall, _, out = timed_process(cmd, ROOT)
        walls.append(wall)
        train_epochs += [float(s) for s in re.findall(r"train ([0-9.]+) s", out)]
    threads = int(re.search(r"torch threads: ([0-9]+)", out).group(1))
    return {"wall": walls, "epochs": train_epochs, "threads": threads}


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


def stage_timings(reps: int) -> dict:
    """The train stage as a process under each mode, alternating, and each stage's peak RSS."""
    project = project_copy()
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}
    env.update(GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="b@localhost", GIT_COMMITTER_NAME="bench")
    env["GIT_COMMITTER_EMAIL"] = "b@localhost"
    env.pop("MLFLOW_TRACKING_URI", None)
    try:
        timed_process([str(bindir / "dvc"), "repro"], project, env)  # creates the store, fills the cache
        stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
        commands = {name: [sys.executable, *stages[name]["cmd"].split()[1:]] for name in STAGES}
        rss = {name: timed_process(cmd, project, env)[1] for name, cmd in commands.items()}
        wall = {mode: [] for mode in MODES}
        for _ in range(reps):
            for mode in MODES:
                set_param(project, "determinism", mode)
                wall[mode].append(timed_process(commands["train"], project, env)[0])
    finally:
        shutil.rmtree(project, ignore_errors=True)
    return {"rss": rss, "wall": wall}


def set_param(project: Path, key: str, value) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params[key] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def machine() -> str:
    import torch

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    field = lambda name: next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith(name)), "?")  # noqa: E731
    flags = field("flags").split()
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    mkl = re.search(r"Math Kernel Library Version ([0-9.]+)", torch.__config__.show())
    gpu = f"CUDA {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "no GPU"
    return (
        f"{field('model name')} ({field('vendor_id')}, {isa}), {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, torch {torch.__version__}, MKL {mkl.group(1) if mkl else '?'}, {gpu}"
    )


def n_threads(count: int, word: str = "thread") -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="rounds of the two modes' epoch processes (default 5)")
    parser.add_argument("--epochs", type=int, default=5, help="timed epochs per epoch process (default 5)")
    parser.add_argument("--book-runs", type=int, default=3, help="runs of the book's script (default 3)")
    parser.add_argument("--book-epochs", type=int, default=10, help="epochs per run of the book's script (default 10)")
    parser.add_argument("--quick", action="store_true", help="one round of everything, 2 epochs each: a smoke run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.reps, args.epochs, args.book_runs, args.book_epochs = 1, 2, 1, 2
    if args.probe == "bound":
        return bound_probe(max(args.reps, 3))
    if args.probe == "same":
        return same_bytes_probe()
    if args.probe:
        return epoch_probe(args.probe, args.epochs)
    if not DATA.is_dir():
        raise SystemExit(f"error: {DATA} missing; run the pipeline first (make pipeline)")

    started, load_before, probe_before = datetime.now(UTC), load(), cpu_probe()
    stages = stage_timings(args.reps if not args.quick else 1)
    epochs = {mode: [] for mode in MODES}
    stage_epochs = {mode: [] for mode in MODES}
    threads, parts = {}, {}
    with Others() as others:  # the epochs' rounds: what decides the ratio between the modes
        for _ in range(args.reps):  # alternating, so a change of load on a shared machine hits both modes
            for mode in MODES:
                probe = child("--probe", mode, "--epochs", str(args.epochs))
                epochs[mode] += probe["epochs"]
                stage_epochs[mode] += probe["whole"]
                threads[mode] = probe["threads"]
                whole = "whole epoch under the profiler"
                if mode not in parts or probe["parts"][whole] < parts[mode][whole]:
                    parts[mode] = probe["parts"]  # the least disturbed round's
    bound = child("--probe", "bound", "--reps", str(args.reps))
    same = child("--probe", "same")["identical"]
    book = book_runs(args.book_runs, args.book_epochs)

    med = {mode: statistics.median(epochs[mode]) for mode in MODES}
    bound_s = max(bound["bytes"] / bound["bandwidth"], bound["flops"] / bound["gemm_flops_per_s"])
    book_med = statistics.median(book["epochs"])
    ok = lambda good: "met" if good else "NOT met"  # noqa: E731
    load_after, probe_after = load(), cpu_probe()
    # Judged by what other processes and the host took while the epochs ran: the load average
    # counts the benchmark's own work too (fast's two threads, the book's four DataLoader workers).
    busy = others.busy > 0.25 or others.stolen > 0.1
    ratio = med["portable"] / med["fast"]
    whole_ratio = statistics.median(stage_epochs["portable"]) / statistics.median(stage_epochs["fast"])
    verdict = lambda r: ok(r <= 1.25) if not busy else "not judged, busy machine"  # noqa: E731
    rows = [
        ("**Train epoch, ours, `determinism: portable` (the default)**", spread(epochs["portable"], 1000, " ms"),
         f"{n_threads(threads['portable'])} (fixed, whatever the cores); "
         f"**{ratio:.2f}x fast** (goal ≤ 1.25: {verdict(ratio)})"),
        ("Train epoch, ours, `determinism: fast`", spread(epochs["fast"], 1000, " ms"),
         f"{n_threads(threads['fast'])} (the machine's default)"),
        ("The stage's whole epoch, `portable` (train epoch + test accuracy, as `fit` runs it)",
         spread(stage_epochs["portable"], 1000, " ms"),
         f"**{whole_ratio:.2f}x fast** (goal ≤ 1.25: {verdict(whole_ratio)})"),
        ("The stage's whole epoch, `fast`", spread(stage_epochs["fast"], 1000, " ms"), ""),
        ("Lower bound for an epoch on this machine", f"{bound_s * 1000:.1f} ms",
         f"portable = {med['portable'] / bound_s:.1f}x it, fast = {med['fast'] / bound_s:.1f}x it"),
        ("… memory: bytes an epoch must read / best bandwidth", f"{bound['bytes'] / bound['bandwidth'] * 1000:.1f} ms",
         f"{bound['bytes'] / 1e6:.0f} MB (inputs as float32, labels) at {bound['bandwidth'] / 1e9:.1f} GB/s "
         f"(read {bound['read_bw'] / 1e9:.1f}, copy {bound['copy_bw'] / 1e9:.1f}; {n_threads(bound['threads'])})"),
        ("… arithmetic: the epoch's flops / large-GEMM rate",
         f"{bound['flops'] / bound['gemm_flops_per_s'] * 1000:.1f} ms",
         f"{bound['flops'] / 1e9:.2f} GFLOP (X·Wᵀ and Gᵀ·X) at {bound['gemm_flops_per_s'] / 1e9:.0f} GFLOP/s "
         f"(2048² sgemm, {n_threads(bound['threads'])})"),
        ("Train epoch, the book's script (DataLoader, 4 workers)", spread(book["epochs"], 1000, " ms"),
         f"{n_threads(book['threads'], 'torch thread')}; ours is {book_med / med['portable']:.0f}x faster portable, "
         f"{book_med / med['fast']:.0f}x fast"),
        (f"The book's script, {args.book_epochs} epochs + test accuracy (process)", spread(book["wall"], 1, " s"), ""),
        ("Same model bytes as the plainest loop (portable)", "yes" if same else "NO", ""),
        ("Train stage wall (process), `portable`", spread(stages["wall"]["portable"], 1, " s"),
         f"{statistics.median(stages['wall']['portable']) / statistics.median(stages['wall']['fast']):.2f}x fast"),
        ("Train stage wall (process), `fast`", spread(stages["wall"]["fast"], 1, " s"), ""),
    ] + [
        (f"Peak RSS, {stage} stage", f"{rss:.0f} MiB", f"goal ≤ 1536 MiB: {ok(rss <= 1536)}")
        for stage, rss in stages["rss"].items()
    ]  # fmt: skip
    table = "| measure | median (min-max) | comparison |\n| --- | --- | --- |\n"
    table += "".join(f"| {a} | {b} | {c} |\n" for a, b, c in rows)
    options = " --quick" if args.quick else f" --reps {args.reps} --epochs {args.epochs}"
    command = "python -m benchmarks.bench" + options
    portable, fast = n_threads(threads["portable"]), n_threads(threads["fast"])
    profile = f"| part of the epoch | portable, {portable} | fast, {fast} |\n"
    profile += "| --- | --- | --- |\n" + "".join(
        f"| {name} | {parts['portable'][name] * 1000:.0f} ms | {parts['fast'][name] * 1000:.0f} ms |\n"
        for name in parts["portable"]
    )
    warning = (
        f"**The machine was busy while the epochs ran ({others}, on {os.cpu_count()} cores): every time is "
        "too long, the lower bound's too (its bandwidth and GEMM rate were measured low, so it may not bound), "
        "and the ratio between the modes depends on the load (fast's threads spin-wait; portable runs one). "
        "Rerun on an idle machine.**\n\n"
        if busy
        else ""
    )
    text = (
        f"{SECTION}: portable (default) against fast, a lower bound, the book\n\n"
        f"`{command}`, {started:%Y-%m-%d %H:%M} UTC, {(datetime.now(UTC) - started).seconds // 60} min. "
        f"Machine: {machine()}. Load average before: {load_before}; after: {load_after}. "
        f"CPU probe (10 million additions in Python): {probe_before:.2f} s before, {probe_after:.2f} s after. "
        f"While the epochs ran: {others}.\n"
        f"Epochs: {len(epochs['portable'])} per mode, in {args.reps} round(s) of one process per mode "
        f"(alternating, each after a warm-up epoch); the book: {args.book_runs} run(s) of {args.book_epochs} "
        f"epochs; train stage: {len(stages['wall']['portable'])} run(s) per mode. Every ratio is from this run.\n\n"
        f"{warning}{table}\n"
        "Where an epoch's time goes (`torch.profiler`, self CPU time; each mode's least disturbed round):\n\n"
        f"{profile}"
    )
    write_section(text, args.out)
    print(text)


if __name__ == "__main__":
    main()
