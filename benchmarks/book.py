"""The book's own script (D2L 3.7 with d2l.load_data_fashion_mnist and d2l.train_ch3), for comparison.

Same model, loss, optimizer, batch size and epochs as the pipeline, fed the way the book feeds it:
torchvision's FashionMNIST with ToTensor through a DataLoader with 4 workers. The d2l package's
functions are inlined (minus the live plot) so nothing is downloaded.

    python -m benchmarks.book --data data/fashion-mnist [--epochs 10]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def load_data_fashion_mnist(batch_size: int, data_dir: Path):
    """d2l.load_data_fashion_mnist, reading the verified files instead of downloading them."""
    import torchvision
    from torch.utils import data
    from torchvision import transforms

    root = Path(tempfile.mkdtemp(prefix="book-fmnist-"))
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in Path(data_dir).iterdir():
        os.symlink(f.resolve(), raw / f.name)
    trans = transforms.ToTensor()
    train = torchvision.datasets.FashionMNIST(root=root, train=True, transform=trans, download=False)
    test = torchvision.datasets.FashionMNIST(root=root, train=False, transform=trans, download=False)
    return (
        data.DataLoader(train, batch_size, shuffle=True, num_workers=4),
        data.DataLoader(test, batch_size, shuffle=False, num_workers=4),
    )


def accuracy(y_hat, y):
    if len(y_hat.shape) > 1 and y_hat.shape[1] > 1:
        y_hat = y_hat.argmax(axis=1)
    cmp = y_hat.type(y.dtype) == y
    return float(cmp.type(y.dtype).sum())


def evaluate_accuracy(net, data_iter):
    import torch

    net.eval()
    right = total = 0.0
    with torch.no_grad():
        for X, y in data_iter:
            right += accuracy(net(X), y)
            total += y.numel()
    return right / total


def train_epoch_ch3(net, train_iter, loss, updater):
    net.train()
    loss_sum = right = total = 0.0
    for X, y in train_iter:
        y_hat = net(X)
        lo = loss(y_hat, y)
        updater.zero_grad()
        lo.mean().backward()
        updater.step()
        loss_sum += float(lo.detach().sum())
        right += accuracy(y_hat, y)
        total += y.numel()
    return loss_sum / total, right / total


def build(seed: int = 0):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))

    def init_weights(m):
        if type(m) is nn.Linear:
            nn.init.normal_(m.weight, std=0.01)

    net.apply(init_weights)
    return net, nn.CrossEntropyLoss(reduction="none"), torch.optim.SGD(net.parameters(), lr=0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/fashion-mnist"))
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    import torch

    train_iter, test_iter = load_data_fashion_mnist(256, args.data)
    net, loss, trainer = build()
    print(f"torch threads: {torch.get_num_threads()}, DataLoader workers: {train_iter.num_workers}")
    for epoch in range(args.epochs):
        start = time.perf_counter()
        train_loss, train_acc = train_epoch_ch3(net, train_iter, loss, trainer)
        trained = time.perf_counter()
        test_acc = evaluate_accuracy(net, test_iter)
        print(f"epoch {epoch + 1}: loss {train_loss:.3f}, train acc {train_acc:.3f}, test acc {test_acc:.3f}"
              f" (train {trained - start:.3f} s, test {time.perf_counter() - trained:.3f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
