"""Files: atomic output writes (a reader, or a crash, sees the old files or the complete new ones,
never half), and inputs opened only if they are regular files.

A stage's outputs are published together: `Outputs` writes each file to a temporary file beside its
target and moves them all into place only once every one is complete, so a failure part-way (a full
disk, an interrupt) leaves every output as it was.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path

from stages import PipelineError


class OutputError(PipelineError):
    """An output that cannot be written; the message names the file and the system's reason."""


class Outputs:
    """`with Outputs() as out: out.write_json(...)`: all files move into place at the end, or none."""

    def __init__(self):
        self._staged: list[tuple[str, Path]] = []

    def write_bytes(self, path: Path, data: bytes) -> None:
        path = Path(path)
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            self._staged.append((tmp, path))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        except OSError as e:
            raise OutputError(f"{path}: cannot write: {e.strerror or e}") from None

    def write_json(self, path: Path, obj) -> None:
        self.write_bytes(path, json_bytes(obj))

    def discard(self) -> None:
        for tmp, _ in self._staged:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self._staged.clear()

    def publish(self) -> None:
        try:
            for tmp, path in self._staged:
                publish(tmp, path)
        finally:
            self.discard()

    def __enter__(self) -> Outputs:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.publish()
        else:
            self.discard()


def publish(tmp: str | Path, path: Path) -> None:
    """Move a finished temporary file into place, with the permissions a plain open() would give."""
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"{path}: cannot write: {e.strerror or e}") from None


def json_bytes(obj) -> bytes:
    """JSON as every output and artifact of the project is written: indented, one final newline."""
    return (json.dumps(obj, indent=2) + "\n").encode()


_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a device"}


def open_regular(path: Path):
    """Open an input for reading in binary, refusing anything but a regular file: a FIFO would block
    the open (and a read) forever, a directory or a device is no data file.

    O_NONBLOCK makes opening a FIFO return at once, so it can be refused; it changes nothing for a
    regular file. Raises OSError, with a `strerror` that says what is there instead."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
            raise OSError(0, f"{kind}, not a regular file", str(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
