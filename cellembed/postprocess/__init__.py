"""Decoder outputs to instances (no torch): CISCA (CISCA.md §3) and HoVer-Net (METRICS.md §3.1).

    >>> import numpy as np
    >>> from cellembed.postprocess import CISCA_PRESETS, cisca_instances
    >>> from cellembed.targets import cisca_targets
    >>> inst = np.zeros((48, 48), np.int32); inst[8:30, 6:24] = 1; inst[8:30, 24:42] = 2
    >>> t = cisca_targets(inst, magnification="40x")
    >>> onehot = (np.arange(3)[:, None, None] == t.classes).astype(np.float32)
    >>> int(cisca_instances(onehot, t.directions, None, CISCA_PRESETS["40x"])[0].max())
    2

Every step is a numba kernel (``_kernels``: labelling, size filters, seed rescue, binary morphology,
the watershed in scikit-image's exact flooding order, voting; ``_filter_kernels``: min-max scaling, the
5x5 and Sobel correlations, blurs, landscapes, x2 resizing) behind the stage functions of ``_cisca`` /
``_hover`` and the validating wrappers of ``_ops``. ``_reference`` holds the scipy / scikit-image twins,
stage by stage; both paths return identical arrays (float stages bit for bit). Only scikit-image's
``skeletonize`` (CISCA's seed cut) is shared. Every kernel releases the GIL: ``map_tiles`` post-processes a
batch of tiles on one thread per core.
"""

from cellembed._parallel import map_threads as map_tiles

from ._cisca import cisca_instances
from ._hover import hover_instances
from ._params import CISCA_PRESETS, HOVER_PRESETS, CiscaParams, HoverParams
from ._reference import cisca_instances_reference

__all__ = ["CISCA_PRESETS", "CiscaParams", "HOVER_PRESETS", "HoverParams", "cisca_instances",
           "cisca_instances_reference", "hover_instances", "map_tiles"]
