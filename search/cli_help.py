"""The CLI's words: what each command is for, its examples, and the help formatter that shows defaults."""
from __future__ import annotations

import argparse

APPROACHES_HELP = ("baseline: train from scratch; single: fine-tune one pretrained model (--pretrained TARGET=URI, "
                   "e.g. "
                   "a QRS-duration regressor); fused: one pretrained backbone per target (hr, pr, qrs, qt), their "
                   "features concatenated under a new head")
DESCRIPTIONS = {
    "search": "Search a prepared dataset: Optuna (TPE) proposes each trial's architecture and training settings\n"
              "(configs/search.yaml, --config), Ray Tune runs the trials --max-concurrent at a time and ASHA stops\n"
              "weak trials early. Each trial is a child run of the search's MLflow run; the printed link opens them\n"
              "best first.\n\n"
              "approaches:\n"
              "  baseline  train from scratch\n"
              "  single    fine-tune one pretrained model (--pretrained TARGET=URI), e.g. a QRS-duration regressor\n"
              "            trained on DeepFake ECGs\n"
              "  fused     one pretrained backbone per interval target (hr, pr, qrs, qt), their features\n"
              "            concatenated under a new head",
}
EXAMPLES = {
    "data ptbxl": "ecgsearch data ptbxl --root ~/ptb-xl --features ~/ptb-xl-plus --out prepared/ptbxl-100",
    "data deepfake": "ecgsearch data deepfake --count 2000 --rate 100 --out prepared/deepfake-100\n"
                     "  ecgsearch data deepfake --asc-dir ~/deepfake/asc --ground-truth ~/deepfake/gt.csv --out df",
    "data verify": "ecgsearch data verify prepared/ptbxl-100",
    "data resample": "ecgsearch data resample prepared/ptbxl-500 --rate 100 --out prepared/ptbxl-100",
    "server": "ecgsearch server --backend-store-uri postgresql://postgres@127.0.0.1:5432/mlflow "
              "--artifacts-destination /data/mlartifacts",
    "search": "ecgsearch search --data prepared/ptbxl-100 --task classification --half A --num-samples 32\n"
              "  ecgsearch search --data prepared/deepfake-100 --task regression --target qrs --num-samples 16\n"
              "  ecgsearch search --data prepared/ptbxl-100 --task classification --approach single "
              "--pretrained qrs=models:/ecg-qrs@champion --num-samples 16",
    "resume": "ecgsearch resume baseline-classification-20261201-101500",
    "promote": "ecgsearch promote --search baseline-classification-20261201-101500 --name ecg-superclass",
    "ui": "ecgsearch ui --port 5000",
    "dashboard": "ecgsearch dashboard demo-20261201-101500",
    "compare": "ecgsearch compare baseline-classification-20261201-101500 single-classification-20261201-120000",
    "demo": "ecgsearch demo\n  ecgsearch demo --num-samples 4 --max-epochs 3",
    "": "ecgsearch demo\n  ecgsearch search --help",
    "study": "ecgsearch study --config configs/study-small.yaml --plan\n"
             "  ecgsearch study --config configs/study-small.yaml",
}


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown where they say something (not None, False or already in the help); epilogs as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default == [] or \
                action.default == argparse.SUPPRESS or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def explain(parser: argparse.ArgumentParser, path: str = "") -> None:
    """Every parser below `parser`: the formatter, `-v`, and its examples as the epilog."""
    parser.formatter_class = _Formatter
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for action in subparsers:
        for name, child in action.choices.items():
            explain(child, f"{path} {name}".strip())
    if path and not subparsers:
        parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                            help="also show Ray, Tune, Optuna and MLflow's own INFO output")
    if path in EXAMPLES:
        parser.epilog = "example:\n  " + EXAMPLES[path]
    if path in DESCRIPTIONS:
        parser.description = DESCRIPTIONS[path]
