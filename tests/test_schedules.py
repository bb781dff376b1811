"""Each learning-rate schedule moves the lr when and how it should."""
from __future__ import annotations

import pytest
import torch

from data_prep.errors import InputError
from search.schedules import Schedule

STEPS, EPOCHS, LR = 4, 6, 0.1


def lrs(config: dict, val: list[float] | None = None, mode: str = "max") -> list[list[float]]:
    """The lr at every step of every epoch (a row per epoch)."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    schedule = Schedule(opt, {"max_epochs": EPOCHS, **config}, STEPS, mode)
    seen = []
    for epoch in range(EPOCHS):
        row = []
        for _ in range(STEPS):
            row.append(opt.param_groups[0]["lr"])
            opt.step()
            schedule.after_batch()
        seen.append(row)
        schedule.after_epoch(val[epoch] if val else 0.0)
    return seen


def test_constant_and_per_epoch_schedules_hold_the_lr_within_an_epoch() -> None:
    assert all(lr == LR for row in lrs({"schedule": "constant"}) for lr in row)
    for config in ({"schedule": "exponential", "schedule.gamma": 0.5}, {"schedule": "cosine"}):
        assert all(len(set(row)) == 1 for row in lrs(config))
    assert [row[0] for row in lrs({"schedule": "exponential", "schedule.gamma": 0.5})] == pytest.approx(
        [LR * 0.5 ** e for e in range(EPOCHS)])


def test_cosine_warms_up_then_decays() -> None:
    first = [row[0] for row in lrs({"schedule": "cosine", "schedule.warmup_epochs": 2})]
    assert first[0] < first[1] < first[2] == pytest.approx(LR)
    assert all(a > b for a, b in zip(first[2:], first[3:])) and first[-1] > 0


def test_onecycle_steps_every_batch_and_peaks_at_the_lr() -> None:
    seen = lrs({"schedule": "onecycle", "schedule.pct_start": 0.25})
    flat = [lr for row in seen for lr in row]
    assert len(set(seen[0])) == STEPS  # changes inside an epoch
    assert max(flat) == pytest.approx(LR) and flat.index(max(flat)) == round(0.25 * STEPS * EPOCHS) - 1
    assert flat[-1] < LR / 100


def test_plateau_cuts_the_lr_once_more_than_patience_epochs_did_not_improve() -> None:
    val = [0.6, 0.7, 0.7, 0.7, 0.7, 0.7]  # epochs 3 and 4 (then 5 and 6) without improvement
    first = [row[0] for row in lrs({"schedule": "plateau", "schedule.factor": 0.5, "schedule.patience": 1}, val)]
    assert first == pytest.approx([LR, LR, LR, LR, LR / 2, LR / 2])


def test_unknown_schedule_is_input_error() -> None:
    with pytest.raises(InputError, match="unknown schedule 'step'"):
        lrs({"schedule": "step"})
