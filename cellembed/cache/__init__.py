"""The feature cache: WebDataset shards of safetensors, a manifest with a cache key, writer, reader, verify."""

from cellembed.cache._codec import Sample
from cellembed.cache._extract import ExtractConfig, ExtractResult, extract
from cellembed.cache._layout import describe_difference
from cellembed.cache._loader import Batch, Loader, check_compatible, make_loader
from cellembed.cache._manifest import FORMAT_VERSION, CacheError, read_manifest
from cellembed.cache._oversample import OVERSAMPLE_SCHEMES, cisca_oversample
from cellembed.cache._reader import Cache, open_cache
from cellembed.cache._verify import ShardProblem, VerifyReport, verify_cache

__all__ = [
    "FORMAT_VERSION", "Cache", "CacheError", "ExtractConfig", "ExtractResult", "Sample", "ShardProblem",
    "VerifyReport", "describe_difference", "extract", "open_cache", "read_manifest", "verify_cache",
    "Batch", "Loader", "OVERSAMPLE_SCHEMES", "check_compatible", "cisca_oversample", "make_loader",
]
