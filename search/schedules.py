"""Learning-rate schedules, stepped where each belongs: one-cycle per batch, plateau on the val metric, the rest
per epoch.

  constant     the optimiser's lr throughout
  cosine       linear warm-up over `schedule.warmup_epochs`, then cosine decay towards 0 at `max_epochs`
  exponential  lr x `schedule.gamma` after every epoch
  onecycle     torch's OneCycleLR peaking at the lr, `schedule.pct_start` of all steps rising
  plateau      lr x `schedule.factor` once more than `schedule.patience` epochs passed without val improvement
"""
from __future__ import annotations

import math

import torch

from data_prep.errors import InputError

SCHEDULES = ("constant", "cosine", "exponential", "onecycle", "plateau")


class Schedule:
    """One trial's schedule: call `after_batch()` after each optimiser step, `after_epoch(val_metric)` per epoch."""

    def __init__(self, optimizer: torch.optim.Optimizer, config: dict, steps_per_epoch: int, mode: str):
        name, epochs = config.get("schedule", "constant"), int(config["max_epochs"])
        if name not in SCHEDULES:
            raise InputError(f"unknown schedule {name!r}; choose from {', '.join(SCHEDULES)}")
        self.name = name
        sched = torch.optim.lr_scheduler
        if name == "constant":
            self.torch = sched.LambdaLR(optimizer, lambda e: 1.0)
        elif name == "cosine":
            warm = int(config.get("schedule.warmup_epochs", 0))
            self.torch = sched.LambdaLR(optimizer, lambda e: (e + 1) / (warm + 1) if e < warm else
                                        0.5 * (1 + math.cos(math.pi * (e - warm) / max(1, epochs - warm))))
        elif name == "exponential":
            self.torch = sched.ExponentialLR(optimizer, float(config.get("schedule.gamma", 0.9)))
        elif name == "onecycle":
            self.torch = sched.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups],
                                          total_steps=steps_per_epoch * epochs,
                                          pct_start=float(config.get("schedule.pct_start", 0.3)))
        else:
            self.torch = sched.ReduceLROnPlateau(optimizer, mode=mode, factor=float(config.get("schedule.factor", 0.5)),
                                                 patience=int(config.get("schedule.patience", 2)))

    def after_batch(self) -> None:
        if self.name == "onecycle":
            self.torch.step()

    def after_epoch(self, val_metric: float) -> None:
        if self.name == "plateau":
            self.torch.step(val_metric)
        elif self.name != "onecycle":
            self.torch.step()
