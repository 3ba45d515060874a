"""Tiles in, tiles out: dataset readers, splits and the synthetic nuclei generator (no torch).

    >>> from cellembed.data import open_dataset, resolve_split
    >>> source = open_dataset("synthetic", n_tiles=8, seed=0)
    >>> tile = source[0]
    >>> tile.image.shape, tile.image.dtype.name, tile.inst_map.dtype.name, tile.type_map.dtype.name
    ((256, 256, 3), 'uint8', 'int32', 'uint8')
    >>> resolve_split(source, "test").scheme
    'cisca'

Readers (``DATASETS``): ``pannuke``, ``conic``, ``cytodark0``, ``folder``, ``semantic_folder`` (tissue classes per
pixel, ``IGNORE`` = 255 unlabelled), ``synthetic``; each returns a
``TileSource`` (random access, picklable, lazily opened) yielding ``Tile`` tuples.
"""

from ._base import DATASETS, Tile, TileSource, open_dataset, relabel
from ._folder import FolderSource, write_folder_dataset
from ._readers import CoNICSource, CytoDArk0Source, PanNukeSource, combine_pannuke_channels
from ._semantic import IGNORE, SemanticFolderSource
from ._splits import SPLIT_SCHEMES, SplitSelection, read_folds_csv, resolve_split
from ._synthetic import (NUCLEUS_TYPES, SyntheticSource, make_synthetic_tile, synthetic_class_names,
                         write_synthetic_dataset)

__all__ = [
    "DATASETS",
    "SPLIT_SCHEMES",
    "NUCLEUS_TYPES",
    "Tile",
    "TileSource",
    "SplitSelection",
    "open_dataset",
    "resolve_split",
    "read_folds_csv",
    "relabel",
    "combine_pannuke_channels",
    "make_synthetic_tile",
    "synthetic_class_names",
    "write_folder_dataset",
    "write_synthetic_dataset",
    "PanNukeSource",
    "CoNICSource",
    "CytoDArk0Source",
    "FolderSource",
    "SemanticFolderSource",
    "IGNORE",
    "SyntheticSource",
]
