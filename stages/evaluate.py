"""Evaluate stage: test-set metrics, scikit-learn classification report, confusion matrix, pictures.

    python -m stages.evaluate --data data/fashion-mnist --model models/model.pt \
        --history reports/train/history.json --run-info reports/train/run.json --out reports/eval
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from stages import determinism, files, run_stage
from stages.config import load_or_exit


def predict(model, images_u8, batch_size: int):
    """Logits for uint8 images, in batches."""
    import torch

    from stages.model import to_inputs

    with torch.inference_mode():
        return torch.cat(
            [model(to_inputs(images_u8[i : i + batch_size])) for i in range(0, len(images_u8), batch_size)]
        )


def compute_metrics(logits, labels) -> tuple[dict, dict, str]:
    """(metrics for DVC, report as dict, report as text)."""
    import torch
    from sklearn.metrics import classification_report

    from stages.data import CLASSES

    loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item() / len(labels)
    predicted = logits.argmax(1).cpu().numpy()
    actual = labels.cpu().numpy()
    kwargs = dict(labels=list(range(len(CLASSES))), target_names=list(CLASSES), digits=4, zero_division=0)
    report = classification_report(actual, predicted, output_dict=True, **kwargs)
    text = classification_report(actual, predicted, **kwargs)
    metrics = {"test_loss": loss, "test_acc": report["accuracy"]}
    for avg in ("macro", "weighted"):
        for name in ("precision", "recall", "f1-score"):
            metrics[f"{name.replace('-score', '')}_{avg}"] = report[f"{avg} avg"][name]
    return metrics, report, text


def draw_pictures(out: Path, history: list[dict], logits, labels, images_u8, grid: int) -> list[Path]:
    """The book's training curves, the confusion matrix and a grid of misclassified test images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from sklearn.metrics import ConfusionMatrixDisplay

    from stages.data import CLASSES

    paths = []

    def save(fig, name):
        path = out / name
        fig.savefig(path, dpi=100, bbox_inches="tight", metadata={"Software": None})
        plt.close(fig)
        paths.append(path)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    epochs = [row["epoch"] for row in history]
    for key, style in (("train_loss", "-"), ("train_acc", "m--"), ("test_acc", "g-."), ("val_acc", "g-.")):
        if history[0].get(key) is not None:
            ax.plot(epochs, [row[key] for row in history], style, label=key.replace("_", " "))
    ax.set(xlabel="epoch", xlim=(1, max(epochs[-1], 2)), ylim=(0.3, 0.9))
    ax.grid(True)
    ax.legend()
    save(fig, "curves.png")

    predicted = logits.argmax(1).cpu().numpy()
    actual = labels.cpu().numpy()
    fig, ax = plt.subplots(figsize=(8, 7))
    ConfusionMatrixDisplay.from_predictions(
        actual, predicted, labels=list(range(len(CLASSES))), display_labels=CLASSES,
        ax=ax, xticks_rotation=45, colorbar=False,
    )  # fmt: skip
    save(fig, "confusion.png")

    # One mosaic image in one axes: 36 separate subplots take seconds to lay out.
    probabilities = logits.softmax(1).cpu().numpy()
    wrong = np.flatnonzero(predicted != actual)[:grid]
    cols, cell = 6, 28 + 12
    rows = max(1, -(-len(wrong) // cols))
    mosaic = np.zeros((rows * cell, cols * cell))
    fig, ax = plt.subplots(figsize=(cols * 1.6, rows * 1.9))
    for k, i in enumerate(wrong):
        r, c = divmod(k, cols)
        mosaic[r * cell + 12 : r * cell + 40, c * cell + 6 : c * cell + 34] = images_u8[i]
        caption = f"true: {CLASSES[actual[i]]}\npred: {CLASSES[predicted[i]]} {probabilities[i, predicted[i]]:.0%}"
        ax.text(c * cell + 20, r * cell + 11, caption, ha="center", va="bottom", fontsize=7)
    ax.imshow(mosaic, cmap="gray_r", vmin=0, vmax=255)
    ax.axis("off")
    save(fig, "misclassified.png")
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--history", type=Path, required=True)
    parser.add_argument("--run-info", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    params = load_or_exit()
    cfg = params.evaluate
    try:
        history = json.loads(args.history.read_text())
        run_id = json.loads(args.run_info.read_text())["mlflow_run_id"]
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"error: cannot read training outputs: {e}") from None

    determinism.apply(params.train.determinism)
    import torch

    from stages import tracking
    from stages.data import CLASSES, DataError, load_split
    from stages.model import CheckpointError, load_checkpoint

    determinism.threads(params.train.determinism)

    try:
        model, _ = load_checkpoint(args.model)
        images, labels = load_split(args.data, "test")
    except (CheckpointError, DataError) as e:
        raise SystemExit(f"error: {e}") from None
    with tracking.evaluation_run(run_id) as run:
        labels_t = torch.from_numpy(labels).long()
        logits = predict(model, torch.from_numpy(images), cfg.batch_size)
        metrics, report, text = compute_metrics(logits, labels_t)
        args.out.mkdir(parents=True, exist_ok=True)
        predicted = logits.argmax(1).tolist()
        confusion = [{"actual": CLASSES[a], "predicted": CLASSES[p]} for a, p in zip(labels, predicted, strict=True)]
        files.write_json(args.out / "confusion.json", confusion)
        files.write_json(args.out / "classification_report.json", report)
        files.write_text(args.out / "classification_report.txt", text)
        pictures = draw_pictures(args.out, history, logits, labels_t, images, cfg.misclassified_grid)
        files.write_json(args.out / "metrics.json", metrics)
        reports = ["metrics.json", "classification_report.txt", "classification_report.json", "confusion.json"]
        settings = {f"evaluate.{k}": v for k, v in vars(cfg).items()}
        run.log_evaluation(metrics, settings, [args.out / name for name in reports] + pictures)
    print(text)
    print(f"test_acc {metrics['test_acc']:.4f}  test_loss {metrics['test_loss']:.4f}  (MLflow run {run_id})")


if __name__ == "__main__":
    run_stage(main)
