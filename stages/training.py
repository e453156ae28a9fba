"""The training loop of D2L 3.7 (train_ch3), reproducibly: data on the device, the split, the epochs.

Imports torch at the top: the train stage imports this module only after determinism is applied."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from tqdm import tqdm

from stages import PipelineError, check_interrupt
from stages.config import ConfigError, Params
from stages.data import load_split
from stages.model import build_model, resolve_device, to_inputs

# A mean loss this far above uniform guessing (ln 10) means confidently wrong everywhere. Softmax
# regression's loss grows with lr but rarely turns NaN (lr=1000 gives ~3500, still finite).
DIVERGED_LOSS = 100 * math.log(10)


class DivergedError(PipelineError):
    """A runaway loss; `train_epoch` knows the batch, `fit` adds the epoch and the lr."""

    def __init__(self, loss: float, batch: int, epoch: int | None = None, lr: float | None = None):
        self.loss, self.batch, self.epoch, self.lr = loss, batch, epoch, lr
        where = f"epoch {epoch}, batch {batch}" if epoch is not None else f"batch {batch}"
        advice = f"lower lr (now {lr})" if lr is not None else "lower lr"
        super().__init__(
            f"training diverged: loss {loss:.4g} at {where} (uniform guessing gives {math.log(10):.2f}); {advice}"
        )


class Datasets(NamedTuple):
    train: tuple[torch.Tensor, torch.Tensor]
    eval: tuple[torch.Tensor, torch.Tensor]
    eval_name: str  # "val_acc" with a validation split, else "test_acc"
    example: torch.Tensor  # two test images, as the logged model's input example


def device_for(setting: str) -> torch.device:
    device = resolve_device(setting)
    if device.type == "cuda":  # the CPU kernels used here are deterministic already
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    return device


def split_validation(n: int, params: Params):
    """Indices (train, val): `val_size` examples carved off the training set by `val_seed`."""
    if params.val_size == 0:
        return torch.arange(n), None
    if params.val_size >= n:
        raise ConfigError(f"params.yaml: val_size: {params.val_size} leaves no training data (the set has {n})")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(params.val_seed))
    return order[params.val_size :].sort().values, order[: params.val_size].sort().values


def load_datasets(data_dir: Path, params: Params, device: torch.device) -> Datasets:
    """The training set (less the validation split) and the held-out set, converted once for all epochs."""
    train_images, train_labels = load_split(data_dir, "train")
    test_images, test_labels = load_split(data_dir, "test")

    def on_device(images, labels, index=None):
        """Float inputs in [0, 1] and int64 labels."""
        images, labels = to_inputs(torch.from_numpy(images)), torch.from_numpy(labels).long()
        if index is not None:
            images, labels = images[index], labels[index]
        return images.to(device), labels.to(device)

    train_idx, val_idx = split_validation(len(train_labels), params)
    train_set = on_device(train_images, train_labels, train_idx)
    example = to_inputs(torch.from_numpy(test_images[:2]))  # two images: the batch stays dynamic
    if val_idx is not None:  # the test set stays untouched until the evaluate stage
        return Datasets(train_set, on_device(train_images, train_labels, val_idx), "val_acc", example)
    return Datasets(train_set, on_device(test_images, test_labels), "test_acc", example)


def new_model(params: Params, device: torch.device) -> nn.Sequential:
    torch.manual_seed(params.seed)
    return build_model(params.init_std).to(device)


def accuracy(model, inputs, labels, batch_size: int = 10_000) -> float:
    """Fraction of correct argmax predictions, like d2l.evaluate_accuracy."""
    model.eval()
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(labels), batch_size):
            logits = model(inputs[start : start + batch_size])
            correct += int((logits.argmax(1) == labels[start : start + batch_size]).sum())
    return correct / len(labels)


def train_epoch(model, loss_fn, optimizer, inputs, labels, *, batch_size: int, generator) -> tuple[float, float]:
    """One pass in shuffled minibatches; returns (mean train loss, train accuracy) as train_ch3 does.

    Minibatches are gathered row by row from one tensor (the book's per-sample DataLoader costs
    ~20x more); gathering per batch keeps each batch in cache for the matrix products."""
    model.train()
    order = torch.randperm(len(labels), generator=generator).to(labels.device)
    loss_sum, correct = 0.0, 0
    for start in range(0, len(labels), batch_size):
        check_interrupt()  # between batches: stopping here leaves every output as it was
        batch = order[start : start + batch_size]
        X, y = inputs.index_select(0, batch), labels.index_select(0, batch)
        logits = model(X)
        losses = loss_fn(logits, y)
        optimizer.zero_grad()
        losses.mean().backward()
        optimizer.step()
        batch_loss = float(losses.detach().sum())
        if not batch_loss / len(y) < DIVERGED_LOSS:  # also catches nan
            raise DivergedError(batch_loss / len(y), batch=start // batch_size + 1)
        loss_sum += batch_loss
        correct += int((logits.argmax(1) == y).sum())
    return loss_sum / len(labels), correct / len(labels)


def fit(model, train_set, eval_set, params: Params, *, eval_name="test_acc", progress=True, on_epoch=None):
    """Train for params.num_epochs (or until `patience` epochs pass without a better eval accuracy).
    `on_epoch(row)` sees each epoch's history row as it ends (MLflow logs it with its real time).

    Returns the per-epoch history and the epoch whose weights the model holds at the end."""
    loss_fn = nn.CrossEntropyLoss(reduction="none")  # on logits: the LogSumExp-stable path
    optimizer = torch.optim.SGD(
        model.parameters(), lr=params.lr, momentum=params.momentum, weight_decay=params.weight_decay
    )
    generator = torch.Generator().manual_seed(params.seed)
    history, best_acc, best_epoch, best_state = [], -1.0, 0, None
    # The live bar only on a terminal; logs (dvc, CI) get one line per epoch.
    bar = tqdm(range(1, params.num_epochs + 1), desc="train", unit="epoch", disable=None if progress else True)
    for epoch in bar:
        try:
            loss, acc = train_epoch(
                model, loss_fn, optimizer, *train_set, batch_size=params.batch_size, generator=generator
            )
        except DivergedError as e:
            raise DivergedError(e.loss, e.batch, epoch=epoch, lr=params.lr) from None
        eval_acc = accuracy(model, *eval_set)
        # Both columns in every row, the unmeasured one null, so `dvc plots` draws either kind of run.
        history.append({"epoch": epoch, "train_loss": loss, "train_acc": acc, "test_acc": None, "val_acc": None})
        history[-1][eval_name] = eval_acc
        if on_epoch is not None:
            on_epoch(history[-1])
        bar.set_postfix(loss=f"{loss:.4f}", train_acc=f"{acc:.3f}", **{eval_name: f"{eval_acc:.3f}"})
        bar.write(f"epoch {epoch:3d}  train_loss {loss:.4f}  train_acc {acc:.4f}  {eval_name} {eval_acc:.4f}")
        if params.patience:
            if eval_acc > best_acc:
                best_acc, best_epoch = eval_acc, epoch
                best_state = {k: v.clone() for k, v in model.state_dict().items()}
            elif epoch - best_epoch >= params.patience:
                bar.write(f"early stop: no better {eval_name} for {params.patience} epochs; keeping epoch {best_epoch}")
                break
    if best_state is not None:
        model.load_state_dict(best_state)
        return history, best_epoch
    return history, len(history)
