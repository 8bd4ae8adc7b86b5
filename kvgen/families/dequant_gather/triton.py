"""The Triton backend: for GPUs without a shipped cubin, and testable on the CPU
under TRITON_INTERPRET=1.

Written for bandwidth rather than ported from the seed's fallback (which
gives each request 128 programs that walk tokens one at a time): each program
takes a tile of TOKENS_PER_PROGRAM tokens x head_dim values, so a long
request spreads over thousands of programs with many loads in flight.
Decoding is done with integer arithmetic on the raw bytes, the same bits as
the torch path (reference.py) on every input, NaN bytes and edge scales
included, for every record format (kvgen/formats.py): e4m3 or e2m1 values,
UE8M0, e4m3 or float32 scales, page-split or inline records. The format enters
the kernels as constexprs only (its kinds, and where each part of a row lies,
from `Format.regions`), so each format compiles to its own straight-line code:
the e4m3 x UE8M0 page-split formats to the same work as before the other kinds
existed.

Three indexings: dense (a block table per request, `seq_lens` and
`gather_lens`), sparse (global slots) and packed (output rows packed request
after request; each row finds its request by a binary search over the
requests' start rows, on the device, with no host synchronisation), the last
also raw (the record's value and scale bytes copied undecoded).

Two things the CPU interpreter and the GPU disagree on, both avoided: the
interpreter's float32 -> bf16 cast mis-rounds subnormal results (the rounding
is done in integers), and the GPU lowers float negation to 0 - x, which loses
-0 (signs are set as bits).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...formats import Format
from ...runtime.dispatch import MAX_GRID_Y
from ...runtime.validate import format_of

TOKENS_PER_PROGRAM = 16
NUM_WARPS = 8
MAX_GRID = 65535 * 16  # sparse and packed: programs grid-stride past this


@triton.jit
def _e4m3_to_f32(raw):
    """int32 OCP E4M3 bytes -> float32, exactly: normals by exponent rebias,
    subnormals as m * 2^-9; 0x7F/0xFF NaN."""
    exp = (raw >> 3) & 0xF
    man = raw & 0x7
    normal = (((exp + 120) << 23) | (man << 20)).to(tl.float32, bitcast=True)
    value = tl.where(exp == 0, man.to(tl.float32) * 0.001953125, normal)
    # The sign as a bit: float negation lowers to 0 - x on the GPU, which loses -0.
    value = (value.to(tl.int32, bitcast=True) | ((raw & 0x80) << 24)).to(tl.float32, bitcast=True)
    return tl.where((raw & 0x7F) == 0x7F, float("nan"), value)


@triton.jit
def _e2m1_to_f32(nib):
    """int32 OCP E2M1 nibbles -> float32, exactly, in bits: magnitudes 0, 0.5, 1,
    1.5, 2, 3, 4, 6; bit 3 the sign (0x8 is -0)."""
    exp = (nib >> 1) & 0x3
    man = nib & 0x1
    bits = tl.where(exp == 0, man * 0x3F000000, ((exp + 126) << 23) | (man << 22))
    return (bits | ((nib & 0x8) << 28)).to(tl.float32, bitcast=True)


@triton.jit
def _dequant_tile(cache_ptr, page, row, tok_ok, page_stride,
                  VALUE_KIND: tl.constexpr, SCALE_KIND: tl.constexpr, VALUES: tl.constexpr,
                  SCALE_GROUP: tl.constexpr, ROW_BYTES: tl.constexpr, TAIL_BASE: tl.constexpr,
                  SCALE_BASE: tl.constexpr, SCALE_ROW: tl.constexpr, HEAD: tl.constexpr,
                  HEAD_P2: tl.constexpr):
    """bf16 [tokens, HEAD_P2] for the records at (page, row): kvgen's decoding, in
    integers; columns past HEAD (up to the power of two Triton needs) are zero.

    Row r's values start at page + r * ROW_BYTES (the tail TAIL_BASE bytes
    further on), its scales at page + SCALE_BASE + r * SCALE_ROW: a page-split
    format's data and scale rows, or an inline record's parts (Format.regions)."""
    # 64-bit page addressing: caches beyond 4 GiB.
    page_base = page.to(tl.int64) * page_stride
    record = tl.multiple_of(page_base + row * ROW_BYTES, 16)
    scale_row = page_base + SCALE_BASE + row * SCALE_ROW

    col = tl.arange(0, HEAD_P2)
    is_val = col < VALUES
    m_val = tok_ok[:, None] & is_val[None, :]
    m_tail = tok_ok[:, None] & ((col >= VALUES) & (col < HEAD))[None, :]

    # The loads first (the old formats' order), then the decoding.
    if VALUE_KIND == "e2m1" and VALUES == HEAD_P2:  # no tail: the packed bytes whole, each split in two
        half = tl.arange(0, VALUES // 2)
        packed = tl.load(cache_ptr + record[:, None] + half[None, :], mask=tok_ok[:, None], other=0).to(tl.int32)
        # value 2i in the low nibble of byte i, 2i+1 in the high one: join interleaves them
        raw = tl.reshape(tl.join(packed & 0xF, packed >> 4), (packed.shape[0], VALUES))
    elif VALUE_KIND == "e2m1":  # a tail beside: each column loads its byte
        raw = (tl.load(cache_ptr + record[:, None] + (col // 2)[None, :], mask=m_val, other=0).to(tl.int32)
               >> ((col & 1) * 4)[None, :]) & 0xF
    else:
        raw = tl.load(cache_ptr + record[:, None] + col[None, :], mask=m_val, other=0).to(tl.int32)
    if SCALE_KIND == "f32":  # little-endian float32, used as it stands
        scale_ptr = (cache_ptr + scale_row[:, None] + 4 * (col // SCALE_GROUP)[None, :]).to(
            tl.pointer_type(tl.uint32))
        code = tl.load(scale_ptr, mask=m_val, other=0x3F800000)
    else:  # one byte per scale: 127 is UE8M0's 1.0; E4M3's 1.0 is 0x38
        code = tl.load(cache_ptr + scale_row[:, None] + (col // SCALE_GROUP)[None, :], mask=m_val,
                       other=127 if SCALE_KIND == "ue8m0" else 0x38).to(tl.int32)
    tail_ptr = (cache_ptr + record[:, None] + TAIL_BASE + 2 * (col - VALUES)[None, :]).to(
        tl.pointer_type(tl.uint16))
    tail = tl.load(tail_ptr, mask=m_tail, other=0)

    if VALUE_KIND == "e2m1":
        value = _e2m1_to_f32(raw)
    else:
        value = _e4m3_to_f32(raw)
    if SCALE_KIND == "f32":
        scale = code.to(tl.float32, bitcast=True)
    elif SCALE_KIND == "e4m3":
        scale = _e4m3_to_f32(code)
    else:  # UE8M0 -> float32: 2^(code-127); code 0 -> 2^-127 (subnormal); 255 -> NaN.
        scale_bits = tl.where(code == 0, 0x00400000, code << 23)
        scale_bits = tl.where(code == 255, 0x7FC00000, scale_bits)
        scale = scale_bits.to(tl.float32, bitcast=True)

    # One float32 multiply, round to nearest even with subnormals kept (the
    # interpreter's numpy multiply and the GPU's mul.rn.f32 agree); exact unless
    # the scales are float32.
    product = value * scale
    # float32 -> bf16, round to nearest even, in integer arithmetic: the same
    # bits on the GPU and in the CPU interpreter (whose float cast mis-rounds
    # subnormal results), subnormals kept, overflow to Inf.
    bits = product.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    scaled = tl.where(product != product, 0x7FC0, rounded).to(tl.uint16)
    return tl.where(is_val[None, :], scaled, tail).to(tl.bfloat16, bitcast=True)


@triton.jit
def _owner(starts_ptr, t, num_reqs, search_steps):
    """(r, starts[r]) for the last request r < num_reqs with starts[r] <= t, per
    token of the tile (r = -1 where there is none): a binary search over the
    non-decreasing starts, `search_steps` = bit length of num_reqs halvings.
    Starts that decrease (a caller's mistake, refused by KVGEN_CHECK=1) may give
    another request, but always one with starts[r] <= t (r is the last probe
    that went right), so a position is never negative."""
    lo = tl.zeros_like(t)
    hi = lo + num_reqs
    start = lo
    for _ in range(search_steps):
        active = lo < hi
        mid = (lo + hi) >> 1
        s = tl.load(starts_ptr + mid, mask=active, other=0)
        right = active & (s <= t)
        start = tl.where(right, s, start)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(active & (s > t), mid, hi)
    return lo - 1, start


@triton.jit
def _dequant_gather_kernel(
    out_ptr, cache_ptr, seq_lens_ptr, gather_lens_ptr, block_table_ptr,
    out_stride_req, out_stride_row, page_stride, block_table_stride, offset, max_rows,
    HAS_GATHER_LENS: tl.constexpr, BLOCK_SIZE: tl.constexpr, VALUE_KIND: tl.constexpr,
    SCALE_KIND: tl.constexpr, VALUES: tl.constexpr, SCALE_GROUP: tl.constexpr, ROW_BYTES: tl.constexpr,
    TAIL_BASE: tl.constexpr, SCALE_BASE: tl.constexpr, SCALE_ROW: tl.constexpr,
    HEAD: tl.constexpr, HEAD_P2: tl.constexpr, TOKENS: tl.constexpr,
):
    req = tl.program_id(0)
    seq_len = tl.load(seq_lens_ptr + req)
    if HAS_GATHER_LENS:
        gather_len = tl.load(gather_lens_ptr + req)
    else:
        gather_len = seq_len
    rows = tl.minimum(gather_len, max_rows)
    start = seq_len - gather_len

    # Grid-stride over this request's token tiles (grid.y is capped).
    for tile in range(tl.program_id(1), tl.cdiv(rows, TOKENS), tl.num_programs(1)):
        tok = tile * TOKENS + tl.arange(0, TOKENS)
        tok_ok = tok < rows
        pos = start + tok
        page = tl.load(block_table_ptr + req.to(tl.int64) * block_table_stride + pos // BLOCK_SIZE,
                       mask=tok_ok, other=0)
        result = _dequant_tile(cache_ptr, page, pos % BLOCK_SIZE, tok_ok, page_stride, VALUE_KIND, SCALE_KIND,
                               VALUES, SCALE_GROUP, ROW_BYTES, TAIL_BASE, SCALE_BASE, SCALE_ROW, HEAD, HEAD_P2)
        dst = out_ptr + req.to(tl.int64) * out_stride_req + (offset + tok).to(tl.int64)[:, None] * out_stride_row
        col = tl.arange(0, HEAD_P2)
        tl.store(dst + col[None, :], result, mask=tok_ok[:, None] & (col < HEAD)[None, :])


@triton.jit
def _dequant_gather_sparse_kernel(
    out_ptr, cache_ptr, slot_ptr, out_stride_row, page_stride, num_slots,
    BLOCK_SIZE: tl.constexpr, VALUE_KIND: tl.constexpr, SCALE_KIND: tl.constexpr, VALUES: tl.constexpr,
    SCALE_GROUP: tl.constexpr, ROW_BYTES: tl.constexpr, TAIL_BASE: tl.constexpr, SCALE_BASE: tl.constexpr,
    SCALE_ROW: tl.constexpr, HEAD: tl.constexpr, HEAD_P2: tl.constexpr, TOKENS: tl.constexpr,
):
    for tile in range(tl.program_id(0), tl.cdiv(num_slots, TOKENS), tl.num_programs(0)):
        idx = tile * TOKENS + tl.arange(0, TOKENS)
        slot = tl.load(slot_ptr + idx, mask=idx < num_slots, other=-1)
        ok = slot >= 0  # slot -1: no load, no store
        result = _dequant_tile(cache_ptr, slot // BLOCK_SIZE, slot % BLOCK_SIZE, ok, page_stride, VALUE_KIND,
                               SCALE_KIND, VALUES, SCALE_GROUP, ROW_BYTES, TAIL_BASE, SCALE_BASE, SCALE_ROW, HEAD,
                               HEAD_P2)
        col = tl.arange(0, HEAD_P2)
        dst = out_ptr + idx.to(tl.int64)[:, None] * out_stride_row + col[None, :]
        tl.store(dst, result, mask=ok[:, None] & (col < HEAD)[None, :])


@triton.jit
def _dequant_gather_packed_kernel(
    out_ptr, cache_ptr, block_table_ptr, starts_ptr, seq_starts_ptr,
    out_stride_row, page_stride, block_table_stride, num_rows, num_reqs, search_steps,
    HAS_SEQ_STARTS: tl.constexpr, BLOCK_SIZE: tl.constexpr, VALUE_KIND: tl.constexpr,
    SCALE_KIND: tl.constexpr, VALUES: tl.constexpr, SCALE_GROUP: tl.constexpr, ROW_BYTES: tl.constexpr,
    TAIL_BASE: tl.constexpr, SCALE_BASE: tl.constexpr, SCALE_ROW: tl.constexpr,
    HEAD: tl.constexpr, HEAD_P2: tl.constexpr, TOKENS: tl.constexpr,
):
    for tile in range(tl.program_id(0), tl.cdiv(num_rows, TOKENS), tl.num_programs(0)):
        t = tile * TOKENS + tl.arange(0, TOKENS)
        req, start = _owner(starts_ptr, t, num_reqs, search_steps)
        ok = (t < num_rows) & (req >= 0)  # rows before starts[0]: no request, not touched
        req = tl.maximum(req, 0).to(tl.int64)
        pos = t - start
        if HAS_SEQ_STARTS:
            pos += tl.load(seq_starts_ptr + req, mask=ok, other=0)
        page = tl.load(block_table_ptr + req * block_table_stride + pos // BLOCK_SIZE, mask=ok, other=0)
        result = _dequant_tile(cache_ptr, page, pos % BLOCK_SIZE, ok, page_stride, VALUE_KIND, SCALE_KIND,
                               VALUES, SCALE_GROUP, ROW_BYTES, TAIL_BASE, SCALE_BASE, SCALE_ROW, HEAD, HEAD_P2)
        col = tl.arange(0, HEAD_P2)
        dst = out_ptr + t.to(tl.int64)[:, None] * out_stride_row + col[None, :]
        tl.store(dst, result, mask=ok[:, None] & (col < HEAD)[None, :])


@triton.jit
def _copy_part(dst_ptr, dst_row, src_row, ok, N: tl.constexpr, N_P2: tl.constexpr, WIDE: tl.constexpr):
    """Copy N bytes from each src_row address to its dst_row address (byte offsets
    from dst_ptr / the cache); in 4-byte words where WIDE (everything aligned)."""
    if WIDE:
        word = tl.arange(0, N_P2 // 4)
        mask = ok[:, None] & (word < N // 4)[None, :]
        src = src_row.to(tl.pointer_type(tl.uint32))
        dst = (dst_ptr + dst_row).to(tl.pointer_type(tl.uint32))
        tl.store(dst[:, None] + word[None, :], tl.load(src[:, None] + word[None, :], mask=mask), mask=mask)
    else:
        byte = tl.arange(0, N_P2)
        mask = ok[:, None] & (byte < N)[None, :]
        tl.store(dst_ptr + dst_row[:, None] + byte[None, :], tl.load(src_row[:, None] + byte[None, :], mask=mask),
                 mask=mask)


@triton.jit
def _gather_raw_packed_kernel(
    dst_k_ptr, dst_scale_ptr, cache_ptr, block_table_ptr, cu_ptr,
    k_stride, scale_stride, page_stride, block_table_stride, num_rows, num_reqs, search_steps,
    BLOCK_SIZE: tl.constexpr, ROW_BYTES: tl.constexpr, VALUE_BYTES: tl.constexpr, VALUE_P2: tl.constexpr,
    VALUE_WIDE: tl.constexpr, SCALE_BASE: tl.constexpr, SCALE_ROW: tl.constexpr, SCALE_COPY: tl.constexpr,
    SCALE_P2: tl.constexpr, SCALE_WIDE: tl.constexpr, TOKENS: tl.constexpr,
):
    end = tl.load(cu_ptr + num_reqs)
    for tile in range(tl.program_id(0), tl.cdiv(num_rows, TOKENS), tl.num_programs(0)):
        t = tile * TOKENS + tl.arange(0, TOKENS)
        req, start = _owner(cu_ptr, t, num_reqs, search_steps)
        ok = (t < num_rows) & (req >= 0) & (t < end)  # rows outside cu[0] .. cu[B] - 1: not touched
        req = tl.maximum(req, 0).to(tl.int64)
        pos = t - start
        page = tl.load(block_table_ptr + req * block_table_stride + pos // BLOCK_SIZE, mask=ok, other=0)
        page_base = page.to(tl.int64) * page_stride
        row = pos % BLOCK_SIZE
        t64 = t.to(tl.int64)
        values = tl.multiple_of(page_base + row * ROW_BYTES, 16)
        _copy_part(dst_k_ptr, t64 * k_stride, cache_ptr + values, ok, VALUE_BYTES, VALUE_P2, VALUE_WIDE)
        scales = page_base + SCALE_BASE + row * SCALE_ROW
        _copy_part(dst_scale_ptr, t64 * scale_stride, cache_ptr + scales, ok, SCALE_COPY, SCALE_P2, SCALE_WIDE)


def _placement(fmt: Format, block_size: int) -> dict:
    """The format as the kernels' constexprs: its kinds, and where row r's parts
    lie in a page (Format.regions): values and tail on one row stride, the
    values first in the row; the scales on their own."""
    regions = fmt.regions(block_size)
    value_base, row_bytes, _ = regions["values"]
    tail_base, tail_row, _ = regions["tail"]
    scale_base, scale_row, _ = regions["scales"]
    assert value_base == 0 and tail_row == row_bytes and row_bytes % 16 == 0, (fmt, regions)
    return dict(ROW_BYTES=row_bytes, TAIL_BASE=tail_base, SCALE_BASE=scale_base, SCALE_ROW=scale_row)


def _format_constants(k_cache: torch.Tensor, block_size: int) -> dict:
    fmt = format_of(k_cache)
    return dict(VALUE_KIND=fmt.value_kind, SCALE_KIND=fmt.scale_kind, VALUES=fmt.values,
                SCALE_GROUP=fmt.scale_group, HEAD=fmt.head_dim, HEAD_P2=triton.next_power_of_2(fmt.head_dim),
                BLOCK_SIZE=block_size, **_placement(fmt, block_size))


def dequantize_and_gather_triton(out: torch.Tensor, k_cache: torch.Tensor, seq_lens: torch.Tensor,
                                 gather_lens: torch.Tensor | None, block_table: torch.Tensor,
                                 block_size: int, offset: int) -> None:
    num_reqs = seq_lens.shape[0]
    max_rows = out.shape[1] - offset
    if num_reqs == 0 or max_rows <= 0:
        return
    # Host-known bound on every request's tiles: no device synchronisation.
    tiles = triton.cdiv(max_rows, TOKENS_PER_PROGRAM)
    grid = (num_reqs, min(tiles, MAX_GRID_Y))
    _dequant_gather_kernel[grid](
        out, k_cache, seq_lens, gather_lens if gather_lens is not None else seq_lens, block_table,
        out.stride(0), out.stride(1), k_cache.stride(0), block_table.stride(0), offset, max_rows,
        HAS_GATHER_LENS=gather_lens is not None, TOKENS=TOKENS_PER_PROGRAM,
        num_warps=NUM_WARPS, **_format_constants(k_cache, block_size),
    )


def dequantize_and_gather_sparse_triton(out: torch.Tensor, k_cache: torch.Tensor, slot_indices: torch.Tensor,
                                        block_size: int) -> None:
    rows = out.view(-1, format_of(k_cache).head_dim)
    num_slots = slot_indices.shape[0]
    if num_slots == 0:
        return
    grid = (min(triton.cdiv(num_slots, TOKENS_PER_PROGRAM), MAX_GRID),)
    _dequant_gather_sparse_kernel[grid](
        rows, k_cache, slot_indices, rows.stride(0), k_cache.stride(0), num_slots,
        TOKENS=TOKENS_PER_PROGRAM, num_warps=NUM_WARPS, **_format_constants(k_cache, block_size),
    )


def dequantize_and_gather_packed_triton(out: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor,
                                        starts: torch.Tensor, num_reqs: int, seq_starts: torch.Tensor | None,
                                        block_size: int) -> None:
    """out (bf16 [T, head_dim], rows strided, innermost stride 1) row t <- the
    record of the last request r < num_reqs with starts[r] <= t, at position
    t - starts[r] (+ seq_starts[r]), page block_table[r, p // block_size];
    rows before starts[0] are not touched. The request is found on the device:
    no synchronisation."""
    num_rows = out.shape[0]
    if num_reqs <= 0 or num_rows == 0:
        return
    grid = (min(triton.cdiv(num_rows, TOKENS_PER_PROGRAM), MAX_GRID),)
    _dequant_gather_packed_kernel[grid](
        out, k_cache, block_table, starts, seq_starts if seq_starts is not None else starts,
        out.stride(0), k_cache.stride(0), block_table.stride(0), num_rows, num_reqs, int(num_reqs).bit_length(),
        HAS_SEQ_STARTS=seq_starts is not None, TOKENS=TOKENS_PER_PROGRAM, num_warps=NUM_WARPS,
        **_format_constants(k_cache, block_size),
    )


def _bytes_view(t: torch.Tensor) -> torch.Tensor:
    """A [T, n] destination as uint8 rows (an fp8 or float32 view of the same bytes too)."""
    return t if t.dtype == torch.uint8 else t.view(torch.uint8)


def gather_raw_packed_triton(dst_k: torch.Tensor, dst_scale: torch.Tensor, k_cache: torch.Tensor,
                             block_table: torch.Tensor, cu_seq_lens: torch.Tensor, block_size: int) -> None:
    """Raw packed gather: row t in [cu[0], cu[B]) (B = cu_seq_lens.shape[0] - 1)
    belongs to the last r < B with cu[r] <= t, position t - cu[r]; dst_k[t] <-
    the record's value bytes, dst_scale[t] <- its scale bytes (no pad). Other
    rows are not touched; rows may be strided (innermost stride 1)."""
    fmt = format_of(k_cache)
    dst_k, dst_scale = _bytes_view(dst_k), _bytes_view(dst_scale)
    num_reqs = cu_seq_lens.shape[0] - 1
    num_rows = min(dst_k.shape[0], dst_scale.shape[0])
    if num_reqs <= 0 or num_rows == 0:
        return
    placement = _placement(fmt, block_size)
    scale_copy = fmt.num_scales * fmt.scale_size
    k_stride = dst_k.stride(0) if dst_k.shape[0] > 1 else fmt.value_bytes
    scale_stride = dst_scale.stride(0) if dst_scale.shape[0] > 1 else scale_copy
    # 4-byte words where every address is 4-byte aligned (pages and value rows
    # are 16-byte aligned; scale rows as their base and stride say).
    wide = lambda t, stride, n: t.data_ptr() % 4 == 0 and stride % 4 == 0 and n % 4 == 0  # noqa: E731
    scale_wide = (wide(dst_scale, scale_stride, scale_copy) and placement["SCALE_BASE"] % 4 == 0
                  and placement["SCALE_ROW"] % 4 == 0)
    grid = (min(triton.cdiv(num_rows, TOKENS_PER_PROGRAM), MAX_GRID),)
    _gather_raw_packed_kernel[grid](
        dst_k, dst_scale, k_cache, block_table, cu_seq_lens,
        k_stride, scale_stride, k_cache.stride(0), block_table.stride(0), num_rows, num_reqs,
        int(num_reqs).bit_length(),
        BLOCK_SIZE=block_size, ROW_BYTES=placement["ROW_BYTES"], VALUE_BYTES=fmt.value_bytes,
        VALUE_P2=triton.next_power_of_2(fmt.value_bytes), VALUE_WIDE=wide(dst_k, k_stride, fmt.value_bytes),
        SCALE_BASE=placement["SCALE_BASE"], SCALE_ROW=placement["SCALE_ROW"], SCALE_COPY=scale_copy,
        SCALE_P2=triton.next_power_of_2(scale_copy), SCALE_WIDE=scale_wide,
        TOKENS=TOKENS_PER_PROGRAM, num_warps=4,
    )
