"""Stage two: losses and the decoder training loop (AdamW + OneCycle, validation, resumable checkpoints)."""

from cellembed.train._fit import FitConfig, FitResult, fit_decoder, validate
from cellembed.train._live import LiveLoader, make_live_loader
from cellembed.train._many import fit_many, variant_configs

__all__ = ["FitConfig", "FitResult", "LiveLoader", "fit_decoder", "fit_many", "make_live_loader", "validate",
           "variant_configs"]
