"""Plain-PyTorch ECG architectures with a shared backbone/head split, transfer and checkpoints."""
from . import cnn, inception, lstm, resnet, rnn, vit  # noqa: F401  (each registers its architecture)
from .calibration import fit_temperature, init_prior_bias, set_temperature
from .ensemble import Ensemble
from .forest import Forest, signal_features
from .checkpoint import load_backbone, load_checkpoint, save_checkpoint
from .model import ECGModel, FusedModel
from .normalize import NORMALISATIONS
from .registry import create_model, default_hparams, list_models, register_model
from .transfer import freeze, fused_transfer, param_groups, single_transfer

__all__ = ["create_model", "list_models", "default_hparams", "register_model", "freeze", "single_transfer",
           "fused_transfer", "param_groups", "save_checkpoint", "load_checkpoint", "load_backbone", "ECGModel",
           "FusedModel", "NORMALISATIONS", "fit_temperature", "set_temperature", "init_prior_bias", "Ensemble",
           "Forest", "signal_features"]
