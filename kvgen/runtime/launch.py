"""Launch one manifest row: its arguments packed in the row's ABI order, the
loaded cubin launched on torch's current stream, in torch's context."""

from __future__ import annotations

import threading
from typing import Callable, NamedTuple, Optional

import torch

from .driver import Driver, driver
from .loader import LoadedKernel, registry
from .manifest import KernelEntry


class Launched(NamedTuple):
    """A launch made through `launch`, as kvgen.runtime.plans remembers it."""

    kernel: LoadedKernel
    names: tuple[str, ...]
    values: tuple
    grid: tuple[int, int, int]
    device: int
    pdl: bool


_last = threading.local()  # per thread: `launched`, the last launch made through `launch`


def launch(entry: KernelEntry, names: tuple[str, ...], values: tuple, grid: tuple[int, int, int], device: int,
           pdl: bool) -> None:
    """`values`: every ABI parameter, named by `names` (the op's constant
    tuple, in the op's order); `device`: the CUDA ordinal. Once it has
    launched, the launch is this thread's `take_launched()`."""
    kernel = registry().get(entry)  # loaded on first use
    launch_loaded(kernel, names, values, grid, device, pdl)
    _last.launched = Launched(kernel, names, values, grid, device, pdl)


def take_launched() -> Optional[Launched]:
    """The last launch this thread made through `launch` (None if none since the last take), forgotten."""
    launched = getattr(_last, "launched", None)
    _last.launched = None
    return launched


def launch_loaded(kernel: LoadedKernel, names: tuple[str, ...], values: tuple, grid: tuple[int, int, int],
                  device: int, pdl: bool) -> None:
    """Launch a loaded kernel as `launch` does, on torch's current stream (read now: a capturing
    stream included), in torch's context."""
    args = kernel.in_abi_order(names, values)
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
