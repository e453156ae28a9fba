"""The evaluation's work: test-set predictions, metrics, the classification report and the pictures.

The report and the confusion matrix picture are scikit-learn's (`classification_report`,
`ConfusionMatrixDisplay`), computed here with the same numpy operations in the same order, so the
files are the same bytes (tests/test_evaluate.py compares them with scikit-learn's): importing
scikit-learn and SciPy took ~1.5 s of every evaluation, for ten counts per class.

Imports torch and matplotlib at the top: the evaluate stage imports this module only after
determinism is applied."""

from __future__ import annotations

import io
import itertools

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch

from stages.data import CLASSES
from stages.files import json_bytes
from stages.model import to_inputs

matplotlib.use("Agg")  # files only, no display: pyplot picks its backend at the first figure

# Misclassified images are drawn as one mosaic in one axes (36 subplots take seconds to lay out):
# each cell is a 28x28 image with a caption band above it and a margin either side.
MOSAIC_COLUMNS = 6
CAPTION_HEIGHT = 12
CELL_MARGIN = 6
CELL = 28 + CAPTION_HEIGHT  # square cells: 28 + 2 * CELL_MARGIN == CELL
INCHES_PER_CELL = (1.6, 1.9)  # width, height: room for two caption lines


def predict(model, images_u8, batch_size: int):
    """Logits for uint8 images, in batches."""
    with torch.inference_mode():
        return torch.cat(
            [model(to_inputs(images_u8[i : i + batch_size])) for i in range(0, len(images_u8), batch_size)]
        )


def confusion_matrix(actual, predicted, classes: int):
    """Counts: row = true class, column = predicted class (scikit-learn's `confusion_matrix`)."""
    return np.bincount(actual * classes + predicted, minlength=classes * classes).reshape(classes, classes)


def _divide(numerator, denominator):
    """Elementwise in float64, 0 where the denominator is 0 (scikit-learn's `zero_division=0`)."""
    denominator = np.asarray(denominator, dtype=np.float64).copy()
    empty = denominator == 0
    denominator[empty] = 1
    result = np.asarray(numerator, dtype=np.float64) / denominator
    result[empty] = 0.0
    return result


def _scores(tp, pred_sum, true_sum):
    """(precision, recall, f1) per entry, as scikit-learn's `precision_recall_fscore_support`."""
    f1 = _divide(2.0 * tp.astype(np.float64), 1.0 * true_sum.astype(np.float64) + pred_sum.astype(np.float64))
    return _divide(tp, pred_sum), _divide(tp, true_sum), f1


def classification_report(confusion, names: list[str], digits: int = 4) -> tuple[dict, str]:
    """scikit-learn's `classification_report(..., digits=4, zero_division=0)`, as a dict and as text."""
    tp, pred_sum, true_sum = np.diag(confusion), confusion.sum(0), confusion.sum(1)
    if not tp.any():  # no prediction right: scikit-learn's counts are floats then ("1000.0" in the text)
        tp, pred_sum, true_sum = (counts.astype(np.float64) for counts in (tp, pred_sum, true_sum))
    precision, recall, f1 = _scores(tp, pred_sum, true_sum)
    headers = ["precision", "recall", "f1-score", "support"]
    rows = list(zip(names, precision, recall, f1, true_sum, strict=True))
    micro = [float(np.nanmean(v)) for v in _scores(*(np.reshape(x.sum(), (1,)) for x in (tp, pred_sum, true_sum)))]
    averages = {
        "accuracy": micro,
        "macro avg": [float(np.nanmean(v)) for v in (precision, recall, f1)],
        "weighted avg": [float(np.average(v, weights=true_sum)) for v in (precision, recall, f1)],
    }
    support = np.sum(true_sum)
    report = {name: dict(zip(headers, map(float, scores), strict=True)) for name, *scores in rows}
    report |= {heading: dict(zip(headers, [*avg, float(support)], strict=True)) for heading, avg in averages.items()}
    report["accuracy"] = report["accuracy"]["precision"]

    width = max(max(len(name) for name in names), len("weighted avg"), digits)
    row = "{:>{width}s} " + " {:>9.{digits}f}" * 3 + " {:>9}\n"
    text = ("{:>{width}s} " + " {:>9}" * len(headers)).format("", *headers, width=width) + "\n\n"
    text += "".join(row.format(*r, width=width, digits=digits) for r in rows) + "\n"
    accuracy_row = "{:>{width}s} " + " {:>9.{digits}}" * 2 + " {:>9.{digits}f}" + " {:>9}\n"
    text += accuracy_row.format("accuracy", "", "", micro[2], support, width=width, digits=digits)
    for heading in ("macro avg", "weighted avg"):
        text += row.format(heading, *averages[heading], support, width=width, digits=digits)
    return report, text


def compute_metrics(logits, labels) -> tuple[dict, dict, str]:
    """(metrics for DVC, report as dict, report as text)."""
    loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item() / len(labels)
    predicted = logits.argmax(1).cpu().numpy()
    actual = labels.cpu().numpy()
    report, text = classification_report(confusion_matrix(actual, predicted, len(CLASSES)), list(CLASSES))
    metrics = {"test_loss": loss, "test_acc": report["accuracy"]}
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
    """scikit-learn's `ConfusionMatrixDisplay.from_predictions(..., xticks_rotation=45, colorbar=False)`."""
    confusion = confusion_matrix(actual, predicted, len(CLASSES))
    fig, ax = plt.subplots(figsize=(8, 7))
    image = ax.imshow(confusion, interpolation="nearest", cmap="viridis")
    dark, light = image.cmap(0), image.cmap(1.0)
    middle = (confusion.max() + confusion.min()) / 2.0
    for i, j in itertools.product(range(len(CLASSES)), repeat=2):
        count = confusion[i, j]
        text = min(format(count, ".2g"), format(count, "d"), key=len)  # "d" only when shorter, as scikit-learn
        ax.text(j, i, text, ha="center", va="center", color=light if count < middle else dark)
    ticks = np.arange(len(CLASSES))
    ax.set(
        xticks=ticks,
        yticks=ticks,
        xticklabels=CLASSES,
        yticklabels=CLASSES,
        ylabel="True label",
        xlabel="Predicted label",
    )
    ax.set_ylim((len(CLASSES) - 0.5, -0.5))
    plt.setp(ax.get_xticklabels(), rotation=45)
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


def report_files(history: list[dict], logits, labels, images_u8, grid: int) -> tuple[dict, dict[str, bytes]]:
    """(metrics, every report file by name): the stage's outputs, as bytes."""
    metrics, report, text = compute_metrics(logits, labels)
    actual, predicted = labels.cpu().numpy(), logits.argmax(1).cpu().numpy()
    confusion = [{"actual": CLASSES[a], "predicted": CLASSES[p]} for a, p in zip(actual, predicted, strict=True)]
    probabilities = logits.softmax(1).cpu().numpy()
    return metrics, {
        "metrics.json": json_bytes(metrics),
        "classification_report.txt": text.encode(),
        "classification_report.json": json_bytes(report),
        "confusion.json": json_bytes(confusion),
        "curves.png": draw_curves(history),
        "confusion.png": draw_confusion(actual, predicted),
        "misclassified.png": draw_misclassified(images_u8, actual, predicted, probabilities, grid),
    }
