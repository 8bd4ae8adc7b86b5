"""Argument checks every op shares: tensors, the paged cache and its format.

Each mistake is one TypeError/ValueError naming the argument, raised before
any launch. Each tensor attribute read costs ~0.3 us on a slow host, so each
is read once and handed on.
"""

from __future__ import annotations

import torch

from ..formats import Format
from .loader import registry


def expect(cond: bool, message: str, error=ValueError) -> None:
    if not cond:
        raise error(message)


def meta(name: str, t, dtype: torch.dtype, ndim: int | None):
    """(shape, strides) of a checked tensor (ndim None: any rank)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {t.dtype}")
    shape = t.shape
    if ndim is not None and len(shape) != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(shape)}")
    return shape, t.stride()


def check_cache(k_cache, block_size, name: str = "k_cache") -> tuple[Format, int]:
    """The paged cache [num_blocks, block_size, record_bytes] and its block size:
    (its format, told apart by record_bytes among the loaded trees' formats; its
    page stride in bytes). `name` is the cache's argument name in the caller's op."""
    kc_shape, kc_stride = meta(name, k_cache, torch.uint8, 3)
    expect(type(block_size) is int, f"block_size: expected an int, got {type(block_size).__name__}", TypeError)
    fmt = registry().format_for_record(kc_shape[2])
    if fmt is None:
        raise ValueError(f"{name}: last dimension must be the record size of a loaded format "
                         f"{loaded_record_sizes()} (bytes per token record), got {kc_shape[2]}")
    expect(block_size > 0 and block_size == kc_shape[1],
           f"block_size: must equal {name}.shape[1] ({kc_shape[1]}), got {block_size}")
    record = fmt.record_bytes
    expect(kc_stride[2] == 1 and (kc_shape[1] == 1 or kc_stride[1] == record),
           f"{name}: each page must hold contiguous {record}-byte rows, got strides {tuple(kc_stride)}")
    page_stride = kc_stride[0]
    expect(page_stride % 16 == 0, f"{name}: page stride (stride(0)) must be a multiple of 16 bytes, got {page_stride}")
    expect(kc_shape[0] <= 1 or page_stride >= block_size * record,
           f"{name}: page stride {page_stride} is smaller than a page ({block_size}*{record} bytes)")
    expect(k_cache.data_ptr() % 16 == 0, f"{name}: data must be 16-byte aligned")
    return fmt, page_stride


def check_one_device(*tensors) -> None:
    device = tensors[0].device
    for t in tensors[1:]:
        if t is not None and t.device != device:
            devices = sorted({str(x.device) for x in tensors if x is not None})
            raise ValueError(f"all tensors must be on one device, got {devices}")


def loaded_record_sizes() -> dict[int, str]:
    """Record bytes -> format name, for every loaded format (for error messages)."""
    return dict(sorted((f.record_bytes, f.name) for f in registry().by_record.values()))


def format_named(record_bytes: int, argument: str) -> Format:
    """The loaded format of `record_bytes`-byte records; ValueError naming `argument` if none."""
    fmt = registry().format_for_record(record_bytes)
    if fmt is None:
        raise ValueError(f"{argument}: no loaded format has {record_bytes}-byte records; known: "
                         f"{loaded_record_sizes()}")
    return fmt


def format_of(k_cache: torch.Tensor) -> Format:
    """The loaded format whose records are k_cache.shape[-1] bytes."""
    return format_named(k_cache.shape[-1], "k_cache")
