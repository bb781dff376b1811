"""Batched ECG augmentations on (B, leads, L) tensors in millivolts, run on whatever device the batch is on.

Each augmentation is applied to a row with probability `aug.<name>.p`, at `aug.<name>.strength`:
  noise         gaussian noise, SD = strength mV
  wander        baseline wander: a 0.05-0.5 Hz sinusoid per lead, amplitude up to strength mV
  scale         amplitude scaling by a factor drawn from [1 - strength, 1 + strength] per lead
  shift         circular time shift by up to strength x L samples either way
  lead_dropout  round(strength x leads) leads (at least one) set to zero
  time_mask     a window of strength x L samples set to zero in every lead
p = 0 (the default) disables one; an augmentation with p = 0 leaves the batch untouched.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from data_prep.errors import InputError

AugFn = Callable[[Tensor, float, int, torch.Generator], Tensor]


def _rand(x: Tensor, *shape: int, gen: torch.Generator) -> Tensor:
    return torch.rand(*shape, generator=gen, device=x.device, dtype=x.dtype)


def noise(x: Tensor, strength: float, rate: int, gen: torch.Generator) -> Tensor:
    return x + strength * torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)


def wander(x: Tensor, strength: float, rate: int, gen: torch.Generator) -> Tensor:
    b, c, n = x.shape
    freq = 0.05 + 0.45 * _rand(x, b, c, 1, gen=gen)
    phase = 2 * math.pi * _rand(x, b, c, 1, gen=gen)
    amp = strength * _rand(x, b, c, 1, gen=gen)
    t = torch.arange(n, device=x.device, dtype=x.dtype) / rate
    return x + amp * torch.sin(2 * math.pi * freq * t + phase)


def scale(x: Tensor, strength: float, rate: int, gen: torch.Generator) -> Tensor:
    b, c, _ = x.shape
    return x * (1 + strength * (2 * _rand(x, b, c, 1, gen=gen) - 1))


def shift(x: Tensor, strength: float, rate: int, gen: torch.Generator) -> Tensor:
    b, _, n = x.shape
    most = int(strength * n)
    lag = torch.randint(-most, most + 1, (b, 1, 1), generator=gen, device=x.device)
    index = (torch.arange(n, device=x.device) - lag) % n
    return torch.gather(x, 2, index.expand_as(x))


def lead_dropout(x: Tensor, strength: float, rate: int, gen: torch.Generator) -> Tensor:
    b, c, _ = x.shape
    k = max(1, round(strength * c))
    order = _rand(x, b, c, gen=gen).argsort(1)  # a random permutation of leads per row; its first k are dropped
    return x * (order >= k).unsqueeze(-1).to(x.dtype)


def time_mask(x: Tensor, strength: float, rate: int, gen: torch.Generator) -> Tensor:
    b, _, n = x.shape
    width = int(strength * n)
    start = (_rand(x, b, 1, 1, gen=gen) * (n - width + 1)).long()
    t = torch.arange(n, device=x.device)
    return x * ~((t >= start) & (t < start + width))


AUGMENTATIONS: dict[str, AugFn] = {f.__name__: f for f in (noise, wander, scale, shift, lead_dropout, time_mask)}


class Augmenter:
    """The augmentations a trial's config switches on, with their own seeded random stream on `device`."""

    def __init__(self, config: dict, rate: int, seed: int, device: str | torch.device = "cpu"):
        unknown = {k.split(".")[1] for k in config if k.startswith("aug.")} - set(AUGMENTATIONS)
        if unknown:
            raise InputError(f"unknown augmentation {sorted(unknown)}; choose from {list(AUGMENTATIONS)}")
        self.rate = rate
        self.steps = [(fn, float(config[f"aug.{name}.p"]), float(config.get(f"aug.{name}.strength", 0)))
                      for name, fn in AUGMENTATIONS.items() if float(config.get(f"aug.{name}.p", 0)) > 0]
        self.gen = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, x: Tensor) -> Tensor:
        for fn, p, strength in self.steps:
            chosen = _rand(x, x.shape[0], 1, 1, gen=self.gen) < p
            x = torch.where(chosen, fn(x, strength, self.rate, self.gen), x)
        return x
