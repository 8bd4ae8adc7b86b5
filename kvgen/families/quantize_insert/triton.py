"""The writer's Triton backend: for GPUs without a shipped cubin, and testable on the CPU under TRITON_INTERPRET=1.

Each program takes a tile of TOKENS_PER_PROGRAM tokens (grid-striding past
MAX_GRID tiles) and writes each token's whole record: value bytes, the scales
and their zero pad bytes, the bf16 tail, with masked stores of exactly those
bytes, wherever `Format.regions(block_size)` puts them (page-split or inline:
base, row stride and size of each part are constexprs). The values are loaded
as [tokens, groups, group] (both padded to powers of two with masks), so any
scale group and any number of groups work; e2m1 values as two such halves,
the even and the odd values of each group, which make a byte's low and high
nibbles.

One code path per (value kind, scale kind) that docs/semantics.md defines:

* e4m3 values, UE8M0 codes (dsv4_584, v41_528, users'): integer arithmetic on
  the bf16 bits only -- the group amax (NaN ignored: magnitude bits above
  0x7F80), the code (from the amax's float32 bits), the exact product (an
  exponent shift) and the E4M3 rounding (nearest, ties to even, saturating),
  with no float8 cast, no subnormal float multiply (code 255's scale is
  2^-128) and no flush-to-zero to worry about.
* e4m3 values, float32 scales (v32_656, indexer_132; `pow2_scale` rounds the
  scale up to a power of two from its bits): s = max(a / 448, 2^-126), values
  e4m3_rne_satfinite(x / s).
* e2m1 values, e4m3 scales (v41_288): s = min(max(a / 6, 2^-9), 448), its
  E4M3 byte and decoded value S, each nibble by the threshold rule on x / S.

Every division is `tl.math.div_rn` (IEEE div.rn.f32 on the GPU -- no .ftz in
the PTX of Triton 3.6 on the H100 -- and numpy's float32 division in the
interpreter): a plain `/` lowers to the approximate div.full.f32. Everything
around the divisions is integer arithmetic on float32 bits (maxima, minima,
the floors, power-of-two rounding, the E4M3 rounding, the e2m1 thresholds, the
decoded scale), so no float compare, min/max or multiply can flush a
subnormal, and a quotient flushed or kept below a floor gives the floor. The
one place a subnormal operand reaches a division and matters -- a bf16
subnormal x over a float32 scale of 2^-126, whose quotient can be as large as
0.99 -- divides x * 2^64 (made exactly from x's integer significand, a normal
float32) instead and takes the 64 off the quotient's exponent in the integer
E4M3 rounding (a guard: today's div.rn.f32 keeps subnormals, but a backend or
flag that flushed them would write 0 there); a quotient below 2^-126, flushed
or kept, rounds to the same signed E4M3 zero. Signs come from x's bits (-0
stays -0); NaN inputs give 0x7F (e4m3) or the nibble 0x0 (e2m1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...formats import Format

TOKENS_PER_PROGRAM = 16
NUM_WARPS = 4
MAX_GRID = 65535 * 16  # programs grid-stride past this

VALUE_KINDS = {"e4m3": 0, "e2m1": 1}
SCALE_KINDS = {"ue8m0": 0, "e4m3": 1, "f32": 2}
# The (value kind, scale kind) pairs whose writing docs/semantics.md defines.
SUPPORTED = {("e4m3", "ue8m0"), ("e4m3", "f32"), ("e2m1", "e4m3")}


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
def _e4m3_of_f32_bits(sign, bits, lift):
    """int32 E4M3 byte of (-1)^sign * |f| * 2^-lift, f the float32 of `bits` (its sign bit ignored):
    nearest, ties to even; Inf and magnitudes past 448 give 0x7E | sign; NaN gives 0x7F."""
    mag = bits & 0x7FFFFFFF
    e = (mag >> 23) & 0xFF
    sig = (mag & 0x7FFFFF) | tl.where(e > 0, 0x800000, 0)
    byte = _e4m3_rne_satfinite(sign, sig, tl.maximum(e, 1) - 150 - lift)
    byte = tl.where(mag == 0x7F800000, 0x7E | (sign << 7), byte)
    return tl.where(mag > 0x7F800000, 0x7F, byte)


@triton.jit
def _e2m1_nibble(h, s):
    """int32 e2m1 nibble of the bf16 bits h (int32, 0..0xFFFF) over the decoded scale s (float32 > 0,
    normal): the magnitude code counts the thresholds |x / s| passes (ties to the even code, saturating at
    6), bit 3 is x's sign; NaN gives 0. The quotient's rounding is div_rn's; the compares are on its bits."""
    mag = h & 0x7FFF
    v = tl.math.div_rn((mag << 16).to(tl.float32, bitcast=True), s)
    vb = v.to(tl.int32, bitcast=True)  # |x| / s >= 0 (a flushed subnormal x: +0, code 0 as unflushed)
    code = ((vb > 0x3E800000).to(tl.int32) + (vb >= 0x3F400000).to(tl.int32)  # > 0.25, >= 0.75
            + (vb > 0x3FA00000).to(tl.int32) + (vb >= 0x3FE00000).to(tl.int32)  # > 1.25, >= 1.75
            + (vb > 0x40200000).to(tl.int32) + (vb >= 0x40600000).to(tl.int32)  # > 2.5, >= 3.5
            + (vb > 0x40A00000).to(tl.int32))  # > 5 (+Inf too)
    return tl.where(mag > 0x7F80, 0, code | ((h >> 15) << 3))


@triton.jit
def _quantize_insert_kernel(
    k_ptr, tail_ptr, cache_ptr, slot_ptr, num_tokens, k_stride_row, k_stride_col, tail_stride_row,
    tail_stride_col, page_stride,
    BLOCK_SIZE: tl.constexpr, VALUE_KIND: tl.constexpr, SCALE_KIND: tl.constexpr, POW2: tl.constexpr,
    TAIL: tl.constexpr, NUM_SCALES: tl.constexpr, SCALE_GROUP: tl.constexpr,
    SCALE_SIZE: tl.constexpr, SCALE_PAD: tl.constexpr,
    VAL_BASE: tl.constexpr, VAL_STRIDE: tl.constexpr, SC_BASE: tl.constexpr, SC_STRIDE: tl.constexpr,
    TAIL_BASE: tl.constexpr, TAIL_STRIDE: tl.constexpr,
    GROUPS_P2: tl.constexpr, GROUP_P2: tl.constexpr, TAIL_P2: tl.constexpr, PAD_P2: tl.constexpr,
    TOKENS: tl.constexpr,
):
    g = tl.arange(0, GROUPS_P2)
    j = tl.arange(0, GROUP_P2)  # e2m1: the pair within the group (GROUP_P2 = pairs, padded)
    g_ok = g < NUM_SCALES
    if VALUE_KIND == 1:
        col_ok = g_ok[:, None] & (j < SCALE_GROUP // 2)[None, :]
        col = g[:, None] * SCALE_GROUP + 2 * j[None, :]  # the even value of pair j: the low nibble
        out_col = g[:, None] * (SCALE_GROUP // 2) + j[None, :]  # its byte
    else:
        col_ok = g_ok[:, None] & (j < SCALE_GROUP)[None, :]
        col = g[:, None] * SCALE_GROUP + j[None, :]  # [groups, group]: value index
        out_col = col
    for tile in range(tl.program_id(0), tl.cdiv(num_tokens, TOKENS), tl.num_programs(0)):
        tok = tile * TOKENS + tl.arange(0, TOKENS)
        slot = tl.load(slot_ptr + tok, mask=tok < num_tokens, other=-1).to(tl.int64)
        ok = slot >= 0  # a negative slot: nothing loaded, nothing stored
        page = tl.where(ok, slot, 0) // BLOCK_SIZE
        row = tl.where(ok, slot, 0) % BLOCK_SIZE
        page_base = page * page_stride  # 64-bit: caches beyond 4 GiB
        val_row = page_base + VAL_BASE + row * VAL_STRIDE
        sc_row = page_base + SC_BASE + row * SC_STRIDE
        k_row = tok.to(tl.int64) * k_stride_row

        # The values, [tokens, groups, group] (e2m1: the even and the odd halves), as bf16 bits.
        m = ok[:, None, None] & col_ok[None, :, :]
        h = tl.load(k_ptr + k_row[:, None, None] + (col * k_stride_col)[None, :, :], mask=m, other=0)
        h = h.to(tl.int32) & 0xFFFF
        mag = h & 0x7FFF
        # Group amax: for non-negative floats the bit patterns order as the values (Inf included).
        amax = tl.max(tl.where(mag > 0x7F80, 0, mag), axis=2)  # NaN ignored; masked columns are 0
        if VALUE_KIND == 1:
            h_odd = tl.load(k_ptr + k_row[:, None, None] + ((col + 1) * k_stride_col)[None, :, :], mask=m,
                            other=0)
            h_odd = h_odd.to(tl.int32) & 0xFFFF
            mag_odd = h_odd & 0x7FFF
            amax = tl.maximum(amax, tl.max(tl.where(mag_odd > 0x7F80, 0, mag_odd), axis=2))
        a = (amax << 16).to(tl.float32, bitcast=True)  # exact; +Inf for a group holding +-Inf

        if SCALE_KIND == 0:
            # UE8M0: a = max(a, 1e-4) = f * 2^E, f in [1, 2): code = (E - 8) + 127, plus 1 when f > 1.75;
            # +Inf gives 255.
            a_bits = tl.maximum(amax << 16, 0x38D1B717)
            code = ((a_bits >> 23) & 0xFF) - 8 + ((a_bits & 0x7FFFFF) > 0x600000).to(tl.int32)
            scale = tl.where(a_bits == 0x7F800000, 255, code)
            # x * 2^(127 - code), exactly: x = sig * 2^(max(E_bf16, 1) - 134), so the product's lowest bit
            # weighs 2^(max(E_bf16, 1) - 7 - code).
            exp_field = (h >> 7) & 0xFF
            sig = (h & 0x7F) | tl.where(exp_field > 0, 0x80, 0)
            lsb_exp = tl.maximum(exp_field, 1) - 7 - scale[:, :, None]
            sign = h >> 15
            byte = _e4m3_rne_satfinite(sign, sig, lsb_exp)
            byte = tl.where(mag == 0x7F80, 0x7E | (sign << 7), byte)  # +-Inf saturate
            byte = tl.where(mag > 0x7F80, 0x7F, byte)
        elif SCALE_KIND == 2:
            # float32 s = max(a / 448, 2^-126) (+Inf for an Inf group): the max on the bits, so a quotient
            # flushed to 0 and a subnormal one both give 2^-126.
            s_bits = tl.maximum(tl.math.div_rn(a, 448.0).to(tl.int32, bitcast=True), 0x00800000)
            if POW2:  # 2^ceil(log2(s)): s is normal (or +Inf), so from its bits
                s_bits = tl.where((s_bits & 0x7FFFFF) != 0, (s_bits & 0x7F800000) + 0x00800000, s_bits)
            scale = s_bits
            s = s_bits.to(tl.float32, bitcast=True)
            # |x| / s, a bf16 subnormal x lifted to x * 2^64 (a normal float32, exactly) and its quotient's
            # exponent lowered by 64 in the rounding; the sign from x's bits.
            sub = (mag < 0x80) & (mag != 0)
            lifted = (mag & 0x7F).to(tl.float32) * 1.6940658945086007e-21  # 2^-69: m * 2^-133 * 2^64
            x = tl.where(sub, lifted, (mag << 16).to(tl.float32, bitcast=True))
            q = tl.math.div_rn(x, s[:, :, None])
            byte = _e4m3_of_f32_bits(h >> 15, q.to(tl.int32, bitcast=True), tl.where(sub, 64, 0))
        else:
            # e4m3 s = min(max(a / 6, 2^-9), 448) on the bits (+Inf: 448), its byte, and S decoded exactly.
            s_bits = tl.minimum(tl.maximum(tl.math.div_rn(a, 6.0).to(tl.int32, bitcast=True), 0x3B000000),
                                0x43E00000)
            scale = _e4m3_rne_satfinite(0, (s_bits & 0x7FFFFF) | 0x800000, ((s_bits >> 23) & 0xFF) - 150)
            e = scale >> 3
            unit = ((tl.maximum(e, 1) - 10 + 127) << 23).to(tl.float32, bitcast=True)  # 2^(e - 10), normal
            s = ((scale & 7) + tl.where(e > 0, 8, 0)).to(tl.float32) * unit  # exact: <= 15 * 2^5
            lo = _e2m1_nibble(h, s[:, :, None])
            hi = _e2m1_nibble(h_odd, s[:, :, None])
            byte = lo | (hi << 4)
        tl.store(cache_ptr + val_row[:, None, None] + out_col[None, :, :], byte.to(tl.uint8), mask=m)

        # The scales, SCALE_SIZE little-endian bytes each, then SCALE_PAD zero bytes.
        b = tl.arange(0, SCALE_SIZE)
        sc_bytes = (scale[:, :, None] >> (8 * b)[None, None, :]) & 0xFF
        ms = ok[:, None, None] & g_ok[None, :, None] & (b < SCALE_SIZE)[None, None, :]
        tl.store(cache_ptr + sc_row[:, None, None] + (g[:, None] * SCALE_SIZE + b[None, :])[None, :, :],
                 sc_bytes.to(tl.uint8), mask=ms)
        if SCALE_PAD > 0:
            p = tl.arange(0, PAD_P2)
            zeros = tl.zeros((TOKENS, PAD_P2), dtype=tl.uint8)
            tl.store(cache_ptr + sc_row[:, None] + NUM_SCALES * SCALE_SIZE + p[None, :], zeros,
                     mask=ok[:, None] & (p < SCALE_PAD)[None, :])
        if TAIL > 0:  # the bf16 tail, bit for bit
            t = tl.arange(0, TAIL_P2)
            mt = ok[:, None] & (t < TAIL)[None, :]
            tail = tl.load(tail_ptr + (tok.to(tl.int64) * tail_stride_row)[:, None] + (t * tail_stride_col)[None, :],
                           mask=mt, other=0)
            tail_row = page_base + TAIL_BASE + row * TAIL_STRIDE
            dst = (cache_ptr + tail_row[:, None] + 2 * t[None, :]).to(tl.pointer_type(tl.int16))
            tl.store(dst, tail, mask=mt)


def format_constants(fmt: Format, block_size: int) -> dict:
    """The kernel's constexprs for `fmt` in pages of `block_size` rows."""
    if (fmt.value_kind, fmt.scale_kind) not in SUPPORTED:
        raise ValueError(f"format {fmt.name}: the writer has no rule for {fmt.value_kind} values with "
                         f"{fmt.scale_kind} scales (it writes {sorted(SUPPORTED)})")
    p2 = triton.next_power_of_2
    regions = fmt.regions(block_size)
    (val_base, val_stride, _), (sc_base, sc_stride, _) = regions["values"], regions["scales"]
    tail_base, tail_stride, _ = regions["tail"]
    pairs = fmt.value_kind == "e2m1"
    if pairs and fmt.scale_group % 2:
        raise ValueError(f"format {fmt.name}: e2m1 scale groups must hold whole bytes (an even group)")
    group_p2 = p2(fmt.scale_group // 2 if pairs else fmt.scale_group)
    return {"VALUE_KIND": VALUE_KINDS[fmt.value_kind], "SCALE_KIND": SCALE_KINDS[fmt.scale_kind],
            "TAIL": fmt.tail, "NUM_SCALES": fmt.num_scales, "SCALE_GROUP": fmt.scale_group,
            "SCALE_SIZE": fmt.scale_size, "SCALE_PAD": fmt.scale_pad,
            "VAL_BASE": val_base, "VAL_STRIDE": val_stride, "SC_BASE": sc_base, "SC_STRIDE": sc_stride,
            "TAIL_BASE": tail_base, "TAIL_STRIDE": tail_stride, "GROUPS_P2": p2(fmt.num_scales),
            "GROUP_P2": group_p2, "TAIL_P2": p2(max(fmt.tail, 1)), "PAD_P2": p2(max(fmt.scale_pad, 1))}


def quantize_and_insert_triton(k: torch.Tensor, k_cache: torch.Tensor, slot_mapping: torch.Tensor,
                               block_size: int, fmt: Format, tail: torch.Tensor | None = None,
                               pow2_scale: bool = False) -> None:
    """Write token i to slot slot_mapping[i] (int32 or int64) for i < slot_mapping.shape[0], slot >= 0.

    `k`: bf16 [T, head_dim] (values then tail) when `tail` is None, else bf16 [T, values] with the tail
    in `tail`, bf16 [T, fmt.tail]; rows of either may be strided. `pow2_scale` (float32-scale formats
    only) rounds each scale up to a power of two. Unchecked: a slot past the cache writes past it
    (KVGEN_CHECK=1 in the op refuses it first)."""
    if pow2_scale and fmt.scale_kind != "f32":
        raise ValueError(f"pow2_scale: format {fmt.name} has {fmt.scale_kind} scales; only float32 scales "
                         f"are rounded to powers of two")
    constants = format_constants(fmt, block_size)
    num_tokens = slot_mapping.shape[0]
    if num_tokens == 0:
        return
    k16 = k.view(torch.int16)
    if tail is None:
        tail16 = k16[:, fmt.values:]  # the tail columns of k: k's own strides
    else:
        tail16 = tail.view(torch.int16)
    grid = (min(triton.cdiv(num_tokens, TOKENS_PER_PROGRAM), MAX_GRID),)
    _quantize_insert_kernel[grid](
        k16, tail16, k_cache, slot_mapping, num_tokens, k.stride(0), k.stride(1), tail16.stride(0),
        tail16.stride(1), k_cache.stride(0),
        BLOCK_SIZE=block_size, POW2=bool(pow2_scale), TOKENS=TOKENS_PER_PROGRAM, num_warps=NUM_WARPS,
        **constants,
    )
