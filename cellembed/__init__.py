"""cellembed: frozen vision foundation models for cell segmentation, extracted once and decoded fast."""

__version__ = "0.1.0"


def __getattr__(name):  # heavy modules (torch, timm) load on first use, so `cellembed --help` stays instant
    if name in ("extract", "ExtractConfig", "open_cache", "verify_cache"):
        from cellembed import cache

        return getattr(cache, name)
    if name in ("load_sweep", "run_sweep", "report"):
        from cellembed import sweep

        return getattr(sweep, name)
    raise AttributeError(f"module 'cellembed' has no attribute {name!r}")
