"""The Triton backend: for GPUs without a shipped cubin, and testable on the CPU
under TRITON_INTERPRET=1.

Written for bandwidth rather than ported from the seed's fallback (which
gives each request 128 programs that walk tokens one at a time): each program
takes a tile of TOKENS_PER_PROGRAM tokens x 512 values of one request, so a
long request spreads over thousands of programs with many loads in flight.
Decoding is done with integer arithmetic on the raw bytes, the same bits as
the torch path (kvgen/reference.py) on every input, NaN bytes and edge scale
codes included.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...runtime.dispatch import MAX_GRID_Y
from ...runtime.validate import format_of

TOKENS_PER_PROGRAM = 16
NUM_WARPS = 8
MAX_GRID = 65535 * 16  # sparse: programs grid-stride past this


@triton.jit
def _dequant_tile(cache_ptr, page, row, tok_ok, page_stride,
                  BLOCK_SIZE: tl.constexpr, FP8_DIM: tl.constexpr, DATA_BYTES: tl.constexpr,
                  SCALE_BYTES: tl.constexpr, SCALE_GROUP: tl.constexpr, HEAD: tl.constexpr,
                  HEAD_P2: tl.constexpr):
    """bf16 [tokens, HEAD_P2] for the records at (page, row): kvgen's decoding, in
    integers; columns past HEAD (up to the power of two Triton needs) are zero."""
    # 64-bit page addressing: caches beyond 4 GiB.
    page_base = page.to(tl.int64) * page_stride
    record = tl.multiple_of(page_base + row * DATA_BYTES, 16)
    scale_row = page_base + BLOCK_SIZE * DATA_BYTES + row * SCALE_BYTES

    col = tl.arange(0, HEAD_P2)
    is_fp8 = col < FP8_DIM
    m_fp8 = tok_ok[:, None] & is_fp8[None, :]
    m_tail = tok_ok[:, None] & ((col >= FP8_DIM) & (col < HEAD))[None, :]

    raw = tl.load(cache_ptr + record[:, None] + col[None, :], mask=m_fp8, other=0).to(tl.int32)
    code = tl.load(cache_ptr + scale_row[:, None] + (col // SCALE_GROUP)[None, :], mask=m_fp8,
                   other=127).to(tl.int32)
    tail_ptr = (cache_ptr + record[:, None] + FP8_DIM + 2 * (col - FP8_DIM)[None, :]).to(
        tl.pointer_type(tl.uint16))
    tail = tl.load(tail_ptr, mask=m_tail, other=0)

    # e4m3 -> float32, exactly: normals by exponent rebias, subnormals as m * 2^-9.
    exp = (raw >> 3) & 0xF
    man = raw & 0x7
    normal = (((exp + 120) << 23) | (man << 20)).to(tl.float32, bitcast=True)
    value = tl.where(exp == 0, man.to(tl.float32) * 0.001953125, normal)
    # The sign as a bit: float negation lowers to 0 - x on the GPU, which loses -0.
    value = (value.to(tl.int32, bitcast=True) | ((raw & 0x80) << 24)).to(tl.float32, bitcast=True)
    value = tl.where((raw & 0x7F) == 0x7F, float("nan"), value)
    # UE8M0 -> float32: 2^(code-127); code 0 -> 2^-127 (subnormal); 255 -> NaN.
    scale_bits = tl.where(code == 0, 0x00400000, code << 23)
    scale_bits = tl.where(code == 255, 0x7FC00000, scale_bits)
    product = value * scale_bits.to(tl.float32, bitcast=True)  # exact (see reference.py)
    # float32 -> bf16, round to nearest even, in integer arithmetic: the same
    # bits on the GPU and in the CPU interpreter (whose float cast mis-rounds
    # subnormal results), subnormals kept, overflow to Inf.
    bits = product.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    scaled = tl.where(product != product, 0x7FC0, rounded).to(tl.uint16)
    return tl.where(is_fp8[None, :], scaled, tail).to(tl.bfloat16, bitcast=True)


@triton.jit
def _dequant_gather_kernel(
    out_ptr, cache_ptr, seq_lens_ptr, gather_lens_ptr, block_table_ptr,
    out_stride_req, out_stride_row, page_stride, block_table_stride, offset, max_rows,
    HAS_GATHER_LENS: tl.constexpr, BLOCK_SIZE: tl.constexpr, FP8_DIM: tl.constexpr,
    DATA_BYTES: tl.constexpr, SCALE_BYTES: tl.constexpr, SCALE_GROUP: tl.constexpr,
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
        result = _dequant_tile(cache_ptr, page, pos % BLOCK_SIZE, tok_ok, page_stride, BLOCK_SIZE, FP8_DIM,
                               DATA_BYTES, SCALE_BYTES, SCALE_GROUP, HEAD, HEAD_P2)
        dst = out_ptr + req.to(tl.int64) * out_stride_req + (offset + tok).to(tl.int64)[:, None] * out_stride_row
        col = tl.arange(0, HEAD_P2)
        tl.store(dst + col[None, :], result, mask=tok_ok[:, None] & (col < HEAD)[None, :])


@triton.jit
def _dequant_gather_sparse_kernel(
    out_ptr, cache_ptr, slot_ptr, out_stride_row, page_stride, num_slots,
    BLOCK_SIZE: tl.constexpr, FP8_DIM: tl.constexpr, DATA_BYTES: tl.constexpr, SCALE_BYTES: tl.constexpr,
    SCALE_GROUP: tl.constexpr, HEAD: tl.constexpr, HEAD_P2: tl.constexpr, TOKENS: tl.constexpr,
):
    for tile in range(tl.program_id(0), tl.cdiv(num_slots, TOKENS), tl.num_programs(0)):
        idx = tile * TOKENS + tl.arange(0, TOKENS)
        slot = tl.load(slot_ptr + idx, mask=idx < num_slots, other=-1)
        ok = slot >= 0  # slot -1: no load, no store
        result = _dequant_tile(cache_ptr, slot // BLOCK_SIZE, slot % BLOCK_SIZE, ok, page_stride, BLOCK_SIZE,
                               FP8_DIM, DATA_BYTES, SCALE_BYTES, SCALE_GROUP, HEAD, HEAD_P2)
        col = tl.arange(0, HEAD_P2)
        dst = out_ptr + idx.to(tl.int64)[:, None] * out_stride_row + col[None, :]
        tl.store(dst, result, mask=ok[:, None] & (col < HEAD)[None, :])


def _format_constants(k_cache: torch.Tensor) -> dict:
    fmt = format_of(k_cache)
    return dict(FP8_DIM=fmt.values, DATA_BYTES=fmt.data_bytes, SCALE_BYTES=fmt.scale_bytes,
                SCALE_GROUP=fmt.scale_group, HEAD=fmt.head_dim, HEAD_P2=triton.next_power_of_2(fmt.head_dim))


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
        HAS_GATHER_LENS=gather_lens is not None, BLOCK_SIZE=block_size, TOKENS=TOKENS_PER_PROGRAM,
        num_warps=NUM_WARPS, **_format_constants(k_cache),
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
        BLOCK_SIZE=block_size, TOKENS=TOKENS_PER_PROGRAM, num_warps=NUM_WARPS, **_format_constants(k_cache),
    )
