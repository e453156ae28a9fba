import io
import pickle

import pytest
import torch
from torch import nn

from stages.model import CheckpointError, build_model, checkpoint_bytes, load_checkpoint, to_inputs


def test_the_books_model():
    torch.manual_seed(0)
    net = build_model(init_std=0.01)
    assert isinstance(net[0], nn.Flatten) and isinstance(net[1], nn.Linear)
    assert tuple(net[1].weight.shape) == (10, 784)
    assert abs(net[1].weight.std().item() - 0.01) < 0.001
    # The book re-initialises only the weight; the bias keeps PyTorch's U(-1/28, 1/28).
    assert net[1].bias.abs().max().item() <= 1 / 28
    assert net(torch.zeros(3, 28, 28)).shape == (3, 10)


def test_pixels_scale_like_to_tensor():
    images = torch.tensor([[[0, 51, 255]]], dtype=torch.uint8)
    assert torch.equal(to_inputs(images), images.float() / 255)  # what ToTensor does to uint8


def test_checkpoint_round_trip_carries_config(tmp_path):
    net = build_model(0.01)
    (tmp_path / "m.pt").write_bytes(checkpoint_bytes(net, {"lr": 0.1}, kept_epoch=3))
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    assert raw["config"] == {"lr": 0.1} and raw["kept_epoch"] == 3
    loaded, config = load_checkpoint(tmp_path / "m.pt")
    assert config == {"lr": 0.1}
    assert torch.equal(loaded[1].weight, net[1].weight)


class Exploit:
    def __reduce__(self):
        return (print, ("code from the pickle ran",))


def test_crafted_pickle_is_refused_without_running_code(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    buffer = io.BytesIO()
    torch.save({"state_dict": {}, "config": Exploit()}, buffer, pickle_module=pickle)
    path.write_bytes(buffer.getvalue())
    with pytest.raises(CheckpointError, match=f"{path}: not a loadable checkpoint") as err:
        load_checkpoint(path)
    assert "code from the pickle ran" not in capsys.readouterr().out
    assert "GLOBAL print" in str(err.value)  # what was refused
    assert "weights_only" not in str(err.value) and "add_safe_globals" not in str(err.value)  # no advice to disarm


def test_truncated_checkpoint_is_refused(tmp_path):
    (tmp_path / "m.pt").write_bytes(checkpoint_bytes(build_model(0.01), {}))
    blob = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "m.pt").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="not a loadable checkpoint"):
        load_checkpoint(tmp_path / "m.pt")


def test_wrong_shape_is_refused(tmp_path):
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 5))
    (tmp_path / "m.pt").write_bytes(checkpoint_bytes(net, {}))
    with pytest.raises(CheckpointError, match="do not match the model's"):
        load_checkpoint(tmp_path / "m.pt")


def test_missing_checkpoint_points_at_train(tmp_path):
    with pytest.raises(CheckpointError, match="missing; run the train stage"):
        load_checkpoint(tmp_path / "none.pt")
