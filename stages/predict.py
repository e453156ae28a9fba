"""Classify clothing images with the trained model: top-k classes with softmax probabilities.

fmnist-predict shirt.jpg boot.png          # photos, converted to 28x28 grayscale like Fashion-MNIST
fmnist-predict --test-index 0 17 42        # images of the test set, with their true labels
fmnist-predict --mlflow shirt.jpg          # the same through the registered MLflow model
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from stages import run_stage
from stages.data import CLASSES, DataError, load_split

ROOT = Path(__file__).resolve().parents[1]


class ImageError(Exception):
    pass


def load_image(path: Path) -> np.ndarray:
    """A photo as Fashion-MNIST sees clothes: 28x28 grayscale, the item centred on a dark background.

    Fashion-MNIST's images are the product photos trimmed, fitted into 28x28 and negated, so a
    photo on a light background is inverted here too."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ImageError(f"{path}: not an image PIL can read ({e})") from None
    if image.mode not in {"1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I", "F", "CMYK", "YCbCr"}:
        raise ImageError(f"{path}: unsupported image mode {image.mode!r}")
    if image.mode in {"RGBA", "LA", "P"}:  # transparent areas count as background
        canvas = Image.new("RGBA", image.size, "white")
        canvas.alpha_composite(image.convert("RGBA"))
        image = canvas
    gray = image.convert("L")
    pixels = np.asarray(gray, dtype=np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    if border.mean() > 127:
        gray = ImageOps.invert(gray)
    gray = ImageOps.pad(gray, (28, 28), method=Image.Resampling.LANCZOS, color=0)
    return np.asarray(gray, dtype=np.uint8)


def top_k(probabilities: np.ndarray, k: int) -> list[tuple[str, float]]:
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [(CLASSES[i], float(probabilities[i])) for i in order]


def probabilities_from_checkpoint(model_path: Path, images_u8: np.ndarray) -> np.ndarray:
    import torch

    from stages.model import load_checkpoint, to_inputs

    model, _ = load_checkpoint(model_path)
    with torch.inference_mode():
        return model(to_inputs(torch.from_numpy(images_u8))).softmax(1).numpy()


def probabilities_from_mlflow(model_uri: str, images_u8: np.ndarray) -> np.ndarray:
    """The registered MLflow model already ends in a softmax."""
    import mlflow

    from stages.tracking import import_mlflow, tracking_uri

    import_mlflow()
    mlflow.set_tracking_uri(tracking_uri())
    return np.asarray(mlflow.pyfunc.load_model(model_uri).predict(images_u8.astype(np.float32) / 255))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="*", type=Path, help="PNG or JPEG files")
    parser.add_argument("--test-index", nargs="+", type=int, default=[], metavar="N", help="test-set images")
    parser.add_argument("--top", type=int, default=3, help="how many classes to show (default 3)")
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "model.pt")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "fashion-mnist")
    parser.add_argument("--mlflow", nargs="?", const="latest", metavar="VERSION",
                        help="use the registered MLflow model (default: its latest version)")  # fmt: skip
    args = parser.parse_args(argv)
    if not args.images and not args.test_index:
        parser.error("give image files or --test-index")
    if not 1 <= args.top <= len(CLASSES):
        parser.error(f"--top must be 1..{len(CLASSES)}")
    try:
        names, images, truth = [], [], []
        for path in args.images:
            images.append(load_image(path))
            names.append(str(path))
            truth.append(None)
        if args.test_index:
            test_images, test_labels = load_split(args.data, "test")
            for i in args.test_index:
                if not 0 <= i < len(test_labels):
                    raise ImageError(f"--test-index {i}: the test set has images 0..{len(test_labels) - 1}")
                images.append(test_images[i])
                names.append(f"test[{i}]")
                truth.append(CLASSES[test_labels[i]])
        batch = np.stack(images)
        if args.mlflow:
            from stages.config import load_or_exit

            uri = f"models:/{load_or_exit().tracking.registered_model}/{args.mlflow}"
            probabilities = probabilities_from_mlflow(uri, batch)
        else:
            from stages.model import CheckpointError

            try:
                probabilities = probabilities_from_checkpoint(args.model, batch)
            except CheckpointError as e:
                raise ImageError(str(e)) from None
    except (ImageError, DataError) as e:
        sys.exit(f"error: {e}")
    for name, true, probs in zip(names, truth, probabilities, strict=True):
        ranked = ", ".join(f"{cls} {p:.1%}" for cls, p in top_k(probs, args.top))
        print(f"{name}: {ranked}" + (f"  (true: {true})" if true else ""))


def cli() -> None:
    run_stage(main)


if __name__ == "__main__":
    cli()
