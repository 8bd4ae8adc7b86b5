"""A second encoder for the writer, written from docs/semantics.md alone: the oracle the others are checked against.

It shares no code with reference.py or triton.py and no torch arithmetic:
each bf16 input is decoded from its bits into an exact float64 (8 significant
bits, exponent >= -133, so every power-of-two product below is exact too).
A UE8M0 code is found by search (the smallest e with a <= 448 * 2^e,
compared exactly), not by a bit formula or a log; so is a float32 scale's
power of two (the smallest e with s <= 2^e). Each e4m3 byte is chosen from
the table of the 127 non-negative finite E4M3 values (decoded from the OCP
definition) as the nearest one, ties to the even byte (the even mantissa),
everything past 448 saturating; each e2m1 nibble likewise from the table of
the 8 E2M1 magnitudes, ties to the even code, past 6 saturating (the
reference counts thresholds instead). The one rounded arithmetic is the
contract's IEEE float32 division (a / 448, a / 6, x / s), done by numpy on
float32 operands (correctly rounded, nearest even) and read back exactly as
float64. Placement (page_split, inline) is computed here from the docs, not
taken from Format.regions; the oracle reads only the record-format fields
(a Format row) from kvgen.

CPU torch tensors in; the cache is written through a numpy view of its whole
storage, so padded pages, byte views and storage offsets are honoured and
nothing but the addressed rows is touched.
"""

from __future__ import annotations

import numpy as np
import torch

from ...formats import Format

NAN_BYTE = 0x7F
AMAX_FLOOR = float(np.float32(1e-4))  # the float32 nearest 1e-4, exactly, as a float64
SEARCH_LO, SEARCH_HI = -300, 300  # exponents searched lie well inside (finite bf16 codes: -22 .. 120)
FLT_MIN = 2.0 ** -126  # the float32 scale's floor
E2M1_MAX = 6.0
VALUE_BITS_OF = {"e4m3": 8, "e2m1": 4}  # docs/semantics.md: one e4m3 per byte, two e2m1 per byte
SCALE_SIZE_OF = {"ue8m0": 1, "e4m3": 1, "f32": 4}  # bytes per scale


def _e4m3_table() -> np.ndarray:
    """Values of the bytes 0x00 .. 0x7E (float64, exact, increasing): exponent field 0 holds
    m * 2^-9; field f > 0 holds (8 + m) * 2^(f - 10), i.e. 1.m * 2^(f - 7)."""
    table = []
    for byte in range(0x7F):
        f, m = byte >> 3, byte & 7
        table.append(m * 2.0 ** -9 if f == 0 else (8 + m) * 2.0 ** (f - 10))
    return np.array(table, dtype=np.float64)


def _e2m1_table() -> np.ndarray:
    """Magnitudes of the nibbles 0x0 .. 0x7 (OCP E2M1, bias 1): exponent field 0 holds m * 0.5 (subnormal);
    field e > 0 holds (1 + m / 2) * 2^(e - 1). 0, 0.5, 1, 1.5, 2, 3, 4, 6."""
    return np.array([m * 0.5 if e == 0 else (2 + m) * 2.0 ** (e - 2) for e in range(4) for m in range(2)])


E4M3_TABLE = _e4m3_table()
E4M3_MAX = E4M3_TABLE[-1]  # 448
E2M1_TABLE = _e2m1_table()


def bf16_to_float64(bits: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) -> float64, exactly; NaN patterns give NaN, 0x7F80 / 0xFF80 give +-Inf."""
    b = bits.astype(np.int64)
    sign = np.where(b >> 15 == 1, -1.0, 1.0)
    exp, man = (b >> 7) & 0xFF, b & 0x7F
    subnormal = np.ldexp(man.astype(np.float64), np.int32(-133))  # m * 2^-133
    normal = np.ldexp((128 + man).astype(np.float64), (exp - 134).astype(np.int32))  # 1.m * 2^(exp - 127)
    mag = np.where(exp == 0, subnormal, normal)
    mag = np.where(exp == 0xFF, np.where(man == 0, np.inf, np.nan), mag)
    return sign * mag  # -0 for 0x8000 (sign * +0.0 = -0.0)


def nearest_index(table: np.ndarray, mag: np.ndarray) -> np.ndarray:
    """Index of the entry of an increasing table of exact non-negative values nearest to each magnitude
    (finite, >= 0; past the last entry: the last), ties to the even index."""
    mag = np.minimum(mag, table[-1])
    hi = np.minimum(np.searchsorted(table, mag, side="left"), len(table) - 1)  # table[hi-1] < mag <= table[hi]
    lo = np.maximum(hi - 1, 0)
    twice, mid = 2 * mag, table[lo] + table[hi]  # both exact: compare without a rounded difference
    pick = np.where(twice < mid, lo, np.where(twice > mid, hi, np.where(lo % 2 == 0, lo, hi)))
    return np.where(mag == table[hi], hi, pick).astype(np.int64)


def e4m3_nearest(x: np.ndarray) -> np.ndarray:
    """float64 -> uint8 E4M3 bytes, by table search: nearest value, ties to the even byte;
    beyond 448 (Inf included) 448; NaN 0x7F; the sign kept for zeros too."""
    x = np.asarray(x, dtype=np.float64)
    mag = np.abs(x)
    byte = nearest_index(E4M3_TABLE, np.where(np.isnan(mag), 0.0, mag)) | (np.signbit(x).astype(np.int64) << 7)
    return np.where(np.isnan(x), NAN_BYTE, byte).astype(np.uint8)


def e2m1_nearest(v: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """float64 -> E2M1 nibbles (uint8 0x0 .. 0xF), by table search: the nearest magnitude, ties to the even
    code, beyond 6 (Inf included) 6; bit 3 set where `negative` (the input's sign, -0 included); NaN 0x0."""
    v = np.asarray(v, dtype=np.float64)
    nan = np.isnan(v)
    code = nearest_index(E2M1_TABLE, np.where(nan, 0.0, np.abs(v)))
    code = code | (np.asarray(negative, dtype=bool).astype(np.int64) << 3)
    return np.where(nan, 0, code).astype(np.uint8)


def smallest_exponent(a: np.ndarray, unit: float) -> np.ndarray:
    """The smallest integer e with a <= unit * 2^e, by bisection with exact comparisons (a finite, > 0)."""
    lo = np.full(a.shape, SEARCH_LO, dtype=np.int64)  # a > unit * 2^lo
    hi = np.full(a.shape, SEARCH_HI, dtype=np.int64)  # a <= unit * 2^hi
    while (hi - lo > 1).any():
        mid = (lo + hi) // 2
        fits = a <= np.ldexp(unit, mid.astype(np.int32))
        hi = np.where(fits, mid, hi)
        lo = np.where(fits, lo, mid)
    return hi


def scale_exponent(a: np.ndarray) -> np.ndarray:
    """The smallest integer e with a <= 448 * 2^e (a finite, > 0): the UE8M0 code is e + 127."""
    return smallest_exponent(a, E4M3_MAX)


def f32_divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """The IEEE float32 quotient num / den, rounded to nearest even (numpy's float32 division: the one
    float32 operation the oracle uses), as an exact float64. Both operands must be float32 values."""
    num32, den32 = np.asarray(num, dtype=np.float32), np.asarray(den, dtype=np.float32)
    with np.errstate(all="ignore"):
        exact = np.isnan(num) | (num32.astype(np.float64) == num)
        assert exact.all() and (den32.astype(np.float64) == den).all(), "f32_divide: an operand is not a float32"
        return (num32 / den32).astype(np.float64)


def float32_bytes(s: np.ndarray) -> np.ndarray:
    """uint8 [..., 4]: the little-endian bytes of float32 values (each s exactly a float32, asserted)."""
    s32 = np.asarray(s, dtype=np.float32)
    assert (np.isnan(s) | (s32.astype(np.float64) == s)).all(), "float32_bytes: not a float32 value"
    word = s32.view(np.uint32).astype(np.int64)
    return np.stack([(word >> shift) & 0xFF for shift in (0, 8, 16, 24)], axis=-1).astype(np.uint8)


def group_amax(x: np.ndarray) -> np.ndarray:
    """max |x| over the last axis, NaN ignored (a group of NaNs gives 0)."""
    mag = np.abs(x)
    return np.where(np.isnan(mag), 0.0, mag).max(axis=-1, initial=0.0)


def _check_kinds(fmt: Format, pow2_scale: bool) -> None:
    pairs = {("e4m3", "ue8m0"), ("e4m3", "f32"), ("e2m1", "e4m3")}
    if (fmt.value_kind, fmt.scale_kind) not in pairs:
        raise ValueError(f"format {fmt.name}: no encoding of {fmt.value_kind} values under {fmt.scale_kind} scales")
    if pow2_scale and fmt.scale_kind != "f32":
        raise ValueError(f"pow2_scale: only float32 scales round to a power of two, not {fmt.scale_kind} "
                         f"(format {fmt.name})")


def _layout(fmt: Format) -> dict[str, int]:
    """Byte counts of one record, from the format's fields and docs/semantics.md alone."""
    value_bytes = fmt.values * VALUE_BITS_OF[fmt.value_kind] // 8
    groups = fmt.values // fmt.scale_group
    scale_row = groups * SCALE_SIZE_OF[fmt.scale_kind] + fmt.scale_pad
    tail_bytes = 2 * fmt.tail
    return dict(values=value_bytes, groups=groups, scales=scale_row, tail=tail_bytes,
                data=value_bytes + tail_bytes, record=value_bytes + tail_bytes + scale_row)


def encode_values(value_bits: np.ndarray, fmt: Format, pow2_scale: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """bf16 bits uint16 [n, values] -> (value bytes uint8 [n, value bytes], scale bytes uint8 [n, scale row
    bytes], pad bytes 0), by the format's value and scale kinds (docs/semantics.md, "Writing")."""
    _check_kinds(fmt, pow2_scale)
    size = _layout(fmt)
    value_bits = np.asarray(value_bits, dtype=np.uint16).reshape(-1, fmt.values)
    n, groups = value_bits.shape[0], size["groups"]
    x = bf16_to_float64(value_bits).reshape(n, groups, fmt.scale_group)
    a = group_amax(x)  # [n, groups]
    scales = np.zeros((n, size["scales"]), dtype=np.uint8)  # pad bytes 0
    if fmt.scale_kind == "ue8m0":
        a = np.maximum(a, AMAX_FLOOR)
        infinite = np.isinf(a)
        code = np.where(infinite, 255, scale_exponent(np.where(infinite, 1.0, a)) + 127)
        # x * 2^(127 - code): exact in float64 (at most 8 significant bits, exponent >= -133 - 128).
        values = e4m3_nearest(np.ldexp(x, (127 - code).astype(np.int32)[..., None])).reshape(n, fmt.values)
        scales[:, :groups] = code
    elif fmt.scale_kind == "f32":
        s = np.maximum(f32_divide(a, np.full(a.shape, E4M3_MAX)), FLT_MIN)  # +Inf for a group holding +-Inf
        if pow2_scale:
            finite = np.isfinite(s)
            e = smallest_exponent(np.where(finite, s, 1.0), 1.0)  # the smallest e with s <= 2^e
            s = np.where(finite, np.ldexp(1.0, e.astype(np.int32)), s)
        quotient = f32_divide(x, np.broadcast_to(s[..., None], x.shape))
        values = e4m3_nearest(quotient).reshape(n, fmt.values)
        scales[:, : 4 * groups] = float32_bytes(s).reshape(n, 4 * groups)
    else:  # e4m3 scales over e2m1 values
        s = np.minimum(np.maximum(f32_divide(a, np.full(a.shape, E2M1_MAX)), E4M3_TABLE[1]), E4M3_MAX)
        code = e4m3_nearest(s)  # s is positive and within range: the nearest e4m3 value, ties to even
        big_s = E4M3_TABLE[code]  # S, the scale byte's value
        quotient = f32_divide(x, np.broadcast_to(big_s[..., None], x.shape))
        nibble = e2m1_nearest(quotient, negative=np.signbit(x)).reshape(n, fmt.values // 2, 2).astype(np.int64)
        values = (nibble[..., 0] + 16 * nibble[..., 1]).astype(np.uint8)  # value 2i in the low nibble
        scales[:, :groups] = code
    return values.astype(np.uint8), scales


def encode_records(x_bits: np.ndarray, fmt: Format, pow2_scale: bool = False,
                   tail_bits: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """bf16 bits -> (data uint8 [n, value bytes + tail bytes]: the value bytes then the tail's bits
    little-endian, scales uint8 [n, scale row bytes], pad bytes 0): one record's bytes, whatever the placement.
    x_bits is uint16 [n, head_dim] (the tail its last columns) or, with tail_bits uint16 [n, tail], [n, values]."""
    if tail_bits is None:
        x_bits = np.asarray(x_bits, dtype=np.uint16).reshape(-1, fmt.head_dim)
        value_bits, tail_bits = x_bits[:, : fmt.values], x_bits[:, fmt.values:]
    else:
        value_bits = np.asarray(x_bits, dtype=np.uint16).reshape(-1, fmt.values)
        tail_bits = np.asarray(tail_bits, dtype=np.uint16).reshape(value_bits.shape[0], fmt.tail)
    values, scales = encode_values(value_bits, fmt, pow2_scale)
    tail = tail_bits.astype(np.int64)
    data = np.zeros((values.shape[0], values.shape[1] + 2 * fmt.tail), dtype=np.uint8)
    data[:, : values.shape[1]] = values
    data[:, values.shape[1]::2] = tail & 0xFF  # little-endian bf16, copied bit for bit
    data[:, values.shape[1] + 1::2] = tail >> 8
    return data, scales


def storage_bytes(t: torch.Tensor) -> np.ndarray:
    """The whole uint8 storage under a CPU tensor, flat: index = byte address."""
    return t.as_strided((t.untyped_storage().nbytes(),), (1,), 0).numpy()


def bf16_bits(t: torch.Tensor) -> np.ndarray:
    """uint16 bit patterns of a CPU bf16 tensor (strided rows are fine: a numpy view with t's strides)."""
    return t.view(torch.int16).numpy().view(np.uint16)


def quantize_and_insert_oracle(k: torch.Tensor, k_cache: torch.Tensor, slot_mapping: torch.Tensor,
                               block_size: int, fmt: Format, tail: torch.Tensor | None = None,
                               pow2_scale: bool = False) -> None:
    """Write token i to slot slot_mapping[i] (i < slot_mapping.shape[0], slot >= 0) through numpy views.
    k is bf16 [T, head_dim], or [T, values] with `tail` bf16 [T, fmt.tail]; `pow2_scale` as for the writer.
    Placement from the docs: page_split puts data row r (values, tail) at page + r * data bytes and scale
    row r at page + block_size * data bytes + r * scale row bytes; inline puts record r at
    page + r * record bytes, holding values, scales (+ pad), tail."""
    _check_kinds(fmt, pow2_scale)
    slots = slot_mapping.numpy().astype(np.int64)
    (idx,) = np.nonzero(slots >= 0)
    if idx.size == 0:
        return
    page, row = slots[idx] // block_size, slots[idx] % block_size
    if page.max() >= k_cache.shape[0]:
        raise ValueError("slot_mapping: a slot lies outside k_cache")
    if tail is None:
        data, scales = encode_records(bf16_bits(k)[idx], fmt, pow2_scale)
    else:
        data, scales = encode_records(bf16_bits(k)[idx][:, : fmt.values], fmt, pow2_scale, bf16_bits(tail)[idx])
    size = _layout(fmt)
    values, tail_part = data[:, : size["values"]], data[:, size["values"]:]
    start = k_cache.storage_offset() + page * k_cache.stride(0)  # each page's first byte
    if fmt.placement == "inline":
        record = start + row * size["record"]
        at = {"values": record, "scales": record + size["values"], "tail": record + size["values"] + size["scales"]}
    else:
        data_row = start + row * size["data"]
        at = {"values": data_row, "tail": data_row + size["values"],
              "scales": start + block_size * size["data"] + row * size["scales"]}
    storage = storage_bytes(k_cache)
    for part, content in (("values", values), ("scales", scales), ("tail", tail_part)):
        storage[at[part][:, None] + np.arange(content.shape[1])] = content
