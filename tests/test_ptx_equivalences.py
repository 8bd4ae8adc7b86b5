"""Rewrites the inline-PTX helpers make of the contract's formulas, proved here
for every input they can see (CPU, numpy): the cubins may compute a rule
another way only where the two agree everywhere."""

import numpy as np
import pytest

E2M1_THRESHOLDS = (("gt", 0.25), ("ge", 0.75), ("gt", 1.25), ("ge", 1.75), ("gt", 2.5), ("ge", 3.5), ("gt", 5.0))


def e4m3_scales() -> np.ndarray:
    """Every positive finite e4m3 value (bytes 0x01..0x7E) as float32: the scales an NVFP4 group can have."""
    byte = np.arange(0x01, 0x7F, dtype=np.int32)
    exp, man = byte >> 3, byte & 7
    return np.where(exp > 0, (8 + man) * 2.0 ** (exp - 10), man * 2.0 ** -9).astype(np.float32)


def test_e2m1_code_by_comparing_x_with_threshold_times_scale():
    """quantize_e2m1_bf16x8 compares |x| with t * S, where the contract compares
    the rounded quotient x / S (div.rn.f32) with t: the same verdict for every
    bf16 x (NaN, Inf, subnormals included) and every e4m3 scale S the writer can
    choose (every positive finite byte: S is clamped to [2^-9, 448])."""
    x = (np.arange(65536, dtype=np.uint32) << 16).view(np.float32)
    scales = e4m3_scales()
    ax = np.abs(x)
    with np.errstate(all="ignore"):
        for s in scales:
            q = np.abs(x / s)  # numpy's float32 division: IEEE, correctly rounded, as div.rn.f32
            for op, t in E2M1_THRESHOLDS:
                threshold = np.float32(t) * s
                assert float(threshold) == t * float(s)  # the product is exact
                verdict, rewrite = (q > t, ax > threshold) if op == "gt" else (q >= t, ax >= threshold)
                assert np.array_equal(verdict, rewrite), (float(s), op, t)


def _bf16_pair(t: float, s: np.float32) -> np.uint32:
    """t * S as a bf16 pattern in both halves of a word; asserts the product is exact (a bf16 value)."""
    bits = int((np.float32(t) * s).view(np.uint32))
    assert bits & 0xFFFF == 0 and float((np.float32(t) * s)) == t * float(s)
    return np.uint32((bits >> 16) * 0x10001)


def _threshold_products(s: np.float32) -> tuple:
    """The helpers' shared asm piece (_THRESHOLD_PRODUCTS) for scale S: sp (S in both halves, S a bf16
    value) and the fma.rn.bf16x2 products 0.75 S, 1.25 S, 1.75 S in q2, q3, q4 -- exact, so bf16 patterns."""
    assert int(np.float32(s).view(np.uint32)) & 0xFFFF == 0  # S is a bf16 value
    sp = np.uint32((int(np.float32(s).view(np.uint32)) >> 16) * 0x10001)
    return (sp,) + tuple(_bf16_pair(t, s) for t in (0.75, 1.25, 1.75))


def _e2m1_word_swar(words: np.ndarray, s: np.float32) -> np.ndarray:
    """quantize_e2m1_bf16x8's integer steps for one bf16x2 word per entry (uint32), replayed in numpy:
    the two values' nibbles, value 2i's in the low four bits of the result."""
    u32 = np.uint32
    sp, q2, q3, q4 = _threshold_products(s)
    with np.errstate(over="ignore"):
        q = [sp - u32(0x00FF00FF), q2, q3 + u32(0x00010001), q4, q3 + u32(0x00810081), q4 + u32(0x00800080),
             q3 + u32(0x01010101)]
        a = words | u32(0x80008000)
        d = [a - qj for qj in q]
        n = ~(a - u32(0x7F817F81)) & u32(0x80008000)
    b0 = d[0] ^ d[1] ^ d[2] ^ d[3] ^ d[4] ^ d[5] ^ d[6]
    b1 = (~d[3] & d[1]) | d[5]
    b0, b1, b2 = b0 & n, b1 & n, d[3] & n
    g = (words & n) >> u32(4)
    g = g + (b2 >> u32(5)) + (b1 >> u32(6)) + (b0 >> u32(7))  # mad.hi by 2^27, 2^26, 2^25: right shifts
    r = g | (g >> u32(12))
    return (r >> u32(8)) & u32(0xFF)


def _e2m1_word_search(words: np.ndarray, s: np.float32) -> np.ndarray:
    """The hopper flavour's quantize_e2m1_bf16x8 for one bf16x2 word per entry (uint32), replayed in numpy
    step for step: `set.*.u32.bf16x2` as float comparisons of each half giving 0xFFFF masks, `lop3` 0xCA as
    a bit select, `mad.hi.u32 y, r, 256, y` as y + (r >> 24)."""
    u32 = np.uint32

    def halves(v):  # each half of a bf16x2 word as float32
        return ((v & u32(0xFFFF)) << u32(16)).view(np.float32), (v & u32(0xFFFF0000)).view(np.float32)

    def mask(lo, hi):  # a 0xFFFF mask in each half where its comparison holds
        return np.where(lo, u32(0xFFFF), u32(0)) | np.where(hi, u32(0xFFFF0000), u32(0))

    def ge(a, b):
        (a0, a1), (b0, b1) = halves(a), halves(b)
        return mask(a0 >= b0, a1 >= b1)

    def gt(a, b):
        (a0, a1), (b0, b1) = halves(a), halves(b)
        return mask(a0 > b0, a1 > b1)

    def select(m, x, y):  # lop3 0xCA: m ? x : y, bit by bit
        return (m & x) | (~m & y)

    # The thresholds as the asm makes them: three fma.rn.bf16x2 products, the rest by exponent steps in
    # integers -- each checked against the exact t * S it stands for.
    sp, q2, q3, q4 = _threshold_products(s)
    q1, q5, q6, q7 = sp - u32(0x01000100), q3 + u32(0x00800080), q4 + u32(0x00800080), q3 + u32(0x01000100)
    for q, t in ((q1, 0.25), (q5, 2.5), (q6, 3.5), (q7, 5.0)):
        assert q == _bf16_pair(t, s), (float(s), t)
    with np.errstate(invalid="ignore"):
        a = words & u32(0x7FFF7FFF)
        m2 = ge(a, np.broadcast_to(q4, a.shape))
        lo, hi, t = select(m2, q5, q1), select(m2, q7, q3), select(m2, q6, q2)
        m1 = ge(a, t)
        m0 = gt(a, select(m1, hi, lo))
        w0, w1 = halves(words)
        n = mask(~np.isnan(w0), ~np.isnan(w1))  # set.num
    sign = words & n & u32(0x80008000)
    r = select(u32(0x10001000), m0, m1)
    r = select(u32(0x30003000), r, m2)
    r = (r & u32(0x70007000)) | sign
    y = (r >> u32(12)) + (r >> u32(24))
    return y & u32(0xFF)


@pytest.mark.parametrize("flavour, replay", [("integer", _e2m1_word_swar), ("hopper", _e2m1_word_search)])
def test_e2m1_code_in_pairs_of_bf16_patterns(flavour, replay):
    """quantize_e2m1_bf16x8 finds the code on both halves of a word at once (see its docstring; the integer
    flavour counts the thresholds in integers, the hopper one searches with bf16x2 comparisons): every bf16
    value, in either half, beside every other, gives the contract's nibble (threshold count of
    div.rn.f32(x, S), sign bit; NaN 0x0) under every e4m3 scale S."""
    x16 = np.arange(65536, dtype=np.uint32)
    partner = (x16 * np.uint32(40503) + np.uint32(12345)) & np.uint32(0xFFFF)  # a permutation: every pairing
    scales = e4m3_scales()

    def contract(bits16, s):
        x = (bits16 << np.uint32(16)).view(np.float32)
        with np.errstate(all="ignore"):
            v = np.abs(x / s)
        code = np.zeros(x.shape, np.uint32)
        for op, t in E2M1_THRESHOLDS:
            code += (v > t) if op == "gt" else (v >= t)
        sign = np.where(np.isnan(x), 0, (bits16 >> np.uint32(15)) << np.uint32(3)).astype(np.uint32)
        return code | sign

    for s in scales:
        for lo, hi in ((x16, partner), (partner, x16)):
            got = replay(lo | (hi << np.uint32(16)), s)
            want = contract(lo, s) | (contract(hi, s) << np.uint32(4))
            bad = np.flatnonzero(got != want)
            assert bad.size == 0, (flavour, float(s), hex(int(lo[bad[0]])), hex(int(hi[bad[0]])), hex(int(got[bad[0]])),
                                   hex(int(want[bad[0]])))


def _rn32_of_exact_sum(q: np.ndarray, p: np.ndarray) -> np.ndarray:
    """float32 round-to-nearest-even of q + p, exactly (q float32 values in float64, p exact in float64): the
    float64 sum and its error (TwoSum); where the float64 sum sits on a float32 tie, the error breaks it."""
    s = q + p
    bb = s - q
    e = (q - (s - bb)) + (p - bb)
    f = s.astype(np.float32)
    a = f.astype(np.float64)
    b = np.nextafter(f, np.where(s > a, np.float32(np.inf), np.float32(-np.inf))).astype(np.float64)
    tie = (s != a) & (s == (a + b) * 0.5) & (e != 0)
    return np.where(tie & (np.sign(e) == np.sign(b - a)), b.astype(np.float32), f)


def _markstein_quotient(x: np.ndarray, s: np.float32) -> np.ndarray:
    """The steps of the helpers' _scaled("div") in numpy: every fma rounded once (products of two float32 are
    exact in float64; the residual's float64 difference is exact too, as x and q * s lie within a few ulps)."""
    f32, f64 = np.float32, np.float64
    with np.errstate(all="ignore"):
        c = f32(2.0 ** 64) if s < f32(2.0 ** -80) else f32(1)
        s, x = s * c, x * c
        y = f32(1) / s  # rcp.rn.f32
        q = x * y
        r = (x.astype(f64) - q.astype(f64) * f64(s)).astype(f32)
        t = _rn32_of_exact_sum(q.astype(f64), r.astype(f64) * f64(y))
        return np.where(np.isnan(r) | (r == 0), q, t)


def test_e4m3_of_quotient_without_division():
    """quantize_div_bf16x8 divides by Markstein's correction, not div.rn.f32: for every bf16 x and the
    float32 scale s = max(amax / 448, 2^-126) of every bf16 amax >= |x| (a stride of them here, all of them
    when KVGEN_EXHAUSTIVE=1; and each scale rounded up to a power of two), and
    for s = +Inf, the e4m3 bytes equal those of the IEEE quotient."""
    import os

    import torch

    from kvgen.families.quantize_insert.reference import e4m3_rne_satfinite

    def e4m3(v):
        return e4m3_rne_satfinite(torch.from_numpy(np.ascontiguousarray(v))).numpy()

    x = (np.arange(65536, dtype=np.uint32) << 16).view(np.float32)
    stride = 1 if os.environ.get("KVGEN_EXHAUSTIVE") == "1" else 97
    amaxes = np.concatenate([np.arange(1, 0x7F80, stride), np.arange(0x3F00, 0x3F80), [0x7F7F]]).astype(np.uint32)
    amax_values = (amaxes << 16).view(np.float32)
    for amax in amax_values:
        s = max(np.float32(amax / np.float32(448)), np.float32(2.0 ** -126))
        s_pow2 = np.array([(int(np.array([s]).view(np.uint32)[0]) + 0x7FFFFF) & ~0x7FFFFF], np.uint32).view(np.float32)
        for scale in (s, s_pow2[0]):
            domain = np.abs(x) <= amax
            with np.errstate(all="ignore"):
                want = e4m3(x / scale)
            got = e4m3(_markstein_quotient(x, scale))
            bad = np.flatnonzero((got != want) & domain)
            assert bad.size == 0, (float(amax), float(scale), hex(int(x.view(np.uint32)[bad[0]])))
    with np.errstate(all="ignore"):
        inf = np.float32(np.inf)
        assert np.array_equal(e4m3(_markstein_quotient(x, inf)), e4m3(x / inf))


def _f32_pow2_scale(amax: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The steps of the helpers' f32_pow2_scale in numpy: (scale bits, reciprocal bits)."""
    with np.errstate(all="ignore"):
        # max.f32 returns the operand that is not NaN: np.fmax, not np.maximum.
        s = np.fmax(amax / np.float32(448), np.float32(2.0 ** -126)).astype(np.float32).view(np.uint32)
    up = (s & 0x7FFFFF) != 0
    s = np.where(up, (s & 0x7F800000) + 0x00800000, s).astype(np.uint32)
    r = np.where(s >= 0x7F800000, 0, np.uint32(0x7F000000) - s).astype(np.uint32)
    return s, r


def test_e4m3_of_product_with_pow2_reciprocal():
    """With the indexer's power-of-two float32 scales (pow2_scale), quantize_bf16x8 multiplies by the
    reciprocal f32_pow2_scale gives instead of dividing: for the scale of every bf16 amax (NaN and +Inf
    included), every bf16 x has the e4m3 byte of the IEEE quotient x / scale."""
    import torch

    from kvgen.families.quantize_insert.reference import e4m3_rne_satfinite

    def e4m3(v):
        return e4m3_rne_satfinite(torch.from_numpy(np.ascontiguousarray(v))).numpy()

    x = (np.arange(65536, dtype=np.uint32) << 16).view(np.float32)
    amax = (np.arange(0x0000, 0x8000, dtype=np.uint32) << 16).view(np.float32)  # +0 .. +Inf, then the NaNs
    scale_bits, reciprocal_bits = _f32_pow2_scale(amax)
    scales = np.unique(scale_bits)
    assert scales.max() == 0x7F800000 and scales[-2] == np.float32(2.0 ** 120).view(np.uint32)  # + Inf, then 2^120
    for s_bits, r_bits in sorted(set(zip(scale_bits.tolist(), reciprocal_bits.tolist()))):
        s, r = np.uint32(s_bits).view(np.float32), np.uint32(r_bits).view(np.float32)
        with np.errstate(all="ignore"):
            want, got = e4m3(x / s), e4m3(x * r)
        bad = np.flatnonzero(got != want)
        assert bad.size == 0, (float(s), float(r), hex(int(x.view(np.uint32)[bad[0]])))
