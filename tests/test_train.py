import io

import pytest
import torch

from stages.config import ConfigError, parse_params
from stages.model import build_model, to_inputs
from stages.training import DivergedError, accuracy, fit, split_validation
from tests.helpers import default_params, synthetic_split


def tiny_params(**changes):
    params = parse_params(default_params())
    return params.model_copy(update={"num_epochs": 2, "batch_size": 64, **changes})


def tensors(n, seed):
    images, labels = synthetic_split(n, seed)
    return to_inputs(torch.from_numpy(images)), torch.from_numpy(labels).long()


def train_once(params):
    torch.manual_seed(params.seed)
    model = build_model(params.init_std)
    history, kept = fit(model, tensors(600, 1), tensors(200, 2), params, progress=False)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return history, kept, buffer.getvalue()


def test_history_has_the_books_three_numbers_per_epoch():
    history, kept, _ = train_once(tiny_params())
    assert [row["epoch"] for row in history] == [1, 2] and kept == 2
    assert set(history[0]) == {"epoch", "train_loss", "train_acc", "test_acc", "val_acc"}
    assert history[0]["val_acc"] is None  # no validation split: the book's setup
    assert history[1]["train_loss"] < history[0]["train_loss"]
    assert history[1]["test_acc"] > 0.5  # the synthetic classes are easy


def test_same_params_same_bytes_and_metrics():
    assert train_once(tiny_params()) == train_once(tiny_params())
    assert train_once(tiny_params())[2] != train_once(tiny_params(seed=1))[2]


def test_matches_a_plain_reference_loop():
    """Batching from one tensor may not change a single bit against the plainest loop."""
    params = tiny_params()
    _, _, ours = train_once(params)
    images, labels = synthetic_split(600, 1)
    inputs, labels = torch.from_numpy(images).float() / 255, torch.from_numpy(labels).long()
    torch.manual_seed(params.seed)
    model = build_model(params.init_std)
    loss_fn = torch.nn.CrossEntropyLoss(reduction="none")
    optimizer = torch.optim.SGD(model.parameters(), lr=params.lr)
    generator = torch.Generator().manual_seed(params.seed)
    for _ in range(params.num_epochs):
        order = torch.randperm(len(labels), generator=generator)
        for batch in order.split(params.batch_size):
            optimizer.zero_grad()
            loss_fn(model(inputs[batch]), labels[batch]).mean().backward()
            optimizer.step()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    assert buffer.getvalue() == ours


@pytest.mark.parametrize("lr, loss, shown", [(1e38, "nan", r"1e\+38"), (1000.0, r"[\d.]+", "1000.0")])
def test_divergence_stops_at_the_first_runaway_loss_naming_lr(lr, loss, shown):
    pattern = rf"loss {loss} at epoch 1, batch \d+ \(uniform guessing gives 2.30\); lower lr \(now {shown}\)"
    with pytest.raises(DivergedError, match=pattern):
        train_once(tiny_params(lr=lr))


def test_a_large_but_sane_lr_is_not_divergence():
    history, _, _ = train_once(tiny_params(lr=1.0))
    assert history[-1]["train_loss"] < 2.3


def test_validation_split_is_carved_from_training_by_seed():
    params = tiny_params(val_size=100, val_seed=3)
    train_idx, val_idx = split_validation(600, params)
    assert len(train_idx) == 500 and len(val_idx) == 100
    assert not set(train_idx.tolist()) & set(val_idx.tolist())
    assert torch.equal(split_validation(600, params)[1], val_idx)
    assert not torch.equal(split_validation(600, params.model_copy(update={"val_seed": 4}))[1], val_idx)


def test_a_validation_split_must_leave_training_data():
    with pytest.raises(ConfigError, match="val_size: 600 leaves no training data"):
        split_validation(600, tiny_params(val_size=600))


def test_early_stopping_keeps_the_best_epoch():
    params = tiny_params(num_epochs=30, lr=3.0, val_size=100, patience=2)
    torch.manual_seed(params.seed)
    model = build_model(params.init_std)
    images, labels = tensors(600, 1)
    train_idx, val_idx = split_validation(600, params)
    history, kept = fit(
        model,
        (images[train_idx], labels[train_idx]),
        (images[val_idx], labels[val_idx]),
        params,
        eval_name="val_acc",
        progress=False,
    )
    accs = [row["val_acc"] for row in history]
    assert len(history) < 30  # it stopped
    assert kept == accs.index(max(accs)) + 1
    assert len(history) - kept == params.patience
    assert accuracy(model, images[val_idx], labels[val_idx]) == max(accs)
