"""Instance-segmentation metrics with the official hover_net / CoNIC / PanNuke-metrics behaviour.

One numba pass over the pixels builds each overlap table; matching is IoU > 0.5 (strict, one-to-one).
``score_arrays`` is the entry point behind ``cellembed score --pred P.npy --true T.npy``; its docstring
documents every output key and aggregation rule. No torch here.
"""

from cellembed.metrics._image import ImageCounts
from cellembed.metrics._score import image_counts, score_arrays, score_counts
from cellembed.metrics._table import Overlap, compact_labels, overlap

__all__ = ["ImageCounts", "Overlap", "compact_labels", "image_counts", "overlap", "score_arrays",
           "score_counts"]
