"""``cellembed predict``: a trained run on images of any size and whole slides (seam-free tiled inference,
GeoJSON for QuPath, cell tables, overlays)."""

from ._input import InputError, open_input
from ._predict import PredictConfig, Predictor, PredictResult, predict
from ._tiling import Grid

__all__ = ["Grid", "InputError", "PredictConfig", "PredictResult", "Predictor", "open_input", "predict"]
