"""The study's config and its searches: `load_config` checks a study YAML, `searches` lists stages 0-2 with their
keys, `Search.spec` is the SearchSpec each search runs with (the same one `plan` checks)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from data_prep.constants import TARGETS
from data_prep.errors import InputError
from search.fidelity import HIGH as HIGH_RATE, LOW as LOW_RATE
from search.space import APPROACHES

STAGES = ("architectures", "pretrain", "finetune", "evaluate")
SOURCES = {"ptbxl-a": ("ptbxl", "A"), "deepfake": ("deepfake", None)}  # pretraining source -> (dataset, half)
FINETUNE_HALF = "B"
TAG = "study."  # prefix of the study's MLflow tags
DEFAULTS: dict[str, Any] = {
    "name": "study", "workdir": "study", "experiment": None, "seed": 0, "single_label": True, "model_prefix": "",
    "address": None, "fidelity": None,
    "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0, "max_concurrent": 2},
    "data": {"ptbxl": None, "deepfake": None},
    "architectures": {"archs": [], "tasks": [*TARGETS, "classification"], "num_samples": 1, "max_epochs": 2,
                      "cv": 1, "space": {}},
    "pretrain": {"targets": list(TARGETS), "sources": list(SOURCES), "num_samples": 8, "max_epochs": 10, "cv": 1,
                 "space": {}},
    "finetune": {"approaches": list(APPROACHES), "sources": list(SOURCES), "single_target": "qrs", "num_samples": 8,
                 "max_epochs": 10, "cv": 1, "space": {}},
    "evaluate": {"n_boot": 1000, "trees": 500, "folds": 1, "seeds": [0]},
}
DATA_KEYS = {"ptbxl": {"root", "rate", "features", "split", "min_likelihood"},
             "deepfake": {"count", "asc_dir", "ground_truth"}}


@dataclass
class Search:
    """One search of the study: what run_search gets, plus where it sits in the study."""

    stage: str
    name: str
    dataset: str  # "ptbxl" or "deepfake"
    half: str | None
    task: str
    target: str | None = None
    approach: str = "baseline"
    source: str = "-"  # pretraining source of stages 1-2 ("-" for none)
    pretrained: dict[str, str] = field(default_factory=dict)  # target -> name of the stage-1 search that trains it
    space: dict = field(default_factory=dict)
    num_samples: int = 1
    max_epochs: int = 1
    cv: int = 1  # the stage's `cv`: each trial scored over K folds of the half's train+val rows (SearchSpec.cv)
    register_as: str | None = None
    key: str = ""

    @property
    def metric(self) -> str:
        return "val_auc" if self.task == "classification" else "val_mae"

    def spec(self, cfg: dict, uri: str | None, pretrained: dict[str, str] | None = None,
             study_run: str | None = None) -> "SearchSpec":
        """The SearchSpec of this search: `pretrained` maps target -> registry URI of its backbone (default: the
        upstream model's champion, enough for `check`)."""
        from search.spec import SearchSpec

        res = cfg["resources"]
        if pretrained is None:
            pretrained = {t: f"models:/{model_name(cfg, t, self.source)}@champion" for t in self.pretrained}
        return SearchSpec(
            data_dir(cfg, self.dataset, LOW_RATE if cfg["fidelity"] else None), self.task, fidelity=cfg["fidelity"],
            target=self.target, approach=self.approach, pretrained=pretrained,
            half=self.half, num_samples=self.num_samples, max_epochs=self.max_epochs, cv=self.cv,
            space_overrides={"lead_stats": False, **self.space},  # transfer arms have no lead statistics
            tracking_uri=uri, name=f"{self.name}-{self.key}", storage_path=Path(cfg["workdir"]) / "ray_results",
            seed=cfg["seed"], max_concurrent=res["max_concurrent"], cpus_per_trial=res["cpus_per_trial"],
            gpus_per_trial=res["gpus_per_trial"], address=cfg["address"], experiment=cfg["experiment"],
            single_label=cfg["single_label"], parent_run_id=study_run, forest=False,  # the arms compare nets
            tags={f"{TAG}search_key": self.key, f"{TAG}search": self.name, f"{TAG}stage": self.stage,
                  f"{TAG}name": cfg["name"],
                  f"{TAG}source": self.source})


# ----------------------------------------------------------------------------------------------------- config

def _merge(defaults: dict, given: dict, file: str, prefix: str = "") -> dict:
    """`given` over `defaults`, section by section (a stage's `space` and `data` are taken whole)."""
    if not isinstance(given, dict):
        raise InputError(f"{file}: {prefix.rstrip('.') or 'the file'} must be a mapping of settings")
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise InputError(f"{file}: {prefix}{unknown[0]}: unknown setting; known: {', '.join(defaults)}")
    out = dict(defaults)
    for k, v in given.items():
        nested = isinstance(defaults[k], dict) and k not in ("space", "data")
        out[k] = _merge(defaults[k], v or {}, file, f"{prefix}{k}.") if nested else v
    return out


def _names(values: Any, allowed: tuple | list, where: str) -> list[str]:
    values = [values] if isinstance(values, str) else list(values or [])
    for v in values:
        if v not in allowed:
            raise InputError(f"{where}: unknown {v!r}; choose from {', '.join(allowed)}")
    return values


def load_config(path: str | Path, registered: Callable[[str], bool] | None = None) -> dict:
    """Read and check a study YAML file: every error is one InputError line, raised before anything runs.

    `registered(name)` says whether a model is already in the registry (for approaches whose backbones are not
    scheduled in this config); without it only scheduled backbones count.
    """
    from ecgmodels import list_models
    from search.space import SearchSpace, load_space_config, read_yaml

    path = Path(path)
    cfg = _merge(DEFAULTS, read_yaml(path, "study config"), path.name)
    where = f"{path.name}:"
    for section in ("architectures", "pretrain", "finetune"):
        for k in ("num_samples", "max_epochs", "cv"):
            if not isinstance(cfg[section][k], int) or isinstance(cfg[section][k], bool) or cfg[section][k] < 1:
                raise InputError(f"{where} {section}.{k} must be a positive integer, got {cfg[section][k]!r}")
        try:
            SearchSpace(load_space_config(None, cfg[section]["space"] or {}), "baseline", {})
        except InputError as e:
            raise InputError(f"{where} {section}.space: {e}") from None
    arch = cfg["architectures"]
    arch["archs"] = _names(arch["archs"], list_models(), f"{where} architectures.archs")
    arch["tasks"] = _names(arch["tasks"], [*TARGETS, "classification"], f"{where} architectures.tasks")
    pre, fine = cfg["pretrain"], cfg["finetune"]
    pre["targets"] = _names(pre["targets"], TARGETS, f"{where} pretrain.targets")
    pre["sources"] = _names(pre["sources"], list(SOURCES), f"{where} pretrain.sources")
    fine["approaches"] = _names(fine["approaches"], APPROACHES, f"{where} finetune.approaches")
    fine["sources"] = _names(fine["sources"], list(SOURCES), f"{where} finetune.sources")
    _names(fine["single_target"], TARGETS, f"{where} finetune.single_target")

    data = _merge({"ptbxl": None, "deepfake": None}, cfg["data"] or {}, path.name, "data.")
    used = {"ptbxl"} | {SOURCES[s][0] for s in (pre["sources"] if pre["targets"] else [])}
    used |= {SOURCES[s][0] for s in fine["sources"] if set(fine["approaches"]) - {"baseline"}}
    for name in sorted(used):
        if not data.get(name):
            raise InputError(f"{where} source {name} is used but data.{name} is missing (its raw data: "
                             f"{', '.join(sorted(DATA_KEYS[name]))})")
    for name, spec in data.items():
        if spec:
            data[name] = _check_source(name, spec, where)
    if data["deepfake"]:
        data["deepfake"]["rate"] = data["ptbxl"]["rate"]  # backbones transfer only between equal lengths
    cfg["data"] = data
    if cfg["fidelity"] not in (None, "rate"):
        raise InputError(f"{where} fidelity {cfg['fidelity']!r}: choose rate, or leave it out")
    if cfg["fidelity"] and data["ptbxl"]["rate"] != HIGH_RATE:
        raise InputError(f"{where} fidelity rate screens at {LOW_RATE} Hz and chooses at {HIGH_RATE} Hz: set "
                         f"data.ptbxl.rate to {HIGH_RATE}")

    for approach in (a for a in fine["approaches"] if a != "baseline"):
        wanted = [fine["single_target"]] if approach == "single" else list(TARGETS)
        for source in fine["sources"]:
            missing = [t for t in wanted if not (t in pre["targets"] and source in pre["sources"])
                       and not (registered and registered(model_name(cfg, t, source)))]
            if missing:
                raise InputError(f"{where} finetune approach {approach} on source {source} needs pretrained "
                                 f"{', '.join(model_name(cfg, t, source) for t in missing)}: neither scheduled in "
                                 "pretrain (targets x sources) nor in the registry")
    if "fused" in fine["approaches"] and isinstance(
            load_space_config(None, pre["space"] or {}).get("norm"), (list, dict)):
        raise InputError(f"{where} fused transfer needs one normalisation for all four backbones: fix "
                         "pretrain.space.norm to one of zscore, minmax, global")
    _share_normalisation(cfg)
    _check_evaluate(cfg["evaluate"], where)
    cfg["workdir"] = str(Path(cfg["workdir"]).resolve())
    cfg["experiment"] = cfg["experiment"] or f"study-{cfg['name']}"
    return cfg


def _share_normalisation(cfg: dict) -> None:
    """The baseline arm gets the normalisation the transfer arms' backbones were pretrained with, unless
    finetune.space names its own (then the report lists the difference): no confound by default."""
    from search.space import load_space_config

    fine, pre = cfg["finetune"], cfg["pretrain"]
    norm = load_space_config(None, pre["space"] or {}).get("norm")
    if set(fine["approaches"]) - {"baseline"} and "norm" not in (fine["space"] or {}) and isinstance(norm, str):
        fine["space"] = {**(fine["space"] or {}), "norm": norm}


def _check_evaluate(ev: dict, where: str) -> None:
    for k in ("n_boot", "trees", "folds"):
        if not isinstance(ev[k], int) or isinstance(ev[k], bool) or ev[k] < 1:
            raise InputError(f"{where} evaluate.{k} must be a positive integer, got {ev[k]!r}")
    if ev["folds"] == 2:
        raise InputError(f"{where} evaluate.folds 2: cross-fitting needs at least 3 folds (one held out, one inner "
                         "validation fold, the rest to train on), or 1 for the single test split")
    seeds = ev["seeds"] if isinstance(ev["seeds"], list) else [ev["seeds"]]
    if not seeds or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds) or \
            len(set(seeds)) != len(seeds):
        raise InputError(f"{where} evaluate.seeds must be a list of distinct integers, got {ev['seeds']!r}")
    ev["seeds"] = seeds


def _check_source(name: str, spec: dict, where: str) -> dict:
    if not isinstance(spec, dict):
        raise InputError(f"{where} data.{name} must be a mapping of {', '.join(sorted(DATA_KEYS[name]))}")
    unknown = sorted(set(spec) - DATA_KEYS[name])
    if unknown:
        raise InputError(f"{where} data.{name}.{unknown[0]}: unknown; known: {', '.join(sorted(DATA_KEYS[name]))}")
    spec = dict(spec)
    if name == "ptbxl":
        spec = {"rate": 100, "features": None, "split": "strat_fold", "min_likelihood": 0.0, **spec}
        if not spec.get("root") or not (Path(spec["root"]) / "ptbxl_database.csv").is_file():
            raise InputError(f"{where} data.ptbxl.root {spec.get('root')!r} is not a PTB-XL directory "
                             "(no ptbxl_database.csv)")
        if spec["rate"] not in (100, 500):
            raise InputError(f"{where} data.ptbxl.rate {spec['rate']!r}: choose 100 or 500")
        for k in ("root", "features"):
            spec[k] = str(Path(spec[k]).resolve()) if spec[k] else None
        return spec
    spec = {"count": None, "asc_dir": None, "ground_truth": None, **spec}
    if (spec["count"] is None) == (spec["asc_dir"] is None):
        raise InputError(f"{where} data.deepfake: give exactly one of count (generate) or asc_dir (published .asc)")
    for k in ("asc_dir", "ground_truth"):
        if spec[k] is not None:
            if not Path(spec[k]).exists():
                raise InputError(f"{where} data.deepfake.{k} {spec[k]!r} does not exist")
            spec[k] = str(Path(spec[k]).resolve())
    return spec


def data_dir(cfg: dict, dataset: str, rate: int | None = None) -> Path:
    """Where the study prepares a source: workdir/data/ptbxl-<rate> or deepfake-<rate> (`rate`: the source's own,
    or the screening rate of `fidelity: rate`, derived from it)."""
    return Path(cfg["workdir"]) / "data" / f"{dataset}-{rate or cfg['data'][dataset]['rate']}"


def model_name(cfg: dict, target: str, source: str) -> str:
    """The registered name of stage 1's model for `target` pretrained on `source`, e.g. ecg-qrs-ptbxl-a."""
    return f"{cfg['model_prefix']}ecg-{target}-{source}"


# ------------------------------------------------------------------------------------------------- searches

def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def searches(cfg: dict) -> list[Search]:
    """The study's searches in run order (stages 0-2), each keyed by a hash of what decides its outcome."""
    arch, pre, fine = cfg["architectures"], cfg["pretrain"], cfg["finetune"]
    out: list[Search] = []
    for a in arch["archs"]:
        for task in arch["tasks"]:
            regression = task in TARGETS
            out.append(Search("architectures", f"arch-{a}-{task}", "ptbxl", "A",
                              "regression" if regression else "classification", task if regression else None,
                              space={**(arch["space"] or {}), "arch": a}, num_samples=arch["num_samples"],
                              max_epochs=arch["max_epochs"], cv=arch["cv"]))
    for source in pre["sources"]:
        dataset, half = SOURCES[source]
        for t in pre["targets"]:
            out.append(Search("pretrain", f"pretrain-{t}-{source}", dataset, half, "regression", t, source=source,
                              space=pre["space"] or {}, num_samples=pre["num_samples"],
                              max_epochs=pre["max_epochs"], cv=pre["cv"], register_as=model_name(cfg, t, source)))
    for approach in fine["approaches"]:
        for source in (["-"] if approach == "baseline" else fine["sources"]):
            wanted = {"baseline": [], "single": [fine["single_target"]], "fused": list(TARGETS)}[approach]
            label = "baseline" if approach == "baseline" else f"{approach}-{source}"
            out.append(Search("finetune", f"finetune-{label}", "ptbxl", FINETUNE_HALF, "classification",
                              approach=approach, source=source,
                              pretrained={t: f"pretrain-{t}-{source}" for t in wanted}, space=fine["space"] or {},
                              num_samples=fine["num_samples"], max_epochs=fine["max_epochs"], cv=fine["cv"],
                              register_as=f"{cfg['model_prefix']}ecg-cls-{label}"))
    keys: dict[str, str] = {}
    for s in out:
        upstream = {t: keys.get(n, model_name(cfg, t, s.source)) for t, n in s.pretrained.items()}
        fields = {k: v for k, v in asdict(s).items() if (k, v) != ("cv", 1)}  # a study from before `cv` resumes
        s.key = keys[s.name] = _key({**fields, "key": "", "pretrained": upstream, "seed": cfg["seed"],
                                     "single_label": cfg["single_label"], "data": cfg["data"][s.dataset],
                                     **({"fidelity": cfg["fidelity"]} if cfg["fidelity"] else {})})
    return out


def evaluation_key(cfg: dict, finetune: list[Search]) -> str:
    return _key({"models": [s.key for s in finetune], "evaluate": cfg["evaluate"], "seed": cfg["seed"],
                 "single_label": cfg["single_label"], "data": cfg["data"]["ptbxl"]})


