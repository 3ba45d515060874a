"""Stage two: losses and the decoder training loop (AdamW + OneCycle, validation, resumable checkpoints)."""

from cellembed.train._fit import FitConfig, FitResult, fit_decoder, validate

__all__ = ["FitConfig", "FitResult", "fit_decoder", "validate"]
