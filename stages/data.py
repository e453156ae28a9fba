"""Fashion-MNIST files: fetching from local copies or HTTPS mirrors, verification, and loading.

The data stays in its original IDX format, decompressed, so verification is one SHA-256 per file
(the same whatever gzip produced it) and loading is a memory copy with numpy: no torchvision.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages import PipelineError, files

CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
SPLITS = {"train": "train", "test": "t10k"}
FILES = tuple(f"{prefix}-{kind}" for prefix in SPLITS.values() for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"))
CHECKSUMS = Path(__file__).with_name("fashion-mnist.sha256")
IMAGE_SHAPE = (28, 28)
_IDX_MAGIC = {"images": 0x00000803, "labels": 0x00000801}  # unsigned bytes; 3 or 1 dimensions
_CHUNK = 1 << 20


class DataError(PipelineError):
    """A data file or source that cannot be used; the message names the file and the source."""


def read_checksums(path: Path = CHECKSUMS) -> dict[str, str]:
    """The pinned SHA-256 of each decompressed file, in `sha256sum` format."""
    sums = {}
    for line in path.read_text().splitlines():
        if line.strip():
            digest, name = line.split()
            sums[name] = digest
    if set(sums) != set(FILES):
        raise DataError(f"{path}: expected checksums for {', '.join(FILES)}")
    return sums


def _kind(name: str) -> str:
    return "images" if "images" in name else "labels"


def check_idx_header(name: str, header: bytes, size: int) -> tuple[int, ...]:
    """Validate an IDX header against the file's kind and size; return its dimensions."""
    kind = _kind(name)
    ndim = 3 if kind == "images" else 1
    if len(header) < 4 + 4 * ndim:
        raise DataError(f"{name}: truncated: {size} bytes is too short for an IDX header")
    magic = int.from_bytes(header[:4], "big")
    if magic != _IDX_MAGIC[kind]:
        raise DataError(f"{name}: wrong IDX magic number 0x{magic:08x}, expected 0x{_IDX_MAGIC[kind]:08x}")
    dims = tuple(int.from_bytes(header[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if kind == "images" and dims[1:] != IMAGE_SHAPE:
        raise DataError(f"{name}: images are {dims[1]}x{dims[2]}, expected 28x28")
    expected = 4 + 4 * ndim + int(np.prod(dims))
    if size != expected:
        raise DataError(f"{name}: {size} bytes, expected {expected} for dimensions {dims} (truncated or padded)")
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


def _open_local(directory: Path, name: str):
    if not directory.is_dir():
        raise DataError(f"{directory}: no such directory")
    for candidate in (directory / f"{name}.gz", directory / name):
        if candidate.is_file():
            return open(candidate, "rb")
    raise DataError(f"{name}: not found in {directory} (looked for {name}.gz and {name})")


def _open_url(url: str, timeout: float, retries: int):
    last = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(0.5 * 2**attempt, 4))
        try:
            response = urllib.request.urlopen(url, timeout=timeout)
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


def _stream_into(stream, out, where: str) -> str:
    """Copy `stream` into `out`, gunzipping if it is gzip; return the SHA-256 of what was written."""
    digest = hashlib.sha256()
    first = stream.read(_CHUNK)
    inflate = zlib.decompressobj(wbits=31) if first[:2] == b"\x1f\x8b" else None
    chunk = first
    while chunk:
        data = inflate.decompress(chunk) if inflate else chunk
        digest.update(data)
        out.write(data)
        chunk = stream.read(_CHUNK)
    if inflate:
        if not inflate.eof:
            raise DataError(f"{where}: gzip stream ends early (truncated)")
        tail = inflate.flush()
        digest.update(tail)
        out.write(tail)
    return digest.hexdigest()


def fetch_file(name: str, expected_sha256: str, source: Source, dest_dir: Path, timeout: float, retries: int) -> None:
    """Fetch one file from one source into `dest_dir`, verified; never leaves a partial file behind."""
    where = source.describe(name)
    dest_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial", dir=dest_dir)
    try:
        with os.fdopen(fd, "wb") as out:
            opened = _open_url(where, timeout, retries) if source.is_url else _open_local(Path(source.location), name)
            try:
                with opened as stream:
                    actual = _stream_into(stream, out, where)
            except (OSError, zlib.error, EOFError) as e:
                raise DataError(f"{where}: read failed: {e}") from None
        with open(tmp, "rb") as f:
            check_idx_header(name, f.read(16), os.path.getsize(tmp))
        if actual != expected_sha256:
            raise DataError(f"{name} from {where}: SHA-256 {actual} does not match the expected {expected_sha256}")
        files.publish(tmp, dest_dir / name)
    except DataError as e:
        msg = str(e)
        raise DataError(msg if where in msg else f"{msg} (from {where})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def fetch_all(
    dest_dir: Path, sources: list[Source], checksums: dict[str, str], timeout: float, retries: int
) -> dict[str, str]:
    """Fetch every file from the first source that gives verified bytes; return file -> source."""
    used = {}
    for name in FILES:
        tried = []
        for source in sources:
            try:
                fetch_file(name, checksums[name], source, dest_dir, timeout, retries)
            except DataError as e:
                tried.append(str(e))
                print(f"  skipped: {e}", file=sys.stderr)
                continue
            used[name] = source.describe(name)
            print(f"  {name}: verified, from {used[name]}")
            break
        else:
            raise DataError(
                f"{name}: no source gave a verified copy; tried: " + "; ".join(tried or ["no sources configured"])
            )
    for split in SPLITS:
        load_split(dest_dir, split)  # image and label counts must agree
    return used


# --- loading --------------------------------------------------------------------------------


def _read_idx(path: Path) -> np.ndarray:
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"{path}: missing; run the download stage (dvc repro download)") from None
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


def dataset_digest(data_dir: Path) -> str:
    """One SHA-256 over the data files, for tagging runs with the exact data they saw."""
    digest = hashlib.sha256()
    for name in FILES:
        digest.update(hashlib.sha256((Path(data_dir) / name).read_bytes()).digest())
    return digest.hexdigest()
