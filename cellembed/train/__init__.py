"""Stage two: losses and the decoder training loop (AdamW + OneCycle, validation, resumable checkpoints)."""

from cellembed.train._fit import FitConfig, FitResult, fit_decoder
from cellembed.train._live import LiveLoader, make_live_loader
from cellembed.train._many import fit_many, variant_configs
from cellembed.train._search import SearchResult, search_blocks
from cellembed.train._validate import validate

__all__ = ["FitConfig", "FitResult", "LiveLoader", "SearchResult", "fit_decoder", "fit_many", "make_live_loader",
           "search_blocks", "validate", "variant_configs"]
