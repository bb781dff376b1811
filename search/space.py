"""The search space: a YAML file -> an Optuna define-by-run function.

Each dimension in the YAML is a constant (fixed: `lr: 0.001`), a list (a choice: `arch: [inception1d, resnet1d]`)
or a range (`lr: {low: 1.0e-4, high: 1.0e-2, log: true}`, integer when both ends are integers, optional `step`).
A user's file is merged over `configs/search.yaml`, so it names only what it fixes or narrows. Choices condition
others: `arch` -> `arch.<hp>` from `archs.<arch>`, `schedule` -> `schedule.<param>` from `schedules.<schedule>`;
`freeze_depth` and `pretrained_lr_mult` exist only for the single and fused approaches. Everything is validated
before Ray starts; a bad setting is one InputError line naming it.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml

from data_prep.dataset import NORMALISATIONS
from data_prep.errors import InputError
from search.augment import AUGMENTATIONS
from search.schedules import SCHEDULES

DEFAULT_SPACE = Path(__file__).resolve().parents[1] / "configs" / "search.yaml"
APPROACHES = ("baseline", "single", "fused")
SCHEDULE_PARAMS: dict[str, tuple[str, ...]] = {
    "constant": (), "cosine": ("warmup_epochs",), "exponential": ("gamma",), "onecycle": ("pct_start",),
    "plateau": ("factor", "patience"),
}
assert set(SCHEDULE_PARAMS) == set(SCHEDULES)
# dimension -> (type, smallest allowed value, largest allowed value); None = unbounded or not numeric
_TYPES: dict[str, tuple[type, float | None, float | None]] = {
    "arch": (str, None, None), "norm": (str, None, None), "schedule": (str, None, None),
    "lead_stats": (bool, None, None),
    "lr": (float, 0.0, None), "weight_decay": (float, 0.0, None), "batch_size": (int, 1, None),
    "patience": (int, 1, None), "freeze_depth": (int, 0, None), "pretrained_lr_mult": (float, 0.0, None),
    "schedule.warmup_epochs": (int, 0, None), "schedule.gamma": (float, 0.0, 1.0),
    "schedule.pct_start": (float, 0.0, 1.0), "schedule.factor": (float, 0.0, 1.0), "schedule.patience": (int, 0, None),
    **{f"aug.{a}.p": (float, 0.0, 1.0) for a in AUGMENTATIONS},
    **{f"aug.{a}.strength": (float, 0.0, None) for a in AUGMENTATIONS},
}
_TOP_KEYS = ("arch", "archs", "norm", "lead_stats", "lr", "weight_decay", "batch_size", "schedule", "schedules",
             "aug", "patience", "freeze_depth", "pretrained_lr_mult")


@dataclass(frozen=True)
class Dim:
    """One dimension: `value` when fixed, else `choices`, else the range low..high (int or float, log, step)."""

    name: str
    value: Any = None
    key: str = ""  # the name Optuna knows it by (conditional dims: `<choice>.<param>`); default `name`
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    is_int: bool = False

    @property
    def fixed(self) -> bool:
        return self.choices is None and self.low is None

    def suggest(self, trial: optuna.Trial) -> Any:
        """The fixed value, or a value Optuna suggests under `key`."""
        if self.fixed:
            return self.value
        key = self.key or self.name
        if self.choices is not None:
            return trial.suggest_categorical(key, list(self.choices))
        if self.is_int:
            return trial.suggest_int(key, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return trial.suggest_float(key, self.low, self.high, log=self.log, step=self.step)

    def distribution(self) -> optuna.distributions.BaseDistribution:
        if self.choices is not None:
            return optuna.distributions.CategoricalDistribution(list(self.choices))
        if self.is_int:
            return optuna.distributions.IntDistribution(int(self.low), int(self.high), log=self.log,
                                                        step=int(self.step or 1))
        return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def describe(self) -> str:
        if self.fixed:
            return repr(self.value)
        if self.choices is not None:
            return "[" + ", ".join(map(str, self.choices)) + "]"
        return f"{self.low}..{self.high}" + (" log" if self.log else "") + (f" step {self.step}" if self.step else "")


def parse_dim(name: str, spec: Any, kind: type, lo: float | None = None, hi: float | None = None,
              allowed: tuple | list | None = None, key: str = "") -> Dim:
    """One YAML entry -> a Dim, checking its type, range and allowed values; errors name the setting."""
    def check(v: Any) -> Any:
        if kind is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
            raise InputError(f"search space: {name}: {v!r} is not {kind.__name__}")
        if kind is float and not math.isfinite(v):
            raise InputError(f"search space: {name}: {v!r} is not a finite number")
        if allowed is not None and v not in allowed:
            raise InputError(f"search space: {name}: unknown {v!r}; choose from {', '.join(map(str, allowed))}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise InputError(f"search space: {name}: {v!r} is outside [{lo}, {hi if hi is not None else 'inf'}]")
        return v

    if isinstance(spec, list):
        if not spec:
            raise InputError(f"search space: {name}: empty list of choices")
        choices = tuple(dict.fromkeys(check(v) for v in spec))
        return Dim(name, value=choices[0]) if len(choices) == 1 else Dim(name, key=key, choices=choices)
    if isinstance(spec, dict):
        unknown = set(spec) - {"low", "high", "log", "step"}
        if unknown or not {"low", "high"} <= set(spec):
            raise InputError(f"search space: {name}: a range is {{low, high[, log, step]}}, got keys {sorted(spec)}")
        if kind not in (int, float):
            raise InputError(f"search space: {name}: a {kind.__name__} setting takes a value or a list, not a range")
        low, high = check(spec["low"]), check(spec["high"])
        if low > high:
            raise InputError(f"search space: {name}: inverted range, low {low} > high {high}")
        log = bool(spec.get("log", False))
        if log and low <= 0:
            raise InputError(f"search space: {name}: a log range needs low > 0, got {low}")
        if low == high:
            return Dim(name, value=low)
        return Dim(name, key=key, low=low, high=high, log=log, step=spec.get("step"), is_int=kind is int)
    return Dim(name, value=check(spec))


def load_space_config(path: str | Path | None = None, overrides: dict | None = None) -> dict:
    """The default space with the user's YAML file (and then `overrides`) merged over it."""
    space = yaml.safe_load(DEFAULT_SPACE.read_text())
    for layer in ([read_yaml(path)] if path else []) + ([overrides] if overrides else []):
        space = _merge(space, layer)
    return space


def read_yaml(path: str | Path, what: str = "search space") -> dict:
    """A YAML file holding a mapping of settings; a missing or malformed file is an InputError naming `what`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what}: {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise InputError(f"{what}: {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise InputError(f"{what}: {path} must hold a mapping of settings, got {type(data).__name__}")
    return data


def _merge(base: dict, layer: dict) -> dict:
    """Deep-merge `layer` over `base`; a range ({low, high}), a list or a constant replaces what was there."""
    out = copy.deepcopy(base)
    for k, v in layer.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and "low" not in v and "low" not in out[k]:
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


class SearchSpace:
    """The define-by-run function OptunaSearch calls per trial: suggests the searched dimensions (conditioned on
    arch and schedule) and returns the fixed ones, the search-wide constants and `trial_number` as constants."""

    def __init__(self, spec: dict, approach: str, constants: dict[str, Any], pretrained: dict | None = None):
        """`constants`: the search-wide config keys of the trial contract; `pretrained`: target -> loaded model
        (single/fused), whose architecture and normalisation the trials keep."""
        from ecgmodels import default_hparams, list_models

        if approach not in APPROACHES:
            raise InputError(f"approach: unknown {approach!r}; choose from {', '.join(APPROACHES)}")
        unknown = sorted(set(spec) - set(_TOP_KEYS))
        if unknown:
            raise InputError(f"search space: unknown setting {unknown[0]!r}; known: {', '.join(_TOP_KEYS)}")
        self.spec, self.approach, self.constants = spec, approach, dict(constants)
        self.dims: dict[str, Dim] = {}
        for name in ("lr", "weight_decay", "batch_size", "patience"):
            self._add(name, spec.get(name))
        self._add("schedule", spec.get("schedule"), allowed=SCHEDULES)
        self.schedule_dims = self._conditional("schedules", spec.get("schedules") or {}, SCHEDULE_PARAMS,
                                               self._values("schedule"), "schedule")
        aug = spec.get("aug") or {}
        if not isinstance(aug, dict) or not all(isinstance(v or {}, dict) for v in aug.values()):
            raise InputError(f"search space: aug: a mapping of augmentation -> {{p, strength}}, got {aug!r}")
        for a, params in aug.items():
            if a not in AUGMENTATIONS:
                raise InputError(f"search space: aug.{a}: unknown augmentation; known: {', '.join(AUGMENTATIONS)}")
            for p, v in (params or {}).items():
                if p not in ("p", "strength"):
                    raise InputError(f"search space: aug.{a}.{p}: unknown; an augmentation has p and strength")
                self._add(f"aug.{a}.{p}", v)
        if approach == "baseline":
            self._add("norm", spec.get("norm"), allowed=NORMALISATIONS)
            self._add("lead_stats", spec.get("lead_stats", False))
            self._add("arch", spec.get("arch"), allowed=tuple(list_models()))
            hparams = {a: tuple(h for h in default_hparams(a) if h != "lead_stats") for a in list_models()}
            self.arch_dims = self._conditional("archs", spec.get("archs") or {}, hparams, self._values("arch"),
                                               "arch", types={a: default_hparams(a) for a in hparams})
        else:
            models = list((pretrained or {}).values())
            if not models:
                raise InputError(f"approach {approach} needs pretrained models (--pretrained TARGET=URI)")
            self.dims["arch"] = Dim("arch", value="+".join(dict.fromkeys(m.config["name"] for m in models)))
            self.dims["norm"] = Dim("norm", value=models[0].config["norm"])  # a transferred backbone keeps its own
            self.arch_dims = {}
            stages = max(len(m.stage_names) for m in models)
            depth = spec.get("freeze_depth")
            if isinstance(depth, dict) and isinstance(depth.get("high"), int):  # a range fits itself to the backbone
                depth = {**depth, "high": min(depth["high"], stages)}
            self._add("freeze_depth", depth, hi=stages)
            self._add("pretrained_lr_mult", spec.get("pretrained_lr_mult"))

    def _add(self, name: str, spec: Any, allowed: tuple | None = None, hi: float | None = None) -> None:
        if spec is None:
            raise InputError(f"search space: {name} is missing (configs/search.yaml has the defaults)")
        kind, lo, top = _TYPES[name]
        self.dims[name] = parse_dim(name, spec, kind, lo, top if hi is None else hi, allowed)

    def _values(self, name: str) -> tuple:
        d = self.dims[name]
        return (d.value,) if d.fixed else d.choices

    def _conditional(self, section: str, spec: dict, known: dict[str, tuple[str, ...]], used: tuple, prefix: str,
                     types: dict[str, dict] | None = None) -> dict[str, list[Dim]]:
        """`archs:` / `schedules:` -> the dims each choice brings, named `<prefix>.<param>`."""
        out: dict[str, list[Dim]] = {}
        if not isinstance(spec, dict):
            raise InputError(f"search space: {section}: a mapping of choice -> parameters, got {spec!r}")
        for choice, params in spec.items():
            if choice not in known:
                raise InputError(f"search space: {section}.{choice}: unknown; known: {', '.join(known)}")
            if not isinstance(params or {}, dict):
                raise InputError(f"search space: {section}.{choice}: a mapping of parameters, got {params!r}")
            dims = []
            for p, v in (params or {}).items():
                if p not in known[choice]:
                    raise InputError(f"search space: {section}.{choice}.{p}: unknown parameter; "
                                     f"{choice} has {', '.join(known[choice]) or 'none'}")
                name = f"{prefix}.{p}"
                if types is not None:
                    default = types[choice][p]
                    kind, lo, hi = type(default), (0 if isinstance(default, (int, float)) else None), None
                else:
                    kind, lo, hi = _TYPES[name]
                dims.append(parse_dim(name, v, kind, lo, hi, key=f"{choice}.{p}"))
            if choice in used:
                out[choice] = dims
        return out

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        """The whole trial config. Suggestions go to the raw Optuna trial (Ray's wrapper would add them to the
        config under Optuna's names), so conditional dims are `<choice>.<param>` to Optuna and `arch.<hp>` /
        `schedule.<param>` in the config: two architectures may give one hyperparameter different ranges."""
        raw = getattr(trial, "ot_trial", trial)
        config = {**self.constants, "approach": self.approach, "trial_number": trial.number}
        config.update({d.name: d.suggest(raw) for d in self.dims.values()})
        config.update({d.name: d.suggest(raw) for d in self._conditional_dims(config)})
        return config

    def _conditional_dims(self, config: dict) -> list[Dim]:
        return [*self.arch_dims.get(config["arch"], []), *self.schedule_dims.get(config["schedule"], [])]

    def searched(self, config: dict) -> tuple[dict, dict]:
        """One trial's searched values and their distributions under Optuna's names (to rebuild a study)."""
        dims = [d for d in (*self.dims.values(), *self._conditional_dims(config)) if not d.fixed]
        return ({d.key or d.name: config[d.name] for d in dims},
                {d.key or d.name: d.distribution() for d in dims})

    def describe(self) -> dict[str, str]:
        """Every dimension as `name -> fixed value, choices or range` (logged as the parent run's params)."""
        out = {f"space.{d.name}": d.describe() for d in self.dims.values()}
        for section, conditional in (("archs", self.arch_dims), ("schedules", self.schedule_dims)):
            for choice, dims in conditional.items():
                out.update({f"space.{section}.{choice}.{d.name.split('.', 1)[1]}": d.describe() for d in dims})
        return out
