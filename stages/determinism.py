"""Bit-reproducible arithmetic across machines, applied by each torch stage before torch loads.

`portable` (the default) pins everything that changes float32 results between CPUs and thread
counts, measured on torch 2.14.1 (MKL 2024.2, oneDNN 3.12):
- MKL's code path (`MKL_CBWR=COMPATIBLE`): otherwise MKL picks kernels by CPU vendor and ISA, so
  an Intel AVX-512 and an AMD AVX2 machine sum the same products in a different order;
- torch's own vector kernels (`ATEN_CPU_CAPABILITY=default`) and oneDNN's (`ONEDNN_MAX_CPU_ISA`):
  e.g. `normal_` (the weight init) has an AVX2 variant that rounds differently;
- one thread, with MKL's dynamic threading off: 1 and 2 threads agree under COMPATIBLE, 4 do not.
Each switch alone leaves some difference, so they are set together, overriding the environment.
`fast` leaves the machine's defaults: byte-identical reruns on the same machine and thread count.
"""

from __future__ import annotations

import os
import sys

from stages import PipelineError

PORTABLE_ENV = {
    "MKL_CBWR": "COMPATIBLE",
    "MKL_DYNAMIC": "FALSE",
    "ATEN_CPU_CAPABILITY": "default",
    "ONEDNN_MAX_CPU_ISA": "SSE41",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
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

        torch.set_num_threads(1)
