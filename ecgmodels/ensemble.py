"""A weighted ensemble of trained models of one task and input shape, averaging their calibrated predictions."""
from __future__ import annotations

import torch
from torch import nn

from .forest import Forest
from .model import ECGModel, FusedModel, _default_temperature

Model = ECGModel | FusedModel | Forest


class Ensemble(nn.Module):
    """``members`` (each applying its own temperature; a member may be an Ensemble) averaged with ``weights``
    (normalised to sum 1).

    ``forward`` returns logits of the averaged *probabilities*: ``softmax(ensemble(x))`` (or ``sigmoid`` with
    ``multi_label``) is the weighted mean of the members' calibrated probabilities, so a caller treats an ensemble
    like any model. Those logits are divided by the ensemble's own ``temperature`` (1 until
    ``calibration.set_temperature``): a mean of diverse members is less confident than any of them, so the ensemble
    is recalibrated as a whole. For regression it returns the weighted mean of the members' outputs.
    """

    def __init__(self, members: list[Model], weights: list[float], multi_label: bool = False):
        super().__init__()
        if not members or len(members) != len(weights) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"an ensemble needs one non-negative weight per member (not all 0), got {len(members)} "
                             f"members and weights {weights}")
        first = members[0].config
        for i, m in enumerate(members):
            for field in ("task", "n_outputs", "n_leads", "length"):
                if m.config[field] != first[field]:
                    raise ValueError(f"cannot ensemble: member {i} has {field}={m.config[field]!r}, member 0 has "
                                     f"{first[field]!r}")
        self.members = nn.ModuleList(members)
        total = float(sum(weights))
        self.register_buffer("weights", torch.tensor([w / total for w in weights]))
        self.register_buffer("temperature", torch.ones(()))
        self.register_load_state_dict_pre_hook(_default_temperature)
        self.multi_label = bool(multi_label)
        self.config = {"name": "ensemble", **{k: first[k] for k in ("task", "n_outputs", "n_leads", "length")},
                       "multi_label": self.multi_label, "weights": self.weights.tolist(),
                       "members": [m.config for m in members]}

    @property
    def frozen(self) -> list:
        """Each member's freezing depth (a list again for a member that is an ensemble)."""
        return [m.frozen for m in self.members]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = torch.stack([m(x).float() for m in self.members])  # (members, N, outputs)
        w = self.weights.to(outs.dtype)[:, None, None]
        if self.config["task"] == "regression":
            return (w * outs).sum(0)
        log_w = w.log()
        if self.multi_label:  # logit of the mean probability: log mean p - log mean (1 - p)
            mean = (torch.logsumexp(log_w + nn.functional.logsigmoid(outs), 0)
                    - torch.logsumexp(log_w + nn.functional.logsigmoid(-outs), 0))
        else:
            mean = torch.logsumexp(log_w + outs.log_softmax(-1), 0)  # log of the mean probability
        return mean / self.temperature
