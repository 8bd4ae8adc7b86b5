"""Stage 6: the public op -- validate, dispatch, launch.

`dequantize_and_gather_k_cache(out, k_cache, seq_lens, gather_lens,
block_table, block_size, offset)` has vLLM's DeepSeek-V4 signature and
semantics (docs/semantics.md). It is also registered as the PyTorch custom op
`torch.ops.kvgen.dequantize_and_gather_k_cache` (mutates `out`, with a fake
implementation) so it can sit inside torch.compile graphs and CUDA graphs.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from .config import LAYOUTS
from .dispatch import BACKEND_ENV, CallKey, candidate_rows, choose_row, forced_backend, launch_grid, preference_for
from .manifest import KernelEntry

_RECORD_TO_LAYOUT = {layout.record_bytes: layout for layout in LAYOUTS.values()}


class BackendUnavailable(RuntimeError):
    """KVGEN_BACKEND forced a backend that cannot serve this call."""


# ---------------------------------------------------------------- validation
def _expect(cond: bool, message: str, error=ValueError) -> None:
    if not cond:
        raise error(message)


def _tensor(name: str, t, dtype: torch.dtype, ndim: int) -> None:
    _expect(isinstance(t, torch.Tensor), f"{name}: expected a torch.Tensor, got {type(t).__name__}", TypeError)
    _expect(t.dtype == dtype, f"{name}: expected dtype {dtype}, got {t.dtype}", TypeError)
    _expect(t.dim() == ndim, f"{name}: expected {ndim} dimensions, got shape {tuple(t.shape)}")


def validate(out, k_cache, seq_lens, gather_lens, block_table, block_size, offset):
    """Check every argument before any launch; returns the cache layout."""
    _tensor("out", out, torch.bfloat16, 3)
    _tensor("k_cache", k_cache, torch.uint8, 3)
    _tensor("seq_lens", seq_lens, torch.int32, 1)
    if gather_lens is not None:
        _tensor("gather_lens", gather_lens, torch.int32, 1)
    _tensor("block_table", block_table, torch.int32, 2)
    for name, value in (("block_size", block_size), ("offset", offset)):
        _expect(isinstance(value, int) and not isinstance(value, bool),
                f"{name}: expected an int, got {type(value).__name__}", TypeError)

    layout = _RECORD_TO_LAYOUT.get(k_cache.shape[-1])
    _expect(layout is not None, f"k_cache: last dimension must be one of {sorted(_RECORD_TO_LAYOUT)} "
                                f"(bytes per token record), got {k_cache.shape[-1]}")
    _expect(out.shape[-1] == 512, f"out: last dimension must be 512, got {out.shape[-1]}")
    _expect(block_size > 0 and block_size == k_cache.shape[1],
            f"block_size: must equal k_cache.shape[1] ({k_cache.shape[1]}), got {block_size}")
    _expect(offset >= 0, f"offset: must be >= 0, got {offset}")
    _expect(offset <= out.shape[1], f"offset: must be <= out.shape[1] ({out.shape[1]}), got {offset}")

    _expect(out.stride(2) == 1, f"out: innermost stride must be 1, got {out.stride(2)}")
    _expect(k_cache.stride(2) == 1 and (k_cache.shape[1] == 1 or k_cache.stride(1) == layout.record_bytes),
            f"k_cache: each page must hold contiguous {layout.record_bytes}-byte rows, got strides "
            f"{tuple(k_cache.stride())}")
    page_stride = k_cache.stride(0)
    _expect(page_stride % 16 == 0, f"k_cache: page stride (stride(0)) must be a multiple of 16 bytes, got {page_stride}")
    _expect(k_cache.shape[0] <= 1 or page_stride >= block_size * layout.record_bytes,
            f"k_cache: page stride {page_stride} is smaller than a page ({block_size}*{layout.record_bytes} bytes)")
    _expect(k_cache.data_ptr() % 16 == 0, "k_cache: data must be 16-byte aligned")
    _expect(block_table.stride(1) == 1, f"block_table: innermost stride must be 1, got {block_table.stride(1)}")
    _expect(seq_lens.numel() <= 1 or seq_lens.stride(0) == 1, "seq_lens: must be contiguous")

    num_reqs = seq_lens.shape[0]
    if gather_lens is not None:
        _expect(gather_lens.shape == seq_lens.shape,
                f"gather_lens: shape {tuple(gather_lens.shape)} must match seq_lens {tuple(seq_lens.shape)}")
        _expect(gather_lens.numel() <= 1 or gather_lens.stride(0) == 1, "gather_lens: must be contiguous")
    _expect(block_table.shape[0] == num_reqs,
            f"block_table: shape[0] ({block_table.shape[0]}) must equal the number of requests ({num_reqs})")
    _expect(out.shape[0] == num_reqs,
            f"out: shape[0] ({out.shape[0]}) must equal the number of requests ({num_reqs})")
    _expect(out.shape[1] < 2**31 and block_table.shape[1] < 2**31, "out/block_table: dimensions must fit int32")

    devices = {t.device for t in (out, k_cache, seq_lens, block_table, gather_lens) if t is not None}
    _expect(len(devices) == 1, f"all tensors must be on one device, got {sorted(map(str, devices))}")
    return layout


# ------------------------------------------------------------------ dispatch
@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def device_info(device: torch.device) -> tuple[str, Optional[tuple[int, int]]]:
    """(device type, compute capability or None): all that dispatch asks of the device."""
    if device.type != "cuda":
        return device.type, None
    return "cuda", _capability(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _triton_usable(device_type: str) -> bool:
    if not _available("triton"):
        return False
    return device_type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _cubin_aligned(out: torch.Tensor) -> bool:
    # The kernel stores 16 bytes at a time.
    return out.data_ptr() % 16 == 0 and out.stride(0) % 8 == 0 and out.stride(1) % 8 == 0


@dataclass(frozen=True)
class Decision:
    backend: str
    entry: Optional[KernelEntry] = None
    reason: str = ""  # why a faster backend was not taken


def _cubin_entry(layout, block_size, has_gather_lens, device_type, capability) -> tuple[Optional[KernelEntry], str]:
    if device_type != "cuda":
        return None, f"tensors are on {device_type}, not a CUDA device"
    if not _available("cuda.bindings"):
        return None, "cuda-python (cuda.bindings) is not installed"
    from .loader import registry

    key = CallKey(layout.name, block_size, has_gather_lens, capability)
    entry = choose_row(candidate_rows(registry().entries, key), preference_for(key))
    if entry is None:
        return None, (f"no shipped cubin for layout={layout.name} block_size={block_size} "
                      f"gather_lens={has_gather_lens} on compute capability {capability}")
    return entry, ""


def decide(out, k_cache, seq_lens, gather_lens, block_table, block_size, offset, *, layout=None) -> Decision:
    """Which backend would serve this call (no launch, no synchronisation)."""
    layout = layout or validate(out, k_cache, seq_lens, gather_lens, block_table, block_size, offset)
    device_type, capability = device_info(out.device)
    forced = forced_backend()
    entry, why_not = None, "not asked for"
    if forced in (None, "cubin"):
        entry, why_not = _cubin_entry(layout, block_size, gather_lens is not None, device_type, capability)
        if entry is not None and not _cubin_aligned(out):
            entry, why_not = None, "out is not 16-byte aligned (data pointer and row strides)"
    if forced == "cubin":
        if entry is None:
            raise BackendUnavailable(f"{BACKEND_ENV}=cubin, but {why_not}")
        return Decision("cubin", entry)
    if forced == "triton":
        if not _triton_usable(device_type):
            raise BackendUnavailable(f"{BACKEND_ENV}=triton, but Triton cannot run on {device_type} here "
                                     "(not installed, or CPU tensors without TRITON_INTERPRET=1)")
        return Decision("triton")
    if forced == "torch":
        return Decision("torch")
    if entry is not None:
        return Decision("cubin", entry)
    if device_type == "cuda" and _triton_usable(device_type):
        return Decision("triton", reason=why_not)
    return Decision("torch", reason=why_not)


# -------------------------------------------------------------------- launch
_state = threading.local()
_warned: set[str] = set()


def last_backend() -> Optional[str]:
    """The backend that served this thread's last call (None before any call)."""
    return getattr(_state, "last_backend", None)


def _launch_cubin(entry: KernelEntry, out, k_cache, seq_lens, gather_lens, block_table, offset) -> None:
    from .loader import registry

    kernel = registry().get(entry)
    max_rows = out.shape[1] - offset
    values = {
        "out": out.data_ptr(), "k_cache": k_cache.data_ptr(), "seq_lens": seq_lens.data_ptr(),
        "gather_lens": gather_lens.data_ptr() if gather_lens is not None else 0,
        "block_table": block_table.data_ptr(),
        "out_stride_req": out.stride(0), "out_stride_row": out.stride(1),
        "page_stride": k_cache.stride(0), "block_table_stride": block_table.stride(0),
        "offset": offset, "max_rows": max_rows,
    }
    args = [values[name] for name, _ in entry.params]
    device = out.device.index if out.device.index is not None else torch.cuda.current_device()
    grid = launch_grid(entry, seq_lens.shape[0], max_rows)
    stream = torch.cuda.current_stream(device).cuda_stream
    with _context(device):
        kernel.launch(grid, args, stream, device)


class _context:
    """Make `device`'s primary context current for the launch, if it is not."""

    _primary: dict[int, int] = {}

    def __init__(self, device: int):
        self.device = device
        self.pushed = False

    def __enter__(self):
        from .loader import _check, _driver

        driver = _driver()
        primary = self._primary.get(self.device)
        if primary is None:
            torch.cuda.init()
            primary = self._primary[self.device] = _check(
                driver.cuDevicePrimaryCtxRetain(self.device), "cuDevicePrimaryCtxRetain")
        current = _check(driver.cuCtxGetCurrent(), "cuCtxGetCurrent")
        if int(current) != int(primary):
            _check(driver.cuCtxPushCurrent(primary), "cuCtxPushCurrent")
            self.pushed = True

    def __exit__(self, *exc):
        if self.pushed:
            from .loader import _check, _driver

            _check(_driver().cuCtxPopCurrent(), "cuCtxPopCurrent")


def _run(out, k_cache, seq_lens, gather_lens, block_table, block_size, offset) -> None:
    layout = validate(out, k_cache, seq_lens, gather_lens, block_table, block_size, offset)
    if seq_lens.shape[0] == 0 or out.shape[1] == offset:
        _state.last_backend = None
        return  # empty batch: nothing to launch
    decision = decide(out, k_cache, seq_lens, gather_lens, block_table, block_size, offset, layout=layout)
    backend = decision.backend
    if backend == "cubin":
        try:
            _launch_cubin(decision.entry, out, k_cache, seq_lens, gather_lens, block_table, offset)
        except Exception as err:
            from .loader import KvgenLoadError

            if forced_backend() == "cubin" or not isinstance(err, KvgenLoadError):
                raise
            if decision.entry.name not in _warned:
                _warned.add(decision.entry.name)
                warnings.warn(f"kvgen: falling back from cubin: {err}", RuntimeWarning, stacklevel=3)
            backend = "triton" if _triton_usable(out.device.type) else "torch"
    if backend == "triton":
        from .triton_fallback import dequantize_and_gather_triton

        dequantize_and_gather_triton(out, k_cache, seq_lens, gather_lens, block_table, block_size, offset)
    elif backend == "torch":
        from .reference import dequantize_and_gather_torch

        dequantize_and_gather_torch(out, k_cache, seq_lens, gather_lens, block_table, block_size, offset)
    _state.last_backend = backend


# ---------------------------------------------------------------- custom op
@torch.library.custom_op("kvgen::dequantize_and_gather_k_cache", mutates_args=("out",))
def _custom_op(out: torch.Tensor, k_cache: torch.Tensor, seq_lens: torch.Tensor,
               gather_lens: Optional[torch.Tensor], block_table: torch.Tensor,
               block_size: int, offset: int) -> None:
    _run(out, k_cache, seq_lens, gather_lens, block_table, block_size, offset)


@_custom_op.register_fake
def _(out, k_cache, seq_lens, gather_lens, block_table, block_size, offset) -> None:
    return None


def dequantize_and_gather_k_cache(out: torch.Tensor, k_cache: torch.Tensor, seq_lens: torch.Tensor,
                                  gather_lens: Optional[torch.Tensor], block_table: torch.Tensor,
                                  block_size: int, offset: int) -> None:
    """Gather each request's last `gather_lens[r]` tokens (all `seq_lens[r]` when
    gather_lens is None) from the paged FP8 cache into `out[r, offset:]` as BF16.

    See docs/semantics.md. Raises TypeError/ValueError on bad arguments before
    any launch. In eager mode this calls the implementation directly (no
    custom-op dispatch overhead); under torch.compile it goes through
    torch.ops.kvgen.dequantize_and_gather_k_cache.
    """
    if torch.compiler.is_compiling():
        torch.ops.kvgen.dequantize_and_gather_k_cache(out, k_cache, seq_lens, gather_lens, block_table,
                                                      block_size, offset)
        return
    _run(out, k_cache, seq_lens, gather_lens, block_table, block_size, offset)


def select_backend(out, k_cache, seq_lens, gather_lens, block_table, block_size, offset) -> str:
    """The backend that would serve this call: 'cubin', 'triton' or 'torch'."""
    return decide(out, k_cache, seq_lens, gather_lens, block_table, block_size, offset).backend
