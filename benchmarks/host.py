"""How fast and how busy this machine is while a benchmark runs, so that a figure can say so.

A shared host slows down and speeds up (the same suite ran in 17 to 28 min on one day here), and
the load average cannot tell another tenant from the benchmark's own processes. So a benchmark
times a fixed loop at its start and end (`cpu_probe`), and counts the CPU time that processes other
than its own used while it measured, and the time the hypervisor gave to other machines (`Others`).
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def cpu_probe() -> float:
    """Seconds for a fixed pure-Python loop (10 million additions): how fast this machine is now."""
    start = time.perf_counter()
    total = 0
    for i in range(10_000_000):
        total += i
    return time.perf_counter() - start


def cpu_name() -> str:
    """The processor's model name, as /proc/cpuinfo gives it."""
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown CPU")


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def machine_cpu() -> tuple[float, float]:
    """(busy, stolen) CPU seconds of the whole machine since boot, all cores, from /proc/stat."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + irq + softirq) / TICK, steal / TICK


def own_cpu() -> float:
    """CPU seconds of this process and every child it has waited for (their children included)."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def adopt_orphans() -> None:
    """Become the parent of the processes this one's descendants leave behind (Linux's child
    subreaper), so that once reaped (`reap_orphans`), their CPU time counts as this process's own."""
    import ctypes

    PR_SET_CHILD_SUBREAPER = 36
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def reap_orphans(seconds: float = 30) -> None:
    """Wait for every child left (adopted orphans included), up to `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.05)


class Others:
    """Cores' worth of work by other processes, and of time stolen by the hypervisor, over a span:
    `with Others() as others: ...`, then `others.busy` and `others.stolen` (0.5 = half a core)."""

    def __enter__(self) -> Others:
        self.start, (self.busy_start, self.stolen_start), self.own_start = time.monotonic(), machine_cpu(), own_cpu()
        return self

    def __exit__(self, *exc) -> None:
        seconds = time.monotonic() - self.start
        busy, stolen = machine_cpu()
        self.busy = max(0.0, busy - self.busy_start - (own_cpu() - self.own_start)) / seconds
        self.stolen = (stolen - self.stolen_start) / seconds

    def __str__(self) -> str:
        return f"other processes {self.busy:.2f} cores, stolen by the host {self.stolen:.2f} cores"
