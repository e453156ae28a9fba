"""Fashion-MNIST files: fetching from local copies or HTTPS mirrors, verification, and loading.

The data stays in its original IDX format, decompressed, so verification is one SHA-256 per file
(the same whatever gzip produced it) and loading is a memory copy with numpy: no torchvision.
A download is bounded in time (data.deadline_s per file and source) and in size (the size its IDX
header announces), and is staged beside the output directory, never inside it.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import shutil
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages import PipelineError, check_interrupt, files

log = logging.getLogger(__name__)

CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
SPLITS = {"train": "train", "test": "t10k"}
FILES = tuple(f"{prefix}-{kind}" for prefix in SPLITS.values() for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"))
CHECKSUMS = Path(__file__).with_name("fashion-mnist.sha256")
PINNED = f"stages/{CHECKSUMS.name}"  # as the user finds it in the project
IMAGE_SHAPE, NUM_CLASSES = (28, 28), len(CLASSES)
_IDX_MAGIC = {"images": 0x00000803, "labels": 0x00000801}  # unsigned bytes; 3 or 1 dimensions
# Twice the real counts (60000 and 10000): room for a bigger variant of the data set, none for a
# header that announces gigabytes. The header is checked before a byte of the file is written.
_MAX_COUNT = {"train": 120_000, "t10k": 20_000}
_CHUNK = 1 << 20


class DataError(PipelineError):
    """A data file or source that cannot be used; the message names the file and the source."""


def read_checksums(path: Path = CHECKSUMS) -> dict[str, str]:
    """The pinned SHA-256 of each decompressed file, in `sha256sum` format."""
    sums = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            if len(line.split()) != 2:
                raise DataError(f"{path}: line {number}: expected '<sha256>  <file>'")
            digest, name = line.split()
            sums[name] = digest
    if set(sums) != set(FILES):
        raise DataError(f"{path}: expected checksums for {', '.join(FILES)}")
    return sums


def _kind(name: str) -> str:
    return "images" if "images" in name else "labels"


def _header_size(name: str) -> int:
    return 16 if _kind(name) == "images" else 8  # magic + 3 or 1 dimensions, 4 bytes each


def idx_dims(name: str, header: bytes) -> tuple[int, ...]:
    """Validate an IDX header (magic number, image shape, count) against the file's name; return its dimensions."""
    kind = _kind(name)
    if len(header) < _header_size(name):
        raise DataError(f"{name}: truncated: {len(header)} bytes is too short for an IDX header")
    magic = int.from_bytes(header[:4], "big")
    if magic != _IDX_MAGIC[kind]:
        raise DataError(f"{name}: wrong IDX magic number 0x{magic:08x}, expected 0x{_IDX_MAGIC[kind]:08x}")
    dims = tuple(int.from_bytes(header[i : i + 4], "big") for i in range(4, _header_size(name), 4))
    if kind == "images" and dims[1:] != IMAGE_SHAPE:
        raise DataError(f"{name}: images are {dims[1]}x{dims[2]}, expected 28x28")
    limit = _MAX_COUNT[name.split("-")[0]]
    if dims[0] > limit:
        raise DataError(f"{name}: the IDX header announces {dims[0]} {kind}; at most {limit} are accepted")
    return dims


def idx_size(dims: tuple[int, ...]) -> int:
    """The exact size of an IDX file of unsigned bytes with these dimensions."""
    return 4 + 4 * len(dims) + math.prod(dims)


def check_idx_header(name: str, header: bytes, size: int) -> tuple[int, ...]:
    """Validate an IDX header against the file's kind and size; return its dimensions."""
    dims = idx_dims(name, header)
    if size != idx_size(dims):
        raise DataError(f"{name}: {size} bytes, expected {idx_size(dims)} for dimensions {dims} (truncated or padded)")
    return dims


# --- fetching -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """A place one file can come from: a local directory or a mirror URL."""

    location: str

    @property
    def is_url(self) -> bool:
        return "://" in self.location

    def describe(self, name: str) -> str:
        return f"{self.location.rstrip('/')}/{name}.gz" if self.is_url else str(Path(self.location) / name)


def sources_from(local_dirs: list[str], mirrors: list[str]) -> list[Source]:
    return [Source(d) for d in local_dirs] + [Source(m) for m in mirrors]


def _too_slow(where: str, deadline: float, last: str = "") -> DataError:
    return DataError(f"{where}: not complete within the {deadline:g} s deadline (data.deadline_s)" + last)


def _pause(seconds: float) -> None:
    """Sleep, but notice Ctrl-C/SIGTERM within a tenth of a second (the handlers only record them)."""
    wake = time.monotonic() + seconds
    while (left := wake - time.monotonic()) > 0:
        check_interrupt()
        time.sleep(min(left, 0.1))


def _open_local(directory: Path, name: str):
    if not directory.is_dir():
        raise DataError(f"{directory}: no such directory")
    for candidate in (directory / f"{name}.gz", directory / name):
        if candidate.is_file():
            return files.open_regular(candidate)
    raise DataError(f"{name}: not found in {directory} (looked for {name}.gz and {name})")


def _open_url(url: str, timeout: float, retries: int, ends: float, deadline: float):
    last = ""
    for attempt in range(retries + 1):
        if attempt:
            pause = min(0.5 * 2**attempt, 4)
            if time.monotonic() + pause >= ends:  # no time for another try: say so now, not at the deadline
                raise _too_slow(url, deadline, f"; last attempt: {last}")
            _pause(pause)
        left = ends - time.monotonic()
        if left <= 0:
            raise _too_slow(url, deadline, f"; last attempt: {last}" if last else "")
        try:
            # Every later read of the response waits at most this long, so a read that hangs
            # overruns the deadline by one timeout at most.
            response = urllib.request.urlopen(url, timeout=min(timeout, left))
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code} {e.reason}"
            if e.code < 500:  # a missing file does not appear on retry
                break
        except (urllib.error.URLError, OSError) as e:
            last = str(getattr(e, "reason", e))
        else:
            if response.headers.get_content_type() == "text/html":
                response.close()
                raise DataError(f"{url}: returned an HTML page, not the data file")
            return response
    raise DataError(f"{url}: {last}")


def _chunks(stream, where: str, ends: float, deadline: float):
    """What `stream` gives, a read at a time, stopping at Ctrl-C/SIGTERM and at the file's deadline."""
    while True:
        check_interrupt()
        if time.monotonic() > ends:
            raise _too_slow(where, deadline)
        chunk = stream.read1(_CHUNK)  # whatever has arrived: a slow mirror cannot hold one call for long
        if not chunk:
            return
        yield chunk


def _gunzipped(chunks, where: str):
    """The file's own bytes: `chunks` gunzipped if they are gzip, at most _CHUNK at a time, so that
    a small download that inflates to gigabytes never does so in memory."""
    first = b""
    for chunk in chunks:
        first += chunk
        if len(first) >= 2:
            break
    if first[:2] != b"\x1f\x8b":
        yield first
        yield from chunks
        return
    inflate = zlib.decompressobj(wbits=31)
    data = first
    while not inflate.eof:
        piece = inflate.decompress(data, _CHUNK)
        yield piece
        data = inflate.unconsumed_tail
        if not data and not piece:  # zlib holds no more output: it needs more input
            data = next(chunks, b"")
            if not data:
                raise DataError(f"{where}: gzip stream ends early (truncated)")


def _write_idx(name: str, pieces, out) -> str:
    """Write the file's bytes to `out`, checked against its IDX header as they arrive: a bad header is
    refused before anything is written, and the file never grows past the size the header announces.
    Return the SHA-256 of what was written."""
    head = b""
    for piece in pieces:
        head += piece
        if len(head) >= _header_size(name):
            break
    dims = idx_dims(name, head)
    size = idx_size(dims)
    digest, written = hashlib.sha256(), 0
    for piece in itertools.chain([head], pieces):
        if written + len(piece) > size:
            raise DataError(f"{name}: more than the {size} bytes its IDX header announces (padded, or a gzip bomb)")
        digest.update(piece)
        out.write(piece)
        written += len(piece)
    if written != size:
        raise DataError(f"{name}: {written} bytes, expected {size} for dimensions {dims} (truncated or padded)")
    return digest.hexdigest()


def fetch_file(
    name: str, expected_sha256: str, source: Source, directory: Path, timeout: float, retries: int, deadline: float
) -> None:
    """Fetch one file from one source into `directory`, verified, within `deadline` seconds (retries
    included); on any failure, interrupts included, nothing of it is left there."""
    where = source.describe(name)
    path = Path(directory) / name
    ends = time.monotonic() + deadline
    verified = False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as out:
            if source.is_url:
                opened = _open_url(where, timeout, retries, ends, deadline)
            else:
                opened = _open_local(Path(source.location), name)
            try:
                with opened as stream:
                    actual = _write_idx(name, _gunzipped(_chunks(stream, where, ends, deadline), where), out)
            except (OSError, zlib.error, EOFError) as e:
                raise DataError(f"{where}: read failed: {e}") from None
        if actual != expected_sha256:
            raise DataError(f"{name} from {where}: SHA-256 {actual} does not match the expected {expected_sha256}")
        verified = True
    except DataError as e:
        msg = str(e)
        raise DataError(msg if where in msg else f"{msg} (from {where})") from None
    finally:
        if not verified:
            path.unlink(missing_ok=True)


def fetch_all(
    dest_dir: Path, sources: list[Source], checksums: dict[str, str], timeout: float, retries: int, deadline: float
) -> dict[str, str]:
    """Fetch every file from the first source that gives verified bytes, then move the four into
    `dest_dir` together; return file -> source. On failure or interrupt `dest_dir` is left as it was."""
    dest_dir = Path(dest_dir)
    # Staged beside the output, not inside it: DVC tracks the output directory, and a stray file there
    # makes `dvc checkout` refuse to run. The same filesystem keeps the final moves atomic.
    try:
        dest_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{dest_dir.name}.", suffix=".partial", dir=dest_dir.parent))
    except OSError as e:
        raise files.OutputError(f"{dest_dir.parent}: cannot write: {e.strerror or e}") from None
    try:
        used = {}
        for name in FILES:
            tried = []
            for source in sources:
                check_interrupt()
                try:
                    fetch_file(name, checksums[name], source, staging, timeout, retries, deadline)
                except DataError as e:
                    tried.append(str(e))
                    log.warning("  skipped: %s", e)
                    continue
                used[name] = source.describe(name)
                log.info("  %s: verified, from %s", name, used[name])
                break
            else:
                raise DataError(
                    f"{name}: no source gave a verified copy; tried: " + "; ".join(tried or ["no sources configured"])
                )
        check_interrupt()
        dest_dir.mkdir(exist_ok=True)
        for name in FILES:  # verified against the pinned hashes: image and label counts agree
            files.publish(staging / name, dest_dir / name)
        return used
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --- loading --------------------------------------------------------------------------------


def _read_idx(path: Path) -> np.ndarray:
    try:
        with files.open_regular(path) as f:
            raw = np.fromfile(f, dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"{path}: missing; run the download stage (dvc repro download)") from None
    except OSError as e:  # a directory, FIFO or symlink loop in place of the file
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        dims = check_idx_header(path.name, raw[:16].tobytes(), len(raw))
    except DataError as e:  # name the file as the user knows it, with its directory
        raise DataError(f"{path.parent}/{e}") from None
    return raw[4 + 4 * len(dims) :].reshape(dims)


def load_split(data_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels uint8 [N]) of one split, checked for shape and range."""
    prefix = SPLITS[split]
    images = _read_idx(Path(data_dir) / f"{prefix}-images-idx3-ubyte")
    labels = _read_idx(Path(data_dir) / f"{prefix}-labels-idx1-ubyte")
    if len(images) != len(labels):
        raise DataError(f"{data_dir}/{prefix}-*: {len(images)} images but {len(labels)} labels")
    if len(labels) and labels.max() >= len(CLASSES):
        raise DataError(f"{data_dir}/{prefix}-labels-idx1-ubyte: label {labels.max()} outside 0..{len(CLASSES) - 1}")
    return images, labels


def verify_dir(data_dir: Path, checksums: dict[str, str] | None = None) -> str:
    """Check each data file against its pinned SHA-256, so hand-edited data never reaches training;
    return one SHA-256 over the four (the `data.sha256` tag that ties a run to its data)."""
    checksums = read_checksums() if checksums is None else checksums
    combined = hashlib.sha256()
    for name in FILES:
        path = Path(data_dir) / name
        try:
            with files.open_regular(path) as f:
                actual = hashlib.file_digest(f, "sha256").hexdigest()
        except FileNotFoundError:
            raise DataError(f"{path}: missing; run the download stage (dvc repro download)") from None
        except OSError as e:
            raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
        if actual != checksums[name]:
            raise DataError(
                f"{path}: SHA-256 {actual} does not match the pinned {checksums[name]} ({PINNED}); "
                "run the download stage (dvc repro download)"
            )
        combined.update(bytes.fromhex(actual))  # one digest over the four, for the run's data.sha256 tag
    return combined.hexdigest()
