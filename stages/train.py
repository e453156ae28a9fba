"""Train stage: softmax regression on Fashion-MNIST, as in D2L 3.7 (train_ch3), reproducibly.

    python -m stages.train --data data/fashion-mnist --model models/model.pt \
        --history reports/train/history.json --run-info reports/train/run.json
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

from tqdm import tqdm

from stages import ArgumentParser, PipelineError, check_interrupt, determinism, files, run_stage, tracking
from stages.config import ConfigError, Params, load_params
from stages.data import load_split, verify_dir


class DivergedError(PipelineError):
    pass


# A mean loss this far above uniform guessing (ln 10) means confidently wrong everywhere. Softmax
# regression's loss grows with lr but rarely turns NaN (lr=1000 gives ~3500, still finite).
DIVERGED_LOSS = 100 * math.log(10)


def split_validation(n: int, cfg: Params):
    """Indices (train, val): `val_size` examples carved off the training set by `val_seed`."""
    import torch

    if cfg.val_size == 0:
        return torch.arange(n), None
    if cfg.val_size >= n:
        raise ConfigError(f"params.yaml: val_size: {cfg.val_size} leaves no training data (the set has {n})")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.val_seed))
    return order[cfg.val_size :].sort().values, order[: cfg.val_size].sort().values


def accuracy(model, inputs, labels, batch_size: int = 10_000) -> float:
    """Fraction of correct argmax predictions, like d2l.evaluate_accuracy."""
    import torch

    model.eval()
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(labels), batch_size):
            logits = model(inputs[start : start + batch_size])
            correct += int((logits.argmax(1) == labels[start : start + batch_size]).sum())
    return correct / len(labels)


def train_epoch(model, loss_fn, optimizer, inputs, labels, batch_size: int, generator, lr: float, epoch: int):
    """One pass in shuffled minibatches; returns (mean train loss, train accuracy) as train_ch3 does.

    Minibatches are gathered row by row from one tensor (the book's per-sample DataLoader costs
    ~20x more); gathering per batch keeps each batch in cache for the matrix products."""
    import torch

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
            raise DivergedError(
                f"training diverged: loss {batch_loss / len(y):.4g} at epoch {epoch}, batch {start // batch_size + 1} "
                f"(uniform guessing gives {math.log(10):.2f}); lower lr (now {lr})"
            )
        loss_sum += batch_loss
        correct += int((logits.argmax(1) == y).sum())
    return loss_sum / len(labels), correct / len(labels)


def fit(model, train_set, eval_set, cfg: Params, eval_name: str = "test_acc", progress: bool = True, on_epoch=None):
    """Train for cfg.num_epochs (or until `patience` epochs pass without a better eval accuracy).
    `on_epoch(row)` sees each epoch's history row as it ends (MLflow logs it with its real time).

    Returns the per-epoch history and the epoch whose weights the model holds at the end."""
    import torch
    from torch import nn

    loss_fn = nn.CrossEntropyLoss(reduction="none")  # on logits: the LogSumExp-stable path
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    history, best_acc, best_epoch, best_state = [], -1.0, 0, None
    # The live bar only on a terminal; logs (dvc, CI) get one line per epoch.
    bar = tqdm(range(1, cfg.num_epochs + 1), desc="train", unit="epoch", disable=None if progress else True)
    for epoch in bar:
        loss, acc = train_epoch(model, loss_fn, optimizer, *train_set, cfg.batch_size, generator, cfg.lr, epoch)
        eval_acc = accuracy(model, *eval_set)
        # Both columns in every row, the unmeasured one null, so `dvc plots` draws either kind of run.
        history.append({"epoch": epoch, "train_loss": loss, "train_acc": acc, "test_acc": None, "val_acc": None})
        history[-1][eval_name] = eval_acc
        if on_epoch is not None:
            on_epoch(history[-1])
        bar.set_postfix(loss=f"{loss:.4f}", train_acc=f"{acc:.3f}", **{eval_name: f"{eval_acc:.3f}"})
        bar.write(f"epoch {epoch:3d}  train_loss {loss:.4f}  train_acc {acc:.4f}  {eval_name} {eval_acc:.4f}")
        if cfg.patience:
            if eval_acc > best_acc:
                best_acc, best_epoch = eval_acc, epoch
                best_state = {k: v.clone() for k, v in model.state_dict().items()}
            elif epoch - best_epoch >= cfg.patience:
                bar.write(f"early stop: no better {eval_name} for {cfg.patience} epochs; keeping epoch {best_epoch}")
                break
    if best_state is not None:
        model.load_state_dict(best_state)
        return history, best_epoch
    return history, len(history)


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--history", type=Path, required=True)
    parser.add_argument("--run-info", type=Path, required=True)
    args = parser.parse_args(argv)
    params = load_params()  # before any heavy import: a bad value costs a fraction of a second
    determinism.apply(params.determinism)

    import torch

    from stages.model import build_model, checkpoint_bytes, resolve_device, to_inputs

    determinism.threads(params.determinism)
    device = resolve_device(params.device)
    if device.type == "cuda":  # the CPU kernels used here are deterministic already
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    train_images, train_labels = load_split(args.data, "train")
    test_images, test_labels = load_split(args.data, "test")
    data_sha256 = verify_dir(args.data)  # after the shape and range checks, whose messages say more

    def on_device(images, labels, index=None):
        """Float inputs in [0, 1] and int64 labels, converted once for all epochs."""
        images, labels = to_inputs(torch.from_numpy(images)), torch.from_numpy(labels).long()
        if index is not None:
            images, labels = images[index], labels[index]
        return images.to(device), labels.to(device)

    train_idx, val_idx = split_validation(len(train_labels), params)
    train_set = on_device(train_images, train_labels, train_idx)
    if val_idx is not None:  # the test set stays untouched until the evaluate stage
        eval_set, eval_name = on_device(train_images, train_labels, val_idx), "val_acc"
    else:
        eval_set, eval_name = on_device(test_images, test_labels), "test_acc"

    torch.manual_seed(params.seed)
    model = build_model(params.init_std).to(device)
    with tracking.training_run(params, data_sha256=data_sha256) as run, files.Outputs() as out:
        history, kept_epoch = fit(model, train_set, eval_set, params, eval_name, on_epoch=run.log_epoch)
        checkpoint = checkpoint_bytes(model, params.hyperparameters(), kept_epoch=kept_epoch)
        model_md5 = hashlib.md5(checkpoint).hexdigest()
        history_json = (json.dumps(history, indent=2) + "\n").encode()
        run.log_training(history, kept_epoch, history_json)
        run.log_model(model, to_inputs(torch.from_numpy(test_images[:2])))  # two images: the batch stays dynamic
        run.link_model(model_md5)
        # Only what the same params and data reproduce: no run id, so a rerun leaves dvc.lock as it was.
        run_info = {"epochs_run": len(history), "kept_epoch": kept_epoch, "model_md5": model_md5}
        out.write_bytes(args.model, checkpoint)
        out.write_bytes(args.history, history_json)
        out.write_json(args.run_info, run_info)
        check_interrupt()  # the last safe point: after it, all three files move into place together
    row = history[kept_epoch - 1]
    print(f"saved {args.model} (epoch {kept_epoch}: {eval_name} {row[eval_name]:.4f}); MLflow run {run.run_id}")


if __name__ == "__main__":
    run_stage(main)
