"""kvgen: specialised, prebuilt CuteDSL kernels for paged FP8 KV caches.

The runtime API needs torch and cuda-python only; the build tooling
(kvgen.render/compile/link/build) needs jinja2, CuteDSL and nvJitLink and is
imported only by `make generate` / `make build`.
"""

from .ops import (
    BackendUnavailable,
    dequantize_and_gather_k_cache,
    dequantize_and_gather_k_cache_sparse,
    last_backend,
    select_backend,
    select_backend_sparse,
)

__all__ = [
    "BackendUnavailable",
    "dequantize_and_gather_k_cache",
    "dequantize_and_gather_k_cache_sparse",
    "last_backend",
    "select_backend",
    "select_backend_sparse",
]
__version__ = "0.1.0"
