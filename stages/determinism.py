"""Bit-reproducible arithmetic across machines, applied by each torch stage before torch loads.

`portable` (the default) pins everything that changes float32 results between CPUs and thread
counts, measured on torch 2.14.1 (MKL 2024.2, oneDNN 3.12):
- MKL's code path (`MKL_CBWR=COMPATIBLE`): otherwise MKL picks kernels by CPU vendor and ISA, so
  an Intel AVX-512 and an AMD AVX2 machine sum the same products in a different order;
- torch's own vector kernels (`ATEN_CPU_CAPABILITY=default`) and oneDNN's (`ONEDNN_MAX_CPU_ISA`):
  e.g. `normal_` (the weight init) has an AVX2 variant that rounds differently;
- a fixed thread count, the same on every machine whatever its cores, with MKL's dynamic threading
  off: CNR's documented condition (four threads split the products otherwise and differ). One,
  because inside a stage two threads lose: the stage's own process works beside them (torch's
  import, MLflow's logging of each epoch), and on a 2-core machine two threads that wait for each
  other at every product ran the epochs no faster and up to 2.9x slower than one
  (benchmarks/RESULTS.md, "Portable on one thread"), though their matrix products alone run
  1.6-2.3x faster. One thread per point is also what lets a sweep's points share a machine's
  cores. Two threads give the very bytes one gives (the committed dvc.lock held with either).
  OpenMP is told to wait passively (`OMP_WAIT_POLICY`, no effect on results) should a library
  start threads of its own anyway: they never spin on a core another process needs.
Each switch alone leaves some difference, so they are set together, overriding the environment.
`fast` leaves the machine's defaults: byte-identical reruns on the same machine and thread count.
"""

from __future__ import annotations

import os
import sys

from stages import PipelineError

PORTABLE_THREADS = 1
PORTABLE_ENV = {
    "MKL_CBWR": "COMPATIBLE",
    "MKL_DYNAMIC": "FALSE",
    "OMP_DYNAMIC": "FALSE",
    "ATEN_CPU_CAPABILITY": "default",
    "ONEDNN_MAX_CPU_ISA": "SSE41",
    "OMP_NUM_THREADS": str(PORTABLE_THREADS),
    "MKL_NUM_THREADS": str(PORTABLE_THREADS),
    "OMP_WAIT_POLICY": "PASSIVE",
}


_applied: list[str] = []  # the mode this process was set up for before torch loaded


def apply(mode: str) -> None:
    """Set up the process for `mode` ('portable' or 'fast'); must run before torch is imported.
    Again after that, for the mode torch was loaded under, it changes nothing (stages/warm.py)."""
    if "torch" in sys.modules and _applied != [mode]:
        if mode != "portable":
            return
        # its libraries read these variables once, when they load
        raise PipelineError("determinism: portable must be applied before torch is imported")
    _applied[:] = [mode]
    if mode == "portable":
        os.environ.update(PORTABLE_ENV)


def loaded_under() -> str | None:
    """The mode applied before torch was loaded in this process, if any."""
    return _applied[0] if _applied else None


def threads(mode: str) -> None:
    """After torch is imported: pin its intra-op thread pool too (it may have been sized already)."""
    if mode == "portable":
        import torch

        torch.set_num_threads(PORTABLE_THREADS)
