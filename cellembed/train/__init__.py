"""Stage two: losses and the decoder training loop (AdamW + OneCycle, validation, resumable checkpoints)."""

from cellembed.train._fit import FitConfig, FitResult, fit_decoder
from cellembed.train._live import LiveLoader, make_live_loader
from cellembed.train._validate import validate

__all__ = ["FitConfig", "FitResult", "LiveLoader", "fit_decoder", "make_live_loader", "validate"]
