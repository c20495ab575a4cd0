"""kfopt.autotune: config spaces for kfopt's kernels and a persistent per-device tuning cache."""

from .cache import TuningCache, default_cache_path, get_cache, tuning_key
from .space import (
    INTERPRETER,
    Config,
    ConfigSpace,
    agree_on_configs,
    benchmark,
    can_benchmark,
    configs_per_rank,
    default_configs,
    shape_bucket,
    timing_candidates,
)

__all__ = [
    "INTERPRETER",
    "Config",
    "ConfigSpace",
    "TuningCache",
    "agree_on_configs",
    "benchmark",
    "can_benchmark",
    "configs_per_rank",
    "default_cache_path",
    "default_configs",
    "get_cache",
    "shape_bucket",
    "timing_candidates",
    "tuning_key",
]
