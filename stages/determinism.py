"""Bit-reproducible arithmetic across machines, applied by each torch stage before torch loads.

`portable` (the default) pins everything that changes float32 results between CPUs and thread
counts, measured on torch 2.14.1 (MKL 2024.2, oneDNN 3.12):
- MKL's code path (`MKL_CBWR=COMPATIBLE`): otherwise MKL picks kernels by CPU vendor and ISA, so
  an Intel AVX-512 and an AMD AVX2 machine sum the same products in a different order;
- torch's own vector kernels (`ATEN_CPU_CAPABILITY=default`) and oneDNN's (`ONEDNN_MAX_CPU_ISA`):
  e.g. `normal_` (the weight init) has an AVX2 variant that rounds differently;
- a fixed thread count, the same on every machine whatever its cores, with MKL's dynamic threading
  off: CNR's documented condition. Two, because the matrix products are most of an epoch and two
  threads run them 1.6-2.3x faster than one, while giving the very bytes one thread gives (so the
  committed dvc.lock, made with one, still holds); four threads split the products otherwise and
  differ. A one-core machine runs both threads on its core: slower, the same bytes. The threads
  wait passively (`OMP_WAIT_POLICY`, no effect on results): spinning, two threads that share
  their cores with other work (a sweep's points, a busy machine) ran a product 3-7x slower than
  one thread, passive ones as fast or faster.
Each switch alone leaves some difference, so they are set together, overriding the environment.
`fast` leaves the machine's defaults: byte-identical reruns on the same machine and thread count.
"""

from __future__ import annotations

import os
import sys

from stages import PipelineError

PORTABLE_THREADS = 2
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


def apply(mode: str) -> None:
    """Set up the process for `mode` ('portable' or 'fast'); must run before torch is imported."""
    if mode != "portable":
        return
    if "torch" in sys.modules:  # its libraries read these variables once, when they load
        raise PipelineError("determinism: portable must be applied before torch is imported")
    os.environ.update(PORTABLE_ENV)


def threads(mode: str) -> None:
    """After torch is imported: pin its intra-op thread pool too (it may have been sized already)."""
    if mode == "portable":
        import torch

        torch.set_num_threads(PORTABLE_THREADS)
