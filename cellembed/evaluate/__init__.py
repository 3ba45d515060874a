"""Predict → post-process → score: validation during training, ``cellembed score RUN`` and ``cellembed tune``."""

from cellembed.evaluate._predict import Postprocess, default_postprocess, semantic_scores
from cellembed.evaluate._run import (
           Run,
           ScoreResult,
           load_run,
           score_run,
           table_markdown,
           tune_run,
)

__all__ = ["Postprocess", "Run", "ScoreResult", "default_postprocess", "load_run", "score_run", "semantic_scores",
           "table_markdown", "tune_run"]
