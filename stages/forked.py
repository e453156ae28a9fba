"""A stage's torch half in a forked process, while the stage itself imports MLflow.

Importing torch (with what a stage computes) and importing MLflow with its SQL store each take
~3 s of pure Python, which threads cannot overlap (the GIL); two processes can, on two cores. The
child is forked before either import, computes, sends back its result (or its error's message)
through a pipe and ends; it never touches the tracking store, writes no output and prints
nothing, so the stage keeps its order: compute, publish the files, then tell MLflow.

Signals: Ctrl-C reaches both (one process group) and each records it, as every stage process
does; the stage stops at its next safe point as before. The child dies with the stage (the
kernel's parent-death signal), so it never outlives it.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import signal
import sys
import traceback

from stages import Interrupted, PipelineError


class Forked:
    """A call running in a child process; `result()` waits for it."""

    def __init__(self, fn, *args):
        for stream in (sys.stdout, sys.stderr):  # or the child would write the parent's buffered text again
            stream.flush()
        parent = os.getpid()
        read, write = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            os.close(read)
            self._run_child(parent, write, fn, args)
        os.close(write)
        self._read = read

    @staticmethod
    def _run_child(parent: int, write: int, fn, args) -> None:
        if sys.platform == "linux":
            PR_SET_PDEATHSIG = 1
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the stage ended before the request took effect
            os._exit(1)
        try:
            outcome = ("result", fn(*args))
        except PipelineError as e:
            outcome = ("error", isinstance(e, Interrupted), e.exit_code, str(e))
        except KeyboardInterrupt:  # a second Ctrl-C
            outcome = ("error", True, 1, "interrupted by Ctrl-C")
        except BaseException:  # a bug: the parent shows its traceback
            outcome = ("crash", traceback.format_exc())
        with os.fdopen(write, "wb") as pipe:
            pickle.dump(outcome, pipe)
        os._exit(0)  # no teardown: the parent owns every output

    def result(self):
        """The call's return value; its PipelineError (same message and exit code) is raised here."""
        with os.fdopen(self._read, "rb") as pipe:
            data = pipe.read()
        _, status = os.waitpid(self.pid, 0)
        if not data:
            raise PipelineError(f"the stage's worker process ended without an answer (exit status {status})")
        outcome = pickle.loads(data)
        if outcome[0] == "result":
            return outcome[1]
        if outcome[0] == "crash":
            raise RuntimeError(f"the stage's worker process failed:\n{outcome[1]}")
        _, interrupted, exit_code, message = outcome
        error = Interrupted(message) if interrupted else PipelineError(message)
        error.exit_code = exit_code
        raise error
