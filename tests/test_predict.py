import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from stages.predict import MAX_PIXELS, ImageError, load_image, top_k
from tests.helpers import DVC, ROOT, lock_md5, run, synthetic_split, write_dataset


def photo(item: np.ndarray, size: int = 112) -> Image.Image:
    """A Fashion-MNIST item as a product photo: dark garment on a white background, larger."""
    return Image.fromarray(255 - item).resize((size, size), Image.Resampling.NEAREST)


def test_a_photo_becomes_a_fashion_mnist_image(tmp_path):
    item = synthetic_split(1, 0)[0][0]
    for suffix in ("png", "jpg"):
        path = tmp_path / f"item.{suffix}"
        photo(item).convert("RGB").save(path)
        converted = load_image(path)
        assert converted.shape == (28, 28) and converted.dtype == np.uint8
        assert np.abs(converted.astype(int) - item.astype(int)).mean() < 12  # inverted back, resized down


def test_transparent_background_counts_as_background(tmp_path):
    rgba = Image.new("RGBA", (56, 56), (0, 0, 0, 0))
    rgba.paste((40, 40, 40, 255), (14, 14, 42, 42))
    rgba.save(tmp_path / "t.png")
    converted = load_image(tmp_path / "t.png")
    assert converted[0, 0] == 0 and converted[14, 14] > 150  # dark background, bright item


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "no such file"),
        (lambda p: p.write_text("not a picture"), "not an image PIL can read"),
        (lambda p: Image.new("LAB", (30, 30)).save(p, format="TIFF"), "unsupported image mode 'LAB'"),
    ],
)
def test_bad_images_get_one_clear_error(tmp_path, make, message):
    path = tmp_path / "bad.png"
    make(path)
    with pytest.raises(ImageError, match=message):
        load_image(path)


def with_declared_size(png: bytes, width: int, height: int) -> bytes:
    """The PNG with its header claiming another size: what a decompression bomb looks like before decoding."""
    ihdr = struct.pack(">II", width, height) + png[24:29]
    return png[:16] + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + png[33:]


@pytest.mark.parametrize("side", [20_000, 13_000])  # PIL's own bomb check fires at 20000x20000, not at 13000x13000
def test_images_over_the_pixel_cap_are_refused_before_decoding(tmp_path, side):
    small = tmp_path / "small.png"
    Image.new("P", (8, 8)).save(small)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(with_declared_size(small.read_bytes(), side, side))
    with pytest.raises(ImageError, match=f"bomb.png: .*over the limit of {MAX_PIXELS:,} pixels"):
        load_image(bomb)


def test_an_image_just_under_the_cap_loads_in_bounded_memory(tmp_path):
    side = int(MAX_PIXELS**0.5)
    path = tmp_path / "large.png"
    image = Image.new("P", (side, side), 0)
    image.putpalette([0, 0, 0, 40, 40, 40])
    image.paste(1, (side // 4, side // 4, 3 * side // 4, 3 * side // 4))
    image.save(path, compress_level=1, transparency=0)  # palette and transparency: the costliest conversion
    measure = (
        "import resource, sys; from pathlib import Path; from stages.predict import load_image; "
        f"image = load_image(Path({str(path)!r})); "
        "print(image[14, 14], image[0, 0], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)"
    )
    out = subprocess.run([sys.executable, "-c", measure], cwd=ROOT, capture_output=True, text=True, check=True)
    centre, corner, peak_mib = map(int, out.stdout.split())
    assert centre > 150 and corner == 0  # the dark item on a transparent background, as Fashion-MNIST draws it
    assert peak_mib < 1024, f"peak {peak_mib} MiB for {side}x{side} pixels"


def test_top_k_orders_by_probability():
    probabilities = np.array([0.1, 0.6, 0, 0, 0, 0, 0, 0, 0.3, 0])
    assert top_k(probabilities, 2) == [("Trouser", 0.6), ("Bag", 0.3)]


@pytest.mark.slow
def test_cli_agrees_with_the_pipeline_and_with_mlflow(tiny_project):
    run([DVC, "repro"], tiny_project)
    cli = ["python", "-m", "stages.predict", "--top", "1"]
    answered, *ours = run([*cli, "--test-index", "0", "1", "2"], tiny_project).stdout.splitlines()
    assert answered == f"model: models/model.pt (md5 {lock_md5(tiny_project, 'train', 'models/model.pt')})"
    answered, *served = run([*cli, "--mlflow", "--test-index", "0", "1", "2"], tiny_project).stdout.splitlines()
    assert answered.startswith("model: fashion-mnist-softmax version 1 (@champion) from sqlite:///")
    assert [line.split()[1] for line in ours] == [line.split()[1] for line in served]
    photo(synthetic_split(1, 0)[0][0]).save(tiny_project / "item.png")
    readme_form = run([*cli, "--mlflow", "item.png"], tiny_project).stdout.splitlines()  # README: --mlflow shirt.jpg
    by_version = run([*cli, "--version", "1", "item.png"], tiny_project).stdout.splitlines()
    assert readme_form[1] == by_version[1] and readme_form[1].startswith("item.png: ")
    assert by_version[0].startswith("model: fashion-mnist-softmax version 1 from ")
    assert all("(true: " in line for line in ours)
    confusion = json.loads((tiny_project / "reports/eval/confusion.json").read_text())
    assert [line.split(": ", 1)[1].rsplit(" ", 1)[0] for line in ours][0].startswith(confusion[0]["predicted"])
    proc = run([*cli, "missing.png"], tiny_project, check=False)
    assert proc.returncode == 1 and proc.stderr.strip() == "error: missing.png: no such file"


@pytest.mark.slow
def test_unknown_model_versions_and_aliases_get_one_line(tmp_path):
    from tests.helpers import client_for

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client_for(uri).create_registered_model("fashion-mnist-softmax")
    item = tmp_path / "item.png"
    photo(synthetic_split(1, 0)[0][0]).save(item)
    for option, asked, shown in (("--version", "999", "/999"), ("--alias", "abc", "@abc")):
        predict = ["python", "-m", "stages.predict", option, asked, str(item)]
        proc = run(predict, ROOT, check=False, MLFLOW_TRACKING_URI=uri)
        assert proc.returncode == 1
        expected = f"error: models:/fashion-mnist-softmax{shown}: no such version or alias; no versions; no aliases"
        assert proc.stderr.strip() == expected


def predict(cwd, *args: str, timeout: float = 30):
    """`python -m stages.predict` as a program: exit code and the lines it wrote to stderr."""
    return run([sys.executable, "-m", "stages.predict", *args], cwd, check=False, timeout=timeout, PYTHONPATH=str(ROOT))


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p: os.mkfifo(p), "a FIFO, not a regular file"),
        (lambda p: p.mkdir(), "a directory, not a regular file"),
        (lambda p: p.symlink_to(p.name), "Too many levels of symbolic links"),
    ],
)
def test_an_image_that_is_not_a_file_is_one_line_at_once(tmp_path, make, reason):
    make(tmp_path / "fifo.png")
    proc = predict(tmp_path, "fifo.png")
    assert proc.returncode == 1 and proc.stderr.splitlines() == [f"error: fifo.png: cannot read: {reason}"]


def test_a_directory_as_the_test_images_is_one_line(tmp_path):
    write_dataset(tmp_path / "data", gz=False)
    (tmp_path / "data" / "t10k-images-idx3-ubyte").unlink()
    (tmp_path / "data" / "t10k-images-idx3-ubyte").mkdir()
    proc = predict(tmp_path, "--data", "data", "--test-index", "0")
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "error: data/t10k-images-idx3-ubyte: cannot read: a directory, not a regular file"
    ]


@pytest.mark.parametrize(
    "module, args, message",
    [
        ("predict", [], "error: nothing to classify: give image files or --test-index"),
        ("predict", ["--top", "0", "x.png"], "error: --top must be 1..10"),
        (
            "predict",
            ["--test-index", "x"],
            "error: argument --test-index: invalid int value: 'x'",
        ),
        ("promote", [], "error: the following arguments are required: target"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(tmp_path, module, args, message):
    proc = run([sys.executable, "-m", f"stages.{module}", *args], tmp_path, check=False, PYTHONPATH=str(ROOT))
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"{message} (see python -m stages.{module} --help)"]


def test_usage_errors_name_what_is_missing():
    proc = run(["python", "-m", "stages.predict", "--mlflow"], ROOT, check=False)
    assert proc.returncode == 2 and "nothing to classify: give image files or --test-index" in proc.stderr
    proc = run(["python", "-m", "stages.predict", "--version", "champion", "x.png"], ROOT, check=False)
    assert proc.returncode == 2 and "--version champion: not a version number (for an alias, use --alias)" in (
        proc.stderr
    )
