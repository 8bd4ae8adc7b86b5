"""A second decoder, written from docs/semantics.md alone: the oracle the others are checked against.

It shares no code with kvgen/reference.py and no floating point with anyone:
every value is decoded from its bits into an exact (sign, integer M, power of
two E) triple, |x| = M * 2^E, and encoded into bf16 bits by integer
arithmetic. So a bug in torch's float8 casts, its float -> bf16 rounding, or
the reference's vectorised indexing cannot hide here. It reads only the
record-format facts (the loaded Format rows, which are data) from kvgen.

numpy, CPU torch tensors in; `out` is written through numpy views of its
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
BF16_MIN_EXP = -126  # smallest normal bf16 exponent; below it the step is 2^-133


def _storage_bytes(k_cache: torch.Tensor) -> np.ndarray:
    """The whole uint8 storage under the cache, flat: index = byte address (pages
    are addressed by stride(0) from the storage offset, not through k_cache's shape)."""
    return k_cache.as_strided((k_cache.untyped_storage().nbytes(),), (1,), 0).numpy()


def read_records(k_cache: torch.Tensor, block_size: int, page: np.ndarray, row: np.ndarray):
    """(data rows uint8 [n, data_bytes], used scale codes uint8 [n, fp8_dim / group]) at (page, row).

    A page is `k_cache.stride(0)` bytes apart and holds block_size data rows,
    then block_size scale rows: the [.., record_bytes] shape is only a byte budget.
    """
    layout = format_of(k_cache)
    data_bytes = layout.data_bytes
    page = np.asarray(page, dtype=np.int64)
    row = np.asarray(row, dtype=np.int64)
    if page.size and (page.min() < 0 or page.max() >= k_cache.shape[0]):
        raise ValueError("a page index lies outside k_cache")
    storage = _storage_bytes(k_cache)
    start = k_cache.storage_offset() + page * k_cache.stride(0)  # byte address of each page
    data_at = start[:, None] + row[:, None] * data_bytes + np.arange(data_bytes)
    groups = layout.num_scales  # the padding codes are never read
    codes_at = start[:, None] + block_size * data_bytes + row[:, None] * layout.scale_bytes + np.arange(groups)
    return storage[data_at], storage[codes_at]


def _e4m3(byte: np.ndarray):
    """OCP E4M3 bits -> (sign, M, E, nan) with |x| = M * 2^E exactly."""
    b = byte.astype(np.int64)
    sign, exp, man = b >> 7, (b >> 3) & 0xF, b & 0x7
    nan = (exp == 0xF) & (man == 0x7)  # the only NaNs; E4M3 has no infinities
    normal = exp > 0
    m = np.where(normal, man + 8, man)  # implicit leading one for normals
    e = np.where(normal, exp - 7 - 3, 1 - 7 - 3)  # bias 7, 3 fraction bits; subnormals: m * 2^-9
    return sign, m, e, nan


def _bf16_from_exact(sign: np.ndarray, m: np.ndarray, e: np.ndarray) -> np.ndarray:
    """bf16 bits of (-1)^sign * m * 2^e, rounded to nearest even; 0 <= m < 2^8.

    Normal results are exact (m has at most 8 significant bits): only the
    subnormal range (step 2^-133) rounds, and only overflow gives Inf.
    """
    m = m.astype(np.int64)
    e = e.astype(np.int64)
    top = np.zeros_like(m)  # position of m's leading one
    for bit in range(1, 8):
        top = np.where((m >> bit) != 0, bit, top)
    exp = e + top  # |x| = 1.f * 2^exp
    normal = ((exp + 127) << 7) | ((m << (7 - top)) & 0x7F)

    # Subnormal range: |x| = (m * 2^(e + 133)) * 2^-133; round m * 2^(e + 133) to an integer.
    shift = e + 133
    down = np.clip(-shift, 0, 62)
    q = (m << np.clip(shift, 0, 8)) >> down
    rest = m & ((np.int64(1) << down) - 1)  # the bits shifted out
    half = (np.int64(1) << down) >> 1
    q = q + ((down > 0) & ((rest > half) | ((rest == half) & ((q & 1) == 1))))  # ties to even
    subnormal = q  # q == 128 is 2^-126: exactly the bits of the smallest normal, so no special case

    bits = np.where(m == 0, 0, np.where(exp > 127, BF16_INF, np.where(exp >= BF16_MIN_EXP, normal, subnormal)))
    return (bits | (sign.astype(np.int64) << 15)).astype(np.uint16)


def decode_records(data: np.ndarray, codes: np.ndarray, layout: Format) -> np.ndarray:
    """uint16 bf16 bits [n, head_dim] of each record (the contract's "Values" section)."""
    fp8_dim = layout.values
    sign, m, e, nan = _e4m3(data[:, :fp8_dim])
    code = np.repeat(codes.astype(np.int64), layout.scale_group, axis=1)  # one code per group of values
    # ue8m0(c) = 2^(c - 127) exactly, code 0 included (2^-127); code 255 is NaN.
    bits = _bf16_from_exact(sign, m, e + code - 127)
    bits[nan | (code == 255)] = BF16_NAN
    tail = data[:, fp8_dim:].astype(np.uint16)
    tail = tail[:, 0::2] | (tail[:, 1::2] << 8)  # little-endian bf16, copied bit for bit
    return np.concatenate([bits, tail], axis=1)


def _bf16_rows(out: torch.Tensor) -> np.ndarray:
    """A uint16 numpy view of `out`'s bits, same shape and strides: writes land in `out`."""
    return out.view(torch.int16).numpy().view(np.uint16)


def dequantize_and_gather_oracle(out: torch.Tensor, k_cache: torch.Tensor, seq_lens: torch.Tensor,
                                 gather_lens: torch.Tensor | None, block_table: torch.Tensor,
                                 block_size: int, offset: int) -> None:
    """Dense: request r's last gather_len tokens -> out[r, offset + t]; ValueError on out-of-range values."""
    seq = seq_lens.numpy().astype(np.int64)
    gathered = seq if gather_lens is None else gather_lens.numpy().astype(np.int64)
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
    layout = format_of(k_cache)
    values = decode_records(*read_records(k_cache, block_size, page, pos % block_size), layout)
    _bf16_rows(out)[req, offset + tok] = values


def dequantize_and_gather_sparse_oracle(out: torch.Tensor, k_cache: torch.Tensor, slot_indices: torch.Tensor,
                                        block_size: int) -> None:
    """Sparse: out row i <- global slot slot_indices[i]; a -1 slot leaves row i untouched."""
    rows = _bf16_rows(out.view(-1, format_of(k_cache).head_dim))  # a view, so it writes into out
    slots = slot_indices.numpy().astype(np.int64)
    (idx,) = np.nonzero(slots >= 0)
    if idx.size == 0:
        return
    layout = format_of(k_cache)
    values = decode_records(*read_records(k_cache, block_size, slots[idx] // block_size,
                                          slots[idx] % block_size), layout)
    rows[idx] = values
