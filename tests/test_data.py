import gzip
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest

from stages import data
from stages.data import FILES, DataError, Source, fetch_all, fetch_file, load_split
from tests.helpers import checksum_text, idx_bytes, synthetic_split, write_dataset


class Mirror:
    """A real HTTP server on loopback: path -> (status, content type, body, delay in seconds)."""

    def __init__(self):
        self.routes: dict[str, tuple[int, str, bytes, float]] = {}
        self.hits: list[str] = []
        mirror = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                mirror.hits.append(self.path)
                status, ctype, body, delay = mirror.routes.get(self.path, (404, "text/plain", b"nope", 0))
                if delay:
                    threading.Event().wait(delay)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def serve_dir(self, prefix: str, directory: Path):
        for path in directory.iterdir():
            self.routes[f"{prefix}/{path.name}"] = (200, "application/gzip", path.read_bytes(), 0)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def mirror():
    m = Mirror()
    yield m
    m.close()


@pytest.fixture
def pinned(tiny_source, tmp_path):
    """The tiny dataset and its hashes, read back from a checksum file like the real ones."""
    source, sums = tiny_source
    manifest = tmp_path / "tiny.sha256"
    manifest.write_text(checksum_text(sums))
    return source, data.read_checksums(manifest)


def corrupt(src: Path, dst: Path, flip_at: int = 100):
    raw = bytearray(gzip.decompress(src.read_bytes()))
    raw[flip_at] ^= 0xFF
    dst.write_bytes(gzip.compress(bytes(raw)))


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_pinned_hashes_are_the_real_fashion_mnist():
    sums = data.read_checksums()
    assert sums["train-images-idx3-ubyte"].startswith("c59f468a")
    assert sums["t10k-labels-idx1-ubyte"].startswith("0402a96d")


def test_local_copy_is_verified_and_loaded(pinned, tmp_path):
    source, _ = pinned
    out = tmp_path / "data"
    used = fetch_all(out, [Source(str(source))], pinned[1], timeout=5, retries=0, deadline=30)
    assert listing(out) == sorted(FILES)
    assert set(used.values()) == {f"{source}/{name}" for name in FILES}
    images, labels = load_split(out, "train")
    expected_images, expected_labels = synthetic_split(600, 1)
    assert images.shape == (600, 28, 28) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, expected_images)
    np.testing.assert_array_equal(labels, expected_labels)


def test_uncompressed_local_copy_works_too(pinned, tmp_path):
    raw_dir = tmp_path / "raw"
    write_dataset(raw_dir, gz=False)
    fetch_all(tmp_path / "data", [Source(str(raw_dir))], pinned[1], timeout=5, retries=0, deadline=30)
    assert listing(tmp_path / "data") == sorted(FILES)


def test_missing_directory_then_mirror(pinned, mirror, tmp_path, capsys):
    source, _ = pinned
    mirror.serve_dir("/fmnist", source)
    out = tmp_path / "data"
    fetch_all(
        out,
        [Source(str(tmp_path / "nowhere")), Source(mirror.url + "/fmnist/")],
        pinned[1],
        timeout=5,
        retries=0,
        deadline=30,
    )
    assert listing(out) == sorted(FILES)
    assert f"{tmp_path / 'nowhere'}: no such directory" in capsys.readouterr().err


def test_corrupted_file_is_rejected_and_next_source_used(pinned, mirror, tmp_path, capsys):
    source, sums = pinned
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in FILES:
        corrupt(source / f"{name}.gz", bad / f"{name}.gz", flip_at=20)
    mirror.serve_dir("/good", source)
    out = tmp_path / "data"
    fetch_all(out, [Source(str(bad)), Source(mirror.url + "/good")], pinned[1], timeout=5, retries=0, deadline=30)
    err = capsys.readouterr().err
    name = "train-images-idx3-ubyte"
    assert f"{name} from {bad}/{name}: SHA-256 " in err
    assert f"does not match the expected {sums[name]}" in err
    assert listing(out) == sorted(FILES)


@pytest.mark.parametrize(
    "route, fragment",
    [
        ((404, "text/plain", b"not here", 0), "HTTP 404"),
        ((200, "text/html", b"<html>login</html>", 0), "returned an HTML page"),
        ((200, "application/octet-stream", b"\x1f\x8b\x08\x00garbage", 0), "gzip"),
        ((500, "text/plain", b"oops", 0), "HTTP 500"),
    ],
)
def test_bad_mirror_responses_fail_cleanly(pinned, mirror, tmp_path, route, fragment):
    name = "train-labels-idx1-ubyte"
    mirror.routes[f"/m/{name}.gz"] = route
    out = tmp_path / "data"
    with pytest.raises(DataError) as err:
        fetch_file(name, pinned[1][name], Source(mirror.url + "/m"), out, timeout=5, retries=1, deadline=30)
    assert fragment in str(err.value) and f"{mirror.url}/m/{name}.gz" in str(err.value)
    assert listing(out) == []  # nothing partial left behind
    expected_hits = 2 if route[0] >= 500 else 1  # server errors are retried, a 404 is not
    assert len(mirror.hits) == expected_hits


def test_mirror_that_hangs_times_out(pinned, mirror, tmp_path):
    name = "t10k-labels-idx1-ubyte"
    mirror.routes[f"/slow/{name}.gz"] = (200, "application/gzip", b"", 3)
    with pytest.raises(DataError, match="timed out"):
        fetch_file(name, pinned[1][name], Source(mirror.url + "/slow"), tmp_path, timeout=0.5, retries=0, deadline=30)


def test_truncated_gzip_is_rejected(pinned, tmp_path):
    source, sums = pinned
    bad = tmp_path / "bad"
    bad.mkdir()
    name = "train-images-idx3-ubyte"
    blob = (source / f"{name}.gz").read_bytes()
    (bad / f"{name}.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="truncated"):
        fetch_file(name, sums[name], Source(str(bad)), tmp_path / "out", timeout=5, retries=0, deadline=30)
    assert listing(tmp_path / "out") == []


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda raw: b"\x00\x00\x08\x01" + raw[4:], "wrong IDX magic number 0x00000801, expected 0x00000803"),
        (lambda raw: raw[:12] + (27).to_bytes(4, "big") + raw[16:], "images are 28x27, expected 28x28"),
        (lambda raw: raw[:-5], "truncated or padded"),
    ],
)
def test_bad_idx_structure_is_named(pinned, tmp_path, mutate, fragment):
    source, sums = pinned
    name = "t10k-images-idx3-ubyte"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / name).write_bytes(mutate(gzip.decompress((source / f"{name}.gz").read_bytes())))
    with pytest.raises(DataError) as err:
        fetch_file(name, sums[name], Source(str(bad)), tmp_path / "out", timeout=5, retries=0, deadline=30)
    assert fragment in str(err.value) and str(bad / name) in str(err.value)


def test_nothing_works_lists_every_attempt(pinned, mirror, tmp_path):
    with pytest.raises(DataError) as err:
        fetch_all(
            tmp_path / "out",
            [Source(str(tmp_path / "none")), Source(mirror.url + "/x")],
            pinned[1],
            timeout=2,
            retries=0,
            deadline=30,
        )
    message = str(err.value)
    assert message.startswith("train-images-idx3-ubyte: no source gave a verified copy; tried:")
    assert "no such directory" in message and "HTTP 404" in message
    assert listing(tmp_path / "out") == []


def test_image_and_label_counts_must_agree(tmp_path):
    images, labels = synthetic_split(50, 0)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(images))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(labels[:40]))
    with pytest.raises(DataError, match="50 images but 40 labels"):
        load_split(tmp_path, "test")


def test_labels_outside_the_ten_classes_are_refused(tmp_path):
    images, labels = synthetic_split(50, 0)
    labels[7] = 12
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(images))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    with pytest.raises(DataError, match="label 12 outside 0..9"):
        load_split(tmp_path, "test")


def test_missing_data_points_at_download(tmp_path):
    with pytest.raises(DataError, match="missing; run the download stage"):
        load_split(tmp_path, "train")
