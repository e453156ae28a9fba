"""The pipeline's stages (`python -m stages.<name>`) and the modules they share."""

import gc
import sys


def run_stage(main) -> None:
    """Run a stage's main() as a program: an interruption ends it with one line, not a traceback."""
    try:
        main()
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM turned into one by the tracking module
        sys.exit(f"error: interrupted ({e or 'Ctrl-C'}); outputs already written stay as they were")
    # Interpreter teardown would spend ~2 s walking torch's and MLflow's object graph; the
    # outputs are written and closed by now, so let the process end without that walk.
    gc.freeze()
