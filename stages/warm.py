"""A warm start for the evaluate stage: its imports done while train trains.

Each tracked stage is a fresh Python process, and most of an experiment's fixed cost is importing:
evaluate spends ~3 s importing MLflow, torch, scikit-learn and matplotlib to do ~1 s of work. The
train stage has MLflow and torch loaded already, and one core idles while it trains (its epochs run
on one thread). So train forks a process (`offer`) that imports what evaluate needs beside the
epochs and waits for the evaluate stage of the same `dvc` run. Evaluate's command (`take`) hands
that process its arguments, directory, environment and stdin/stdout/stderr; it runs evaluate's
main() as the command would and sends back the exit code, which the command exits with. The same
code runs on the same files: outputs, MLflow content and messages are the same; only the imports
moved.

It serves only when nothing that matters changed since train started: the same dvc process, working
directory, interpreter and `sys.path`; the same environment (DVC_STAGE aside); every file under
stages/ byte for byte; and params.yaml's `determinism`, which torch was loaded under. Otherwise,
or when anything in the hand-off fails, evaluate runs as a fresh process, as before. It never
outlives its dvc run: it ends with dvc, after serving once, or after ten minutes unused. Signals to
evaluate's command (Ctrl-C, SIGTERM, dvc's end) are passed on, and the stage stops when the command
is gone, as a stage stops when dvc is. It listens on an abstract socket named for the user, the dvc
process and the directory; each side checks that the other is this user's process in this pid
namespace, and evaluate's command also that it runs this interpreter in this directory, before it
hands over its environment.

`FMNIST_WARM=0` turns it off; `FMNIST_WARM=verbose` has evaluate say on stderr which way it ran.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from pathlib import Path

import stages
from stages import CODE_ROOT, determinism

IDLE_S = 600  # unused this long (dvc ran no evaluate): it ends
READY_S = 120  # what evaluate waits for a process still importing, at most, before running fresh
_SOURCES = CODE_ROOT / "stages"


def _setting() -> str:
    return os.environ.get("FMNIST_WARM", "1")


def _say(line: str) -> None:
    if _setting() == "verbose":
        print(f"warm: {line}", file=sys.stderr, flush=True)


def _sources() -> dict[str, str]:
    """md5 of every .py file under stages/: what the stages' code is now."""
    found = {}
    for path in sorted(_SOURCES.rglob("*.py")):
        with contextlib.suppress(OSError):  # an editor's dangling lock link, a file deleted meanwhile
            found[str(path)] = hashlib.md5(path.read_bytes()).hexdigest()
    return found


_SOURCES_AT_START = _sources()  # imported with the stage's first modules: the code it started with


def _environment() -> dict[str, str]:
    """The environment the stage was started with, less what differs by design between stages."""
    return {k: v for k, v in stages.STARTED_WITH.items() if k != "DVC_STAGE"}


def _address(stage: str) -> str | None:
    """The abstract socket of `stage`'s warm process in this dvc run, or None outside one."""
    dvc = stages.starter()
    if sys.platform != "linux" or "DVC_STAGE" not in os.environ or dvc is None or _setting() == "0":
        return None
    where = hashlib.sha256(os.getcwd().encode()).hexdigest()[:16]
    return f"\0fmnist-warm/{os.getuid()}/{dvc}/{where}/{stage}"


def _peer(sock: socket.socket) -> int | None:
    """The pid of the process at the other end, if it is this user's and in this pid namespace (an
    abstract socket is reachable from every process in the network namespace, containers included)."""
    pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return pid if uid == os.getuid() and pid > 0 else None


def _same_program(pid: int) -> bool:
    """Whether process `pid` runs this interpreter in this directory."""
    try:
        return all(os.readlink(f"/proc/{pid}/{what}") == os.readlink(f"/proc/self/{what}") for what in ("exe", "cwd"))
    except OSError:
        return False


def _send(sock: socket.socket, message: dict) -> None:
    sock.sendall(json.dumps(message).encode() + b"\n")


def _receive(stream) -> dict:
    line = stream.readline()
    if not line:
        raise EOFError("the other side has gone")
    return json.loads(line)


# --- train's side: the warm process ---------------------------------------------------------------


def offer(stage: str, leave=()) -> None:
    """Fork a process that gets ready to run `stage` (imports, beside this stage's training) and
    serves it once. Returns at once in this process; `leave` are this stage's own channels (objects
    with `release()`), which the warm process lets go of."""
    address = _address(stage)
    others = [t for t in threading.enumerate() if t is not threading.main_thread()]
    # Forking copies only this thread: any other must hold nothing the fork could copy half-held.
    # stop-with-dvc (stages/__init__.py) only waits in select(), holding nothing.
    if address is None or any(t.name != "stop-with-dvc" for t in others):
        return
    _close_pooled_connections()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    try:
        pid = os.fork()
    except OSError:  # no room for another process: evaluate runs fresh, as it would anyway
        return
    if pid != 0:
        _say(f"process {pid} gets ready to run {stage}")
        return
    try:
        for channel in leave:
            channel.release()
        _serve(stage, address)
    finally:
        os._exit(0)


def _detach() -> None:
    """No terminal, no stage's pipes, no stage's signals: this process only waits and serves."""
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in range(3):
        os.dup2(devnull, fd)
    os.close(devnull)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)
    stages.forget_signals()


_serving = threading.Event()  # set once it runs the stage: from then on the stage decides when it ends


def _end() -> None:
    """Unless it is running the stage by then (which stops as its command does, as stages stop
    with dvc), this process ends."""
    if not _serving.is_set():
        os._exit(0)


def _close_pooled_connections() -> None:
    """Close the SQL stores' pooled connections before a fork, so that no connection is shared:
    each process opens its own when it next needs one (SQLAlchemy's way for engines across a fork;
    SQLite's rule too). Called between store operations, when every connection is back in its pool."""
    import sqlalchemy

    gc.unfreeze()  # `stages.importing` froze them out of gc.get_objects()'s sight
    try:
        engines = [o for o in gc.get_objects() if isinstance(o, sqlalchemy.engine.Engine)]
    finally:
        gc.freeze()
    for engine in engines:
        engine.dispose()


def _serve(stage: str, address: str) -> None:
    _detach()
    if not stages.when_gone(stages.starter(), _end, "end-with-dvc"):  # it could outlive dvc: not offered
        return
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(address)
    except OSError:  # taken: another process serves this run
        return
    listener.listen(1)
    ready = _get_ready(stage)  # evaluate may connect meanwhile: it waits for the answer
    listener.settimeout(IDLE_S)
    while True:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            return
        if (client := _peer(conn)) is not None:
            break
        conn.close()  # another user's, or another pid namespace's: not for it
    listener.close()
    conn.settimeout(READY_S)
    stream = conn.makefile("rb")
    header, fds, flags, _ = socket.recv_fds(conn, 4, 3)
    request = _receive(stream)
    if header != b"fds\n" or flags & socket.MSG_CTRUNC or request.get("pid") != client:
        return
    refusal = ready if isinstance(ready, str) else _refusal(stage, request, fds)
    if refusal:
        _send(conn, {"ready": False, "why": refusal, "pid": os.getpid()})
        return
    _serving.set()
    stages.stop_with(client)  # from here on, its signals are the stage's
    _send(conn, {"ready": True, "pid": os.getpid()})
    if _receive(stream).get("go") is not True:  # evaluate gave up waiting: it runs fresh
        return
    conn.settimeout(None)
    code = _run(ready, request, fds)
    with contextlib.suppress(OSError):
        _send(conn, {"exit": code})
    os._exit(code)


def _get_ready(stage: str):
    """Import what `stage` needs; its main(), or why it cannot be served."""
    try:
        import importlib

        with stages.importing():  # and frozen: the stage's forked workers share them with no copying
            module = importlib.import_module(f"stages.{stage}")
            for name in getattr(module, "WARM_IMPORTS", ()):
                importlib.import_module(name)
        return module.main
    except BaseException as e:  # noqa: BLE001 - any failure here means: run fresh
        return f"getting ready failed: {type(e).__name__}: {e}"[:300]


def _refusal(stage: str, request: dict, fds: list[int]) -> str | None:
    """Why this process cannot run the stage that `request` describes as a fresh one would; None if it can."""
    if request.get("stage") != stage or len(fds) != 3:
        return f"asked for {request.get('stage')} with {len(fds)} file descriptors"
    if request.get("cwd") != os.getcwd():
        return "another working directory"
    if request.get("executable") != sys.executable or request.get("path") != sys.path:
        return "another interpreter or sys.path"
    env, started = {k: v for k, v in request.get("env", {}).items() if k != "DVC_STAGE"}, _environment()
    if env != started:
        changed = {k for k, _ in set(env.items()) ^ set(started.items())}  # names only: values may be secrets
        return f"the environment differs ({', '.join(sorted(changed))})"[:300]
    if (now := _sources()) != _SOURCES_AT_START:
        changed = sorted(set(now.items()) ^ set(_SOURCES_AT_START.items()))
        return f"the code changed since train started ({', '.join(sorted({Path(p).name for p, _ in changed}))})"[:300]
    from stages.config import load_params

    try:
        mode = load_params().determinism
    except stages.PipelineError as e:
        return f"params.yaml: {e}"[:300]
    if mode != determinism.loaded_under():
        return f"determinism is {mode}, torch was loaded for {determinism.loaded_under()}"
    return None


def _run(main, request: dict, fds: list[int]) -> int:
    """Become the stage: its stdio, directory, environment and arguments; its exit code."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = list(request["argv"])
    try:
        stages.run_stage(main)
        code = 0
    except SystemExit as e:  # as the interpreter ends on one
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if not isinstance(e.code, int | None):
            print(e.code, file=sys.stderr)
    except BaseException:  # a bug: its traceback, as a fresh process would print it
        traceback.print_exc()
        code = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError):
            stream.flush()
    return code


# --- evaluate's side: the command ----------------------------------------------------------------


def take(stage: str) -> int | None:
    """Run `stage` in this dvc run's warm process, if there is one that can: its exit code. None:
    there is none, or it cannot (`FMNIST_WARM=verbose` says why); run the stage here instead."""
    address = _address(stage)
    if address is None:
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(READY_S)
    try:
        conn.connect(address)
    except OSError:
        conn.close()
        _say(f"{stage} runs in a fresh process: no warm process in this dvc run")
        return None
    asked = time.monotonic()
    with conn, conn.makefile("rb") as stream:
        try:
            server = _peer(conn)
            if server is None or not _same_program(server):  # the environment it would get holds secrets
                _say(f"{stage} runs in a fresh process: the warm process is not this user's program")
                return None
            socket.send_fds(conn, [b"fds\n"], [0, 1, 2])
            request = {"stage": stage, "cwd": os.getcwd(), "env": stages.STARTED_WITH, "pid": os.getpid()}
            _send(conn, {**request, "argv": sys.argv, "executable": sys.executable, "path": sys.path})
            answer = _receive(stream)
            if not answer.get("ready") or answer.get("pid") != server:
                _say(f"{stage} runs in a fresh process, not in process {server}: {answer.get('why')}")
                return None
            if stages.interrupted():  # a signal came meanwhile: the fresh path says so at once
                return None
            _send(conn, {"go": True})
        except (OSError, EOFError, ValueError) as e:
            _say(f"{stage} runs in a fresh process: the hand-off failed ({e})")
            return None
        except KeyboardInterrupt:  # a second Ctrl-C: the fresh path ends with the usual line
            return None
        waited = time.monotonic() - asked
        _say(f"{stage} runs in process {server}, its modules imported while train trained ({waited:.1f} s)")
        return _wait(conn, stream, server)


def _wait(conn: socket.socket, stream, pid: int) -> int:
    """Pass Ctrl-C and SIGTERM on to the stage's process, and wait for its exit code."""

    def pass_on(signum, frame):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, pass_on)
    for signum in stages.interrupted():  # arrived between the answer and now
        pass_on(signum, None)
    conn.settimeout(None)
    try:
        return int(_receive(stream)["exit"])
    except (OSError, EOFError, ValueError, KeyError):
        print(f"error: the stage's process {pid} ended without an exit code", file=sys.stderr, flush=True)
        return 1
