"""Many tiles or images at once on threads: the numba kernels (post-processing, metrics) release the GIL."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def default_workers(n_items: int) -> int:
    """Threads for ``n_items`` items: one per core (``CELLEMBED_POSTPROCESS_THREADS`` overrides), never more than
    the items."""
    env = os.environ.get("CELLEMBED_POSTPROCESS_THREADS")
    cores = int(env) if env and env.isdigit() and int(env) > 0 else (os.cpu_count() or 1)
    return max(1, min(cores, n_items))


def map_threads(fn: Callable[[T], R], items: Sequence[T], workers: int | None = None) -> list[R]:
    """``[fn(x) for x in items]`` with ``workers`` threads (default ``default_workers``), results in order.

    Each thread takes every ``workers``-th item, so the work is split once, without a task per item. The
    numba kernels of ``cisca_instances`` / ``hover_instances`` / the metrics and scikit-image's ``skeletonize``
    release the GIL; only the Python glue between them runs one thread at a time. ``postprocess.map_tiles``.

    Example:
        >>> map_threads(lambda x: x * x, [1, 2, 3], workers=2)
        [1, 4, 9]
    """
    n = len(items)
    workers = default_workers(n) if workers is None else max(1, min(int(workers), n))
    if workers < 2:
        return [fn(x) for x in items]

    def part(start: int) -> list[R]:
        return [fn(items[i]) for i in range(start, n, workers)]

    out: list = [None] * n
    with ThreadPoolExecutor(workers, thread_name_prefix="cellembed") as pool:
        for start, results in enumerate(pool.map(part, range(workers))):
            out[start::workers] = results
    return out
