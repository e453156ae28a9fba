"""Tiny synthetic Fashion-MNIST in the real IDX format, and where the real one is."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np

REAL_DATA = Path("/usr/share/datasets/fashion-mnist")
TINY_TRAIN, TINY_TEST = 600, 200


def idx_bytes(array: np.ndarray) -> bytes:
    magic = 0x0803 if array.ndim == 3 else 0x0801
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def synthetic_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable fake clothing: each class lights up its own band of rows, plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = rng.integers(0, 60, size=(n, 28, 28))
    for i, label in enumerate(labels):
        images[i, 2 * label + 4 : 2 * label + 7, 4:24] += 180
    return images.astype(np.uint8), labels.astype(np.uint8)


def write_dataset(directory: Path, train=(TINY_TRAIN, 1), test=(TINY_TEST, 2), gz: bool = True) -> dict[str, str]:
    """Write the four IDX files (gzipped like the real ones); return file -> SHA-256 of raw bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    sums = {}
    for prefix, (n, seed) in (("train", train), ("t10k", test)):
        images, labels = synthetic_split(n, seed)
        for name, array in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
            raw = idx_bytes(array)
            sums[name] = hashlib.sha256(raw).hexdigest()
            if gz:
                (directory / f"{name}.gz").write_bytes(gzip.compress(raw, mtime=0))
            else:
                (directory / name).write_bytes(raw)
    return sums


def checksum_text(sums: dict[str, str]) -> str:
    return "".join(f"{digest}  {name}\n" for name, digest in sums.items())
