"""The registered model: an ecgmodels checkpoint as an MLflow pyfunc, raw mV in, probabilities or bpm/ms out.

Logged as code (MLflow's "models from code": this file, not a pickle) with the `ecgmodels` package bundled in the
model's code_paths, so `mlflow.pyfunc.load_model("models:/NAME@champion")` needs torch, numpy, scipy (a forest's
features) and mlflow, not ecgsearch. Input: float32 (N, 8, L) raw millivolts (leads I, II, V1..V6, at the rate in
the version's tags); the model normalises inside itself; output: class probabilities (N, 5) or values (N,) in the
target's unit (bpm or ms). The checkpoint is one trial's model, the search's `ecgmodels.Forest`, or an
`ecgmodels.Ensemble` of several; either way its logits are already divided by the fitted temperature (an ensemble's are the logits of its members' averaged calibrated probabilities), so the
softmax (sigmoid for multi-label) below gives calibrated probabilities without knowing which it is.
"""
from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import torch

from ecgmodels import load_checkpoint
from ecgmodels.checkpoint import read_checkpoint


class ECGPyfunc(mlflow.pyfunc.PythonModel):
    """Loads the `model.pt` artifact (weights_only) and predicts with it."""

    def load_context(self, context: Any) -> None:
        path = context.artifacts["model.pt"]
        self.model = load_checkpoint(path).eval()
        self.extra = read_checkpoint(path)["extra"]

    def predict(self, context: Any, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        """`np.ndarray` is a hint MLflow takes without inferring a schema from it: the logged signature holds."""
        return predict(self.model, self.extra, model_input)


def predict(model: torch.nn.Module, extra: dict, x: Any) -> np.ndarray:
    """A checkpointed model's outputs in the registry's terms (probabilities, or values in the target's unit)."""
    x = torch.from_numpy(np.array(x, dtype=np.float32))  # a copy: MLflow may pass a read-only array
    with torch.inference_mode():
        out = model(x).float()
    if extra["task"] == "regression":
        return (out.squeeze(-1) * extra["target_std"] + extra["target_mean"]).numpy()
    single = extra.get("config", {}).get("single_label", True)
    return (torch.softmax(out, 1) if single else torch.sigmoid(out)).numpy()


mlflow.models.set_model(ECGPyfunc())
