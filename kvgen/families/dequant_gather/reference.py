"""The torch path: kvgen's reference semantics, vectorized, on any device.

Every other backend (cubin, Triton) must give the same bits as this one; see
docs/semantics.md for the contract in prose ("Values", and "Three more record
formats" for every value kind, scale kind and placement). In short, for the
record at (page, row) -- its parts found through `Format.regions` -- and
quantized value j:

    out[j] = bf16_rne( float32_rne( value(j) * scale(j // scale_group) ) )   j <  values
    out[j] = tail_bf16[j - values]  (bit copy)                               j >= values

  * e4m3 values and scales: OCP FP8 E4M3 (torch.float8_e4m3fn): +-0,
    subnormals, +-448; 0x7F/0xFF are NaN.
  * e2m1 values: value j is the low nibble of byte j // 2 when j is even, the
    high nibble when odd; magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6, bit 3 the sign.
  * ue8m0(code) = 2^(code - 127) for code 0..254 (code 0 is 2^-127, a float32
    subnormal, kept); code 255 is NaN (OCP-MX meanings; torch's float8_e8m0fnu agrees).
  * float32 scales: 4 little-endian bytes, used as they stand (+-0,
    subnormals, +-Inf, NaN).
  * The product is one IEEE float32 multiply (round to nearest even,
    subnormals kept); for e4m3/e2m1 values times ue8m0/e4m3 scales it is
    exact. Then float32 -> bf16, round to nearest even, done here in integer
    arithmetic (the same bits on every device), subnormal results kept,
    overflow to +-Inf; NaN gives 0xFFFF (what torch's vectorised CPU cast
    gives, so the golden expected tensors keep their bits).

Three ways to address records:
  * dense: for token t of request r, position p = seq_len - gather_len + t,
    page = block_table[r, p // block_size], row = p % block_size, written to
    out[r, offset + t] for t < min(gather_len, out.shape[1] - offset);
  * sparse: out row i <- global slot slot_indices[i]; -1 leaves row i untouched;
  * packed (vLLM's cp_gather_* ops): out row t belongs to the last request r
    with starts[r] <= t, its position p = t - starts[r] (+ seq_starts[r]);
    see `packed_plan`.
Nothing else in `out` is touched; the pad bytes of a record are never read.
"""

from __future__ import annotations

import torch

from ...runtime.validate import format_of

BF16_NAN_OUT = 0xFFFF  # the NaN this path writes (any NaN matches any NaN: docs/semantics.md)
# e2m1 magnitude codes 0..7, then the same negated (bit 3 the sign; 0x8 is -0).
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_VALUES = _E2M1 + tuple(-v for v in _E2M1)


def decode_e4m3(raw: torch.Tensor) -> torch.Tensor:
    """uint8 e4m3 bytes -> float32 (exact)."""
    return raw.view(torch.float8_e4m3fn).to(torch.float32)


def decode_e2m1(raw: torch.Tensor) -> torch.Tensor:
    """uint8 [n, k] bytes of packed e2m1 pairs -> float32 [n, 2k] (exact): element 2i
    is byte i's low nibble, element 2i + 1 its high nibble."""
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=raw.device)
    nibbles = torch.stack([raw & 0xF, raw >> 4], dim=-1).reshape(*raw.shape[:-1], raw.shape[-1] * 2)
    return table[nibbles.to(torch.int64)]


def decode_ue8m0(codes: torch.Tensor) -> torch.Tensor:
    """uint8 UE8M0 codes -> float32 scales: 2^(code-127); 0 -> 2^-127; 255 -> NaN."""
    c = codes.to(torch.int32)
    bits = torch.where(c == 0, 0x00400000, c << 23)
    bits = torch.where(c == 255, 0x7FC00000, bits)
    return bits.view(torch.float32)


def decode_f32(raw: torch.Tensor) -> torch.Tensor:
    """uint8 [n, 4k] little-endian float32 bytes -> float32 [n, k], bits as they stand."""
    b = raw.to(torch.int64).reshape(*raw.shape[:-1], raw.shape[-1] // 4, 4)
    bits = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)
    bits = bits - ((bits >> 31) << 32)  # two's complement, so the int32 cast is exact
    return bits.to(torch.int32).view(torch.float32)


def decode_values(raw: torch.Tensor, kind: str) -> torch.Tensor:
    """The value bytes of a record -> float32 values (exact)."""
    if kind == "e4m3":
        return decode_e4m3(raw)
    if kind == "e2m1":
        return decode_e2m1(raw)
    raise ValueError(f"no decoding of {kind!r} values")


def decode_scales(raw: torch.Tensor, kind: str) -> torch.Tensor:
    """The (used) scale bytes of a record -> float32 scales (exact)."""
    if kind == "ue8m0":
        return decode_ue8m0(raw)
    if kind == "e4m3":
        return decode_e4m3(raw)
    if kind == "f32":
        return decode_f32(raw)
    raise ValueError(f"no decoding of {kind!r} scales")


def bf16_rne(x: torch.Tensor) -> torch.Tensor:
    """float32 -> bf16, round to nearest even, in integer arithmetic: subnormal
    results kept, overflow to +-Inf, NaN -> 0xFFFF. (Device independent; a
    float cast may flush or mis-round subnormals on some backends.)"""
    bits = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = torch.where(torch.isnan(x), BF16_NAN_OUT, rounded)
    rounded = rounded - ((rounded >> 15) << 16)  # as a signed 16-bit value, so the int16 cast is exact
    return rounded.to(torch.int16).view(torch.bfloat16)


def gather_plan(seq_lens: torch.Tensor, gather_lens: torch.Tensor | None, max_rows: int):
    """(request index, token index, position) of every row that is written."""
    seq = seq_lens.to(torch.int64)
    gathered = seq if gather_lens is None else gather_lens.to(torch.int64)
    rows = gathered.clamp(min=0, max=max(max_rows, 0))
    token = torch.arange(max(max_rows, 0), device=seq.device)
    req_idx, tok_idx = (token[None, :] < rows[:, None]).nonzero(as_tuple=True)
    pos = (seq - gathered)[req_idx] + tok_idx
    return req_idx, tok_idx, pos


def packed_plan(starts: torch.Tensor, num_reqs: int, num_rows: int, bounded: bool,
                seq_starts: torch.Tensor | None = None):
    """(row t, request r, position p), int64, of exactly the rows a packed gather writes.

    Row t in [0, num_rows) belongs to the last r < num_reqs with starts[r] <= t
    (a row with none is not written); with `bounded`, rows t >= starts[num_reqs]
    are not written either. p = t - starts[r] (+ seq_starts[r] when given).
    Starts that decrease are a caller's mistake: ValueError.
    """
    device = starts.device
    num_reqs, num_rows = max(int(num_reqs), 0), max(int(num_rows), 0)
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    if num_reqs == 0 or num_rows == 0:
        return empty, empty, empty.clone()
    s = starts[:num_reqs].to(torch.int64)
    checked = starts[: num_reqs + int(bool(bounded))].to(torch.int64)
    if bool((checked[1:] < checked[:-1]).any()):  # a host-side check, as for the other index values
        raise ValueError("starts: a request starts before the one ahead of it; requests must be packed in order")
    t = torch.arange(num_rows, device=device, dtype=torch.int64)
    r = torch.searchsorted(s, t, right=True) - 1  # the last r with s[r] <= t
    keep = r >= 0
    if bounded:
        keep &= t < starts[num_reqs].to(torch.int64)
    t, r = t[keep], r[keep]
    p = t - s[r]
    if seq_starts is not None:
        p = p + seq_starts[:num_reqs].to(torch.int64)[r]
    return t, r, p


def _region_rows(k_cache: torch.Tensor, block_size: int, part: str, page: torch.Tensor,
                 row: torch.Tensor) -> torch.Tensor:
    """uint8 [n, bytes] of one part ("values", "scales", "tail") of the records at
    (page, row), read through Format.regions from k_cache's storage (pages are
    k_cache.stride(0) bytes apart from its storage offset)."""
    fmt = format_of(k_cache)
    base, row_stride, nbytes = fmt.regions(block_size)[part]
    view = k_cache.as_strided((k_cache.shape[0], block_size, nbytes), (k_cache.stride(0), row_stride, 1),
                              k_cache.storage_offset() + base)
    return view[page, row]


def _check_pages(k_cache: torch.Tensor, page: torch.Tensor) -> None:
    if bool(((page < 0) | (page >= k_cache.shape[0])).any()):
        raise ValueError("a page index lies outside k_cache")


def raw_records(k_cache: torch.Tensor, block_size: int, page: torch.Tensor, row: torch.Tensor):
    """(value bytes uint8 [n, value_bytes], scale bytes uint8 [n, num_scales * scale_size])
    of the records at (page, row), undecoded; pad bytes excluded."""
    fmt = format_of(k_cache)
    _check_pages(k_cache, page)
    values = _region_rows(k_cache, block_size, "values", page, row)
    scales = _region_rows(k_cache, block_size, "scales", page, row)[:, : fmt.num_scales * fmt.scale_size]
    return values, scales


def dequantize_records(k_cache: torch.Tensor, block_size: int, page: torch.Tensor,
                       row: torch.Tensor) -> torch.Tensor:
    """bf16 [n, head_dim] for the records at (page, row): the one decoding every path shares."""
    fmt = format_of(k_cache)
    raw_values, raw_scales = raw_records(k_cache, block_size, page, row)
    values = decode_values(raw_values.contiguous(), fmt.value_kind)
    scales = decode_scales(raw_scales.contiguous(), fmt.scale_kind)
    product = values * scales.repeat_interleave(fmt.scale_group, dim=1)  # one float32 multiply, RNE
    result = torch.empty((raw_values.shape[0], fmt.head_dim), dtype=torch.bfloat16, device=k_cache.device)
    result[:, : fmt.values] = bf16_rne(product)
    if fmt.tail:
        tail = _region_rows(k_cache, block_size, "tail", page, row)
        result[:, fmt.values:] = tail.contiguous().view(torch.bfloat16)  # little-endian bits, copied
    return result


def _pages_of(block_table: torch.Tensor, req: torch.Tensor, pos: torch.Tensor, block_size: int) -> torch.Tensor:
    """block_table[req, pos // block_size] as int64, refusing positions outside the table's rows."""
    if bool((pos < 0).any()):
        raise ValueError("a position lies before the start of its request (negative)")
    col = pos // block_size
    if bool((col >= block_table.shape[1]).any()):
        raise ValueError("block_table: a position lies past the request's last block-table column")
    if bool((req >= block_table.shape[0]).any()):
        raise ValueError("block_table: fewer rows than requests")
    return block_table[req, col].to(torch.int64)


def dequantize_and_gather_torch(out: torch.Tensor, k_cache: torch.Tensor, seq_lens: torch.Tensor,
                                gather_lens: torch.Tensor | None, block_table: torch.Tensor,
                                block_size: int, offset: int) -> None:
    """Dense reference. Raises ValueError on index values out of range (a
    host-side check: on a GPU tensor it synchronizes, which is fine here)."""
    req_idx, tok_idx, pos = gather_plan(seq_lens, gather_lens, out.shape[1] - offset)
    if req_idx.numel() == 0:
        return
    if bool((pos < 0).any()):
        raise ValueError("gather_lens: a request gathers more tokens than its seq_len")
    col = pos // block_size
    if bool((col >= block_table.shape[1]).any()):
        raise ValueError("block_table: a position lies past the request's last block-table column")
    page = block_table[req_idx, col].to(torch.int64)
    out[req_idx, offset + tok_idx] = dequantize_records(k_cache, block_size, page, pos % block_size)


def dequantize_and_gather_sparse_torch(out: torch.Tensor, k_cache: torch.Tensor, slot_indices: torch.Tensor,
                                       block_size: int) -> None:
    """Sparse reference: out row i <- slot slot_indices[i]; slot -1 leaves row i untouched."""
    rows = out.view(-1, format_of(k_cache).head_dim)
    (idx,) = (slot_indices >= 0).nonzero(as_tuple=True)
    if idx.numel() == 0:
        return
    slot = slot_indices[idx].to(torch.int64)
    rows[idx] = dequantize_records(k_cache, block_size, slot // block_size, slot % block_size)


def dequantize_and_gather_packed_torch(out: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor,
                                       starts: torch.Tensor, num_reqs: int, seq_starts: torch.Tensor | None,
                                       block_size: int) -> None:
    """Packed reference (vLLM's cp_gather_and_upconvert_fp8_kv_cache): out bf16 [T, head_dim]
    (rows may be strided); row t of request r (the last with starts[r] <= t) <- its position
    t - starts[r] (+ seq_starts[r]); rows t < starts[0] are not touched. ValueError on a
    position outside its block-table row or a page outside the cache."""
    t, r, p = packed_plan(starts, num_reqs, out.shape[0], False, seq_starts)
    if t.numel() == 0:
        return
    page = _pages_of(block_table, r, p, block_size)
    out[t] = dequantize_records(k_cache, block_size, page, p % block_size)


def gather_raw_packed_torch(dst_k: torch.Tensor, dst_scale: torch.Tensor, k_cache: torch.Tensor,
                            block_table: torch.Tensor, cu_seq_lens: torch.Tensor, block_size: int) -> None:
    """Raw packed reference (vLLM's cp_gather_indexer_k_quant_cache): request r < B =
    cu_seq_lens.shape[0] - 1 owns rows cu_seq_lens[r] .. cu_seq_lens[r+1] - 1, positions from 0;
    dst_k[t] <- the record's value bytes, dst_scale[t] <- its scale bytes (no pad). Rows
    t >= cu_seq_lens[B] (and t < cu_seq_lens[0]) are not touched."""
    num_reqs = max(cu_seq_lens.shape[0] - 1, 0)
    t, r, p = packed_plan(cu_seq_lens, num_reqs, dst_k.shape[0], True)
    if t.numel() == 0:
        return
    page = _pages_of(block_table, r, p, block_size)
    values, scales = raw_records(k_cache, block_size, page, p % block_size)
    dst_k[t] = values
    dst_scale[t] = scales
