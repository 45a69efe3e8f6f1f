"""Hyper-parameter search: Ray Tune + Optuna (TPE) + ASHA over real ``viscy train`` runs (``viscy tune``)."""
