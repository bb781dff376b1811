"""The search's status line: its time estimate against the search's own time budget (no Ray needed: Tune hands
the callback its trials, whose status and id are all the line reads)."""
from __future__ import annotations

import io
import re
import time
from types import SimpleNamespace

from search.progress import Progress


def trials(done: int, running: int) -> list[SimpleNamespace]:
    return [SimpleNamespace(status="TERMINATED", trial_id=f"d{i}") for i in range(done)] + \
        [SimpleNamespace(status="RUNNING", trial_id=f"r{i}") for i in range(running)]


def left_s(line: str) -> int:
    minutes, seconds = re.search(r"~(\d+):(\d\d) left", line).groups()
    return 60 * int(minutes) + int(seconds)


def test_the_estimate_left_never_exceeds_what_the_time_budget_leaves() -> None:
    free = Progress("val_auc", "max", 200, 20, set(), stream=io.StringIO())
    budgeted = Progress("val_auc", "max", 200, 20, set(), stream=io.StringIO(), budget_s=240)
    for p in (free, budgeted):
        p.start = time.monotonic() - 60  # one minute in, 4 of 200 trials done
    assert abs(left_s(free.status(trials(4, 2))) - 60 * 196 / 4) <= 5  # from the trial count alone
    line = budgeted.status(trials(4, 2))
    assert abs(left_s(line) - 180) <= 2 and "4/200 done, 2 running, 194 queued" in line
    budgeted.start = time.monotonic() - 300  # past the budget: the search is ending, not 0:-60
    assert left_s(budgeted.status(trials(9, 2))) == 0
