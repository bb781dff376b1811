"""One search's settings as one value, checked in one place: `SearchSpec`.

The CLI, the study, `resume` and the Python API all build a SearchSpec and hand it to `run_search(spec)`:

    from search.spec import SearchSpec
    from search.tuner import run_search
    run_search(SearchSpec("prepared/ptbxl-100", "classification", half="A", num_samples=8, max_epochs=4))

`spec.check()` validates every setting without touching data or the tracking store (what `ecgsearch study --plan`
checks); `spec.validate()` adds the dataset, the store and the pretrained models and returns what a search needs.
A search's run logs the spec once, as its params; `SearchSpec.from_params` rebuilds it (for `resume`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from data_prep.constants import TARGETS
from data_prep.dataset import PreparedDataset, open_dataset
from data_prep.errors import InputError
from search.server import mask_uri
from search.space import APPROACHES, SearchSpace, load_space_config
from search.tracking import DEFAULT_EXPERIMENT, open_store
from search.trainable import search_metric

SAMPLERS = ("tpe", "random")
FIDELITIES = ("rate",)
GRACE_EPOCHS = 3  # ASHA's default grace period: no architecture is judged on its first epoch alone
SMALL_DATA = 2000  # below this many ECGs in the half, cv None means 3 folds: a val split holds too few
STARTUP_PER_ARCH = 4  # TPE's random startup trials per architecture choice, before it narrows


@dataclass(frozen=True)
class SearchSpec:
    """Every setting of one search. `data` is a prepared dataset directory; `pretrained` maps target -> checkpoint
    path or registry URI (single: one, fused: one per target); `config`/`space_overrides` change the search space
    (configs/search.yaml); `sampler` tpe or random, `n_startup_trials` TPE's random trials first (default
    STARTUP_PER_ARCH per architecture choice, at least 10); `asha` False runs every trial to `max_epochs` (FIFO),
    else ASHA stops weak trials at rungs `grace_period` x `reduction_factor`^k epochs; `cv` K > 1 scores each trial
    as the mean over K patient-grouped folds of the half's train+val rows (None, the CLI's default: 3 below
    SMALL_DATA ECGs, else 1); `top_k` trials get their checkpoint and plots logged; `fault` is the trial
    contract's fault injection (tests); `parent_run_id` nests the search's run under another (a study's), `tags` go
    on it; `optuna_storage` a database URI for the Optuna study (run_search defaults it to a sqlite file beside the
    Ray state); `warm_start` names earlier searches whose finished trials
    seed this one; `fidelity` "rate" judges configurations at 100 Hz first and retrains the best at 500 Hz;
    `forest` fits the features + random-forest candidate after the trials (search/forest.py)."""

    data: str | Path
    task: str = "classification"
    target: str | None = None
    approach: str = "baseline"
    pretrained: dict[str, str] = field(default_factory=dict)
    half: str | None = None
    num_samples: int = 8
    config: str | Path | None = None
    space_overrides: dict | None = None
    max_concurrent: int = 2
    cpus_per_trial: float = 1
    gpus_per_trial: float = 0
    time_budget_s: float | None = None
    max_epochs: int = 10
    address: str | None = None
    tracking_uri: str | None = None
    name: str | None = None
    storage_path: str | Path | None = None
    seed: int = 0
    sampler: str = "tpe"
    n_startup_trials: int | None = None
    asha: bool = True
    grace_period: int | None = None
    reduction_factor: int = 2
    max_failures: int = 0
    top_k: int = 10  # promote's ensemble pool (on the sample, 10 against 5: -0.002 macro AUC, i.e. no gain)
    fault: dict | None = None
    experiment: str = DEFAULT_EXPERIMENT
    single_label: bool = True
    parent_run_id: str | None = None
    tags: dict[str, str] | None = None
    optuna_storage: str | None = None
    cv: int | None = 1
    warm_start: tuple[str, ...] = ()
    fidelity: str | None = None
    forest: bool = True

    def replace(self, **changes: Any) -> "SearchSpec":
        return dataclasses.replace(self, **changes)

    @property
    def metric(self) -> tuple[str, str]:
        """(metric, mode) the search optimises."""
        return search_metric(self.task)

    @property
    def grace(self) -> int:
        """ASHA's grace period in epochs."""
        return min(self.grace_period or GRACE_EPOCHS, self.max_epochs)

    def trial_constants(self) -> dict[str, Any]:
        """The search-wide keys of every trial's config (the trial contract of search/trainable.py)."""
        return {"data": str(Path(self.data).resolve()), "task": self.task,
                "target": self.target if self.task == "regression" else None, "half": self.half,
                "single_label": self.single_label, "max_epochs": self.max_epochs, "seed": self.seed,
                "threads": max(1, int(self.cpus_per_trial)), "fault": self.fault, "cv": self.cv}

    def space_spec(self) -> dict:
        """The search space's YAML (configs/search.yaml with `config` and `space_overrides` merged over it)."""
        return load_space_config(self.config, self.space_overrides)

    def startup_trials(self, space: SearchSpace) -> int:
        """TPE's random startup trials: given, or STARTUP_PER_ARCH per architecture choice (at least 10)."""
        if self.n_startup_trials is not None:
            return self.n_startup_trials
        arch = space.dims["arch"]
        return max(10, STARTUP_PER_ARCH * (1 if arch.fixed else len(arch.choices)))

    def check(self) -> None:
        """Every setting that can be checked without the data or the tracking store; an InputError names it."""
        if self.task not in ("classification", "regression"):
            raise InputError(f"--task {self.task!r}: choose classification or regression")
        if self.task == "regression" and self.target not in TARGETS:
            raise InputError(f"--target {self.target!r}: regression needs one of {', '.join(TARGETS)}")
        if self.approach not in APPROACHES:
            raise InputError(f"--approach {self.approach!r}: choose from {', '.join(APPROACHES)}")
        for key in self.pretrained:
            if key not in TARGETS:
                raise InputError(f"--pretrained {key}={self.pretrained[key]}: unknown target {key!r}; "
                                 f"choose from {', '.join(TARGETS)}")
        need = {"baseline": set(), "single": None, "fused": set(TARGETS)}[self.approach]
        given = set(self.pretrained)
        if (need is None and len(given) != 1) or (need is not None and given != need):
            wants = {"baseline": "none", "single": "exactly one TARGET=URI",
                     "fused": f"one each for {', '.join(TARGETS)}"}
            raise InputError(f"--pretrained: approach {self.approach} takes {wants[self.approach]}, "
                             f"got {sorted(given) or 'none'}")
        if self.half not in (None, "A", "B"):
            raise InputError(f"--half {self.half!r}: choose A or B (or leave it out for all rows)")
        if self.sampler not in SAMPLERS:
            raise InputError(f"--sampler {self.sampler!r}: choose {' or '.join(SAMPLERS)}")
        for name, least in (("num_samples", 1), ("max_epochs", 1), ("reduction_factor", 2), ("cv", 1)):
            value = getattr(self, name)
            if name == "cv" and value is None:  # chosen by the data's size (validate)
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise InputError(f"--{name.replace('_', '-')} {value!r}: must be a whole number of at least {least}")
        if self.grace_period is not None and not 1 <= self.grace_period:
            raise InputError(f"--grace-period {self.grace_period}: must be at least 1 epoch")
        if self.n_startup_trials is not None and self.n_startup_trials < 0:
            raise InputError(f"--startup-trials {self.n_startup_trials}: must be >= 0")
        if self.fidelity not in (None, *FIDELITIES):
            raise InputError(f"--fidelity {self.fidelity!r}: choose {', '.join(FIDELITIES)}")
        self._check_resources()
        if self.approach == "baseline":  # transfer spaces need the pretrained models (validate)
            SearchSpace(self.space_spec(), self.approach, self.trial_constants())
        else:
            self.space_spec()

    def _check_resources(self) -> None:
        if not isinstance(self.max_concurrent, int) or self.max_concurrent < 1:
            raise InputError(f"--max-concurrent {self.max_concurrent}: must be at least 1")
        if not self.cpus_per_trial > 0 or not self.gpus_per_trial >= 0:
            raise InputError(f"--cpus-per-trial {self.cpus_per_trial} must be > 0 and --gpus-per-trial "
                             f"{self.gpus_per_trial} >= 0")
        if self.gpus_per_trial > 1 and self.gpus_per_trial != int(self.gpus_per_trial):
            raise InputError(f"--gpus-per-trial {self.gpus_per_trial}: a fraction of one GPU or a whole number")
        if self.max_failures < 0 or self.top_k < 0:
            raise InputError(f"--max-failures {self.max_failures} and top_k {self.top_k} must be >= 0")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise InputError(f"--time-budget {self.time_budget_s}: must be > 0 seconds")
        if self.address is None:
            import torch

            cpus, gpus = os.cpu_count() or 1, torch.cuda.device_count()
            if self.cpus_per_trial > cpus or self.gpus_per_trial > gpus:
                raise InputError(f"--cpus-per-trial {self.cpus_per_trial} / --gpus-per-trial {self.gpus_per_trial}: "
                                 f"this machine has {cpus} CPUs and {gpus} GPUs, so no trial could start (or join a "
                                 f"cluster: --address)")

    def validate(self) -> "Inputs":
        """check(), then the dataset (prepared, labels for the task, rows of the half), the tracking store (answers)
        and the pretrained models (exist, load safely, regression models of the dataset's leads and length)."""
        self.check()
        ds = open_dataset(self.data)
        wanted = "classification" if self.task == "classification" else f"regression:{self.target}"
        if wanted not in ds.tasks():
            raise InputError(f"{ds.path} has no labels for {wanted}; it has {', '.join(ds.tasks()) or 'none'}")
        if self.half is not None and not len(ds.select(half=self.half)):
            raise InputError(f"--half {self.half}: {ds.path} has no rows of half {self.half}")
        spec = self.space_spec()
        client, uri = open_store(self.tracking_uri)
        models, lineage = load_pretrained(self.pretrained, ds.length, ds.signals.shape[1], uri)
        # cv None: 3 folds on small data (a val split of a few dozen ECGs selects mostly by noise), else a val split
        cv = self.cv or (3 if len(ds.select(half=self.half)) < SMALL_DATA else 1)
        space = SearchSpace(spec, self.approach, self.replace(cv=cv).trial_constants(), models)
        return Inputs(ds, spec, space, models, lineage, client, uri, cv)

    def to_params(self) -> dict[str, Any]:
        """The spec as MLflow params (credentials masked); `from_params` reads them back."""
        params = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key in ("tracking_uri", "optuna_storage"):
            if params[key]:
                params[key] = mask_uri(params[key])
        for key in ("data", "config", "storage_path"):
            if params[key] is not None:
                params[key] = str(params[key])
        params["warm_start"] = list(self.warm_start)
        return params

    @classmethod
    def from_params(cls, params: dict[str, str], **changes: Any) -> "SearchSpec":
        """The spec a search run logged (its params), with `changes` (e.g. the tracking URI given to resume)."""
        values = {}
        for f in dataclasses.fields(cls):
            if f.name in params:
                raw = params[f.name]
                text = str(f.type).startswith("str") and raw != "null"  # strings are logged as they are, the rest as JSON
                values[f.name] = raw if text else json.loads(raw)
        values["warm_start"] = tuple(values.get("warm_start") or ())
        values["pretrained"] = dict(values.get("pretrained") or {})
        return cls(**{**values, **changes})


class Inputs(NamedTuple):
    """What `SearchSpec.validate` found: the dataset, the space, the pretrained models, the tracking store."""
    ds: PreparedDataset
    space_spec: dict
    space: SearchSpace
    models: dict[str, Any]
    lineage: dict[str, str]
    client: Any
    uri: str
    cv: int  # the spec's, or what its None means for this dataset


def checkpoint_path(uri: str, tracking_uri: str | None = None) -> Path:
    """The local model.pt of a checkpoint path (model.pt or a directory holding one) or of a registry URI
    (`models:/NAME@alias`, `models:/NAME/VERSION`, downloaded); an InputError names what is missing."""
    import mlflow

    if uri.startswith("models:/"):
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=tracking_uri))
        except Exception as e:  # MlflowException or a store error: either way the model is not there
            raise InputError(f"{uri}: not in the registry ({str(e).splitlines()[0]})") from None
        found = sorted(local.rglob("model.pt"))
        if not found:
            raise InputError(f"{uri}: the registered model holds no model.pt")
        return found[0]
    path = Path(uri) / "model.pt" if Path(uri).is_dir() else Path(uri)
    if not path.is_file():
        raise InputError(f"{uri}: no checkpoint at {path}")
    return path


def load_pretrained(specs: dict[str, str], data_length: int, n_leads: int,
                    tracking_uri: str) -> tuple[dict[str, Any], dict[str, str]]:
    """target -> loaded model from a checkpoint path or registry URI (`checkpoint_path`), checked to be a regression
    model of that target for the dataset's shape; and target -> lineage text."""
    from ecgmodels import load_checkpoint
    from ecgmodels.checkpoint import read_checkpoint

    models, lineage = {}, {}
    for target, uri in specs.items():
        if target not in TARGETS:
            raise InputError(f"--pretrained {target}={uri}: unknown target {target!r}; choose from {', '.join(TARGETS)}")
        try:
            path = checkpoint_path(uri, tracking_uri)
        except InputError as e:
            raise InputError(f"--pretrained {target}={e}") from None
        try:  # weights_only: a checkpoint holding anything but tensors and plain values is refused, never run
            extra = read_checkpoint(path)["extra"]
        except (pickle.UnpicklingError, RuntimeError, KeyError, EOFError) as e:
            raise InputError(f"--pretrained {target}={uri}: not an ecgmodels checkpoint that loads safely "
                             f"({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from None
        model = load_checkpoint(path)
        cfg = model.config
        if cfg.get("task") != "regression" or extra.get("task", "regression") != "regression":
            raise InputError(f"--pretrained {target}={uri}: a {cfg.get('task')} model; transfer needs a regression "
                             f"model pretrained on {target}")
        if extra.get("target") not in (None, target):
            raise InputError(f"--pretrained {target}={uri}: that model was trained on {extra['target']!r}")
        if (cfg["n_leads"], cfg["length"]) != (n_leads, data_length):
            raise InputError(f"--pretrained {target}={uri}: takes {cfg['n_leads']} leads x {cfg['length']} samples, "
                             f"the dataset holds {n_leads} x {data_length} (another sampling rate?)")
        models[target] = model
        lineage[target] = f"{uri} (dataset {extra.get('dataset_hash', 'unknown')})"
    return models, lineage
