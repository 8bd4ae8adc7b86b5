"""Rewrites the inline-PTX helpers make of the contract's formulas, proved here
for every input they can see (CPU, numpy): the cubins may compute a rule
another way only where the two agree everywhere."""

import numpy as np

E2M1_THRESHOLDS = (("gt", 0.25), ("ge", 0.75), ("gt", 1.25), ("ge", 1.75), ("gt", 2.5), ("ge", 3.5), ("gt", 5.0))


def test_e2m1_code_by_comparing_x_with_threshold_times_scale():
    """quantize_e2m1_bf16x8 compares |x| with t * S, where the contract compares
    the rounded quotient x / S (div.rn.f32) with t: the same verdict for every
    bf16 x (NaN, Inf, subnormals included) and every e4m3 scale S the writer can
    choose (every positive finite byte: S is clamped to [2^-9, 448])."""
    x = (np.arange(65536, dtype=np.uint32) << 16).view(np.float32)
    byte = np.arange(0x01, 0x7F, dtype=np.int32)
    exp, man = byte >> 3, byte & 7
    scales = np.where(exp > 0, (8 + man) * 2.0 ** (exp - 10), man * 2.0 ** -9).astype(np.float32)
    ax = np.abs(x)
    with np.errstate(all="ignore"):
        for s in scales:
            q = np.abs(x / s)  # numpy's float32 division: IEEE, correctly rounded, as div.rn.f32
            for op, t in E2M1_THRESHOLDS:
                threshold = np.float32(t) * s
                assert float(threshold) == t * float(s)  # the product is exact
                verdict, rewrite = (q > t, ax > threshold) if op == "gt" else (q >= t, ax >= threshold)
                assert np.array_equal(verdict, rewrite), (float(s), op, t)
