"""The model MLflow serves: the checkpoint's weights, a softmax, one named column per class.

An MLflow "model from code": train logs this file with the checkpoint (`models/model.pt`'s bytes)
as an artifact; `mlflow.pyfunc.load_model`, `mlflow models serve` and `fmnist-predict --mlflow`
run it. It reads the weights with `torch.load(weights_only=True)`, so loading a model runs no
pickled code, and it imports nothing from this project: a served model works outside a checkout.
(Logging it costs no `torch.export` trace, which took ~2.5 s of every training run.)
"""

import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel
from torch import nn

CHECKPOINT = "checkpoint"  # the artifact's key
IMAGE_SHAPE = (28, 28)


class ClothingClassifier(PythonModel):
    """Probabilities for a batch of 28x28 float images in [0, 1], as a table: a row per image, a
    column per class (`model_config["classes"]`, in the checkpoint's output order)."""

    def load_context(self, context):
        self.classes = list(context.model_config["classes"])
        checkpoint = torch.load(context.artifacts[CHECKPOINT], map_location="cpu", weights_only=True)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(IMAGE_SHAPE[0] * IMAGE_SHAPE[1], len(self.classes)))
        self.net.load_state_dict(checkpoint["state_dict"])
        self.net.eval()

    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> pd.DataFrame:
        images = np.asarray(model_input, dtype=np.float32)  # (n, 28, 28): MLflow checked the shape
        if not np.isfinite(images).all():  # a 400 that says so, not a row of NaN probabilities
            bad = np.argwhere(~np.isfinite(images))[0]
            raise MlflowException(
                f"input has NaN or infinite pixel values (the first at image {bad[0]}, row {bad[1]}, "
                f"column {bad[2]}); expected finite numbers in [0, 1]",
                error_code=INVALID_PARAMETER_VALUE,
            )
        with torch.inference_mode():
            probabilities = self.net(torch.from_numpy(images)).softmax(dim=1).numpy()
        return pd.DataFrame(probabilities, columns=self.classes)


set_model(ClothingClassifier())
