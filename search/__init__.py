"""Hyperparameter studies: Ray Tune + Optuna (define-by-run, TPE) + ASHA over denoiselab runs.

``denoiselab search STUDY.yaml`` (``search.command.run_search``): every trial is a Ray Train run
through ``orchestrator.runs.driver``, a child MLflow run under the study's parent run. Imports point
one way: search -> orchestrator -> trainers.
"""
from search.config import StudyConfig, StudyError, load_study
from search.spaces import SPACES, SpaceFunction, resolve_space

__all__ = ["SPACES", "SpaceFunction", "StudyConfig", "StudyError", "load_study", "resolve_space"]
