"""A stage's torch half in a forked process, while the stage itself imports MLflow.

Importing torch (with what a stage computes) and importing MLflow with its SQL store each take
~3 s of pure Python, which threads cannot overlap (the GIL); two processes can, on two cores. The
child is forked before either import, computes, and sends back its result (or its error's
message) through a pipe; on the way it may send messages (`tell_parent`: train's epochs) and wait
for an answer (`wait_for_parent`). It never touches the tracking store, writes no output and
prints only what the stage printed before (train's epoch lines), so the stage keeps its order:
compute, publish the files, then tell MLflow.

Signals: the stage checks for Ctrl-C and SIGTERM every 0.1 s while it waits for the child, and
stops as before; the child dies with the stage (the kernel's parent-death signal, and on the way
out of `with Forked(...)`), so it never outlives it and never publishes anything.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from multiprocessing.connection import Connection, Pipe

from stages import Interrupted, PipelineError, check_interrupt, die_with_parent

_channel: list[Connection] = []  # in the child: its end of the pipe


def tell_parent(message) -> None:
    """In the child: send a message to the stage (it reads them with `receive` or `messages`)."""
    _channel[0].send(("message", message))


def wait_for_parent():
    """In the child: wait for the stage's next `send`, and return it."""
    return _channel[0].recv()


class Forked:
    """`with Forked(fn, *args) as child:` runs fn(*args) in a child process; `child.result()` waits for it."""

    def __init__(self, fn, *args):
        for stream in (sys.stdout, sys.stderr):  # or the child would write the parent's buffered text again
            stream.flush()
        parent = os.getpid()
        self._conn, child_end = Pipe()
        self._outcome = None
        self.pid = os.fork()
        if self.pid == 0:
            self._conn.close()
            self._run_child(parent, child_end, fn, args)
        child_end.close()

    @staticmethod
    def _run_child(parent: int, conn: Connection, fn, args) -> None:
        die_with_parent(signal.SIGKILL)
        if os.getppid() != parent:  # the stage ended before the request took effect
            os._exit(1)
        _channel[:] = [conn]  # a child's child talks to its own parent
        try:
            outcome = ("result", fn(*args))
        except PipelineError as e:
            outcome = ("error", isinstance(e, Interrupted), e.exit_code, str(e))
        except KeyboardInterrupt:  # a second Ctrl-C
            outcome = ("error", True, 1, "interrupted by Ctrl-C")
        except BaseException:  # a bug: the stage shows its traceback
            outcome = ("crash", traceback.format_exc())
        try:
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            conn.send(outcome)
        finally:
            os._exit(0)  # no teardown: the stage owns every output

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.pid:
            if self._outcome is None:  # the stage stops early (an error, Ctrl-C): so does the child
                os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.pid = 0
        self._conn.close()

    def release(self) -> None:
        """In a process forked from the stage that is not the stage (stages/warm.py): let go of the
        child's pipe, leaving the child to the stage."""
        self.pid = 0
        self._conn.close()

    def send(self, message) -> None:
        """To the child's `wait_for_parent`."""
        self._conn.send(message)

    def _next(self):
        """The child's next message or outcome, checking for Ctrl-C and SIGTERM while waiting."""
        check_interrupt()  # also between messages: a fast child may keep the pipe full
        while not self._conn.poll(0.1):
            check_interrupt()
        try:
            return self._conn.recv()
        except EOFError:
            _, status = os.waitpid(self.pid, 0)
            self.pid = 0
            raise PipelineError(f"the stage's worker process ended without an answer (wait status {status})") from None

    def messages(self):
        """The child's messages, as they come, until it ends."""
        while self._outcome is None:
            kind, *rest = self._next()
            if kind == "message":
                yield rest[0]
            else:
                self._outcome = (kind, *rest)

    def receive(self):
        """The child's next message; its error is raised here if it ends instead."""
        for message in self.messages():
            return message
        self.result()
        raise PipelineError("the stage's worker process ended before it answered")

    def result(self):
        """The call's return value; its PipelineError (same message and exit code) is raised here."""
        for message in self.messages():
            raise PipelineError(f"the stage's worker process sent an unexpected message: {message!r}"[:300])
        kind, *rest = self._outcome
        if kind == "result":
            return rest[0]
        if kind == "crash":
            raise RuntimeError(f"the stage's worker process failed:\n{rest[0]}")
        interrupted, exit_code, message = rest
        error = Interrupted(message) if interrupted else PipelineError(message)
        error.exit_code = exit_code
        raise error
