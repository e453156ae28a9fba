"""The evaluation's reports: metrics, the scikit-learn report and the pictures, from the model's
test-set outcomes (stages/model.py `outcomes`). Without torch: the evaluate stage imports
scikit-learn and matplotlib here while another process computes the outcomes."""

from __future__ import annotations

import io

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import ConfusionMatrixDisplay, classification_report

from stages.data import CLASSES
from stages.files import json_bytes

matplotlib.use("Agg")  # files only, no display: pyplot picks its backend at the first figure

# Misclassified images are drawn as one mosaic in one axes (36 subplots take seconds to lay out):
# each cell is a 28x28 image with a caption band above it and a margin either side.
MOSAIC_COLUMNS = 6
CAPTION_HEIGHT = 12
CELL_MARGIN = 6
CELL = 28 + CAPTION_HEIGHT  # square cells: 28 + 2 * CELL_MARGIN == CELL
INCHES_PER_CELL = (1.6, 1.9)  # width, height: room for two caption lines


def compute_metrics(test_loss: float, actual, predicted) -> tuple[dict, dict, str]:
    """(metrics for DVC, report as dict, report as text)."""
    kwargs = dict(labels=list(range(len(CLASSES))), target_names=list(CLASSES), digits=4, zero_division=0)
    report = classification_report(actual, predicted, output_dict=True, **kwargs)
    text = classification_report(actual, predicted, **kwargs)
    metrics = {"test_loss": test_loss, "test_acc": report["accuracy"]}
    for avg in ("macro", "weighted"):
        for name in ("precision", "recall", "f1-score"):
            metrics[f"{name.replace('-score', '')}_{avg}"] = report[f"{avg} avg"][name]
    return metrics, report, text


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def draw_curves(history: list[dict]) -> bytes:
    """The book's training plot: train loss, train accuracy and held-out accuracy per epoch."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    epochs = [row["epoch"] for row in history]
    for key, style in (("train_loss", "-"), ("train_acc", "m--"), ("test_acc", "g-."), ("val_acc", "g-.")):
        if history[0].get(key) is not None:
            ax.plot(epochs, [row[key] for row in history], style, label=key.replace("_", " "))
    ax.set(xlabel="epoch", xlim=(1, max(epochs[-1], 2)), ylim=(0.3, 0.9))
    ax.grid(True)
    ax.legend()
    return _png(fig)


def draw_confusion(actual, predicted) -> bytes:
    fig, ax = plt.subplots(figsize=(8, 7))
    ConfusionMatrixDisplay.from_predictions(
        actual, predicted, labels=list(range(len(CLASSES))), display_labels=CLASSES,
        ax=ax, xticks_rotation=45, colorbar=False,
    )  # fmt: skip
    return _png(fig)


def draw_misclassified(images_u8, actual, predicted, probabilities, limit: int) -> bytes:
    """The first `limit` misclassified test images, each captioned with truth and prediction."""
    wrong = np.flatnonzero(predicted != actual)[:limit]
    rows = max(1, -(-len(wrong) // MOSAIC_COLUMNS))
    mosaic = np.zeros((rows * CELL, MOSAIC_COLUMNS * CELL))
    fig, ax = plt.subplots(figsize=(MOSAIC_COLUMNS * INCHES_PER_CELL[0], rows * INCHES_PER_CELL[1]))
    for k, i in enumerate(wrong):
        top, left = (k // MOSAIC_COLUMNS) * CELL, (k % MOSAIC_COLUMNS) * CELL
        mosaic[top + CAPTION_HEIGHT : top + CELL, left + CELL_MARGIN : left + CELL - CELL_MARGIN] = images_u8[i]
        caption = f"true: {CLASSES[actual[i]]}\npred: {CLASSES[predicted[i]]} {probabilities[i, predicted[i]]:.0%}"
        ax.text(left + CELL / 2, top + CAPTION_HEIGHT - 1, caption, ha="center", va="bottom", fontsize=7)
    ax.imshow(mosaic, cmap="gray_r", vmin=0, vmax=255)
    ax.axis("off")
    return _png(fig)


def report_files(history, test_loss, labels, predicted, probabilities, images_u8, grid: int):
    """(metrics, every report file by name): the stage's outputs, as bytes."""
    actual = np.asarray(labels, dtype=np.int64)
    metrics, report, text = compute_metrics(test_loss, actual, predicted)
    confusion = [{"actual": CLASSES[a], "predicted": CLASSES[p]} for a, p in zip(actual, predicted, strict=True)]
    return metrics, {
        "metrics.json": json_bytes(metrics),
        "classification_report.txt": text.encode(),
        "classification_report.json": json_bytes(report),
        "confusion.json": json_bytes(confusion),
        "curves.png": draw_curves(history),
        "confusion.png": draw_confusion(actual, predicted),
        "misclassified.png": draw_misclassified(images_u8, actual, predicted, probabilities, grid),
    }
