"""Training targets computed per sample from an instance map (no torch).

    >>> import numpy as np
    >>> from cellembed.targets import cisca_targets, hover_targets
    >>> inst = np.zeros((32, 32), np.int32); inst[4:20, 4:14] = 1; inst[4:20, 14:24] = 2
    >>> t = cisca_targets(inst, magnification="40x")
    >>> t.classes.shape, t.directions.shape, t.weights.dtype.name
    ((32, 32), (4, 32, 32), 'float32')
    >>> hover_targets(inst).hv.shape
    (2, 32, 32)

``cisca_targets``: CISCA.md §1 (3-class map from the 4-level "graymask4", four directional maps,
type target, loss weight map). ``hover_targets``: HoVer-Net's NP, HV, NC. Hot loops are numba kernels
(``_kernels``) with numpy/scikit-image twins (``reference=True`` / ``*_reference``).
"""

from ._cisca import DIRECTION_MODES, MAGNIFICATIONS, CiscaTargets, cisca_targets, weight_map
from ._graymask import BACKGROUND, BODY, BOUNDARY, GAP
from ._hover import HoverTargets, hover_targets

__all__ = [
    "CiscaTargets",
    "cisca_targets",
    "HoverTargets",
    "hover_targets",
    "weight_map",
    "MAGNIFICATIONS",
    "DIRECTION_MODES",
    "BOUNDARY",
    "BODY",
    "BACKGROUND",
    "GAP",
]
