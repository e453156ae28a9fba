import contextlib
import gzip
import hashlib
import http.server
import os
import resource
import shutil
import signal
import subprocess
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from stages import data
from stages.data import FILES, DataError, Source, fetch_all, fetch_file, load_split
from tests.helpers import (
    TINY_TRAIN,
    checksum_text,
    cli_env,
    idx_bytes,
    make_project,
    shrunk_params,
    synthetic_split,
    write_dataset,
)


class Mirror:
    """A real HTTP server on loopback: path -> (status, content type, body, delay in seconds).

    `drips` holds the slow ones: path -> (body, bytes sent at once, seconds between the later bytes);
    `sent_some` is set once such a response has sent its first bytes. A drip hangs up after a minute,
    so a client that never gives up fails its test instead of hanging it."""

    def __init__(self):
        self.routes: dict[str, tuple[int, str, bytes, float]] = {}
        self.drips: dict[str, tuple[bytes, int, float]] = {}
        self.hits: list[str] = []
        self.sent_some = threading.Event()
        self.closing = threading.Event()
        mirror = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                mirror.hits.append(self.path)
                if self.path in mirror.drips:
                    return self.drip(*mirror.drips[self.path])
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

            def drip(self, body, at_once, interval):
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/gzip")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[:at_once])
                    self.wfile.flush()
                    mirror.sent_some.set()
                    hang_up = time.monotonic() + 60
                    for i in range(at_once, len(body)):
                        if mirror.closing.wait(interval) or time.monotonic() > hang_up:
                            return
                        self.wfile.write(body[i : i + 1])
                        self.wfile.flush()
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
        self.closing.set()
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


def test_missing_directory_then_mirror(pinned, mirror, tmp_path, caplog):
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
    assert f"{tmp_path / 'nowhere'}: no such directory" in caplog.text


def test_corrupted_file_is_rejected_and_next_source_used(pinned, mirror, tmp_path, caplog):
    source, sums = pinned
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in FILES:
        corrupt(source / f"{name}.gz", bad / f"{name}.gz", flip_at=20)
    mirror.serve_dir("/good", source)
    out = tmp_path / "data"
    fetch_all(out, [Source(str(bad)), Source(mirror.url + "/good")], pinned[1], timeout=5, retries=0, deadline=30)
    err = caplog.text
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
    assert not [name for name in listing(tmp_path) if name.endswith(".partial")]  # temporaries removed


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


# --- downloads bounded in time and size, all or nothing -------------------------------------


def images_header(count: int) -> bytes:
    return b"".join(n.to_bytes(4, "big") for n in (0x803, count, 28, 28))


def gzip_bomb(header: bytes, zeros: int) -> bytes:
    """A valid gzip file: `header`, then `zeros` zero bytes, in about a thousandth of that size."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [deflate.compress(header)] + [deflate.compress(bytes(1 << 20)) for _ in range(zeros >> 20)]
    return b"".join(parts) + deflate.flush()


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """The kernel's limit on the size of files this process writes: a write past it fails (EFBIG)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_dripping_mirror_is_cut_off_at_the_deadline_and_the_next_source_used(pinned, mirror, tmp_path, caplog):
    source, sums = pinned
    name = "train-images-idx3-ubyte"
    # A byte every 50 ms: each read returns well within timeout_s, only the deadline can stop it.
    mirror.drips[f"/drip/{name}.gz"] = ((source / f"{name}.gz").read_bytes(), 100, 0.05)
    out = tmp_path / "data" / "fashion-mnist"
    fetch_all(out, [Source(mirror.url + "/drip"), Source(str(source))], sums, timeout=5, retries=0, deadline=1)
    err = caplog.text
    assert f"skipped: {mirror.url}/drip/{name}.gz: not complete within the 1 s deadline (data.deadline_s)\n" in err
    assert listing(out) == sorted(FILES)
    assert listing(tmp_path / "data") == ["fashion-mnist"]


def test_retries_stop_at_the_deadline(pinned, mirror, tmp_path):
    name = "t10k-labels-idx1-ubyte"
    mirror.routes[f"/busy/{name}.gz"] = (503, "text/plain", b"busy", 0)
    with pytest.raises(DataError) as err:  # ten retries would back off for 35 s
        fetch_file(name, pinned[1][name], Source(mirror.url + "/busy"), tmp_path, timeout=5, retries=10, deadline=2)
    assert str(err.value) == (
        f"{mirror.url}/busy/{name}.gz: not complete within the 2 s deadline (data.deadline_s); "
        "last attempt: HTTP 503 Service Unavailable"
    )
    assert 1 <= len(mirror.hits) < 11


def test_gzip_bomb_is_stopped_at_the_size_its_header_announces(pinned, mirror, tmp_path, caplog):
    source, sums = pinned
    name = "train-images-idx3-ubyte"
    size = 16 + TINY_TRAIN * 28 * 28
    bomb = gzip_bomb(images_header(TINY_TRAIN), 32 << 20)
    assert len(bomb) < 64 << 10  # under 64 KiB that inflate to 32 MiB
    mirror.routes[f"/bomb/{name}.gz"] = (200, "application/gzip", bomb, 0)
    out = tmp_path / "data" / "fashion-mnist"
    with file_size_limit(4 << 20):  # writing the bomb out would fail past 4 MiB ("File too large")
        fetch_all(out, [Source(mirror.url + "/bomb"), Source(str(source))], sums, timeout=5, retries=0, deadline=30)
    err = caplog.text
    assert (
        f"skipped: {name}: more than the {size} bytes its IDX header announces (padded, or a gzip bomb) "
        f"(from {mirror.url}/bomb/{name}.gz)\n"
    ) in err
    assert listing(out) == sorted(FILES)  # the next source gave the real file


def test_header_announcing_an_absurd_size_is_refused_before_writing(pinned, mirror, tmp_path):
    name = "t10k-images-idx3-ubyte"
    mirror.routes[f"/huge/{name}.gz"] = (200, "application/gzip", gzip_bomb(images_header(10**9), 1 << 20), 0)
    out = tmp_path / "out"
    with file_size_limit(0), pytest.raises(DataError) as err:  # writing a single byte would fail
        fetch_file(name, pinned[1][name], Source(mirror.url + "/huge"), out, timeout=5, retries=0, deadline=30)
    assert str(err.value) == (
        f"{name}: the IDX header announces 1000000000 images; at most 20000 are accepted "
        f"(from {mirror.url}/huge/{name}.gz)"
    )
    assert listing(out) == []


def test_failed_download_leaves_the_previous_files_and_no_temporaries(pinned, tmp_path):
    source, sums = pinned
    out = tmp_path / "data" / "fashion-mnist"
    previous = {name: f"previous {name}".encode() for name in FILES}
    out.mkdir(parents=True)
    for name, content in previous.items():
        (out / name).write_bytes(content)
    incomplete = tmp_path / "incomplete"  # every file but the last
    incomplete.mkdir()
    for name in FILES[:-1]:
        shutil.copy(source / f"{name}.gz", incomplete)
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte: no source gave a verified copy"):
        fetch_all(out, [Source(str(incomplete))], sums, timeout=5, retries=0, deadline=30)
    assert {name: (out / name).read_bytes() for name in FILES} == previous
    assert listing(tmp_path / "data") == ["fashion-mnist"]


@pytest.mark.slow
def test_sigterm_mid_download_keeps_the_previous_files_and_leaves_no_temporaries(tiny_source, mirror, tmp_path):
    source, sums = tiny_source
    name = "train-images-idx3-ubyte"
    mirror.drips[f"/drip/{name}.gz"] = ((source / f"{name}.gz").read_bytes(), 1000, 0.05)  # never done in time
    params = shrunk_params(source)
    params["data"].update(local_dirs=[], mirrors=[mirror.url + "/drip/"])
    project = make_project(tmp_path / "project", params, sums)
    data_dir = project / "data"
    write_dataset(data_dir / "fashion-mnist", train=(300, 7), test=(100, 8), gz=False)  # a previous dataset
    before = {p.name: p.read_bytes() for p in (data_dir / "fashion-mnist").iterdir()}
    proc = subprocess.Popen(
        ["python", "-m", "stages.download", "--out", "data/fashion-mnist"],
        cwd=project, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert mirror.sent_some.wait(timeout=120), "the stage never started downloading"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1
    assert stderr.strip().splitlines()[-1] == "error: interrupted by SIGTERM; outputs stay the previous complete ones"
    assert "Traceback" not in stderr
    assert sorted(str(p.relative_to(data_dir)) for p in data_dir.rglob("*")) == [
        "fashion-mnist",
        *(f"fashion-mnist/{name}" for name in sorted(FILES)),
    ]
    assert {p.name: p.read_bytes() for p in (data_dir / "fashion-mnist").iterdir()} == before


# --- verifying the data before training -----------------------------------------------------


def test_verify_dir_returns_one_digest_over_the_four_files(tmp_path):
    data_dir = tmp_path / "fashion-mnist"
    sums = write_dataset(data_dir, gz=False)
    # The runs' data.sha256 tag: SHA-256 over the four files' digests, in FILES order.
    expected = hashlib.sha256(b"".join(bytes.fromhex(sums[name]) for name in FILES)).hexdigest()
    assert data.verify_dir(data_dir, sums) == expected


def test_verify_dir_refuses_hand_edited_labels_naming_the_file(tmp_path):
    data_dir = tmp_path / "fashion-mnist"
    sums = write_dataset(data_dir, gz=False)
    _, labels = synthetic_split(TINY_TRAIN, 1)  # the training split write_dataset wrote
    shifted = idx_bytes((labels + 1) % 10)
    (data_dir / "train-labels-idx1-ubyte").write_bytes(shifted)
    load_split(data_dir, "train")  # every label is still in range: only the hash can tell
    with pytest.raises(DataError) as err:
        data.verify_dir(data_dir, sums)
    assert str(err.value) == (
        f"{data_dir}/train-labels-idx1-ubyte: SHA-256 {hashlib.sha256(shifted).hexdigest()} does not match "
        f"the pinned {sums['train-labels-idx1-ubyte']} (stages/fashion-mnist.sha256); "
        "run the download stage (dvc repro download)"
    )


def test_verify_dir_points_at_download_when_a_file_is_missing(tmp_path):
    with pytest.raises(DataError, match="train-images-idx3-ubyte: missing; run the download stage"):
        data.verify_dir(tmp_path)


NOT_A_FILE = {  # what can sit where a data file should be; each refused at once, none waited on
    "a directory": (lambda p: p.mkdir(), "a directory, not a regular file"),
    "a symlink loop": (lambda p: p.symlink_to(p.name), "Too many levels of symbolic links"),
    "a FIFO": (lambda p: os.mkfifo(p), "a FIFO, not a regular file"),
}


@pytest.mark.parametrize("case", NOT_A_FILE)
def test_something_else_in_place_of_a_data_file_is_one_line_at_once(tmp_path, case):
    make, reason = NOT_A_FILE[case]
    sums = write_dataset(tmp_path, gz=False)
    target = tmp_path / "t10k-images-idx3-ubyte"
    target.unlink()
    make(target)
    started = time.monotonic()
    with pytest.raises(DataError, match=f"^{target}: cannot read: {reason}$"):
        load_split(tmp_path, "test")
    with pytest.raises(DataError, match=f"^{target}: cannot read: {reason}$"):
        data.verify_dir(tmp_path, sums)
    assert time.monotonic() - started < 5
