"""Classify clothing images with the trained model: top-k classes with softmax probabilities.

fmnist-predict shirt.jpg boot.png          # photos, converted to 28x28 grayscale like Fashion-MNIST
fmnist-predict --test-index 0 17 42        # images of the test set, with their true labels
fmnist-predict --mlflow shirt.jpg          # the same through the registered model's champion
fmnist-predict --version 3 shirt.jpg       # ... or its version 3 (--alias NAME: another alias)

The first line says which model answered: the workspace file and its md5 (as in dvc.lock), or the
registered model's version. The registered model itself (what `make serve` serves) answers a table:
a row per image, a column per class by name (T-shirt/top, Trouser, ... Ankle boot).
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np

from stages import ArgumentParser, PipelineError, project_root, run_stage
from stages.data import CLASSES, load_split
from stages.files import open_regular

# Checked from the file's header before any pixel is decoded: a 165 KB palette PNG can declare
# 13000x13000 pixels (2.2 GB decoded). 50 megapixels covers phone photos and keeps decoding
# and conversion under about 0.5 GB.
MAX_PIXELS = 50_000_000


class ImageError(PipelineError):
    """An image that cannot be classified; the message names the file."""


class ModelError(PipelineError):
    """A registered-model version or alias that does not exist or cannot be loaded."""


def load_image(path: Path) -> np.ndarray:
    """A photo as Fashion-MNIST sees clothes: 28x28 grayscale, the item centred on a dark background.

    Fashion-MNIST's images are the product photos trimmed, fitted into 28x28 and negated, so a
    photo on a light background is inverted here too."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    too_large = f"over the limit of {MAX_PIXELS:,} pixels; scale it down"
    try:
        opened = open_regular(path)  # a FIFO, a directory or a symlink loop is refused, not waited on
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except OSError as e:
        raise ImageError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        with opened:
            with warnings.catch_warnings():  # PIL's bomb warning: the check below says it in one line
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(opened)  # reads the header only
            with image:
                width, height = image.size
                if width * height > MAX_PIXELS:
                    raise ImageError(f"{path}: {width}x{height} is {too_large}")
                image.load()
    except Image.DecompressionBombError:  # PIL's own check, in Image.open, for even larger headers
        raise ImageError(f"{path}: {too_large}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ImageError(f"{path}: not an image PIL can read ({e})") from None
    if image.mode not in {"1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I", "F", "CMYK", "YCbCr"}:
        raise ImageError(f"{path}: unsupported image mode {image.mode!r}")
    transparent = image.mode in {"RGBA", "LA", "P"}
    image = image.convert("RGBA" if transparent else "L")
    # 28x28 is the goal: shrinking first bounds the memory of every step after this one.
    image.thumbnail((1024, 1024), Image.Resampling.LANCZOS)
    if transparent:  # transparent areas count as background
        canvas = Image.new("RGBA", image.size, "white")
        canvas.alpha_composite(image)
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


def checkpoint_description(model_path: Path) -> str:
    """The workspace model as DVC knows it: its path and md5 (the value in dvc.lock and run.json)."""
    try:
        shown = model_path.resolve().relative_to(Path.cwd())
    except ValueError:
        shown = model_path
    md5 = hashlib.md5(model_path.read_bytes()).hexdigest() if model_path.is_file() else "missing"
    return f"model: {shown} (md5 {md5})"


def probabilities_from_checkpoint(model_path: Path, images_u8: np.ndarray) -> np.ndarray:
    import torch

    from stages.model import load_checkpoint, to_inputs

    model, _ = load_checkpoint(model_path)
    with torch.inference_mode():
        return model(to_inputs(torch.from_numpy(images_u8))).softmax(1).numpy()


def registered_model_uri(name: str, version_or_alias: str) -> str:
    """`models:/name/3` for a version number (or `latest`), `models:/name@champion` for an alias."""
    if version_or_alias.isdigit() or version_or_alias == "latest":
        return f"models:/{name}/{version_or_alias}"
    return f"models:/{name}@{version_or_alias}"


def probabilities_from_mlflow(name: str, version_or_alias: str, images_u8: np.ndarray) -> tuple[np.ndarray, str]:
    """The registered MLflow model's probabilities (it already ends in a softmax), and which version answered."""
    from stages.tracking import connect, redacted

    store = connect()
    mlflow, client = store.mlflow, store.client
    model_uri = registered_model_uri(name, version_or_alias)
    try:
        if version_or_alias.isdigit():
            version = client.get_model_version(name, version_or_alias)
        else:
            version = client.get_model_version_by_alias(name, version_or_alias)
    except mlflow.exceptions.MlflowException:
        raise ModelError(f"{model_uri}: no such version or alias; {_known_versions(store, name)}") from None
    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except mlflow.exceptions.MlflowException as e:
        reason = str(e).strip().splitlines()[0][:300]
        raise ModelError(redacted(f"{model_uri}: cannot load it from {store.uri}: {reason}")) from None
    import torch  # loading the model imported it already

    from stages.model import to_inputs

    alias = "" if version_or_alias.isdigit() else f" (@{version_or_alias})"
    answered = redacted(f"model: {name} version {version.version}{alias} from {store.uri}")
    answer = model.predict(to_inputs(torch.from_numpy(images_u8)).numpy())
    if hasattr(answer, "columns"):  # a column per class, by name (stages/served_model.py)
        return answer[list(CLASSES)].to_numpy(), answered
    return np.asarray(answer), answered  # versions logged before named columns: 10 numbers in CLASSES order


def _known_versions(store, name: str) -> str:
    """What the user could have asked for instead."""
    try:
        versions = sorted(int(v.version) for v in store.client.search_model_versions(f"name='{name}'"))
        aliases = sorted(store.client.get_registered_model(name).aliases)
    except store.mlflow.exceptions.MlflowException:
        return f"no registered model {name!r} in this store (run the pipeline first)"
    listed = f"versions {', '.join(map(str, versions))}" if versions else "no versions"
    return listed + (f"; aliases {', '.join(aliases)}" if aliases else "; no aliases")


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="*", type=Path, help="PNG or JPEG files")
    parser.add_argument("--test-index", nargs="+", type=int, default=[], metavar="N", help="test-set images")
    parser.add_argument("--top", type=int, default=3, help="how many classes to show (default 3)")
    parser.add_argument("--model", type=Path, default=project_root() / "models" / "model.pt")
    parser.add_argument("--data", type=Path, default=project_root() / "data" / "fashion-mnist")
    parser.add_argument("--mlflow", action="store_true", help="use the registered MLflow model's champion")
    registered = parser.add_mutually_exclusive_group()
    registered.add_argument("--version", help="use this version of the registered model (implies --mlflow)")
    registered.add_argument("--alias", help="use the registered model's version with this alias (implies --mlflow)")
    args = parser.parse_args(argv)
    if not args.images and not args.test_index:
        parser.error("nothing to classify: give image files or --test-index")
    if args.version is not None and not args.version.isdigit():
        parser.error(f"--version {args.version}: not a version number (for an alias, use --alias)")
    if not 1 <= args.top <= len(CLASSES):
        parser.error(f"--top must be 1..{len(CLASSES)}")
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
    if args.mlflow or args.version or args.alias:
        from stages.config import load_params

        asked = args.version or args.alias or "champion"
        name = load_params().tracking.registered_model
        probabilities, answered = probabilities_from_mlflow(name, asked, batch)
    else:
        probabilities = probabilities_from_checkpoint(args.model, batch)
        answered = checkpoint_description(args.model)
    print(answered)
    for name, true, probs in zip(names, truth, probabilities, strict=True):
        ranked = ", ".join(f"{cls} {p:.1%}" for cls, p in top_k(probs, args.top))
        print(f"{name}: {ranked}" + (f"  (true: {true})" if true else ""))


def cli() -> None:
    run_stage(main, entry_point=True)


if __name__ == "__main__":  # `python -m stages.x`: the checkout this code lives in, as before
    run_stage(main)
