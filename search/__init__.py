"""Ray Tune + Optuna hyperparameter search over ecgmodels on prepared datasets, tracked in MLflow."""
