"""The model of D2L 3.7 and its checkpoint format."""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from stages import PipelineError
from stages.config import ConfigError
from stages.data import IMAGE_SHAPE, NUM_CLASSES

IN_FEATURES = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]


def build_model(init_std: float) -> nn.Sequential:
    """nn.Sequential(Flatten, Linear(784, 10)); weights ~ N(0, init_std²), bias at PyTorch's default."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(IN_FEATURES, NUM_CLASSES))
    nn.init.normal_(net[1].weight, std=init_std)
    return net


def to_inputs(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [0, 1], exactly as torchvision's ToTensor scales them."""
    return images_u8.to(torch.float32).div_(255)


def predict(model, images_u8: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Logits for uint8 images, in batches."""
    with torch.inference_mode():
        return torch.cat(
            [model(to_inputs(images_u8[i : i + batch_size])) for i in range(0, len(images_u8), batch_size)]
        )


def outcomes(logits: torch.Tensor, labels: torch.Tensor):
    """(mean cross-entropy, predicted classes, class probabilities): what the reports need, as numpy,
    so that they are drawn without torch."""
    loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item() / len(labels)
    return loss, logits.argmax(1).cpu().numpy(), logits.softmax(1).cpu().numpy()


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"params.yaml: device: {setting!r} but no CUDA device is available; use auto or cpu")
    return torch.device(setting)


def checkpoint_bytes(model: nn.Module, config: dict, **extra) -> bytes:
    """state_dict plus the config it was trained with; plain tensors and scalars only, so
    `torch.load(weights_only=True)` reads it and no code is pickled."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    buffer = io.BytesIO()
    torch.save({"state_dict": state, "config": config, **extra}, buffer)
    return buffer.getvalue()


class CheckpointError(PipelineError):
    pass


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> tuple[nn.Sequential, dict]:
    """Load a checkpoint safely (weights_only: a crafted pickle cannot run code) and check its shapes."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; run the train stage (dvc repro train)") from None
    except (pickle.UnpicklingError, RuntimeError, zipfile.BadZipFile, EOFError, ValueError, OSError) as e:
        # For a refused pickle, the line naming the refused GLOBAL, not torch's advice around it
        # (set weights_only=False, or allow the global): both would switch off the very check.
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        reason = next((line for line in lines if "GLOBAL " in line), lines[0])
        reason = reason.split(" was not an allowed global")[0].split(" whose module")[0]
        raise CheckpointError(f"{path}: not a loadable checkpoint ({reason[:200]})") from None
    if not isinstance(ckpt, dict) or not {"state_dict", "config"} <= ckpt.keys():
        raise CheckpointError(f"{path}: not a checkpoint of this project (no state_dict/config)")
    model = build_model(init_std=0.0).to(device)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ckpt["state_dict"].items() if isinstance(v, torch.Tensor)}
    if got != expected:
        raise CheckpointError(f"{path}: parameter shapes {got} do not match the model's {expected}")
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return model, ckpt["config"]
