"""The quantize-and-insert op (the writer): validate, decide, launch; a custom op.

`quantize_and_insert_k_cache(k, k_cache, slot_mapping, block_size,
record_bytes=None)` has the convention the serving stacks call (vLLM's): k
bf16 [T, head_dim], the cache as its record view [num_blocks, block_size,
record_bytes] or its byte view [num_blocks, block_bytes], slots int32 or
int64 (-1 skips a token; only the first slot_mapping.shape[0] tokens are
written). It serves every format of the loaded kernel trees. vLLM's
`concat_and_cache_ds_mla` (the tail from a tensor of its own) and
`indexer_k_quant_and_cache` (float32 scales, optionally powers of two) are
the same writer. Each is registered as `torch.ops.kvgen.*` (mutating the
cache, with a fake implementation). docs/semantics.md states the bytes.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ...config import unnamed_defaults
from ...formats import Format
from ...runtime import switches
from ...runtime.backend import Decision, Paths, decide, record_no_launch, serve
from ...runtime.dispatch import UNNAMED_DEFAULTS
from ...runtime.index_check import check_write_slots
from ...runtime.launch import launch, memoised_grid
from ...runtime.manifest import KernelEntry
from ...runtime.plans import launch_planned, remember, signature
from ...runtime.registration import register_op
from ...runtime.validate import check_one_device, format_named, meta
from .config import KERNEL_PARAMS, QuantizeInsertConfig, tokens_per_step

FAMILY = QuantizeInsertConfig.family
UNNAMED_DEFAULTS[FAMILY] = unnamed_defaults(QuantizeInsertConfig)  # dispatch's, for rows and rules older than one
DEFAULT_RECORD_BYTES = 584  # the DeepSeek-V4 record, as vLLM's byte-view callers assume
SLOT_DTYPES = {torch.int32: "int32", torch.int64: "int64"}
MAX_WORKERS = 65535  # CTAs; warps grid-stride over the tokens past them
# A row whose warps load one token at a time (tokens_per_warp 1) is held at this many CTAs, 16 a 132-SM
# H100's SM, so each warp takes several tokens in turn and a CTA's start is paid once for them: 3-17% faster
# than one CTA for every four tokens for every writer format on the H100, where rows loading 2 or 4 tokens
# gain nothing from it (BENCHMARKS.md, log 21).
ONE_TOKEN_CTAS = 2112
# A row loading 2 or more tokens a warp ends its grid in about this many light CTAs (4 an H100 SM), each
# loading one step of its lane groups (the template's light tail), so the last CTAs finish soon after their
# loads. Measured on the H100 (BENCHMARKS.md, log 44), 264-1584 light CTAs against none: at 528 each writer
# format measured gained at 2048, 65536 and 262144 tokens (0.2-1.0% at 65536; NVFP4 lost 0.35% at 16384),
# and a short write is spread over more CTAs (NVFP4, 256 tokens: 2.64 -> 1.82 us); 1056 lost 1.4% on the
# indexer's 65536.
LIGHT_CTAS = 528


class Checked(NamedTuple):
    """What validation read, reused by dispatch and launch (no second read)."""

    format: Format
    page_stride: int
    k_stride: int
    num_tokens: int
    slot_dtype: str
    tail_stride: int  # a separate tail tensor's row stride (concat_and_cache_ds_mla's k_pe); 0 without one
    device: torch.device  # the tensors' device


def _check_cache(k_cache, block_size, record_bytes=None, name: str = "k_cache") -> tuple[Format, int]:
    """The writer's cache (record or byte view): its format and page stride."""
    if not isinstance(k_cache, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(k_cache).__name__}")
    if k_cache.dtype != torch.uint8:
        raise TypeError(f"{name}: expected dtype torch.uint8, got {k_cache.dtype}")
    if type(block_size) is not int:
        raise TypeError(f"block_size: expected an int, got {type(block_size).__name__}")
    if not (record_bytes is None or type(record_bytes) is int):
        raise TypeError(f"record_bytes: expected an int or None, got {type(record_bytes).__name__}")
    if block_size <= 0:
        raise ValueError(f"block_size: must be positive, got {block_size}")
    kc_shape, kc_strides = k_cache.shape, k_cache.stride()
    if len(kc_shape) == 3:  # the record view: its last dimension names the format
        record = kc_shape[2]
        if not (record_bytes is None or record_bytes == record):
            raise ValueError(f"record_bytes: {record_bytes} disagrees with {name}.shape[-1] ({record})")
        fmt = format_named(record, name)  # so record == fmt.record_bytes
        if block_size != kc_shape[1]:
            raise ValueError(f"block_size: must equal {name}.shape[1] ({kc_shape[1]}), got {block_size}")
        if not (kc_strides[2] == 1 and (kc_shape[1] == 1 or kc_strides[1] == record)):
            raise ValueError(f"{name}: each page must hold contiguous {record}-byte rows, got strides "
                             f"{tuple(kc_strides)}")
    elif len(kc_shape) == 2:  # the byte view: record_bytes names the format
        fmt = format_named(DEFAULT_RECORD_BYTES if record_bytes is None else record_bytes, "record_bytes")
        record = fmt.record_bytes
        if not (kc_strides[1] == 1 or kc_shape[1] <= 1):
            raise ValueError(f"{name}: each page's bytes must be contiguous, got strides {tuple(kc_strides)}")
        if block_size * record > kc_shape[1]:
            raise ValueError(f"block_size: {block_size} records of {record} bytes do not fit a page of "
                             f"{kc_shape[1]} bytes ({name}.shape[1])")
    else:
        raise ValueError(f"{name}: expected [num_blocks, block_size, record_bytes] or [num_blocks, block_bytes], "
                         f"got shape {tuple(kc_shape)}")
    page_stride = kc_strides[0]
    if page_stride % 16:
        raise ValueError(f"{name}: page stride (stride(0)) must be a multiple of 16 bytes, got {page_stride}")
    if not (kc_shape[0] <= 1 or page_stride >= block_size * record):
        raise ValueError(f"{name}: page stride {page_stride} is smaller than a page ({block_size}*{record} bytes)")
    if k_cache.data_ptr() % 16:
        raise ValueError(f"{name}: data must be 16-byte aligned")
    return fmt, page_stride


def validate(k, k_cache, slot_mapping, block_size, record_bytes=None, cache_name: str = "k_cache") -> Checked:
    """Check every argument before any launch (the cache named as the caller's op names it)."""
    (k_rows, k_dim), (k_stride, k_inner) = meta("k", k, torch.bfloat16, 2)
    fmt, page_stride = _check_cache(k_cache, block_size, record_bytes, cache_name)
    head = fmt.head_dim
    if k_dim != head:
        raise ValueError(f"k: last dimension must be {head} (format {fmt.name}'s head dim), got {k_dim}")
    if not (k_inner == 1 or k_dim <= 1):
        raise ValueError(f"k: innermost stride must be 1, got {k_inner}")
    num_tokens, slot_dtype = _check_slots(slot_mapping, k_rows, "k")
    device = check_one_device(("k", cache_name, "slot_mapping"), k, k_cache, slot_mapping)
    return Checked(fmt, page_stride, k_stride if k_rows > 1 else head, num_tokens, slot_dtype, 0, device)


def _check_slots(slot_mapping, rows: int, rows_name: str) -> tuple[int, str]:
    """slot_mapping's checks; (its length -- the tokens written --, its dtype's name)."""
    if not isinstance(slot_mapping, torch.Tensor):
        raise TypeError(f"slot_mapping: expected a torch.Tensor, got {type(slot_mapping).__name__}")
    slot_dtype = SLOT_DTYPES.get(slot_mapping.dtype)
    if slot_dtype is None:
        raise TypeError(f"slot_mapping: expected dtype torch.int32 or torch.int64, got {slot_mapping.dtype}")
    shape = slot_mapping.shape
    if len(shape) != 1:
        raise ValueError(f"slot_mapping: expected 1 dimension, got shape {tuple(shape)}")
    num_tokens = shape[0]
    if num_tokens > 1 and slot_mapping.stride(0) != 1:
        raise ValueError("slot_mapping: must be contiguous")
    if num_tokens > rows:
        raise ValueError(f"slot_mapping: {num_tokens} slots for {rows} rows of {rows_name} (at most one slot per row)")
    if num_tokens >= 2**31:
        raise ValueError("slot_mapping: at most 2^31 - 1 slots")
    return num_tokens, slot_dtype


# The family fields a row must have, per slot dtype and scale rounding (made once, not per call).
WRITE_FIELDS = {(slot_dtype, pow2): (("slot_dtype", slot_dtype), ("pow2_scale", pow2))
               for slot_dtype in SLOT_DTYPES.values() for pow2 in (False, True)}


def decide_insert(k, k_cache, slot_mapping, block_size, record_bytes=None, *,
                  checked: Optional[Checked] = None, tail=None, pow2_scale: bool = False,
                  snapshot: Optional[tuple] = None) -> Decision:
    """Which backend would serve this call (no launch, no synchronisation);
    `snapshot`: the call's switches (kvgen.runtime.switches), read now if not given."""
    checked = checked or validate(k, k_cache, slot_mapping, block_size, record_bytes)
    aligned = k.data_ptr() % 16 == 0 and checked.k_stride % 8 == 0  # 16-byte loads of k's rows
    if tail is not None:
        aligned = aligned and tail.data_ptr() % 16 == 0 and checked.tail_stride % 8 == 0
    elif checked.format.tail:
        aligned = aligned and checked.format.values % 8 == 0  # the tail starts 16-byte aligned within k's row
    return decide(FAMILY, checked.format.name, block_size, WRITE_FIELDS[checked.slot_dtype, bool(pow2_scale)], 1,
                  checked.num_tokens, checked.device, aligned, snapshot)


@memoised_grid
def launch_grid(entry: KernelEntry, num_tokens: int, light_ctas: int = LIGHT_CTAS) -> tuple[int, int, int]:
    """Enough CTAs for every token at once, held under MAX_WORKERS (ONE_TOKEN_CTAS for a row that loads one
    token at a time; warps grid-stride past it). A row loading more ends in about `light_ctas` light CTAs
    after the full ones (the template derives the split from the grid; this grid is one whose split gives
    exactly `full` full CTAs)."""
    step = entry.config["num_warps"] * tokens_per_step(entry.format)  # a light CTA's tokens
    if entry.config["tokens_per_warp"] == 1:
        return (max(1, min(-(-num_tokens // step), ONE_TOKEN_CTAS)), 1, 1)
    cta = step * entry.config["tokens_per_warp"]  # a full CTA's
    full = max(num_tokens - light_ctas * step, 0) // cta
    light = -(-(num_tokens - full * cta) // step)
    return (max(1, min(full + light, MAX_WORKERS)), 1, 1)


def launch_entry(entry: KernelEntry, k, k_cache, slot_mapping, grid: tuple[int, int, int] | None = None,
                 checked: Optional[Checked] = None, pdl: bool = False, tail=None) -> None:
    """Launch one writer row of the manifest (the grid from launch_grid unless given). The
    tail is k's own columns past the values unless a separate `tail` tensor is given."""
    if checked is None:
        checked = validate(k, k_cache, slot_mapping, entry.config["block_size"], entry.format.record_bytes)
    _launch(entry, pdl, checked, k, k_cache, slot_mapping, None, None, tail, None, grid)


# The launch's values, named in the kernels' ABI order (launch maps them by name for a row ordered otherwise);
# the names are the same for every slot dtype.
PARAMS = tuple(p.name for p in KERNEL_PARAMS["int64"])


# How each backend runs a write (backend.serve), on (k, k_cache, slot_mapping, block_size, format, tail,
# pow2_scale); the launch is given (entry, pdl, checked) first, the fallbacks are imported on first use.
def _launch(entry, pdl, checked, k, k_cache, slot_mapping, block_size, fmt, tail, pow2_scale, grid=None):
    k_ptr = k.data_ptr()
    if tail is None:
        tail_ptr, tail_stride = k_ptr + 2 * checked.format.values, checked.k_stride
    else:
        tail_ptr, tail_stride = tail.data_ptr(), checked.tail_stride
    values = (k_ptr, tail_ptr, k_cache.data_ptr(), slot_mapping.data_ptr(), checked.k_stride, tail_stride,
              checked.page_stride, checked.num_tokens)
    launch(entry, PARAMS, values, grid or launch_grid(entry, checked.num_tokens), k.get_device(), pdl)


def _triton(k, k_cache, slot_mapping, block_size, fmt, tail, pow2_scale):
    from .triton import quantize_and_insert_triton

    quantize_and_insert_triton(k, k_cache, slot_mapping, block_size, fmt, tail=tail, pow2_scale=pow2_scale)


def _torch(k, k_cache, slot_mapping, block_size, fmt, tail, pow2_scale):
    from .reference import quantize_and_insert_torch

    quantize_and_insert_torch(k, k_cache, slot_mapping, block_size, fmt, tail=tail, pow2_scale=pow2_scale)


PATHS = Paths(_launch, _triton, _torch)


def _signature(op: str, scalars: tuple, k, tail, k_cache, slot_mapping):
    """The write's switches, signature and pointers (kvgen.runtime.plans): the tensors in PARAMS'
    pointer order, k standing for the tail it holds where no `tail` is given (the tail's pointer
    is then k's plus a fixed offset)."""
    return signature(op, scalars, (k, k if tail is None else tail, k_cache, slot_mapping))


def _insert(k, k_cache, slot_mapping, block_size, checked: Checked, snapshot: tuple, key, pointers, tail=None,
            pow2_scale: bool = False) -> None:
    """Serve one validated write: k holds the values (and the tail, unless `tail` is given);
    `snapshot`, `key` and `pointers` as _signature gave them."""
    if checked.num_tokens == 0:
        record_no_launch()
        return
    if switches.check_requested(snapshot):
        check_write_slots(k_cache.shape[0], slot_mapping, block_size)
    decision = decide_insert(k, k_cache, slot_mapping, block_size, checked=checked, tail=tail, pow2_scale=pow2_scale,
                             snapshot=snapshot)
    serve(decision, checked.device, PATHS, checked,
          (k, k_cache, slot_mapping, block_size, checked.format, tail, pow2_scale))
    remember(key, pointers, decision)


# Each op's implementation, registered as torch.ops.kvgen's kernel for it and called by the eager entry point.
@register_op("quantize_and_insert_k_cache", mutates_args=("k_cache",))
def _run(k: torch.Tensor, k_cache: torch.Tensor, slot_mapping: torch.Tensor, block_size: int,
         record_bytes: Optional[int] = None) -> None:
    snapshot, key, pointers = _signature("insert", (block_size, record_bytes), k, None, k_cache, slot_mapping)
    if launch_planned(key, pointers):
        return
    _insert(k, k_cache, slot_mapping, block_size, validate(k, k_cache, slot_mapping, block_size, record_bytes),
            snapshot, key, pointers)


def quantize_and_insert_k_cache(k: torch.Tensor, k_cache: torch.Tensor, slot_mapping: torch.Tensor,
                                block_size: int, record_bytes: Optional[int] = None) -> None:
    """Quantize each token i < slot_mapping.shape[0] of k (bf16 [T, head_dim])
    and write it into the paged cache at slot slot_mapping[i] (page * block_size
    + row); a negative slot skips the token. Nothing but the addressed rows'
    data and scale bytes changes. See docs/semantics.md. Raises
    TypeError/ValueError on bad arguments before any launch."""
    if torch.compiler.is_compiling():
        torch.ops.kvgen.quantize_and_insert_k_cache(k, k_cache, slot_mapping, block_size, record_bytes)
        return
    _run(k, k_cache, slot_mapping, block_size, record_bytes)


def _record_view(name: str, kv_cache) -> tuple[Format, int]:
    """A writer's record view [num_blocks, block_size, record_bytes]: its format and block size."""
    if not isinstance(kv_cache, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(kv_cache).__name__}")
    shape = kv_cache.shape
    if len(shape) != 3:
        raise ValueError(f"{name}: expected [num_blocks, block_size, record_bytes], got shape {tuple(shape)}")
    if kv_cache.dtype != torch.uint8:
        raise TypeError(f"{name}: expected dtype torch.uint8, got {kv_cache.dtype}")
    if shape[1] <= 0:
        raise ValueError(f"{name}: its block size (shape[1]) must be positive, got shape {tuple(shape)}")
    return format_named(shape[2], name), shape[1]


def validate_ds_mla(kv_c, k_pe, kv_cache, slot_mapping) -> tuple[Checked, int]:
    """Check every argument of concat_and_cache_ds_mla; (what was read, the block size)."""
    fmt, block_size = _record_view("kv_cache", kv_cache)
    if fmt.tail <= 0:
        raise ValueError(f"kv_cache: format {fmt.name} has no bf16 tail for k_pe; use quantize_and_insert_k_cache")
    (c_rows, c_dim), (c_stride, c_inner) = meta("kv_c", kv_c, torch.bfloat16, 2)
    (p_rows, p_dim), (p_stride, p_inner) = meta("k_pe", k_pe, torch.bfloat16, 2)
    if c_dim != fmt.values:
        raise ValueError(f"kv_c: last dimension must be {fmt.values} (format {fmt.name}'s quantized values), got "
                         f"{c_dim}")
    if p_dim != fmt.tail:
        raise ValueError(f"k_pe: last dimension must be {fmt.tail} (format {fmt.name}'s tail), got {p_dim}")
    if p_rows != c_rows:
        raise ValueError(f"k_pe: {p_rows} rows for kv_c's {c_rows}")
    if not (c_inner == 1 and p_inner == 1):
        raise ValueError("kv_c/k_pe: innermost stride must be 1")
    _, page_stride = _check_cache(kv_cache, block_size, name="kv_cache")
    num_tokens, slot_dtype = _check_slots(slot_mapping, c_rows, "kv_c")
    device = check_one_device(("kv_c", "kv_cache", "slot_mapping", "k_pe"), kv_c, kv_cache, slot_mapping, k_pe)
    return Checked(fmt, page_stride, c_stride if c_rows > 1 else fmt.values, num_tokens, slot_dtype,
                   p_stride if p_rows > 1 else fmt.tail, device), block_size


@register_op("concat_and_cache_ds_mla", mutates_args=("kv_cache",))
def _run_ds_mla(kv_c: torch.Tensor, k_pe: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    snapshot, key, pointers = _signature("ds_mla", (), kv_c, k_pe, kv_cache, slot_mapping)
    if launch_planned(key, pointers):
        return
    checked, block_size = validate_ds_mla(kv_c, k_pe, kv_cache, slot_mapping)
    _insert(kv_c, kv_cache, slot_mapping, block_size, checked, snapshot, key, pointers, tail=k_pe)


def concat_and_cache_ds_mla(kv_c: torch.Tensor, k_pe: torch.Tensor, kv_cache: torch.Tensor,
                            slot_mapping: torch.Tensor) -> None:
    """vLLM's V3.2 writer: quantize kv_c (bf16 [T, 512]) with float32 scales and
    store k_pe (bf16 [T, 64]) verbatim into the 656-byte inline records of
    kv_cache (uint8 [num_blocks, block_size, 656]) at slot_mapping's slots (-1
    skips). Any loaded format with a tail; docs/semantics.md, "Writing"."""
    if torch.compiler.is_compiling():
        torch.ops.kvgen.concat_and_cache_ds_mla(kv_c, k_pe, kv_cache, slot_mapping)
        return
    _run_ds_mla(kv_c, k_pe, kv_cache, slot_mapping)


def validate_indexer(k, kv_cache, slot_mapping, quant_block_size, scale_fmt=None) -> tuple[Checked, int]:
    if not (scale_fmt is None or isinstance(scale_fmt, str)):
        raise TypeError(f"scale_fmt: expected a str or None, got {type(scale_fmt).__name__}")
    fmt, block_size = _record_view("kv_cache", kv_cache)
    if fmt.scale_kind != "f32":
        raise ValueError(f"kv_cache: format {fmt.name} has {fmt.scale_kind} scales; the indexer writer writes "
                         "float32 scales")
    if type(quant_block_size) is not int:
        raise TypeError(f"quant_block_size: expected an int, got {type(quant_block_size).__name__}")
    if quant_block_size != fmt.scale_group:
        raise ValueError(f"quant_block_size: format {fmt.name} has one scale per {fmt.scale_group} values, got "
                         f"{quant_block_size}")
    return validate(k, kv_cache, slot_mapping, block_size, cache_name="kv_cache"), block_size


@register_op("indexer_k_quant_and_cache", mutates_args=("kv_cache",))
def _run_indexer(k: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor, quant_block_size: int,
                 scale_fmt: Optional[str] = None) -> None:
    snapshot, key, pointers = _signature("indexer", (quant_block_size, scale_fmt), k, None, kv_cache, slot_mapping)
    if launch_planned(key, pointers):
        return
    checked, block_size = validate_indexer(k, kv_cache, slot_mapping, quant_block_size, scale_fmt)
    _insert(k, kv_cache, slot_mapping, block_size, checked, snapshot, key, pointers, pow2_scale=scale_fmt == "ue8m0")


def indexer_k_quant_and_cache(k: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                              quant_block_size: int, scale_fmt: Optional[str] = None) -> None:
    """vLLM's indexer writer: quantize k (bf16 [T, 128]) with one float32 scale
    per quant_block_size values (the format's group, 128) into kv_cache (uint8
    [num_blocks, block_size, 132], page-split) at slot_mapping's slots (-1
    skips); scale_fmt "ue8m0" rounds each scale up to a power of two, any other
    string or None keeps it. It writes any loaded format with float32 scales
    (k then [T, head_dim]; the V3.2 656-byte record too). docs/semantics.md,
    "Writing"."""
    if torch.compiler.is_compiling():
        torch.ops.kvgen.indexer_k_quant_and_cache(k, kv_cache, slot_mapping, quant_block_size, scale_fmt)
        return
    _run_indexer(k, kv_cache, slot_mapping, quant_block_size, scale_fmt)


def select_backend_insert(k, k_cache, slot_mapping, block_size, record_bytes=None) -> str:
    """The backend that would serve this call: 'cubin', 'triton' or 'torch'."""
    return decide_insert(k, k_cache, slot_mapping, block_size, record_bytes).backend
