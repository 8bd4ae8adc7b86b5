"""A second encoder for the writer, written from docs/semantics.md alone: the oracle the others are checked against.

It shares no code with reference.py or triton.py and no torch arithmetic:
each bf16 input is decoded from its bits into an exact float64 (8 significant
bits, exponent >= -133, so every product below is exact too); the scale code
is found by search (the smallest e with a <= 448 * 2^e, compared exactly),
not by a bit formula or a log; each value byte is chosen from the table of
the 127 non-negative finite E4M3 values (decoded from the OCP definition) as
the nearest one, ties to the even byte (the even mantissa), everything past
448 saturating. It reads only the record-format facts (a Format row) from kvgen.

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
SEARCH_LO, SEARCH_HI = -300, 300  # the code's exponent lies well inside (finite bf16: -22 .. 120)


def _e4m3_table() -> np.ndarray:
    """Values of the bytes 0x00 .. 0x7E (float64, exact, increasing): exponent field 0 holds
    m * 2^-9; field f > 0 holds (8 + m) * 2^(f - 10), i.e. 1.m * 2^(f - 7)."""
    table = []
    for byte in range(0x7F):
        f, m = byte >> 3, byte & 7
        table.append(m * 2.0 ** -9 if f == 0 else (8 + m) * 2.0 ** (f - 10))
    return np.array(table, dtype=np.float64)


E4M3_TABLE = _e4m3_table()
E4M3_MAX = E4M3_TABLE[-1]  # 448


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


def e4m3_nearest(x: np.ndarray) -> np.ndarray:
    """float64 -> uint8 E4M3 bytes, by table search: nearest value, ties to the even byte;
    beyond 448 (Inf included) 448; NaN 0x7F; the sign kept for zeros too."""
    x = np.asarray(x, dtype=np.float64)
    mag = np.abs(x)
    finite = np.where(np.isnan(mag), 0.0, np.minimum(mag, E4M3_MAX))
    hi = np.searchsorted(E4M3_TABLE, finite, side="left")  # table[hi-1] < mag <= table[hi]
    hi = np.minimum(hi, len(E4M3_TABLE) - 1)
    lo = np.maximum(hi - 1, 0)
    twice, mid = 2 * finite, E4M3_TABLE[lo] + E4M3_TABLE[hi]  # both exact: compare without a rounded difference
    pick = np.where(twice < mid, lo, np.where(twice > mid, hi, np.where(lo % 2 == 0, lo, hi)))
    pick = np.where(finite == E4M3_TABLE[hi], hi, pick)
    byte = pick | (np.signbit(x).astype(np.int64) << 7)
    return np.where(np.isnan(x), NAN_BYTE, byte).astype(np.uint8)


def scale_exponent(a: np.ndarray) -> np.ndarray:
    """The smallest integer e with a <= 448 * 2^e, by bisection with exact comparisons (a finite, > 0)."""
    lo = np.full(a.shape, SEARCH_LO, dtype=np.int64)  # a > 448 * 2^lo
    hi = np.full(a.shape, SEARCH_HI, dtype=np.int64)  # a <= 448 * 2^hi
    while (hi - lo > 1).any():
        mid = (lo + hi) // 2
        fits = a <= np.ldexp(E4M3_MAX, mid.astype(np.int32))
        hi = np.where(fits, mid, hi)
        lo = np.where(fits, lo, mid)
    return hi


def encode_records(x_bits: np.ndarray, fmt: Format) -> tuple[np.ndarray, np.ndarray]:
    """bf16 bits uint16 [n, head_dim] -> (data rows uint8 [n, data_bytes], scale rows uint8 [n, scale_bytes])."""
    x_bits = np.asarray(x_bits, dtype=np.uint16).reshape(-1, fmt.head_dim)
    n = x_bits.shape[0]
    x = bf16_to_float64(x_bits[:, : fmt.values]).reshape(n, fmt.num_scales, fmt.scale_group)
    mag = np.abs(x)
    amax = np.where(np.isnan(mag), 0.0, mag).max(axis=-1, initial=0.0)  # NaNs ignored
    amax = np.maximum(amax, AMAX_FLOOR)
    infinite = np.isinf(amax)
    e = scale_exponent(np.where(infinite, 1.0, amax))
    code = np.where(infinite, 255, e + 127)
    # x * 2^(127 - code): exact in float64 (at most 8 significant bits, exponent >= -133 - 128).
    product = np.ldexp(x, (127 - code).astype(np.int32)[..., None])
    data = np.zeros((n, fmt.data_bytes), dtype=np.uint8)
    data[:, : fmt.values] = e4m3_nearest(product).reshape(n, fmt.values)
    tail = x_bits[:, fmt.values:].astype(np.int64)
    data[:, fmt.values::2] = tail & 0xFF  # little-endian bf16, copied bit for bit
    data[:, fmt.values + 1::2] = tail >> 8
    codes = np.zeros((n, fmt.scale_bytes), dtype=np.uint8)  # pad bytes 0
    codes[:, : fmt.num_scales] = code
    return data, codes


def storage_bytes(t: torch.Tensor) -> np.ndarray:
    """The whole uint8 storage under a CPU tensor, flat: index = byte address."""
    return t.as_strided((t.untyped_storage().nbytes(),), (1,), 0).numpy()


def quantize_and_insert_oracle(k: torch.Tensor, k_cache: torch.Tensor, slot_mapping: torch.Tensor,
                               block_size: int, fmt: Format) -> None:
    """Write k[i] to slot slot_mapping[i] (i < slot_mapping.shape[0], slot >= 0) through numpy views."""
    slots = slot_mapping.numpy().astype(np.int64)
    (idx,) = np.nonzero(slots >= 0)
    if idx.size == 0:
        return
    page, row = slots[idx] // block_size, slots[idx] % block_size
    if page.max() >= k_cache.shape[0]:
        raise ValueError("slot_mapping: a slot lies outside k_cache")
    k_bits = k.view(torch.int16).numpy().view(np.uint16)  # strided rows are fine: a numpy view with k's strides
    data, codes = encode_records(k_bits[idx], fmt)
    storage = storage_bytes(k_cache)
    start = k_cache.storage_offset() + page * k_cache.stride(0)  # each page's first byte
    data_at = start[:, None] + row[:, None] * fmt.data_bytes + np.arange(fmt.data_bytes)
    scale_rows = start + block_size * fmt.data_bytes + row * fmt.scale_bytes
    codes_at = scale_rows[:, None] + np.arange(fmt.scale_bytes)
    storage[data_at] = data
    storage[codes_at] = codes
