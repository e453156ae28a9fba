"""The pipeline's stages (`python -m stages.<name>`) and the modules they share.

One error route: library code raises `PipelineError` (or a subclass) with a message that names the
culprit; `run_stage` is the one place that turns it into the `error:` line and the exit code.
"""

import argparse
import contextlib
import ctypes
import gc
import logging
import os
import select
import signal
import sys
import threading
from pathlib import Path

CODE_ROOT = Path(__file__).resolve().parents[1]  # the checkout this code lives in
STARTED_WITH = dict(os.environ)  # this process's environment before any stage code changes it
MESSAGE_MAX = 2000  # characters of an `error:` line: a message quoting a 50 MB value is cut


class PipelineError(Exception):
    """A failure the user can act on; the message is the whole story (key, file, URL or store)."""

    exit_code = 1


class Interrupted(PipelineError):
    """Ctrl-C or SIGTERM, raised at a safe point: between batches, chunks or output files."""


class UsageError(PipelineError):
    """Bad command-line arguments; exit 2, as argparse does, but in the one-line form."""

    exit_code = 2


_SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}
_received: list[int] = []
_project: Path | None = None  # set by an installed entry point: the project found from the cwd
_parent = [os.getppid()]  # the process that started this one, as `_stop_with_parent` saw it
_starter: list[int] = []  # the program that started this stage (dvc), above any shell wrapper
_handled: list[bool] = []  # non-empty once this process records signals for its stage


def _record(signum, frame) -> None:
    # Only record: raising here would land wherever Python happens to be, finalizers included,
    # which swallow it. A second signal means "stop now": the default action.
    if signum == signal.SIGTERM and signal.SIGTERM in _received:
        if os.getppid() != _parent[0]:  # the parent's death signal: dvc may have passed its own
            return  # SIGTERM on just before it went; the same request to stop, not a second one
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _received.append(signum)
    if signum == signal.SIGINT:
        signal.signal(signum, signal.default_int_handler)


_SHELLS = {"sh", "dash", "bash", "zsh", "ksh", "fish"}


def _shell_wrapper_parent(pid: int) -> int | None:
    """The parent of `pid` if `pid` is a `<shell> -c ...` waiting on us, else None."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    if Path(argv[0].decode(errors="replace")).name not in _SHELLS or b"-c" not in argv[1:4]:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def when_gone(pid: int, act, name: str) -> bool:
    """Call `act()` when process `pid` (not our child) ends: a thread named `name` waiting on its
    pidfd; at once if it has ended. False where there are no pidfds (an old kernel): nothing waits."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        act()
        return True
    except (AttributeError, OSError):
        return False

    def wait() -> None:
        select.select([pidfd], [], [])
        act()

    threading.Thread(target=wait, name=name, daemon=True).start()
    return True


def _term_when_gone(pid: int) -> None:
    """SIGTERM ourselves when `pid` (not our parent) ends; without pidfds only the parent is followed."""

    def term() -> None:
        if signal.SIGTERM not in _received:  # one request to stop, not a "second signal"
            os.kill(os.getpid(), signal.SIGTERM)

    when_gone(pid, term, "stop-with-dvc")


def die_with_parent(signum: int) -> None:
    """Have the kernel send this process `signum` when its parent ends (Linux's PR_SET_PDEATHSIG;
    elsewhere nothing). Also a child's `preexec_fn`, so that the request is made before it execs."""
    if sys.platform == "linux":
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)


def _stop_with_parent() -> None:
    """Record Ctrl-C and SIGTERM from now on, and get SIGTERM when `dvc` (our starter) dies.

    `kill -TERM <dvc pid>` ends dvc but not the stage it started; without this, the stage would go
    on as an orphan and publish a model nobody asked for. The kernel's parent-death signal turns the
    parent's end into our SIGTERM, which stops the stage at its next safe point. dvc starts a stage
    through `$SHELL -c` (`/bin/sh` when SHELL is unset, as under cron, systemd or CI), and dash stays
    as our parent instead of exec'ing us, outliving dvc: then the process above the shell is followed."""
    _record_signals()
    parent = _parent[0] = os.getppid()
    if sys.platform != "linux":
        return
    die_with_parent(signal.SIGTERM)
    if parent == 1 or os.getppid() != parent:  # the parent died before the request took effect
        _record(signal.SIGTERM, None)
        return
    starter = parent
    while (above := _shell_wrapper_parent(starter)) is not None and above > 1:
        starter = above
    _starter[:] = [starter]
    if starter != parent:
        _term_when_gone(starter)


def _record_signals() -> None:
    for signum in _SIGNAL_NAMES:
        signal.signal(signum, _record)
    _handled[:] = [True]


def stop_with(pid: int) -> None:
    """As `_stop_with_parent`, for a stage run on behalf of process `pid` (stages/warm.py): its
    signals reach this one through `pid`, and `pid`'s end is this stage's SIGTERM."""
    _record_signals()
    _parent[0] = os.getppid()
    _term_when_gone(pid)


def starter() -> int | None:
    """The pid of the program that started this stage (dvc), if it is known."""
    return _starter[0] if _starter else None


def interrupted() -> list[int]:
    """The Ctrl-C and SIGTERM received so far, in order (`check_interrupt` raises on the first)."""
    return list(_received)


def forget_signals() -> None:
    """For a process forked from a stage that is not that stage (stages/warm.py): the signals it
    received are not this process's, and its signal handling is not set up."""
    _received.clear()
    _handled.clear()


# `python -m stages.x` imports this package first, while argv[0] is still "-m": the handlers are in
# place before the stage's heavy imports, so a signal in its first moments gets the usual line too.
if sys.argv[:1] == ["-m"]:
    _stop_with_parent()


@contextlib.contextmanager
def importing():
    """Around a stage's heavy imports (torch, MLflow, scikit-learn, matplotlib). As modules load,
    Python's garbage collector walks every object loaded so far, again and again (benchmarks/RESULTS.md,
    "Imports"). Off meanwhile; then what loaded is frozen, so later collections skip it, here and in
    the processes this one forks (which would otherwise copy every page they touch)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def check_interrupt() -> None:
    """Raise `Interrupted` if Ctrl-C or SIGTERM arrived; call it where stopping leaves no mess."""
    if _received:
        raise Interrupted(f"interrupted by {_SIGNAL_NAMES.get(_received[0], f'signal {_received[0]}')}")


def project_root() -> Path:
    """The project whose params, data, model and store are used: the one an installed command was
    started in, else the checkout this code lives in (`python -m stages.x`, which is how DVC runs it)."""
    return _project or CODE_ROOT


def find_project(start: Path | None = None) -> Path:
    """The nearest directory at or above `start` (the cwd) that holds dvc.yaml and params.yaml."""
    start = Path.cwd() if start is None else Path(start)
    for directory in (start, *start.parents):
        if (directory / "dvc.yaml").is_file() and (directory / "params.yaml").is_file():
            return directory
    raise PipelineError(f"{start}: not inside a project (no directory above it has dvc.yaml and params.yaml)")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its usage errors as one `error:` line (it prints the usage and its own form)."""

    def __init__(self, **kwargs):
        script = Path(sys.argv[0])
        if script.parent == CODE_ROOT / "stages":  # `python -m stages.x`, not `x.py`
            kwargs.setdefault("prog", f"python -m stages.{script.stem}")
        super().__init__(**kwargs)

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def _clip(message: str) -> str:
    return message if len(message) <= MESSAGE_MAX else f"{message[: MESSAGE_MAX - 40]}... ({len(message)} characters)"


def _fail(message: str, code: int = 1):
    with contextlib.suppress(OSError):  # stderr closed too: the exit code is all that is left
        print(f"error: {_clip(message)}", file=sys.stderr, flush=True)
    sys.exit(code)


class _ConsoleHandler(logging.Handler):
    """Library modules' messages as plain lines: news on stdout, warnings (and worse) on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr if record.levelno >= logging.WARNING else sys.stdout)


def _log_to_console() -> None:
    """The one logging route: every `logging.getLogger(__name__)` under stages/ prints its line."""
    logger = logging.getLogger(__name__)
    if not any(isinstance(h, _ConsoleHandler) for h in logger.handlers):
        logger.addHandler(_ConsoleHandler())
    logger.setLevel(logging.INFO)
    logger.propagate = False


def run_stage(main, entry_point: bool = False) -> None:
    """Run a stage's main() as a program: a failure ends it with one `error:` line, not a traceback.

    `entry_point`: an installed command (`fmnist-predict`): it works on the project the cwd is in."""
    global _project
    _log_to_console()
    if not _handled:  # an installed command or a test's script: handlers not yet set
        _stop_with_parent()
    try:
        if entry_point:
            _project = find_project()
            if _project != CODE_ROOT:  # not the checkout the command was installed from: say so
                print(f"project: {_project}", file=sys.stderr)
        check_interrupt()
        main()
        sys.stdout.flush()  # a closed stdout shows here, not in the interpreter's last flush
    except Interrupted as e:
        _fail(f"{e}; outputs stay the previous complete ones")
    except PipelineError as e:
        _fail(str(e), e.exit_code)
    except KeyboardInterrupt:  # a second Ctrl-C while the first was waiting for a safe point
        _fail("interrupted by Ctrl-C; outputs stay the previous complete ones")
    except BrokenPipeError:  # `| head -0`: whoever read our output has gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the final flush is quiet
        _fail("stdout was closed (broken pipe)")
    if _received:  # after the last safe point: the outputs are complete, but the user asked to stop
        _fail(f"interrupted by {_SIGNAL_NAMES.get(_received[0], 'a signal')} after the outputs were written")
    # Interpreter teardown would spend ~2 s walking torch's and MLflow's object graph; the
    # outputs are written and closed by now, so let the process end without that walk.
    gc.freeze()
