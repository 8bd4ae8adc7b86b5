"""Stage 6: the public ops -- validate, dispatch, launch.

`dequantize_and_gather_k_cache(out, k_cache, seq_lens, gather_lens,
block_table, block_size, offset)` has vLLM's DeepSeek-V4 signature and
semantics; `dequantize_and_gather_k_cache_sparse(out, k_cache, slot_indices,
block_size)` gathers global slots (docs/semantics.md). Both take either layout
(k_cache.shape[-1] 584 or 528) and are also registered as PyTorch custom ops
(`torch.ops.kvgen.*`, mutating `out`, with fake implementations) so they can sit
inside torch.compile graphs and CUDA graphs.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import threading
import warnings
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from .config import LAYOUTS, Layout
from .dispatch import (BACKEND_ENV, PDL_ENV, CallKey, candidate_rows, choose_row, forced_backend, launch_grid,
                       pdl_requested, preference_with_pdl, shape_class)
from .driver import driver
from .index_check import check_dense, check_requested, check_slots
from .manifest import KernelEntry

_RECORD_TO_LAYOUT = {layout.record_bytes: layout for layout in LAYOUTS.values()}


class BackendUnavailable(RuntimeError):
    """KVGEN_BACKEND forced a backend that cannot serve this call."""


# ---------------------------------------------------------------- validation
def _expect(cond: bool, message: str, error=ValueError) -> None:
    if not cond:
        raise error(message)


def _meta(name: str, t, dtype: torch.dtype, ndim: int | None):
    """(shape, strides) of a checked tensor (ndim None: any rank). Each tensor
    attribute read costs ~0.3 us on a slow host, so each is read once here."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {t.dtype}")
    shape = t.shape
    if ndim is not None and len(shape) != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(shape)}")
    return shape, t.stride()


class Checked(NamedTuple):
    """What validation read, reused by dispatch and launch (no second read)."""

    layout: Layout
    out_stride: tuple[int, ...]
    page_stride: int
    block_table_stride: int
    max_rows: int
    num_reqs: int


def _check_cache(k_cache, block_size) -> tuple[Layout, int]:
    """The paged cache and its block size; returns (layout, page stride in bytes)."""
    kc_shape, kc_stride = _meta("k_cache", k_cache, torch.uint8, 3)
    _expect(type(block_size) is int, f"block_size: expected an int, got {type(block_size).__name__}", TypeError)
    layout = _RECORD_TO_LAYOUT.get(kc_shape[2])
    _expect(layout is not None, f"k_cache: last dimension must be one of {sorted(_RECORD_TO_LAYOUT)} "
                                f"(bytes per token record), got {kc_shape[2]}")
    _expect(block_size > 0 and block_size == kc_shape[1],
            f"block_size: must equal k_cache.shape[1] ({kc_shape[1]}), got {block_size}")
    record = layout.record_bytes
    _expect(kc_stride[2] == 1 and (kc_shape[1] == 1 or kc_stride[1] == record),
            f"k_cache: each page must hold contiguous {record}-byte rows, got strides {tuple(kc_stride)}")
    page_stride = kc_stride[0]
    _expect(page_stride % 16 == 0, f"k_cache: page stride (stride(0)) must be a multiple of 16 bytes, got {page_stride}")
    _expect(kc_shape[0] <= 1 or page_stride >= block_size * record,
            f"k_cache: page stride {page_stride} is smaller than a page ({block_size}*{record} bytes)")
    _expect(k_cache.data_ptr() % 16 == 0, "k_cache: data must be 16-byte aligned")
    return layout, page_stride


def _check_one_device(*tensors) -> None:
    device = tensors[0].device
    for t in tensors[1:]:
        if t is not None and t.device != device:
            devices = sorted({str(x.device) for x in tensors if x is not None})
            raise ValueError(f"all tensors must be on one device, got {devices}")


def validate(out, k_cache, seq_lens, gather_lens, block_table, block_size, offset) -> Checked:
    """Check every argument of a dense call before any launch."""
    out_shape, out_stride = _meta("out", out, torch.bfloat16, 3)
    layout, page_stride = _check_cache(k_cache, block_size)
    sl_shape, sl_stride = _meta("seq_lens", seq_lens, torch.int32, 1)
    if gather_lens is not None:
        gl_shape, gl_stride = _meta("gather_lens", gather_lens, torch.int32, 1)
    bt_shape, bt_stride = _meta("block_table", block_table, torch.int32, 2)
    _expect(type(offset) is int, f"offset: expected an int, got {type(offset).__name__}", TypeError)
    _expect(out_shape[2] == 512, f"out: last dimension must be 512, got {out_shape[2]}")
    _expect(offset >= 0, f"offset: must be >= 0, got {offset}")
    _expect(offset <= out_shape[1], f"offset: must be <= out.shape[1] ({out_shape[1]}), got {offset}")
    _expect(out_stride[2] == 1, f"out: innermost stride must be 1, got {out_stride[2]}")
    _expect(bt_stride[1] == 1, f"block_table: innermost stride must be 1, got {bt_stride[1]}")
    _expect(sl_shape[0] <= 1 or sl_stride[0] == 1, "seq_lens: must be contiguous")

    num_reqs = sl_shape[0]
    if gather_lens is not None:
        _expect(gl_shape == sl_shape,
                f"gather_lens: shape {tuple(gl_shape)} must match seq_lens {tuple(sl_shape)}")
        _expect(gl_shape[0] <= 1 or gl_stride[0] == 1, "gather_lens: must be contiguous")
    _expect(bt_shape[0] == num_reqs,
            f"block_table: shape[0] ({bt_shape[0]}) must equal the number of requests ({num_reqs})")
    _expect(out_shape[0] == num_reqs, f"out: shape[0] ({out_shape[0]}) must equal the number of requests ({num_reqs})")
    _expect(out_shape[1] < 2**31 and bt_shape[1] < 2**31, "out/block_table: dimensions must fit int32")

    _check_one_device(out, k_cache, seq_lens, block_table, gather_lens)
    return Checked(layout, out_stride, page_stride, bt_stride[0], out_shape[1] - offset, num_reqs)


class CheckedSparse(NamedTuple):
    layout: Layout
    rows: torch.Tensor  # out viewed as [n, 512]
    row_stride: int
    page_stride: int
    num_slots: int


def validate_sparse(out, k_cache, slot_indices, block_size) -> CheckedSparse:
    """Check every argument of a sparse call before any launch."""
    out_shape, _ = _meta("out", out, torch.bfloat16, None)
    _expect(len(out_shape) >= 1 and out_shape[-1] == 512, f"out: last dimension must be 512, got shape {tuple(out_shape)}")
    try:
        rows = out.view(-1, 512)  # [..., 512] flattened; a view, so writes land in out
    except RuntimeError:
        raise ValueError(f"out: its rows must be one strided dimension ([..., 512] viewable as [n, 512]); "
                         f"got strides {tuple(out.stride())}") from None
    row_stride = rows.stride(0) if rows.shape[0] > 1 else 512
    _expect(rows.stride(1) == 1, f"out: innermost stride must be 1, got {rows.stride(1)}")
    layout, page_stride = _check_cache(k_cache, block_size)
    si_shape, si_stride = _meta("slot_indices", slot_indices, torch.int32, 1)
    _expect(si_shape[0] <= 1 or si_stride[0] == 1, "slot_indices: must be contiguous")
    _expect(si_shape[0] == rows.shape[0],
            f"slot_indices: {si_shape[0]} slots for {rows.shape[0]} rows of out (out.numel() // 512)")
    _expect(si_shape[0] < 2**31, "slot_indices: at most 2^31 - 1 slots")
    _check_one_device(out, k_cache, slot_indices)
    return CheckedSparse(layout, rows, row_stride, page_stride, si_shape[0])


# ------------------------------------------------------------------ dispatch
@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


@functools.lru_cache(maxsize=None)
def _device_name(device_index: int) -> str:
    return torch.cuda.get_device_name(device_index)


def device_info(device: torch.device) -> tuple[str, Optional[tuple[int, int]], Optional[str]]:
    """(device type, compute capability, device name; None for both off CUDA):
    all that dispatch asks of the device."""
    if device.type != "cuda":
        return device.type, None, None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return "cuda", _capability(index), _device_name(index)


@functools.lru_cache(maxsize=None)
def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _triton_usable(device_type: str) -> bool:
    if not _available("triton"):
        return False
    return device_type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class Decision:
    backend: str
    entry: Optional[KernelEntry] = None
    reason: str = ""  # why a faster backend was not taken
    pdl: bool = False  # launch the cubin with programmatic dependent launch


def _cubin_entry(layout, block_size, indexing, has_gather_lens, device_type, capability, device_name,
                 call_class) -> tuple[Optional[KernelEntry], str]:
    if device_type != "cuda":
        return None, f"tensors are on {device_type}, not a CUDA device"
    if driver() is None:
        return None, "the CUDA driver library (libcuda) could not be opened, or lacks cuLibraryLoadData"
    from .loader import registry

    key = CallKey(layout.name, block_size, indexing, has_gather_lens, capability, call_class)
    rules = registry().tuned.rules_for(device_name)
    entry = choose_row(candidate_rows(registry().entries, key), preference_with_pdl(key, rules))
    if entry is None:
        return None, (f"no shipped cubin for layout={layout.name} block_size={block_size} {indexing} "
                      f"gather_lens={has_gather_lens} on compute capability {capability}")
    return entry, ""


def _decide(layout: Layout, block_size: int, indexing: str, has_gather_lens: bool, call_class: str,
            device: torch.device, aligned: bool, forced: Optional[str]) -> Decision:
    device_type, capability, device_name = device_info(device)
    pdl = pdl_requested()  # read (and checked) whichever backend serves
    entry, why_not = None, "not asked for"
    if forced in (None, "cubin"):
        entry, why_not = _cubin_entry(layout, block_size, indexing, has_gather_lens, device_type, capability,
                                      device_name, call_class)
        if entry is not None and not aligned:
            entry, why_not = None, "out is not 16-byte aligned (data pointer and row strides)"
    cubin = Decision("cubin", entry, pdl=entry.pdl and pdl) if entry is not None else None
    if forced == "cubin":
        if cubin is None:
            raise BackendUnavailable(f"{BACKEND_ENV}=cubin, but {why_not}")
        return cubin
    if forced == "triton":
        if not _triton_usable(device_type):
            raise BackendUnavailable(f"{BACKEND_ENV}=triton, but Triton cannot run on {device_type} here "
                                     "(not installed, or CPU tensors without TRITON_INTERPRET=1)")
        return Decision("triton")
    if forced == "torch":
        return Decision("torch")
    if cubin is not None:
        return cubin
    if device_type == "cuda" and _triton_usable(device_type):
        return Decision("triton", reason=why_not)
    return Decision("torch", reason=why_not)


# A decision depends only on this key, so each is made once per process.
_decisions: dict[tuple, Decision] = {}


def clear_dispatch_cache() -> None:
    """Forget every decision, and which fallbacks were warned about (the registry changed)."""
    _decisions.clear()
    _warned.clear()


def _cached_decision(layout: Layout, block_size: int, indexing: str, has_gather_lens: bool,
                     num_reqs: int, max_rows: int, device: torch.device, aligned: bool) -> Decision:
    call_class = shape_class(num_reqs, max_rows)
    key = (layout.name, block_size, indexing, has_gather_lens, call_class, device, aligned,
           os.environ.get(BACKEND_ENV), os.environ.get(PDL_ENV), os.environ.get("TRITON_INTERPRET"))
    decision = _decisions.get(key)
    if decision is None:
        decision = _decide(layout, block_size, indexing, has_gather_lens, call_class, device, aligned,
                           forced_backend())
        _decisions[key] = decision
    return decision


def decide(out, k_cache, seq_lens, gather_lens, block_table, block_size, offset, *,
           checked: Optional[Checked] = None) -> Decision:
    """Which backend would serve this dense call (no launch, no synchronisation)."""
    checked = checked or validate(out, k_cache, seq_lens, gather_lens, block_table, block_size, offset)
    stride = checked.out_stride
    aligned = out.data_ptr() % 16 == 0 and stride[0] % 8 == 0 and stride[1] % 8 == 0  # 16-byte stores
    return _cached_decision(checked.layout, block_size, "dense", gather_lens is not None, checked.num_reqs,
                            checked.max_rows, out.device, aligned)


def decide_sparse(out, k_cache, slot_indices, block_size, *, checked: Optional[CheckedSparse] = None) -> Decision:
    """Which backend would serve this sparse call (no launch, no synchronisation)."""
    checked = checked or validate_sparse(out, k_cache, slot_indices, block_size)
    aligned = out.data_ptr() % 16 == 0 and checked.row_stride % 8 == 0
    return _cached_decision(checked.layout, block_size, "sparse", False, 1, checked.num_slots, out.device, aligned)


# -------------------------------------------------------------------- launch
_state = threading.local()
_warned: set[str] = set()


def last_backend() -> Optional[str]:
    """The backend that served this thread's last call (None before any call)."""
    return getattr(_state, "last_backend", None)


def launch_entry(entry: KernelEntry, out, k_cache, seq_lens, gather_lens, block_table, offset,
                 grid: tuple[int, int, int] | None = None, checked: Optional[Checked] = None,
                 pdl: bool = False) -> None:
    """Launch one dense manifest kernel (the grid from dispatch unless given:
    the benchmark launches the seed's grid this way); `pdl` as in Decision."""
    if checked is None:
        checked = validate(out, k_cache, seq_lens, gather_lens, block_table, entry.config["block_size"], offset)
    values = {
        "out": out.data_ptr(), "k_cache": k_cache.data_ptr(), "seq_lens": seq_lens.data_ptr(),
        "gather_lens": gather_lens.data_ptr() if gather_lens is not None else 0,
        "block_table": block_table.data_ptr(),
        "out_stride_req": checked.out_stride[0], "out_stride_row": checked.out_stride[1],
        "page_stride": checked.page_stride, "block_table_stride": checked.block_table_stride,
        "offset": offset, "max_rows": checked.max_rows,
    }
    _launch(entry, values, grid or launch_grid(entry, checked.num_reqs, checked.max_rows), out.get_device(), pdl)


def launch_entry_sparse(entry: KernelEntry, out, k_cache, slot_indices, grid: tuple[int, int, int] | None = None,
                        checked: Optional[CheckedSparse] = None, pdl: bool = False) -> None:
    if checked is None:
        checked = validate_sparse(out, k_cache, slot_indices, entry.config["block_size"])
    values = {"out": out.data_ptr(), "k_cache": k_cache.data_ptr(), "slot_indices": slot_indices.data_ptr(),
              "out_stride_row": checked.row_stride, "page_stride": checked.page_stride,
              "num_slots": checked.num_slots}
    _launch(entry, values, grid or launch_grid(entry, 1, checked.num_slots), out.get_device(), pdl)


def _launch(entry: KernelEntry, values: dict, grid: tuple[int, int, int], device: int, pdl: bool) -> None:
    """Pack `values` in the manifest's ABI order and launch on torch's current stream."""
    from .loader import registry

    kernel = registry().get(entry)
    args = [values[name] for name, _ in entry.params]
    stream = _current_stream(device)
    cuda = driver()
    pushed = _make_context_current(cuda, device)
    try:
        kernel.launch(grid, args, stream, device, pdl)
    finally:
        if pushed:
            cuda.pop_context()


def _current_stream(device: int) -> int:
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # 0.2 us; the public API costs ~4 us
    return raw(device) if raw is not None else torch.cuda.current_stream(device).cuda_stream


_primary_contexts: dict[int, int] = {}  # device -> its primary CUcontext (torch's)


def _make_context_current(cuda, device: int) -> bool:
    """Make `device`'s primary context (torch's) current for the launch; True if pushed."""
    primary = _primary_contexts.get(device)
    if primary is None:
        torch.cuda.init()
        primary = _primary_contexts[device] = cuda.primary_context(device)
    if cuda.current_context() == primary:
        return False
    cuda.push_context(primary)
    return True


def _serve(decision: Decision, device_type: str, launch_cubin, run_triton, run_torch) -> None:
    """Run the decided backend; a cubin that fails to load falls back with a
    warning (an error when KVGEN_BACKEND=cubin forced it)."""
    backend = decision.backend
    if backend == "cubin":
        try:
            launch_cubin(decision.entry)
        except Exception as err:
            from .loader import KvgenLoadError

            if forced_backend() == "cubin" or not isinstance(err, KvgenLoadError):
                raise
            if decision.entry.name not in _warned:
                _warned.add(decision.entry.name)
                warnings.warn(f"kvgen: falling back from cubin: {err}", RuntimeWarning, stacklevel=4)
            backend = "triton" if _triton_usable(device_type) else "torch"
    if backend == "triton":
        run_triton()
    elif backend == "torch":
        run_torch()
    _state.last_backend = backend


def _run(out, k_cache, seq_lens, gather_lens, block_table, block_size, offset) -> None:
    checked = validate(out, k_cache, seq_lens, gather_lens, block_table, block_size, offset)
    if checked.num_reqs == 0 or checked.max_rows == 0:
        _state.last_backend = None
        return  # empty batch: nothing to launch
    if check_requested():
        check_dense(k_cache, seq_lens, gather_lens, block_table, block_size, checked.max_rows)
    args = (out, k_cache, seq_lens, gather_lens, block_table, block_size, offset)
    decision = decide(*args, checked=checked)

    def triton_path():
        from .triton_fallback import dequantize_and_gather_triton

        dequantize_and_gather_triton(*args)

    def torch_path():
        from .reference import dequantize_and_gather_torch

        dequantize_and_gather_torch(*args)

    _serve(decision, out.device.type,
           lambda entry: launch_entry(entry, out, k_cache, seq_lens, gather_lens, block_table, offset,
                                      checked=checked, pdl=decision.pdl),
           triton_path, torch_path)


def _run_sparse(out, k_cache, slot_indices, block_size) -> None:
    checked = validate_sparse(out, k_cache, slot_indices, block_size)
    if checked.num_slots == 0:
        _state.last_backend = None
        return
    if check_requested():
        check_slots(k_cache, slot_indices, block_size)
    decision = decide_sparse(out, k_cache, slot_indices, block_size, checked=checked)

    def triton_path():
        from .triton_fallback import dequantize_and_gather_sparse_triton

        dequantize_and_gather_sparse_triton(out, k_cache, slot_indices, block_size)

    def torch_path():
        from .reference import dequantize_and_gather_sparse_torch

        dequantize_and_gather_sparse_torch(out, k_cache, slot_indices, block_size)

    _serve(decision, out.device.type,
           lambda entry: launch_entry_sparse(entry, out, k_cache, slot_indices, checked=checked, pdl=decision.pdl),
           triton_path, torch_path)


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


@torch.library.custom_op("kvgen::dequantize_and_gather_k_cache_sparse", mutates_args=("out",))
def _custom_op_sparse(out: torch.Tensor, k_cache: torch.Tensor, slot_indices: torch.Tensor, block_size: int) -> None:
    _run_sparse(out, k_cache, slot_indices, block_size)


@_custom_op_sparse.register_fake
def _(out, k_cache, slot_indices, block_size) -> None:
    return None


def dequantize_and_gather_k_cache_sparse(out: torch.Tensor, k_cache: torch.Tensor, slot_indices: torch.Tensor,
                                         block_size: int) -> None:
    """out[i] <- the token at global slot slot_indices[i] (page * block_size + row),
    dequantized like the dense op; slot -1 leaves out[i] untouched (no load, no
    store). `out` is bf16 [n, 512] or [..., 512] (flattened to n rows); the
    layout is told apart by k_cache.shape[-1] (584 or 528)."""
    if torch.compiler.is_compiling():
        torch.ops.kvgen.dequantize_and_gather_k_cache_sparse(out, k_cache, slot_indices, block_size)
        return
    _run_sparse(out, k_cache, slot_indices, block_size)


def select_backend(out, k_cache, seq_lens, gather_lens, block_table, block_size, offset) -> str:
    """The backend that would serve this call: 'cubin', 'triton' or 'torch'."""
    return decide(out, k_cache, seq_lens, gather_lens, block_table, block_size, offset).backend


def select_backend_sparse(out, k_cache, slot_indices, block_size) -> str:
    """The backend that would serve this sparse call."""
    return decide_sparse(out, k_cache, slot_indices, block_size).backend
