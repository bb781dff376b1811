"""The whole transfer-learning study as one resumable command: `ecgsearch study --config FILE [--plan]`.

Stages, all under one parent MLflow run (each search's parent run nested under it):
  0 architectures  each zoo architecture searched briefly on PTB-XL-A, for regression and classification
                   (the study's Tables 1 and 2, with the spread over each architecture's trials); report-only;
  1 pretrain       one regression search per target x source (ptbxl-a, deepfake), its best model registered as
                   `<prefix>ecg-<target>-<source>`;
  2 finetune       PTB-XL-B classification, one search per approach (baseline, single, fused) x source, the
                   backbones being stage 1's registered models (pinned versions, lineage tags), each search's best
                   trial registered as `<prefix>ecg-cls-<approach>-<source>`;
  3 evaluate       every half-B record scored out of fold (`evaluate.folds` >= 3: each approach's chosen
                   configuration retrained per fold and seed) or the test split (`folds: 1`); patient-level
                   bootstrap CIs, paired differences against the baseline with Holm-adjusted p-values, the answer
                   in words (crossfit.py, report.py, search/evaluate.py).
Each search is keyed by a hash of everything that decides its outcome (its settings, its data's settings, the keys
of the searches it builds on); so is each stage-3 retraining. A rerun reuses every FINISHED search and every saved
retraining whose key it finds and trains nothing for it; a search left unfinished (driver killed or interrupted) is
finished with resume_search; a changed config reruns only what its change reaches.

Modules: config.py (the YAML, the searches and their SearchSpecs), run.py (plan, run_study), crossfit.py (stage 3),
report.py (tables and the answer).
"""
from search.study.config import STAGES, Search, evaluation_key, load_config, model_name, searches
from search.study.run import StudyResult, best_trial, finished_search, load_registered, plan, prepare_data, run_study

__all__ = ["STAGES", "Search", "StudyResult", "best_trial", "evaluation_key", "finished_search", "load_config",
           "load_registered", "model_name", "plan", "prepare_data", "run_study", "searches"]
