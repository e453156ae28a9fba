import json
import math

import numpy as np
import pytest
import torch

from stages.data import CLASSES
from stages.model import build_model, outcomes, predict
from stages.reports import compute_metrics, report_files
from tests.helpers import synthetic_split


def logits_for(predicted: list[int], confidence: float = 4.0) -> torch.Tensor:
    logits = torch.zeros(len(predicted), len(CLASSES))
    logits[torch.arange(len(predicted)), torch.tensor(predicted)] = confidence
    return logits


def test_metrics_count_what_is_right():
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    predicted = [0, 1, 2, 3, 4, 5, 6, 7, 8, 0]  # the last ankle boot taken for a T-shirt
    loss, predicted_classes, _ = outcomes(logits_for(predicted), labels)
    metrics, report, text = compute_metrics(loss, labels.numpy(), predicted_classes)
    assert metrics["test_acc"] == 0.9 == report["accuracy"]
    # Cross-entropy of a 4-logit margin over nine zeros, for the nine right; the wrong one sees 0 vs 4.
    right, wrong = math.log(math.exp(4) + 9) - 4, math.log(math.exp(4) + 9)
    assert metrics["test_loss"] == pytest.approx((9 * right + wrong) / 10, rel=1e-6)
    assert report["Ankle boot"]["recall"] == 0 and report["T-shirt/top"]["precision"] == 0.5
    assert metrics["recall_macro"] == pytest.approx(0.9) and metrics["precision_macro"] == pytest.approx(0.85)
    assert set(metrics) == {
        "test_loss", "test_acc",
        "precision_macro", "recall_macro", "f1_macro",
        "precision_weighted", "recall_weighted", "f1_weighted",
    }  # fmt: skip
    assert "Ankle boot" in text and "accuracy" in text


def test_a_class_never_predicted_scores_zero_without_warnings():
    labels = torch.arange(10)
    with np.errstate(all="raise"):
        loss, predicted, _ = outcomes(logits_for([0] * 10), labels)
        metrics, report, _ = compute_metrics(loss, labels.numpy(), predicted)
    assert metrics["test_acc"] == 0.1 and report["Trouser"]["precision"] == 0


def test_reports_are_every_output_and_agree_with_each_other():
    images, labels = synthetic_split(60, 3)
    torch.manual_seed(0)
    model = build_model(0.01)
    logits = predict(model, torch.from_numpy(images), batch_size=16)
    history = [{"epoch": 1, "train_loss": 2.0, "train_acc": 0.3, "test_acc": 0.4, "val_acc": None}]
    loss, predicted, probabilities = outcomes(logits, torch.from_numpy(labels).long())
    metrics, outputs = report_files(history, loss, labels, predicted, probabilities, images, grid=6)
    assert set(outputs) == {
        "metrics.json", "classification_report.txt", "classification_report.json", "confusion.json",
        "curves.png", "confusion.png", "misclassified.png",
    }  # fmt: skip
    assert json.loads(outputs["metrics.json"]) == metrics
    assert json.loads(outputs["classification_report.json"])["accuracy"] == metrics["test_acc"]
    confusion = json.loads(outputs["confusion.json"])
    assert len(confusion) == 60 and confusion[0]["actual"] == CLASSES[labels[0]]
    right = sum(row["actual"] == row["predicted"] for row in confusion)
    assert right / 60 == metrics["test_acc"]
    assert all(outputs[name].startswith(b"\x89PNG") for name in ("curves.png", "confusion.png", "misclassified.png"))
    # The same inputs draw the same bytes: DVC hashes the pictures.
    assert report_files(history, loss, labels, predicted, probabilities, images, grid=6)[1] == outputs
