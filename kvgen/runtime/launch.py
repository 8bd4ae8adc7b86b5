"""Launch one manifest row: its arguments packed in the row's ABI order, the
loaded cubin launched on torch's current stream, in torch's context."""

from __future__ import annotations

import torch

from typing import Callable

from .driver import Driver, driver
from .loader import registry
from .manifest import KernelEntry


def launch(entry: KernelEntry, values: dict, grid: tuple[int, int, int], device: int, pdl: bool) -> None:
    """`values`: every ABI parameter by name; `device`: the CUDA ordinal."""
    kernel = registry().get(entry)  # loaded on first use
    args = kernel.in_abi_order(values)
    cuda = driver()
    stream = _raw_stream(device) if _raw_stream is not None else torch.cuda.current_stream(device).cuda_stream
    primary = _primary_contexts.get(device)
    if primary is not None and cuda.current_context() == primary:  # the usual case: torch's context is current
        kernel.launch(grid, args, stream, device, pdl, cuda)
        return
    cuda.push_context(_primary_context(cuda, device))
    try:
        kernel.launch(grid, args, stream, device, pdl, cuda)
    finally:
        cuda.pop_context()


_GRID_MEMO = 4096  # grids a memo remembers; past it, it starts afresh


def memoised_grid(compute: Callable[..., tuple[int, int, int]]) -> Callable[..., tuple[int, int, int]]:
    """Decorator: `compute(entry, *sizes)` (an op's launch grid: a function of the
    row and the call's sizes alone, ~1 us to compute) remembered per row and
    sizes. Rows are told apart by identity (KernelEntry is not hashable): the
    memo holds each row it has seen, so no other row can take its id."""
    memo: dict = {}

    def grid(entry: KernelEntry, *sizes: int) -> tuple[int, int, int]:
        hit = memo.get((id(entry), *sizes))
        if hit is None:
            if len(memo) >= _GRID_MEMO:
                memo.clear()
            hit = memo[(id(entry), *sizes)] = (entry, compute(entry, *sizes))
        return hit[1]

    grid.__doc__, grid.__wrapped__ = compute.__doc__, compute
    return grid


# torch's current stream on a device: 0.2 us; the public API costs ~4 us.
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


_primary_contexts: dict[int, int] = {}  # device -> its primary CUcontext (torch's)


def _primary_context(cuda: Driver, device: int) -> int:
    """`device`'s primary context: torch's, the one every launch is made in."""
    primary = _primary_contexts.get(device)
    if primary is None:
        torch.cuda.init()
        primary = _primary_contexts[device] = cuda.primary_context(device)
    return primary
