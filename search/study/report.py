"""The study's report: Tables 1-2 (stage 0, with the spread over each architecture's trials) and stage 3's answer
(one sentence per comparison, what touched what, the settings that differ between arms, Tables 3-5, the per-class
AUC with class counts, and a forest plot of the differences)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from data_prep.constants import CLASSES, TARGET_UNITS, TARGETS
from search.evaluate import REFERENCES
from search.study.config import FINETUNE_HALF, Search
from search.study.run import best_trial, trials

SOURCE_NAMES = {"ptbxl-a": "PTB-XL-A", "deepfake": "DeepFake", "-": ""}
SPLIT_NAMES = {"oof": "out-of-fold", "train": "train", "val": "val", "test": "test"}
ALPHA = 0.05


def architecture_tables(client: Any, experiment_id: str, found: list[Search], runs: dict, cfg: dict,
                        out: Path) -> dict[str, Path]:
    """Tables 1 (MAE per architecture and target) and 2 (accuracy and macro AUC per architecture): each stage-0
    search's best trial at its best epoch, and its val metric over all its trials (median [min, max]), as Markdown
    and CSV."""
    rows = []
    for s in (s for s in found if s.stage == "architectures"):
        run_id = runs[s.name].info.run_id
        best = best_trial(client, experiment_id, run_id, s.metric) or {}
        values = [r.data.metrics[f"best_{s.metric}"] for r in trials(client, experiment_id, run_id, s.metric)]
        names = ("train_mae", "val_mae") if s.task == "regression" else ("train_acc", "val_acc", "train_auc",
                                                                          "val_auc")
        rows.append({"arch": s.space["arch"], "task": s.target or s.task, "epoch": best.get("epoch"),
                     **{n: best.get(n, np.nan) for n in names}, "trials": len(values),
                     "val_median": np.median(values) if values else np.nan,
                     "val_min": min(values, default=np.nan), "val_max": max(values, default=np.nan)})
    if not rows:
        return {}
    df = pd.DataFrame(rows)
    out.mkdir(parents=True, exist_ok=True)
    paths = {n: out / n for n in ("architectures.csv", "architectures.md")}
    df.to_csv(paths["architectures.csv"], index=False)
    spread = lambda r, f: f"{r.val_median:{f}} [{r.val_min:{f}}, {r.val_max:{f}}] ({r.trials})"
    arch = (cfg["pretrain"]["space"] or {}).get("arch", "the pretrain space's choice")
    lines = [f"Stage 0 is report-only: it does not choose stage 1's architecture (pretrain.space.arch: {arch}).", ""]
    reg = df[df["task"].isin(TARGETS)]
    if len(reg):
        lines += ["### Table 1: PTB-XL-A regression, MAE of each architecture", "",
                  "| arch | target | best trial train / val | val over trials: median [min, max] (trials) |",
                  "|---|---|---|---|"]
        lines += [f"| {r.arch} | {r.task} ({TARGET_UNITS[r.task]}) | {r.train_mae:.1f} / {r.val_mae:.1f} | "
                  f"{spread(r, '.1f')} |" for r in reg.itertuples()] + [""]
    cls = df[df["task"] == "classification"]
    if len(cls):
        lines += ["### Table 2: PTB-XL-A classification, each architecture", "",
                  "| arch | train acc | val acc | train AUC | val AUC | val AUC over trials: median [min, max] "
                  "(trials) |", "|---|---|---|---|---|---|"]
        lines += [f"| {r.arch} | {r.train_acc:.3f} | {r.val_acc:.3f} | {r.train_auc:.3f} | {r.val_auc:.3f} | "
                  f"{spread(r, '.3f')} |" for r in cls.itertuples()] + [""]
    paths["architectures.md"].write_text("\n".join(lines))
    return paths


def _name(approach: str, source: str) -> str:
    return f"{approach} from {SOURCE_NAMES[source]}" if source != "-" else approach


def _ci(row: pd.Series, col: str, sign: str = "") -> str:
    if col not in row or pd.isna(row[col]):
        return "-"
    return f"{row[col]:{sign}.3f} [{row[col + '_low']:{sign}.3f}, {row[col + '_high']:{sign}.3f}]"


def _p(x: float) -> str:
    return "-" if pd.isna(x) else f"{x:.3f}" if x >= 0.001 else f"{x:.1e}"


def sentences(results: pd.DataFrame) -> list[str]:
    """One sentence per comparison against the baseline, judged by its Holm-adjusted p at ALPHA."""
    out = []
    for _, r in results[results["auc_diff_p_holm"].notna()].iterrows():
        if r["auc_diff_p_holm"] < ALPHA:
            verdict = "better" if r["auc_diff"] > 0 else "worse"
        else:
            verdict = f"no detectable difference (this n detects about ±{r['auc_diff_mdd']:.3f} with 80% power)"
        out.append(f"- **{_name(r['approach'], r['source'])} vs baseline**: {_ci(r, 'auc_diff', '+')} macro AUC, "
                   f"Holm-adjusted p = {_p(r['auc_diff_p_holm'])}: {verdict}.")
    return out


def _table(title: str, header: list[str], body: list[list[str]]) -> list[str]:
    return [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in body), ""]


def _touched(facts: dict) -> list[str]:
    """What touched what, in words."""
    lines = ["### What touched what", "",
             "- Stage 1 backbones trained on PTB-XL-A's train split (their epoch chosen on its val split) or on "
             f"DeepFake; none saw a PTB-XL-{FINETUNE_HALF} record.",
             f"- Stage 2 searches trained on PTB-XL-{FINETUNE_HALF}'s train split and chose each approach's "
             "configuration and epoch on its val split; its test split "
             f"({facts['test_split_n']} records) touched nothing before stage 3. Warm starts: a DeepFake fine-tune "
             "starts from the trials of the PTB-XL-A fine-tune of the same approach (their scores on the same val "
             "split), and a search whose config changed from its previous run's trials."]
    if facts["mode"] == "crossfit":
        lines += [f"- Stage 3: {facts['n']} records of {facts['patients']} patients in {facts['folds']} "
                  f"patient-grouped, stratified folds (sizes {', '.join(map(str, facts['fold_sizes']))}). Each "
                  "approach's chosen configuration was retrained per fold and seed on the other folds but one, "
                  "early-stopped on that one, and scored the held-out fold: every record is scored once per seed "
                  "by a model that neither trained nor early-stopped on it. The random forest was refitted "
                  "per fold on the other folds; the majority class is one constant, the cohort's class frequencies.",
                  "- Caveat: the configurations were chosen on the train/val records, which stage 3 also scores. "
                  f"On the {facts['test_split_n']} test-split records alone (seen by nothing upstream) the macro "
                  "AUCs are " + ", ".join(f"{_name(*k)} {v:.3f}" for k, v in facts["test_split_auc"].items()) + "."]
    else:
        lines.append(f"- Stage 3 scored the registered models on the {facts['n']} test-split records.")
    if facts.get("fidelity"):
        lines.append("- Fidelity: every search of stages 0-2 screened its configurations at 100 Hz (the same records, "
                     "resampled) under ASHA and chose among the best of them retrained at 500 Hz; stage 3 retrained "
                     "and scored at 500 Hz only.")
    lines.append("- Every interval is a patient-level (cluster) bootstrap: patients are resampled with all their "
                 "records; a difference is computed on the same resampled patients for both models.")
    return lines + [""]


def _differences(diff: dict[str, dict]) -> list[str]:
    if not diff:
        return ["Every arm shares its normalisation, augmentation and training budget: no setting differs.", ""]
    arms = list(next(iter(diff.values())))
    return _table("Settings that differ between arms (lr, schedule, freeze depth: each arm's own search chose them)",
                  ["setting", *arms], [[k, *(f"{v[a]:.4g}" if isinstance(v[a], float) else str(v[a]) for a in arms)]
                                       for k, v in diff.items()])


def markdown(results: pd.DataFrame, per_class: pd.DataFrame, primary: str, facts: dict) -> str:
    splits = [s for s in SPLIT_NAMES if f"{s}_n" in results]
    n = {s: int(results[f"{s}_n"].max()) for s in splits}
    b = "the baseline" if (results["approach"] == "baseline").any() else "the majority class"
    out = [f"## The answer (macro AUC vs {b}, {SPLIT_NAMES[primary]} on n = {n[primary]} records, "
           f"{facts['patients']} patients)", "", *sentences(results), ""]
    seeded = results[results["seeds"] > 1]
    if len(seeded):
        arms = results[~results["approach"].isin(REFERENCES)]
        out += [f"Retraining with another seed ({len(facts['seeds'])} seeds) moves an approach's macro AUC by an SD "
                f"of {seeded['seed_auc_sd'].min():.3f} to {seeded['seed_auc_sd'].max():.3f}; the approaches' mean "
                f"AUCs spread by an SD of {arms[f'{primary}_auc'].std(ddof=1):.3f}.", ""]
    out += _touched(facts) + _differences(facts.get("differences", {}))
    key = [[r.approach, r.source] for r in results.itertuples()]
    for number, metric, title in ((3, "acc", "accuracy"), (4, "auc", "macro AUC (one-vs-rest)")):
        extra = ["seed spread (min-max)"] if metric == "auc" else []
        out += _table(f"Table {number}: {title}, 95% patient-bootstrap CI" +
                      (" (mean over seeds)" if len(seeded) else ""),
                      ["approach", "source", *(f"{SPLIT_NAMES[s]} (n={n[s]})" for s in splits), *extra],
                      [k + [_ci(r, f"{s}_{metric}") for s in splits] +
                       ([f"{r['seed_auc_min']:.3f}-{r['seed_auc_max']:.3f}" if r["seeds"] > 1 else "-"]
                        if extra else []) for k, (_, r) in zip(key, results.iterrows())])
    diffs = results.dropna(subset=["auc_diff"]) if "auc_diff" in results else results.iloc[:0]
    out += _table(f"Table 5: {SPLIT_NAMES[primary]} macro AUC minus {b}'s, paired on the same resampled patients",
                  ["approach", "source", "difference [95% CI]", "p", "Holm p", "detectable at 80% power"],
                  [[r["approach"], r["source"], _ci(r, "auc_diff", "+"), _p(r["auc_diff_p"]),
                    _p(r.get("auc_diff_p_holm")), f"±{r['auc_diff_mdd']:.3f}"] for _, r in diffs.iterrows()])
    counts = per_class.iloc[0] if len(per_class) else {}
    out += _table(f"AUC per class ({SPLIT_NAMES[primary]})", ["approach", "source",
                                                              *(f"{c} (n={counts[f'n_{c}']})" for c in CLASSES)],
                  [[r["approach"], r["source"], *("-" if pd.isna(r[c]) else f"{r[c]:.3f}" for c in CLASSES)]
                   for _, r in per_class.iterrows()])
    return "\n".join(out)


def plot_differences(results: pd.DataFrame, path: Path, primary: str) -> Path:
    """Forest plot: each approach's macro AUC difference against the baseline with its 95% CI, saved as PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = results.dropna(subset=["auc_diff"]) if "auc_diff" in results else results.iloc[:0]
    y = np.arange(len(d))[::-1]
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(d) + 1.4))
    diff, lo, hi = (d[c].to_numpy(float) for c in ("auc_diff", "auc_diff_low", "auc_diff_high"))
    ax.errorbar(diff, y, xerr=[diff - lo, hi - diff], fmt="o", capsize=3)
    ax.axvline(0, color="grey", lw=0.8, ls="--")
    ax.set_yticks(y, [_name(a, s) for a, s in zip(d["approach"], d["source"])])
    ax.set_xlabel(f"macro AUC minus the baseline's, 95% patient-bootstrap CI ({SPLIT_NAMES[primary]}, "
                  f"n={int(results[f'{primary}_n'].max())})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_evaluation(results: pd.DataFrame, per_class: pd.DataFrame, out: Path, primary: str,
                     facts: dict) -> list[Path]:
    """results.csv, per_class_auc.csv, tables.md and differences.png in `out`; their paths."""
    out.mkdir(parents=True, exist_ok=True)
    results.to_csv(out / "results.csv", index=False)
    per_class.to_csv(out / "per_class_auc.csv", index=False)
    (out / "tables.md").write_text(markdown(results, per_class, primary, facts))
    return [out / "results.csv", out / "per_class_auc.csv", out / "tables.md",
            plot_differences(results, out / "differences.png", primary)]
