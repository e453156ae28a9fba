import json

import numpy as np
import pytest
from PIL import Image

from stages.predict import ImageError, load_image, top_k
from tests.helpers import DVC, run, synthetic_split


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


def test_top_k_orders_by_probability():
    probabilities = np.array([0.1, 0.6, 0, 0, 0, 0, 0, 0, 0.3, 0])
    assert top_k(probabilities, 2) == [("Trouser", 0.6), ("Bag", 0.3)]


@pytest.mark.slow
def test_cli_agrees_with_the_pipeline_and_with_mlflow(tiny_project):
    run([DVC, "repro"], tiny_project)
    cli = ["python", "-m", "stages.predict", "--top", "1"]
    ours = run([*cli, "--test-index", "0", "1", "2"], tiny_project).stdout.splitlines()
    served = run([*cli, "--mlflow", "--test-index", "0", "1", "2"], tiny_project).stdout.splitlines()
    assert [line.split()[1] for line in ours] == [line.split()[1] for line in served]
    assert all("(true: " in line for line in ours)
    confusion = json.loads((tiny_project / "reports/eval/confusion.json").read_text())
    assert [line.split(": ", 1)[1].rsplit(" ", 1)[0] for line in ours][0].startswith(confusion[0]["predicted"])
    proc = run([*cli, "missing.png"], tiny_project, check=False)
    assert proc.returncode == 1 and proc.stderr.strip() == "error: missing.png: no such file"
