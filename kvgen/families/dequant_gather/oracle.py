"""A second decoder, written from docs/semantics.md alone: the oracle the others are checked against.

It shares no code with kvgen/families/dequant_gather/reference.py and no
floating point with anyone: every value and every scale is decoded from its
bits into an exact (sign, integer M, power of two E) triple, |x| = M * 2^E;
their product is exact in integers; the contract's two roundings (to float32,
then to bf16, both to nearest even with subnormals kept and overflow to Inf)
are done on those integers, and the result is encoded into bf16 bits. So a bug
in torch's float8 casts, its float32 multiply, its float -> bf16 rounding, or
the reference's vectorised indexing cannot hide here. It reads only the
record-format facts (the loaded Format rows, which are data, and their
`regions`) from kvgen.

numpy, CPU torch tensors in; outputs are written through numpy views of their
storage, so strides (padded rows, [..., 512] sparse outputs) are honoured and
nothing but the addressed rows is touched.
"""

from __future__ import annotations

import numpy as np
import torch

from ...formats import Format
from ...runtime.validate import format_of

BF16_NAN = 0x7FC0  # which NaN is free (the comparison rule matches any NaN with any NaN)
BF16_INF = 0x7F80
# (significant bits, smallest normal exponent, largest exponent) of the two rounding targets.
FLOAT32 = (24, -126, 127)
BFLOAT16 = (8, -126, 127)
_MAX_SHIFT = 62  # every exact product here has M < 2^28: a larger shift rounds it to 0 all the same


# ---- reading bytes ---------------------------------------------------------------------------

def _storage_bytes(k_cache: torch.Tensor) -> np.ndarray:
    """The whole uint8 storage under the cache, flat: index = byte address (pages
    are addressed by stride(0) from the storage offset, not through k_cache's shape)."""
    return k_cache.as_strided((k_cache.untyped_storage().nbytes(),), (1,), 0).numpy()


def read_records(k_cache: torch.Tensor, block_size: int, page: np.ndarray, row: np.ndarray):
    """(data uint8 [n, value_bytes + tail_bytes]: the value bytes then the tail's,
    used scale bytes uint8 [n, num_scales * scale_size]) of the records at (page, row).

    A page is `k_cache.stride(0)` bytes apart; where each part of row r lies in
    it is the format's `regions` (page_split: block_size data rows then block_size
    scale rows; inline: one record per row). The [.., record_bytes] shape is only
    a byte budget. Pad bytes after the scales are never read.
    """
    layout = format_of(k_cache)
    page = np.asarray(page, dtype=np.int64)
    row = np.asarray(row, dtype=np.int64)
    if page.size and (page.min() < 0 or page.max() >= k_cache.shape[0]):
        raise ValueError("a page index lies outside k_cache")
    storage = _storage_bytes(k_cache)
    start = k_cache.storage_offset() + page * k_cache.stride(0)  # byte address of each page
    regions = layout.regions(block_size)

    def part(name: str, nbytes: int) -> np.ndarray:
        base, row_stride, _ = regions[name]
        at = start[:, None] + base + row[:, None] * row_stride + np.arange(nbytes)
        return storage[at]

    data = np.concatenate([part("values", layout.value_bytes), part("tail", layout.tail_bytes)], axis=1)
    return data, part("scales", layout.num_scales * layout.scale_size)


# ---- exact decodings: (sign, M, E, nan, inf) with |x| = M * 2^E -------------------------------

def _e4m3(byte: np.ndarray):
    """OCP E4M3 bits -> (sign, M, E, nan) with |x| = M * 2^E exactly."""
    b = byte.astype(np.int64)
    sign, exp, man = b >> 7, (b >> 3) & 0xF, b & 0x7
    nan = (exp == 0xF) & (man == 0x7)  # the only NaNs; E4M3 has no infinities
    normal = exp > 0
    m = np.where(normal, man + 8, man)  # implicit leading one for normals
    e = np.where(normal, exp - 7 - 3, 1 - 7 - 3)  # bias 7, 3 fraction bits; subnormals: m * 2^-9
    return sign, m, e, nan


def _e2m1(nibble: np.ndarray):
    """OCP E2M1 nibbles -> (sign, M, E) exactly: bit 3 the sign, bits 1..2 the exponent
    (bias 1), bit 0 the fraction; exponent 0 is the subnormal 0 / 0.5. No NaN, no Inf."""
    n = nibble.astype(np.int64)
    sign, exp, man = (n >> 3) & 1, (n >> 1) & 0x3, n & 0x1
    normal = exp > 0
    m = np.where(normal, man + 2, man)  # 1.f with one fraction bit, as an integer
    e = np.where(normal, exp - 1 - 1, 1 - 1 - 1)  # bias 1, one fraction bit: (2 + f) * 2^(exp - 2)
    return sign, m, e


def _ue8m0(code: np.ndarray):
    """UE8M0 codes -> (sign, M, E, nan): 2^(code - 127), code 0 included (2^-127); 255 is NaN."""
    c = code.astype(np.int64)
    return np.zeros_like(c), np.ones_like(c), c - 127, c == 255


def _f32(word: np.ndarray):
    """IEEE float32 bit patterns -> (sign, M, E, nan, inf)."""
    w = word.astype(np.int64)
    sign, exp, man = (w >> 31) & 1, (w >> 23) & 0xFF, w & 0x7FFFFF
    special = exp == 0xFF
    normal = exp > 0
    m = np.where(normal, man | (1 << 23), man)
    e = np.where(normal, exp - 127 - 23, -126 - 23)  # subnormals: man * 2^-149
    return sign, np.where(special, 0, m), np.where(special, 0, e), special & (man != 0), special & (man == 0)


def _values(data: np.ndarray, layout: Format):
    """The record's quantized values, exactly: (sign, M, E, nan), [n, values]."""
    raw = data[:, : layout.value_bytes]
    if layout.value_kind == "e4m3":
        return _e4m3(raw)
    if layout.value_kind == "e2m1":
        b = raw.astype(np.int64)
        nibbles = np.empty((b.shape[0], layout.values), dtype=np.int64)
        nibbles[:, 0::2] = b & 0xF  # value 2i: the low nibble of byte i
        nibbles[:, 1::2] = b >> 4
        sign, m, e = _e2m1(nibbles)
        return sign, m, e, np.zeros(m.shape, dtype=bool)
    raise ValueError(f"the oracle knows no {layout.value_kind!r} values")


def _scales(scale_bytes: np.ndarray, layout: Format):
    """The record's scales, exactly: (sign, M, E, nan, inf), [n, num_scales]."""
    if layout.scale_kind == "ue8m0":
        sign, m, e, nan = _ue8m0(scale_bytes)
        return sign, m, e, nan, np.zeros(m.shape, dtype=bool)
    if layout.scale_kind == "e4m3":
        sign, m, e, nan = _e4m3(scale_bytes)
        return sign, m, e, nan, np.zeros(m.shape, dtype=bool)
    if layout.scale_kind == "f32":
        b = scale_bytes.astype(np.int64).reshape(scale_bytes.shape[0], layout.num_scales, 4)
        word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)  # little-endian
        return _f32(word)
    raise ValueError(f"the oracle knows no {layout.scale_kind!r} scales")


# ---- rounding, in integers ---------------------------------------------------------------------

def _top_bit(m: np.ndarray) -> np.ndarray:
    """Position of m's leading one (0 for m <= 1), for 0 <= m < 2^32 (every M here is below 2^28):
    a binary search over the bits."""
    top = np.zeros_like(m)
    x = m
    for step in (16, 8, 4, 2, 1):
        big = x >= (np.int64(1) << step)
        top += big * step
        x = np.where(big, x >> step, x)
    if (x >> 1).any():
        raise AssertionError("the oracle's exact products stay below 2^32")
    return top


def _round(m: np.ndarray, e: np.ndarray, target: tuple[int, int, int]):
    """Round M * 2^E (M >= 0) to the nearest value of a binary format with `bits`
    significant bits, smallest normal exponent `emin` and largest exponent `emax`,
    ties to even, subnormals kept: -> (M', E', overflow), the result exactly
    M' * 2^E' unless overflow (then it is Inf)."""
    bits, emin, emax = target
    m = m.astype(np.int64)
    e = e.astype(np.int64)
    top = _top_bit(m)
    # The step (quantum) at this magnitude: 2^(exponent - (bits - 1)), never below the subnormal step.
    quantum = np.maximum(e + top - (bits - 1), emin - (bits - 1))
    shift = np.clip(quantum - e, 0, _MAX_SHIFT)  # bits of M below the step; 0: already representable
    q = m >> shift
    rest = m & ((np.int64(1) << shift) - 1)
    half = (np.int64(1) << shift) >> 1
    up = (shift > 0) & ((rest > half) | ((rest == half) & ((q & 1) == 1)))  # nearest, ties to even
    q = q + up
    e_out = np.where(shift > 0, quantum, e)
    overflow = (q != 0) & (e_out + _top_bit(q) > emax)  # a carry may lift the top bit
    return q, e_out, overflow


def _bf16_bits(sign: np.ndarray, m: np.ndarray, e: np.ndarray) -> np.ndarray:
    """bf16 bits of (-1)^sign * M * 2^E, a value bf16 represents exactly (normal or subnormal)."""
    top = _top_bit(m)
    exp = e + top  # |x| = 1.f * 2^exp for normals
    frac = np.where(top >= 7, m >> np.clip(top - 7, 0, 62), m << np.clip(7 - top, 0, 7)) & 0x7F
    normal = ((exp + 127) << 7) | frac
    # A subnormal is k * 2^-133 with k < 128: the bits are k itself. (k == 128 is 2^-126,
    # exactly the smallest normal's bits, which the normal branch gives anyway.)
    subnormal = m << np.clip(e + 133, 0, 7)
    bits = np.where(m == 0, 0, np.where(exp >= BFLOAT16[1], normal, subnormal))
    return bits | (sign.astype(np.int64) << 15)


def _bf16_from_exact(sign: np.ndarray, m: np.ndarray, e: np.ndarray) -> np.ndarray:
    """uint16 bf16 bits of bf16_rne(float32_rne((-1)^sign * m * 2^e)), 0 <= m < 2^32.

    Both roundings to nearest, ties to even, with subnormals kept (float32 down to
    2^-149, bf16 to 2^-133) and overflow giving Inf; the sign survives zeros (-0).
    """
    sign = sign.astype(np.int64)
    m32, e32, inf32 = _round(m, e, FLOAT32)
    m16, e16, inf16 = _round(m32, e32, BFLOAT16)
    bits = np.where(inf32 | inf16, BF16_INF | (sign << 15), _bf16_bits(sign, m16, e16))
    return bits.astype(np.uint16)


def decode_records(data: np.ndarray, codes: np.ndarray, layout: Format) -> np.ndarray:
    """uint16 bf16 bits [n, head_dim] of each record (the contract's "Decoding" section),
    from read_records' data (value bytes then tail) and used scale bytes."""
    v_sign, v_m, v_e, v_nan = _values(data, layout)
    s_sign, s_m, s_e, s_nan, s_inf = (np.repeat(x, layout.scale_group, axis=1) for x in _scales(codes, layout))
    sign = v_sign ^ s_sign
    # The exact product (values are finite): M < 2^4 * 2^24.
    bits = _bf16_from_exact(sign, v_m * s_m, v_e + s_e)
    bits = np.where(s_inf, (BF16_INF | (sign << 15)).astype(np.uint16), bits)  # x * Inf = Inf, x != 0
    bits[v_nan | s_nan | (s_inf & (v_m == 0))] = BF16_NAN  # NaN anywhere, and 0 * Inf
    tail = data[:, layout.value_bytes:].astype(np.uint16)
    tail = tail[:, 0::2] | (tail[:, 1::2] << 8)  # little-endian bf16, copied bit for bit
    return np.concatenate([bits, tail], axis=1)


def _decoded(k_cache: torch.Tensor, block_size: int, page: np.ndarray, row: np.ndarray) -> np.ndarray:
    return decode_records(*read_records(k_cache, block_size, page, row), format_of(k_cache))


# ---- the calls ---------------------------------------------------------------------------------

def _bf16_rows(out: torch.Tensor) -> np.ndarray:
    """A uint16 numpy view of `out`'s bits, same shape and strides: writes land in `out`."""
    return out.view(torch.int16).numpy().view(np.uint16)


def _ints(t: torch.Tensor) -> np.ndarray:
    return t.numpy().astype(np.int64)


def _pages(block_table: torch.Tensor, req: np.ndarray, pos: np.ndarray, block_size: int) -> np.ndarray:
    """The page of each (request, position), reading only those block-table entries."""
    if (pos < 0).any():
        raise ValueError("a position lies before the start of its request (negative)")
    col = pos // block_size
    if (col >= block_table.shape[1]).any():
        raise ValueError("block_table: a position lies past the request's last block-table column")
    if (req >= block_table.shape[0]).any():
        raise ValueError("block_table: fewer rows than requests")
    return block_table.numpy()[req, col].astype(np.int64)


def dequantize_and_gather_oracle(out: torch.Tensor, k_cache: torch.Tensor, seq_lens: torch.Tensor,
                                 gather_lens: torch.Tensor | None, block_table: torch.Tensor,
                                 block_size: int, offset: int) -> None:
    """Dense: request r's last gather_len tokens -> out[r, offset + t]; ValueError on out-of-range values."""
    seq = _ints(seq_lens)
    gathered = seq if gather_lens is None else _ints(gather_lens)
    max_rows = max(out.shape[1] - offset, 0)
    req, tok = [], []
    for r in range(seq.shape[0]):
        rows = min(max(int(gathered[r]), 0), max_rows)  # rows past out.shape[1] are never written
        req.append(np.full(rows, r, dtype=np.int64))
        tok.append(np.arange(rows, dtype=np.int64))
    req = np.concatenate(req) if req else np.zeros(0, np.int64)
    tok = np.concatenate(tok) if tok else np.zeros(0, np.int64)
    if req.size == 0:
        return
    pos = seq[req] - gathered[req] + tok
    if (pos < 0).any():
        raise ValueError("gather_lens: a request gathers more tokens than its seq_len")
    col = pos // block_size
    if (col >= block_table.shape[1]).any():
        raise ValueError("block_table: a position lies past the request's last block-table column")
    page = block_table.numpy()[req, col].astype(np.int64)  # only the used entries are read
    _bf16_rows(out)[req, offset + tok] = _decoded(k_cache, block_size, page, pos % block_size)


def dequantize_and_gather_sparse_oracle(out: torch.Tensor, k_cache: torch.Tensor, slot_indices: torch.Tensor,
                                        block_size: int) -> None:
    """Sparse: out row i <- global slot slot_indices[i]; a -1 slot leaves row i untouched."""
    rows = _bf16_rows(out.view(-1, format_of(k_cache).head_dim))  # a view, so it writes into out
    slots = _ints(slot_indices)
    (idx,) = np.nonzero(slots >= 0)
    if idx.size == 0:
        return
    rows[idx] = _decoded(k_cache, block_size, slots[idx] // block_size, slots[idx] % block_size)


def _packed_rows(starts: np.ndarray, num_reqs: int, num_rows: int, bounded: bool,
                 seq_starts: np.ndarray | None):
    """(row, request, position) of every row a packed call writes, from the contract's
    words: row t belongs to the last request r < num_reqs with starts[r] <= t (none: not
    written); bounded: rows t >= starts[num_reqs] are not written."""
    num_reqs = max(num_reqs, 0)
    ordered = starts[: num_reqs + int(bool(bounded))] if num_reqs else starts[:0]
    if (np.diff(ordered) < 0).any():
        raise ValueError("starts: requests must be packed in order (starts must not decrease)")
    t = np.arange(max(num_rows, 0), dtype=np.int64)
    owns = starts[None, :num_reqs] <= t[:, None]  # [rows, requests]: r could own t
    has = owns.any(axis=1)
    last = num_reqs - 1 - np.argmax(owns[:, ::-1], axis=1) if num_reqs else np.zeros_like(t)
    if bounded:
        has &= t < starts[num_reqs]
    t, r = t[has], last[has]
    p = t - starts[r] + (0 if seq_starts is None else seq_starts[r])
    return t, r, p


def dequantize_and_gather_packed_oracle(out: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor,
                                        starts: torch.Tensor, num_reqs: int, seq_starts: torch.Tensor | None,
                                        block_size: int) -> None:
    """Packed (vLLM's cp_gather_and_upconvert_fp8_kv_cache): out[t] <- request r's position
    t - starts[r] (+ seq_starts[r]), r the last with starts[r] <= t; rows before starts[0]
    untouched. ValueError on a position outside its block-table row or a page outside the cache."""
    t, r, p = _packed_rows(_ints(starts), int(num_reqs), out.shape[0], False,
                           None if seq_starts is None else _ints(seq_starts))
    if t.size == 0:
        return
    page = _pages(block_table, r, p, block_size)
    _bf16_rows(out)[t] = _decoded(k_cache, block_size, page, p % block_size)


def gather_raw_packed_oracle(dst_k: torch.Tensor, dst_scale: torch.Tensor, k_cache: torch.Tensor,
                             block_table: torch.Tensor, cu_seq_lens: torch.Tensor, block_size: int) -> None:
    """Raw packed (vLLM's cp_gather_indexer_k_quant_cache): request r owns rows
    cu_seq_lens[r] .. cu_seq_lens[r+1] - 1, positions from 0; dst_k[t] <- the value bytes,
    dst_scale[t] <- the scale bytes (no pad); every other row untouched."""
    cu = _ints(cu_seq_lens)
    t, r, p = _packed_rows(cu, cu.shape[0] - 1, dst_k.shape[0], True, None)
    if t.size == 0:
        return
    layout = format_of(k_cache)
    data, scales = read_records(k_cache, block_size, _pages(block_table, r, p, block_size), p % block_size)
    dst_k.numpy()[t] = data[:, : layout.value_bytes]
    dst_scale.numpy()[t] = scales
