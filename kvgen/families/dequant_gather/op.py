"""The dequantize-and-gather ops: validate, decide, launch; registered as custom ops.

`dequantize_and_gather_k_cache(out, k_cache, seq_lens, gather_lens,
block_table, block_size, offset)` has vLLM's DeepSeek-V4 signature and
semantics; `dequantize_and_gather_k_cache_sparse(out, k_cache, slot_indices,
block_size)` gathers global slots; vLLM's packed gathers
`cp_gather_and_upconvert_fp8_kv_cache` (decoded) and
`cp_gather_indexer_k_quant_cache` (raw bytes) take requests packed one after
another (docs/semantics.md). All serve every format of the loaded kernel
trees (told apart by the cache's shape[-1]; the raw gather, page-split ones)
and are also registered as PyTorch custom ops (`torch.ops.kvgen.*`, mutating
their outputs, with fake implementations) so they can sit inside
torch.compile and CUDA graphs.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ...config import unnamed_defaults
from ...formats import Format
from ...runtime import switches
from ...runtime.backend import Decision, Paths, decide, fallback, record_no_launch, serve
from ...runtime.dispatch import TARGET_CTAS, UNNAMED_DEFAULTS, launch_grid, run_grid
from ...runtime.index_check import check_dense, check_packed, check_slots
from ...runtime.launch import launch, memoised_grid
from ...runtime.manifest import KernelEntry
from ...runtime.plans import launch_planned, remember, signature
from ...runtime.registration import register_op
from ...runtime.validate import check_cache, check_one_device, meta
from .config import CHUNKED_SCHEDULES, KERNEL_PARAMS, DequantGatherConfig, direct_block_rows, tokens_per_step

FAMILY = DequantGatherConfig.family
UNNAMED_DEFAULTS[FAMILY] = unnamed_defaults(DequantGatherConfig)  # dispatch's, for rows and rules older than one
# The family fields a row must have, per indexing mode (made once: a tuple per call is a key per call).
DENSE_FIELDS = {gl: (("indexing", "dense"), ("gather_lens", gl)) for gl in (False, True)}
SPARSE_FIELDS = (("indexing", "sparse"), ("gather_lens", False))
PACKED_FIELDS = {output: (("indexing", "packed"), ("gather_lens", False), ("output", output))
                 for output in ("bf16", "raw")}


# ---------------------------------------------------------------- validation
class Checked(NamedTuple):
    """What validation read, reused by dispatch and launch (no second read)."""

    format: Format
    out_stride: tuple[int, ...]
    page_stride: int
    block_table_stride: int
    max_rows: int
    num_reqs: int
    device: torch.device  # the tensors' device


def validate(out, k_cache, seq_lens, gather_lens, block_table, block_size, offset) -> Checked:
    """Check every argument of a dense call before any launch."""
    out_shape, out_stride = meta("out", out, torch.bfloat16, 3)
    fmt, page_stride = check_cache(k_cache, block_size)
    sl_shape, sl_stride = meta("seq_lens", seq_lens, torch.int32, 1)
    if gather_lens is not None:
        gl_shape, gl_stride = meta("gather_lens", gather_lens, torch.int32, 1)
    bt_shape, bt_stride = meta("block_table", block_table, torch.int32, 2)
    if type(offset) is not int:
        raise TypeError(f"offset: expected an int, got {type(offset).__name__}")
    out_reqs, out_rows, out_dim = out_shape
    if out_dim != fmt.head_dim:
        raise ValueError(f"out: last dimension must be {fmt.head_dim} (format {fmt.name}'s head dim), got {out_dim}")
    if offset < 0:
        raise ValueError(f"offset: must be >= 0, got {offset}")
    if offset > out_rows:
        raise ValueError(f"offset: must be <= out.shape[1] ({out_rows}), got {offset}")
    if out_stride[2] != 1:
        raise ValueError(f"out: innermost stride must be 1, got {out_stride[2]}")
    if bt_stride[1] != 1:
        raise ValueError(f"block_table: innermost stride must be 1, got {bt_stride[1]}")
    num_reqs = sl_shape[0]
    if num_reqs > 1 and sl_stride[0] != 1:
        raise ValueError("seq_lens: must be contiguous")
    if gather_lens is not None:
        if gl_shape != sl_shape:
            raise ValueError(f"gather_lens: shape {tuple(gl_shape)} must match seq_lens {tuple(sl_shape)}")
        if gl_shape[0] > 1 and gl_stride[0] != 1:
            raise ValueError("gather_lens: must be contiguous")
    bt_reqs, bt_width = bt_shape
    if bt_reqs != num_reqs:
        raise ValueError(f"block_table: shape[0] ({bt_reqs}) must equal the number of requests ({num_reqs})")
    if out_reqs != num_reqs:
        raise ValueError(f"out: shape[0] ({out_reqs}) must equal the number of requests ({num_reqs})")
    if out_rows >= 2**31 or bt_width >= 2**31:
        raise ValueError("out/block_table: dimensions must fit int32")
    device = check_one_device(("out", "k_cache", "seq_lens", "block_table", "gather_lens"),
                              out, k_cache, seq_lens, block_table, gather_lens)
    return Checked(fmt, out_stride, page_stride, bt_stride[0], out_rows - offset, num_reqs, device)


class CheckedSparse(NamedTuple):
    format: Format
    rows: torch.Tensor  # out viewed as [n, head_dim]
    row_stride: int
    page_stride: int
    num_slots: int
    device: torch.device


def validate_sparse(out, k_cache, slot_indices, block_size) -> CheckedSparse:
    """Check every argument of a sparse call before any launch."""
    out_shape, out_stride = meta("out", out, torch.bfloat16, None)
    fmt, page_stride = check_cache(k_cache, block_size)
    head = fmt.head_dim
    if not (len(out_shape) >= 1 and out_shape[-1] == head):
        raise ValueError(f"out: last dimension must be {head} (format {fmt.name}'s head dim), got shape "
                         f"{tuple(out_shape)}")
    if len(out_shape) == 2:  # already [n, head]: the view below would be out itself
        rows, (num_rows, _), (row_stride, inner_stride) = out, out_shape, out_stride
    else:
        try:
            rows = out.view(-1, head)  # [..., head] flattened; a view, so writes land in out
        except RuntimeError:
            raise ValueError(f"out: its rows must be one strided dimension ([..., {head}] viewable as [n, {head}]); "
                             f"got strides {tuple(out.stride())}") from None
        (num_rows, _), (row_stride, inner_stride) = rows.shape, rows.stride()
    if num_rows <= 1:
        row_stride = head
    if inner_stride != 1:
        raise ValueError(f"out: innermost stride must be 1, got {inner_stride}")
    si_shape, si_stride = meta("slot_indices", slot_indices, torch.int32, 1)
    num_slots = si_shape[0]
    if num_slots > 1 and si_stride[0] != 1:
        raise ValueError("slot_indices: must be contiguous")
    if num_slots != num_rows:
        raise ValueError(f"slot_indices: {num_slots} slots for {num_rows} rows of out (out.numel() // {head})")
    if num_slots >= 2**31:
        raise ValueError("slot_indices: at most 2^31 - 1 slots")
    device = check_one_device(("out", "k_cache", "slot_indices"), out, k_cache, slot_indices)
    return CheckedSparse(fmt, rows, row_stride, page_stride, num_slots, device)


# ------------------------------------------------------------------ dispatch
def decide_dense(out, k_cache, seq_lens, gather_lens, block_table, block_size, offset, *,
                 checked: Optional[Checked] = None, snapshot: Optional[tuple] = None) -> Decision:
    """Which backend would serve this dense call (no launch, no synchronisation);
    `snapshot`: the call's switches (kvgen.runtime.switches), read now if not given."""
    checked = checked or validate(out, k_cache, seq_lens, gather_lens, block_table, block_size, offset)
    stride = checked.out_stride
    aligned = out.data_ptr() % 16 == 0 and stride[0] % 8 == 0 and stride[1] % 8 == 0  # 16-byte stores
    return decide(FAMILY, checked.format.name, block_size, DENSE_FIELDS[gather_lens is not None], checked.num_reqs,
                  checked.max_rows, checked.device, aligned, snapshot)


def decide_sparse(out, k_cache, slot_indices, block_size, *, checked: Optional[CheckedSparse] = None,
                  snapshot: Optional[tuple] = None) -> Decision:
    """Which backend would serve this sparse call (no launch, no synchronisation)."""
    checked = checked or validate_sparse(out, k_cache, slot_indices, block_size)
    aligned = out.data_ptr() % 16 == 0 and checked.row_stride % 8 == 0
    return decide(FAMILY, checked.format.name, block_size, SPARSE_FIELDS, 1, checked.num_slots,
                  checked.device, aligned, snapshot)


# -------------------------------------------------------------------- launch
# A packed gather's warp takes at least this many ring steps: before its first
# row it waits on its CTA's staging of the request starts (a global round trip
# and a barrier) and searches them for every row. Measured on the H100
# (BENCHMARKS.md, log 24), 65536 rows: 288-byte records 41.8 -> 39.6 us with
# two rows a warp instead of one, 656-byte ones 50.9 -> 48.4; the dense
# gathers of the same records are fastest at one.
PACKED_MIN_STEPS = 2


def grid_for(entry: KernelEntry, num_reqs: int, max_rows: int,
             target_ctas: int = TARGET_CTAS) -> tuple[int, int, int]:
    """A row's grid, held near `target_ctas`: its warps move tokens_per_step
    records a step, packed ones at least PACKED_MIN_STEPS steps; under the
    ballot and compact schedules each warp takes one chunk of slots, under direct
    one block of num_stages records a lane group; under page_run each
    CTA one run of tokens at a time. (The bench's grid sweep asks with other targets.)"""
    config = entry.config
    if config["schedule"] == "page_run":
        return run_grid(num_reqs, max_rows, config["run_tokens"], windowed=config["gather_lens"],
                        target_ctas=target_ctas)
    rows_per_warp = None  # the ring's share: launch_grid's
    if config["schedule"] in CHUNKED_SCHEDULES:
        rows_per_warp = config["ballot_chunk"]
    elif config["schedule"] == "direct":
        rows_per_warp = direct_block_rows(entry.format, config["num_stages"])
    return launch_grid(entry, num_reqs, max_rows, target_ctas,
                       tokens_per_step=tokens_per_step(entry.format, config.get("output", "bf16")),
                       rows_per_warp=rows_per_warp, min_steps=PACKED_MIN_STEPS if config["indexing"] == "packed" else 1)


@memoised_grid
def _grid(entry: KernelEntry, num_reqs: int, max_rows: int) -> tuple[int, int, int]:
    """The dispatch grid for a row (grid_for at dispatch's target)."""
    return grid_for(entry, num_reqs, max_rows)


def launch_entry(entry: KernelEntry, out, k_cache, seq_lens, gather_lens, block_table, offset,
                 grid: tuple[int, int, int] | None = None, checked: Optional[Checked] = None,
                 pdl: bool = False) -> None:
    """Launch one dense manifest kernel (the grid from dispatch unless given:
    the benchmark launches the seed's grid this way); `pdl` as in Decision."""
    if checked is None:
        checked = validate(out, k_cache, seq_lens, gather_lens, block_table, entry.config["block_size"], offset)
    _launch_dense(entry, pdl, checked, out, k_cache, seq_lens, gather_lens, block_table, None, offset, grid)


def launch_entry_sparse(entry: KernelEntry, out, k_cache, slot_indices, grid: tuple[int, int, int] | None = None,
                        checked: Optional[CheckedSparse] = None, pdl: bool = False) -> None:
    if checked is None:
        checked = validate_sparse(out, k_cache, slot_indices, entry.config["block_size"])
    _launch_sparse(entry, pdl, checked, out, k_cache, slot_indices, None, grid)


# How each backend runs a call (backend.serve): the launches take (entry, pdl,
# checked, the call's arguments); the fallbacks, imported on first use, the call's arguments.
# Each launch's values are named by a constant tuple, in the kernels' ABI order (launch maps them by name
# for a row that orders them otherwise).
DENSE_PARAMS = tuple(p.name for p in KERNEL_PARAMS["dense"])
SPARSE_PARAMS = tuple(p.name for p in KERNEL_PARAMS["sparse"])


def _launch_dense(entry, pdl, checked, out, k_cache, seq_lens, gather_lens, block_table, block_size, offset,
                  grid=None):
    out_stride = checked.out_stride
    values = (out.data_ptr(), k_cache.data_ptr(), seq_lens.data_ptr(),
              gather_lens.data_ptr() if gather_lens is not None else 0, block_table.data_ptr(),
              out_stride[0], out_stride[1], checked.page_stride, checked.block_table_stride, offset, checked.max_rows)
    launch(entry, DENSE_PARAMS, values, grid or _grid(entry, checked.num_reqs, checked.max_rows), out.get_device(),
           pdl)


def _launch_sparse(entry, pdl, checked, out, k_cache, slot_indices, block_size, grid=None):
    values = (out.data_ptr(), k_cache.data_ptr(), slot_indices.data_ptr(), checked.row_stride, checked.page_stride,
              checked.num_slots)
    launch(entry, SPARSE_PARAMS, values, grid or _grid(entry, 1, checked.num_slots), out.get_device(), pdl)


DENSE_PATHS = Paths(_launch_dense, fallback(__package__, "triton", "dequantize_and_gather_triton"),
                    fallback(__package__, "reference", "dequantize_and_gather_torch"))
SPARSE_PATHS = Paths(_launch_sparse, fallback(__package__, "triton", "dequantize_and_gather_sparse_triton"),
                     fallback(__package__, "reference", "dequantize_and_gather_sparse_torch"))


# Each op's implementation, registered as torch.ops.kvgen's kernel for it and called by the eager entry point.
@register_op("dequantize_and_gather_k_cache", mutates_args=("out",))
def _run(out: torch.Tensor, k_cache: torch.Tensor, seq_lens: torch.Tensor, gather_lens: Optional[torch.Tensor],
         block_table: torch.Tensor, block_size: int, offset: int) -> None:
    # The signature's tensors in the launch's pointer order (DENSE_PARAMS): kvgen.runtime.plans.
    snapshot, key, pointers = signature("dense", (block_size, offset),
                                        (out, k_cache, seq_lens, gather_lens, block_table))
    if launch_planned(key, pointers):
        return
    checked = validate(out, k_cache, seq_lens, gather_lens, block_table, block_size, offset)
    if checked.num_reqs == 0 or checked.max_rows == 0:
        record_no_launch()
        return  # empty batch: nothing to launch
    if switches.check_requested(snapshot):
        check_dense(k_cache, seq_lens, gather_lens, block_table, block_size, checked.max_rows)
    decision = decide_dense(out, k_cache, seq_lens, gather_lens, block_table, block_size, offset, checked=checked,
                            snapshot=snapshot)
    serve(decision, checked.device, DENSE_PATHS, checked,
          (out, k_cache, seq_lens, gather_lens, block_table, block_size, offset))
    remember(key, pointers, decision)


@register_op("dequantize_and_gather_k_cache_sparse", mutates_args=("out",))
def _run_sparse(out: torch.Tensor, k_cache: torch.Tensor, slot_indices: torch.Tensor, block_size: int) -> None:
    snapshot, key, pointers = signature("sparse", (block_size,), (out, k_cache, slot_indices))  # SPARSE_PARAMS
    if launch_planned(key, pointers):
        return
    checked = validate_sparse(out, k_cache, slot_indices, block_size)
    if checked.num_slots == 0:
        record_no_launch()
        return
    if switches.check_requested(snapshot):
        check_slots(k_cache, slot_indices, block_size)
    decision = decide_sparse(out, k_cache, slot_indices, block_size, checked=checked, snapshot=snapshot)
    serve(decision, checked.device, SPARSE_PATHS, checked, (out, k_cache, slot_indices, block_size))
    remember(key, pointers, decision)


# -------------------------------------------------------------- entry points
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


def dequantize_and_gather_k_cache_sparse(out: torch.Tensor, k_cache: torch.Tensor, slot_indices: torch.Tensor,
                                         block_size: int) -> None:
    """out[i] <- the token at global slot slot_indices[i] (page * block_size + row),
    dequantized like the dense op; slot -1 leaves out[i] untouched (no load, no
    store). `out` is bf16 [n, head_dim] or [..., head_dim] (flattened to n
    rows); the format is told apart by k_cache.shape[-1] among the loaded
    trees' formats (584, 528, 288, 656 and 132 shipped)."""
    if torch.compiler.is_compiling():
        torch.ops.kvgen.dequantize_and_gather_k_cache_sparse(out, k_cache, slot_indices, block_size)
        return
    _run_sparse(out, k_cache, slot_indices, block_size)


def select_backend(out, k_cache, seq_lens, gather_lens, block_table, block_size, offset) -> str:
    """The backend that would serve this call: 'cubin', 'triton' or 'torch'."""
    return decide_dense(out, k_cache, seq_lens, gather_lens, block_table, block_size, offset).backend


def select_backend_sparse(out, k_cache, slot_indices, block_size) -> str:
    """The backend that would serve this sparse call."""
    return decide_sparse(out, k_cache, slot_indices, block_size).backend


# ------------------------------------------------------------ packed gathers
class CheckedPacked(NamedTuple):
    format: Format
    block_size: int
    row_stride: int  # dst rows, in elements
    scale_row_stride: int  # raw gathers: dst_scale rows, in bytes
    page_stride: int
    block_table_stride: int
    num_reqs: int
    num_rows: int
    device: torch.device


def _packed_common(cache_name, k_cache, block_table, starts_name, starts, num_reqs, min_starts):
    """The cache, block table and request starts of a packed call."""
    if not (isinstance(k_cache, torch.Tensor) and k_cache.dim() == 3):
        raise ValueError(f"{cache_name}: expected a uint8 [num_blocks, block_size, record_bytes] tensor, got "
                         f"{tuple(k_cache.shape) if isinstance(k_cache, torch.Tensor) else type(k_cache).__name__}")
    block_size = k_cache.shape[1]
    if block_size <= 0:
        raise ValueError(f"{cache_name}: its block size (shape[1]) must be positive, got shape "
                         f"{tuple(k_cache.shape)}")
    fmt, page_stride = check_cache(k_cache, block_size, cache_name)
    (bt_rows, bt_width), (bt_stride, bt_inner) = meta("block_table", block_table, torch.int32, 2)
    if not (bt_inner == 1 or bt_width <= 1):
        raise ValueError(f"block_table: innermost stride must be 1, got {bt_inner}")
    if bt_rows < num_reqs:
        raise ValueError(f"block_table: {bt_rows} rows for {num_reqs} requests")
    (num_starts,), (st_stride,) = meta(starts_name, starts, torch.int32, 1)
    if num_starts < min_starts:
        raise ValueError(f"{starts_name}: {num_starts} entries, expected at least {min_starts}")
    if num_starts > 1 and st_stride != 1:
        raise ValueError(f"{starts_name}: must be contiguous")
    return fmt, block_size, page_stride, bt_stride if bt_rows > 1 else max(bt_width, 1)


def validate_packed(src_cache, dst, block_table, workspace_starts, batch_size, seq_starts) -> CheckedPacked:
    """Check every argument of cp_gather_and_upconvert_fp8_kv_cache before any launch."""
    if type(batch_size) is not int:
        raise TypeError(f"batch_size: expected an int, got {type(batch_size).__name__}")
    if not 0 <= batch_size < 2**30:
        raise ValueError(f"batch_size: must be in [0, 2^30), got {batch_size}")
    fmt, block_size, page_stride, bt_stride = _packed_common("src_cache", src_cache, block_table, "workspace_starts",
                                                            workspace_starts, batch_size, batch_size)
    (dst_rows, dst_dim), (dst_stride, dst_inner) = meta("dst", dst, torch.bfloat16, 2)
    head = fmt.head_dim
    if dst_dim != head:
        raise ValueError(f"dst: last dimension must be {head} (format {fmt.name}'s head dim), got {dst_dim}")
    if dst_inner != 1:
        raise ValueError(f"dst: innermost stride must be 1, got {dst_inner}")
    if dst_rows >= 2**31:
        raise ValueError("dst: at most 2^31 - 1 rows")
    if seq_starts is not None:
        (num_seq_starts,), (ss_stride,) = meta("seq_starts", seq_starts, torch.int32, 1)
        if num_seq_starts < batch_size:
            raise ValueError(f"seq_starts: {num_seq_starts} entries for {batch_size} requests")
        if num_seq_starts > 1 and ss_stride != 1:
            raise ValueError("seq_starts: must be contiguous")
    device = check_one_device(("dst", "src_cache", "block_table", "workspace_starts", "seq_starts"),
                              dst, src_cache, block_table, workspace_starts, seq_starts)
    row_stride = dst_stride if dst_rows > 1 else head
    return CheckedPacked(fmt, block_size, row_stride, 0, page_stride, bt_stride, batch_size, dst_rows, device)


def byte_rows(name: str, t) -> torch.Tensor:
    """A 2-D destination of the raw gather as uint8 rows (a view: writes land in
    t). vLLM passes dst_k as float8_e4m3fn and dst_scale as uint8 [T, 4] or
    float32 [T, 1]: any dtype, its rows' bytes are what is copied."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name}: expected 2 dimensions, got shape {tuple(t.shape)}")
    if not (t.stride(1) == 1 or t.shape[1] <= 1):
        raise ValueError(f"{name}: innermost stride must be 1, got {t.stride(1)}")
    return t if t.dtype == torch.uint8 else t.view(torch.uint8)


def validate_raw(kv_cache, dst_k, dst_scale, block_table, cu_seq_lens) -> CheckedPacked:
    """Check every argument of cp_gather_indexer_k_quant_cache before any launch
    (dst_k and dst_scale as byte_rows gives them)."""
    (num_cu,), _ = meta("cu_seq_lens", cu_seq_lens, torch.int32, 1)
    if num_cu < 1:
        raise ValueError("cu_seq_lens: expected batch_size + 1 entries, got 0")
    if num_cu > 2**30:
        raise ValueError(f"cu_seq_lens: at most 2^30 requests, got {num_cu - 1}")
    num_reqs = num_cu - 1
    fmt, block_size, page_stride, bt_stride = _packed_common("kv_cache", kv_cache, block_table, "cu_seq_lens",
                                                            cu_seq_lens, num_reqs, num_reqs + 1)
    if not (fmt.placement == "page_split" and fmt.tail == 0):
        raise ValueError(f"kv_cache: the raw gather copies a page-split record's values and scales; format {fmt.name} "
                         f"is {fmt.placement}" + (f" with a {fmt.tail}-value bf16 tail" if fmt.tail else ""))
    value_bytes, scale_bytes = fmt.value_bytes, fmt.num_scales * fmt.scale_size
    (k_rows, k_width), (k_stride, k_inner) = meta("dst_k", dst_k, torch.uint8, 2)
    (s_rows, s_width), (s_stride, s_inner) = meta("dst_scale", dst_scale, torch.uint8, 2)
    if k_width != value_bytes:
        raise ValueError(f"dst_k: rows must be {value_bytes} bytes (format {fmt.name}'s values), got {k_width}")
    if s_width != scale_bytes:
        raise ValueError(f"dst_scale: rows must be {scale_bytes} bytes (format {fmt.name}'s scales), got {s_width}")
    if s_rows != k_rows:
        raise ValueError(f"dst_scale: {s_rows} rows for dst_k's {k_rows}")
    if not (k_inner == 1 and s_inner == 1):
        raise ValueError("dst_k/dst_scale: innermost stride must be 1")
    if k_rows >= 2**31:
        raise ValueError("dst_k: at most 2^31 - 1 rows")
    device = check_one_device(("dst_k", "kv_cache", "dst_scale", "block_table", "cu_seq_lens"),
                              dst_k, kv_cache, dst_scale, block_table, cu_seq_lens)
    return CheckedPacked(fmt, block_size, k_stride if k_rows > 1 else value_bytes,
                         s_stride if s_rows > 1 else scale_bytes, page_stride, bt_stride, num_reqs, k_rows, device)


def decide_packed(dst, checked: CheckedPacked, output: str, aligned: bool,
                  snapshot: Optional[tuple] = None) -> Decision:
    return decide(FAMILY, checked.format.name, checked.block_size, PACKED_FIELDS[output], 1, checked.num_rows,
                  checked.device, aligned, snapshot)


def launch_packed(entry: KernelEntry, src_cache, dst, block_table, workspace_starts, batch_size, seq_starts=None,
                  checked: Optional[CheckedPacked] = None, pdl: bool = False,
                  grid: tuple[int, int, int] | None = None) -> None:
    """Launch one packed (bf16) manifest row on cp_gather_and_upconvert_fp8_kv_cache's arguments
    (nothing to launch, as for the op, without requests or rows)."""
    checked = checked or validate_packed(src_cache, dst, block_table, workspace_starts, batch_size, seq_starts)
    if checked.num_reqs == 0 or checked.num_rows == 0:
        return
    _launch_packed(entry, pdl, checked, dst, src_cache, block_table, workspace_starts, batch_size, seq_starts, None,
                   grid)


def launch_raw(entry: KernelEntry, kv_cache, dst_k, dst_scale, block_table, cu_seq_lens,
               checked: Optional[CheckedPacked] = None, pdl: bool = False,
               grid: tuple[int, int, int] | None = None) -> None:
    """Launch one raw packed manifest row on cp_gather_indexer_k_quant_cache's arguments
    (nothing to launch, as for the op, without requests or rows)."""
    dst_k, dst_scale = byte_rows("dst_k", dst_k), byte_rows("dst_scale", dst_scale)
    checked = checked or validate_raw(kv_cache, dst_k, dst_scale, block_table, cu_seq_lens)
    if checked.num_reqs == 0 or checked.num_rows == 0:
        return
    _launch_raw(entry, pdl, checked, dst_k, dst_scale, kv_cache, block_table, cu_seq_lens, None, grid)


# backend.serve's paths, as for the dense gather (the arguments in the fallbacks' order).
PACKED_PARAMS = tuple(p.name for p in KERNEL_PARAMS["packed"])
RAW_PARAMS = tuple(p.name for p in KERNEL_PARAMS["raw"])


def _launch_packed(entry, pdl, checked, dst, src_cache, block_table, workspace_starts, batch_size, seq_starts,
                   block_size, grid=None):
    values = (dst.data_ptr(), src_cache.data_ptr(), block_table.data_ptr(), workspace_starts.data_ptr(),
              seq_starts.data_ptr() if seq_starts is not None else 0, checked.row_stride, checked.page_stride,
              checked.block_table_stride, checked.num_reqs, checked.num_rows, 0, int(seq_starts is not None))
    launch(entry, PACKED_PARAMS, values, grid or _grid(entry, 1, checked.num_rows), dst.get_device(), pdl)


def _launch_raw(entry, pdl, checked, dst_k, dst_scale, kv_cache, block_table, cu_seq_lens, block_size, grid=None):
    values = (dst_k.data_ptr(), dst_scale.data_ptr(), kv_cache.data_ptr(), block_table.data_ptr(),
              cu_seq_lens.data_ptr(), 0, checked.row_stride, checked.scale_row_stride, checked.page_stride,
              checked.block_table_stride, checked.num_reqs, checked.num_rows, 1, 0)
    launch(entry, RAW_PARAMS, values, grid or _grid(entry, 1, checked.num_rows), dst_k.get_device(), pdl)


PACKED_PATHS = Paths(_launch_packed, fallback(__package__, "triton", "dequantize_and_gather_packed_triton"),
                     fallback(__package__, "reference", "dequantize_and_gather_packed_torch"))
RAW_PATHS = Paths(_launch_raw, fallback(__package__, "triton", "gather_raw_packed_triton"),
                  fallback(__package__, "reference", "gather_raw_packed_torch"))


@register_op("cp_gather_and_upconvert_fp8_kv_cache", mutates_args=("dst",))
def _run_packed(src_cache: torch.Tensor, dst: torch.Tensor, block_table: torch.Tensor,
                workspace_starts: torch.Tensor, batch_size: int, seq_starts: Optional[torch.Tensor] = None) -> None:
    snapshot, key, pointers = signature("packed", (batch_size,),  # PACKED_PARAMS' pointers
                                        (dst, src_cache, block_table, workspace_starts, seq_starts))
    if launch_planned(key, pointers):
        return
    checked = validate_packed(src_cache, dst, block_table, workspace_starts, batch_size, seq_starts)
    if checked.num_reqs == 0 or checked.num_rows == 0:
        record_no_launch()
        return
    if switches.check_requested(snapshot):
        check_packed(src_cache, block_table, workspace_starts, batch_size, checked.num_rows, False, seq_starts,
                     checked.block_size, "workspace_starts")
    aligned = dst.data_ptr() % 16 == 0 and checked.row_stride % 8 == 0
    decision = decide_packed(dst, checked, "bf16", aligned, snapshot)
    serve(decision, checked.device, PACKED_PATHS, checked,
          (dst, src_cache, block_table, workspace_starts, batch_size, seq_starts, checked.block_size))
    remember(key, pointers, decision)


@register_op("cp_gather_indexer_k_quant_cache", mutates_args=("dst_k", "dst_scale"))
def _run_raw(kv_cache: torch.Tensor, dst_k: torch.Tensor, dst_scale: torch.Tensor, block_table: torch.Tensor,
             cu_seq_lens: torch.Tensor) -> None:
    # Signed as passed (dtype included), before byte_rows views them: a view has their pointers.
    snapshot, key, pointers = signature("raw", (), (dst_k, dst_scale, kv_cache, block_table, cu_seq_lens))
    if launch_planned(key, pointers):
        return
    dst_k, dst_scale = byte_rows("dst_k", dst_k), byte_rows("dst_scale", dst_scale)
    checked = validate_raw(kv_cache, dst_k, dst_scale, block_table, cu_seq_lens)
    if checked.num_reqs == 0 or checked.num_rows == 0:
        record_no_launch()
        return
    if switches.check_requested(snapshot):
        check_packed(kv_cache, block_table, cu_seq_lens, checked.num_reqs, checked.num_rows, True, None,
                     checked.block_size, "cu_seq_lens")
    aligned = (dst_k.data_ptr() % 16 == 0 and checked.row_stride % 16 == 0  # 16-byte value stores
               and dst_scale.data_ptr() % 4 == 0 and checked.scale_row_stride % 4 == 0)  # the ABI's assumption
    decision = decide_packed(dst_k, checked, "raw", aligned, snapshot)
    serve(decision, checked.device, RAW_PATHS, checked,
          (dst_k, dst_scale, kv_cache, block_table, cu_seq_lens, checked.block_size))
    remember(key, pointers, decision)


def cp_gather_and_upconvert_fp8_kv_cache(src_cache: torch.Tensor, dst: torch.Tensor, block_table: torch.Tensor,
                                         workspace_starts: torch.Tensor, batch_size: int,
                                         seq_starts: Optional[torch.Tensor] = None) -> None:
    """vLLM's packed gather: dst row t (bf16 [T, head_dim]) <- the token of the
    last request r < batch_size with workspace_starts[r] <= t, at position
    t - workspace_starts[r] (+ seq_starts[r]), decoded; rows before
    workspace_starts[0] are not touched. Any loaded format (the V3.2 656-byte
    record is what vLLM passes); docs/semantics.md, "Packed gathers"."""
    if torch.compiler.is_compiling():
        torch.ops.kvgen.cp_gather_and_upconvert_fp8_kv_cache(src_cache, dst, block_table, workspace_starts,
                                                             batch_size, seq_starts)
        return
    _run_packed(src_cache, dst, block_table, workspace_starts, batch_size, seq_starts)


def cp_gather_indexer_k_quant_cache(kv_cache: torch.Tensor, dst_k: torch.Tensor, dst_scale: torch.Tensor,
                                    block_table: torch.Tensor, cu_seq_lens: torch.Tensor) -> None:
    """vLLM's raw packed gather of the indexer K cache: request r owns rows
    cu_seq_lens[r] .. cu_seq_lens[r+1]-1 of dst_k ([T, value_bytes] bytes: uint8,
    or float8_e4m3fn as vLLM passes it) and dst_scale ([T, scale bytes]: uint8
    [T, 4] or float32 [T, 1]), its positions from 0; the records' value and
    scale bytes are copied undecoded; rows past cu_seq_lens[-1] are not
    touched. Any loaded page-split format without a tail; docs/semantics.md."""
    if torch.compiler.is_compiling():
        torch.ops.kvgen.cp_gather_indexer_k_quant_cache(kv_cache, dst_k, dst_scale, block_table, cu_seq_lens)
        return
    _run_raw(kv_cache, dst_k, dst_scale, block_table, cu_seq_lens)
