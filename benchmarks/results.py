"""benchmarks/RESULTS.md: each benchmark script writes its own section, and leaves the others."""

from __future__ import annotations

import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEAD = "# Benchmark results\n\nEach section is written by the script it names, on the machine and date it gives.\n"


def write_section(text: str, path: Path = RESULTS) -> None:
    """Replace the section whose title is `text`'s first line (`## ...`), or append it."""
    title = text.splitlines()[0]
    current = path.read_text() if path.exists() else HEAD
    pattern = re.compile(rf"^{re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(current):
        new = pattern.sub(lambda _: text.rstrip() + "\n\n", current).rstrip() + "\n"
    else:
        new = current.rstrip() + "\n\n" + text.rstrip() + "\n"
    path.write_text(new)
