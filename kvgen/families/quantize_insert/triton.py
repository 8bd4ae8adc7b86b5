"""The writer's Triton backend: for GPUs without a shipped cubin, and testable on the CPU under TRITON_INTERPRET=1.

Each program takes a tile of TOKENS_PER_PROGRAM tokens (grid-striding past
MAX_GRID tiles) and writes each token's whole record: value bytes, the bf16
tail, the scale codes and the zero pad bytes, with masked stores of exactly
those bytes. Everything is integer arithmetic on the bf16 bits -- the group
amax (NaN ignored: magnitude bits above 0x7F80), the code (from the amax's
float32 bits), the exact product (an exponent shift) and the E4M3 rounding
(nearest, ties to even, saturating) -- so the CPU interpreter and the GPU give
the same bytes as the torch reference (reference.py) and the cubin's
cvt.rn.satfinite.e4m3x2.f32, with no float8 cast, no subnormal float multiply
(code 255's scale is 2^-128) and no flush-to-zero to worry about.

The values are loaded as [tokens, groups, group] (both padded to powers of
two with masks), so any scale group and any number of groups work.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...formats import Format

TOKENS_PER_PROGRAM = 16
NUM_WARPS = 4
MAX_GRID = 65535 * 16  # programs grid-stride past this


@triton.jit
def _e4m3_rne_satfinite(sign, sig, lsb_exp):
    """int32 E4M3 byte of (-1)^sign * sig * 2^lsb_exp (0 <= sig < 2^24; finite, not NaN): nearest, ties to
    even, magnitudes past 448 giving 0x7E, zeros keeping their sign. Integers only (the one conversion,
    sig -> float32 to find its leading bit, is exact)."""
    top = ((sig.to(tl.float32).to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # leading bit of sig
    exp = top + lsb_exp  # |x| = 1.f * 2^exp
    quantum = tl.maximum(exp, -6) - 3  # E4M3 step: 2^(exp - 3) for normals, 2^-9 below 2^-6
    drop = quantum - lsb_exp  # bits of sig below the step (negative: none, shift up)
    up = tl.minimum(tl.maximum(-drop, 0), 8)
    down = tl.minimum(tl.maximum(drop, 0), 25)  # sig < 2^24: dropping 25 bits leaves 0, half = 2^24 > rest
    q = (sig << up) >> down
    rest = sig & ((1 << down) - 1)
    half = (1 << down) >> 1
    round_up = (down > 0) & ((rest > half) | ((rest == half) & ((q & 1) == 1)))
    q = q + round_up.to(tl.int32)
    # Subnormals are q * 2^-9 (byte q, q <= 8) and normals (8 + m) * 2^quantum (byte ((quantum + 10) << 3) | m):
    # one formula for both, and a carry into the next binade lands on its byte.
    byte = ((quantum + 9) << 3) + q
    byte = tl.where(q == 0, 0, tl.minimum(byte, 0x7E))  # saturate: 0x7F would be NaN
    return byte | (sign << 7)


@triton.jit
def _quantize_insert_kernel(
    k_ptr, cache_ptr, slot_ptr, num_tokens, k_stride_row, k_stride_col, page_stride,
    BLOCK_SIZE: tl.constexpr, VALUES: tl.constexpr, TAIL: tl.constexpr, DATA_BYTES: tl.constexpr,
    SCALE_BYTES: tl.constexpr, NUM_SCALES: tl.constexpr, SCALE_GROUP: tl.constexpr, SCALE_PAD: tl.constexpr,
    GROUPS_P2: tl.constexpr, GROUP_P2: tl.constexpr, TAIL_P2: tl.constexpr, PAD_P2: tl.constexpr,
    TOKENS: tl.constexpr,
):
    g = tl.arange(0, GROUPS_P2)
    j = tl.arange(0, GROUP_P2)
    col = g[:, None] * SCALE_GROUP + j[None, :]  # [groups, group]: value index
    col_ok = (g < NUM_SCALES)[:, None] & (j < SCALE_GROUP)[None, :]
    for tile in range(tl.program_id(0), tl.cdiv(num_tokens, TOKENS), tl.num_programs(0)):
        tok = tile * TOKENS + tl.arange(0, TOKENS)
        slot = tl.load(slot_ptr + tok, mask=tok < num_tokens, other=-1).to(tl.int64)
        ok = slot >= 0  # a negative slot: nothing loaded, nothing stored
        page = tl.where(ok, slot, 0) // BLOCK_SIZE
        row = tl.where(ok, slot, 0) % BLOCK_SIZE
        page_base = page * page_stride  # 64-bit: caches beyond 4 GiB
        data_row = page_base + row * DATA_BYTES
        scale_row = page_base + BLOCK_SIZE * DATA_BYTES + row * SCALE_BYTES
        k_row = tok.to(tl.int64) * k_stride_row

        # The values, [tokens, groups, group], as bf16 bits.
        m = ok[:, None, None] & col_ok[None, :, :]
        h = tl.load(k_ptr + k_row[:, None, None] + (col * k_stride_col)[None, :, :], mask=m, other=0)
        h = h.to(tl.int32) & 0xFFFF
        mag = h & 0x7FFF
        nan = mag > 0x7F80
        # Group amax: for non-negative floats the bit patterns order as the values (Inf included).
        amax = tl.max(tl.where(nan, 0, mag), axis=2)  # NaN ignored; masked columns are 0
        a_bits = tl.maximum(amax << 16, 0x38D1B717)  # float32 bits of max(a, 1e-4)
        # a = f * 2^E, f in [1, 2): code = (E - 8) + 127, plus 1 when f > 1.75; +Inf gives 255.
        code = ((a_bits >> 23) & 0xFF) - 8 + ((a_bits & 0x7FFFFF) > 0x600000).to(tl.int32)
        code = tl.where(a_bits == 0x7F800000, 255, code)

        # x * 2^(127 - code), exactly: x = sig * 2^(max(E_bf16, 1) - 134), so the product's lowest bit
        # weighs 2^(max(E_bf16, 1) - 7 - code).
        exp_field = (h >> 7) & 0xFF
        sig = (h & 0x7F) | tl.where(exp_field > 0, 0x80, 0)
        lsb_exp = tl.maximum(exp_field, 1) - 7 - code[:, :, None]
        sign = h >> 15
        byte = _e4m3_rne_satfinite(sign, sig, lsb_exp)
        byte = tl.where(mag == 0x7F80, 0x7E | (sign << 7), byte)  # +-Inf saturate
        byte = tl.where(nan, 0x7F, byte)
        tl.store(cache_ptr + data_row[:, None, None] + col[None, :, :], byte.to(tl.uint8), mask=m)

        tl.store(cache_ptr + scale_row[:, None] + g[None, :], code.to(tl.uint8),
                 mask=ok[:, None] & (g < NUM_SCALES)[None, :])
        if SCALE_PAD > 0:
            p = tl.arange(0, PAD_P2)
            zeros = tl.zeros((TOKENS, PAD_P2), dtype=tl.uint8)
            tl.store(cache_ptr + scale_row[:, None] + NUM_SCALES + p[None, :], zeros,
                     mask=ok[:, None] & (p < SCALE_PAD)[None, :])
        if TAIL > 0:  # the bf16 tail, bit for bit
            t = tl.arange(0, TAIL_P2)
            mt = ok[:, None] & (t < TAIL)[None, :]
            tail = tl.load(k_ptr + k_row[:, None] + ((VALUES + t) * k_stride_col)[None, :], mask=mt, other=0)
            dst = (cache_ptr + data_row[:, None] + VALUES + 2 * t[None, :]).to(tl.pointer_type(tl.int16))
            tl.store(dst, tail, mask=mt)


def format_constants(fmt: Format) -> dict:
    p2 = triton.next_power_of_2
    return dict(VALUES=fmt.values, TAIL=fmt.tail, DATA_BYTES=fmt.data_bytes, SCALE_BYTES=fmt.scale_bytes,
                NUM_SCALES=fmt.num_scales, SCALE_GROUP=fmt.scale_group, SCALE_PAD=fmt.scale_pad,
                GROUPS_P2=p2(fmt.num_scales), GROUP_P2=p2(fmt.scale_group), TAIL_P2=p2(max(fmt.tail, 1)),
                PAD_P2=p2(max(fmt.scale_pad, 1)))


def quantize_and_insert_triton(k: torch.Tensor, k_cache: torch.Tensor, slot_mapping: torch.Tensor,
                               block_size: int, fmt: Format) -> None:
    """Write k[i] to slot slot_mapping[i] (int32 or int64) for i < slot_mapping.shape[0], slot >= 0.
    Unchecked: a slot past the cache writes past it (KVGEN_CHECK=1 in the op refuses it first)."""
    num_tokens = slot_mapping.shape[0]
    if num_tokens == 0:
        return
    grid = (min(triton.cdiv(num_tokens, TOKENS_PER_PROGRAM), MAX_GRID),)
    _quantize_insert_kernel[grid](
        k.view(torch.int16), k_cache, slot_mapping, num_tokens, k.stride(0), k.stride(1), k_cache.stride(0),
        BLOCK_SIZE=block_size, TOKENS=TOKENS_PER_PROGRAM, num_warps=NUM_WARPS, **format_constants(fmt),
    )
