"""The pipeline's stages (`python -m stages.<name>`) and the modules they share.

One error route: library code raises `PipelineError` (or a subclass) with a message that names the
culprit; `run_stage` is the one place that turns it into the `error:` line and the exit code.
"""

import gc
import logging
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the project: params.yaml, dvc.yaml, the default store


class PipelineError(Exception):
    """A failure the user can act on; the message is the whole story (key, file, URL or store)."""


class Interrupted(PipelineError):
    """Ctrl-C or SIGTERM, raised at a safe point: between batches, chunks or output files."""


_SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}
_received: list[int] = []


def _record(signum, frame) -> None:
    # Only record: raising here would land wherever Python happens to be, finalizers included,
    # which swallow it. A second signal means "stop now", so it goes back to the default action.
    _received.append(signum)
    signal.signal(signum, signal.SIG_DFL if signum == signal.SIGTERM else signal.default_int_handler)


def check_interrupt() -> None:
    """Raise `Interrupted` if Ctrl-C or SIGTERM arrived; call it where stopping leaves no mess."""
    if _received:
        raise Interrupted(f"interrupted by {_SIGNAL_NAMES.get(_received[0], f'signal {_received[0]}')}")


class _ConsoleHandler(logging.Handler):
    """Library modules' messages as plain lines: news on stdout, warnings (and worse) on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr if record.levelno >= logging.WARNING else sys.stdout)


def _log_to_console() -> None:
    logger = logging.getLogger(__name__)
    if not any(isinstance(h, _ConsoleHandler) for h in logger.handlers):
        logger.addHandler(_ConsoleHandler())
    logger.setLevel(logging.INFO)
    logger.propagate = False


def run_stage(main) -> None:
    """Run a stage's main() as a program: a failure ends it with one `error:` line, not a traceback."""
    _log_to_console()
    for signum in _SIGNAL_NAMES:
        signal.signal(signum, _record)
    try:
        main()
    except Interrupted as e:
        sys.exit(f"error: {e}; outputs stay the previous complete ones")
    except PipelineError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # a second Ctrl-C while the first was waiting for a safe point
        sys.exit("error: interrupted by Ctrl-C; outputs stay the previous complete ones")
    if _received:  # after the last safe point: the outputs are complete, but the user asked to stop
        sys.exit(f"error: interrupted by {_SIGNAL_NAMES.get(_received[0], 'a signal')} after the outputs were written")
    # Interpreter teardown would spend ~2 s walking torch's and MLflow's object graph; the
    # outputs are written and closed by now, so let the process end without that walk.
    gc.freeze()
