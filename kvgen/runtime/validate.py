"""Argument checks every op shares: tensors, the paged cache and its format.

Each mistake is one TypeError/ValueError naming the argument, raised before
any launch. The checks run at every call, so they cost what a passing check
must: each tensor attribute is read once and handed on (a read costs
~0.1-0.3 us on a slow host), and a message is formatted only when its check
fails (`if not ...: raise`, never a helper that is handed the message).
"""

from __future__ import annotations

import torch

from ..formats import Format
from .loader import registry


def meta(name: str, t, dtype: torch.dtype, ndim: int | None):
    """(shape, strides) of a checked tensor (ndim None: any rank)."""
    if isinstance(t, torch.Tensor) and t.dtype is dtype:  # dtypes are singletons
        shape = t.shape
        if ndim is None or len(shape) == ndim:
            return shape, t.stride()
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(shape)}")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    raise TypeError(f"{name}: expected dtype {dtype}, got {t.dtype}")


def check_cache(k_cache, block_size, name: str = "k_cache") -> tuple[Format, int]:
    """The paged cache [num_blocks, block_size, record_bytes] and its block size:
    (its format, told apart by record_bytes among the loaded trees' formats; its
    page stride in bytes). `name` is the cache's argument name in the caller's op."""
    kc_shape, kc_stride = meta(name, k_cache, torch.uint8, 3)
    if type(block_size) is not int:
        raise TypeError(f"block_size: expected an int, got {type(block_size).__name__}")
    num_blocks, rows, record = kc_shape
    fmt = registry().format_for_record(record)  # so record == fmt.record_bytes
    if fmt is None:
        raise ValueError(f"{name}: last dimension must be the record size of a loaded format "
                         f"{loaded_record_sizes()} (bytes per token record), got {record}")
    if not (block_size > 0 and block_size == rows):
        raise ValueError(f"block_size: must equal {name}.shape[1] ({rows}), got {block_size}")
    page_stride, row_stride, byte_stride = kc_stride
    if not (byte_stride == 1 and (rows == 1 or row_stride == record)):
        raise ValueError(f"{name}: each page must hold contiguous {record}-byte rows, got strides {tuple(kc_stride)}")
    if page_stride % 16:
        raise ValueError(f"{name}: page stride (stride(0)) must be a multiple of 16 bytes, got {page_stride}")
    if not (num_blocks <= 1 or page_stride >= block_size * record):
        raise ValueError(f"{name}: page stride {page_stride} is smaller than a page ({block_size}*{record} bytes)")
    if k_cache.data_ptr() % 16:
        raise ValueError(f"{name}: data must be 16-byte aligned")
    return fmt, page_stride


def check_one_device(names: tuple[str, ...], first, *others) -> torch.device:
    """All the tensors (None: an absent optional one) on `first`'s device; that
    device. `names`: their argument names, in order (a literal tuple at the call
    site is a constant: nothing is built per call); a tensor elsewhere is named."""
    device = first.device
    for i, t in enumerate(others):
        if t is not None and t.device != device:
            raise ValueError(f"{names[i + 1]}: on {t.device}, but {names[0]} is on {device} "
                             f"(all tensors must be on one device)")
    return device


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
