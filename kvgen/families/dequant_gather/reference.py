"""The torch path: kvgen's reference semantics, vectorized, on any device.

Every other backend (cubin, Triton) must give the same bits as this one; see
docs/semantics.md for the contract in prose. In short, for token t of request
r (position p = seq_len - gather_len + t, page = block_table[r, p // block_size],
row = p % block_size), and fp8 value j:

    out[r, offset + t, j] = bf16_rne( e4m3(fp8[j]) * ue8m0(code[j // group]) )   j <  fp8_dim
    out[r, offset + t, j] = tail_bf16[j - fp8_dim]  (bit copy)                  j >= fp8_dim

  * e4m3: OCP FP8 E4M3 (torch.float8_e4m3fn): +-0, subnormals, +-448; 0x7F/0xFF are NaN.
  * ue8m0(code) = 2^(code - 127) for code 0..254 (code 0 is 2^-127, a float32
    subnormal, kept); code 255 is NaN. These are OCP-MX meanings (torch's
    float8_e8m0fnu agrees).
  * The product is exact in float32 (at most 4 significant bits, exponent
    >= -136); its one rounding is float32 -> bf16, round to nearest even,
    subnormal results kept, overflow to +-Inf.
  * Tokens t < min(gather_len, out.shape[1] - offset) are written; nothing else
    in `out` is touched. The unused scale codes of a row are never read.
"""

from __future__ import annotations

import torch

from ...runtime.validate import format_of


def decode_e4m3(raw: torch.Tensor) -> torch.Tensor:
    """uint8 e4m3 bytes -> float32 (exact)."""
    return raw.view(torch.float8_e4m3fn).to(torch.float32)


def decode_ue8m0(codes: torch.Tensor) -> torch.Tensor:
    """uint8 UE8M0 codes -> float32 scales: 2^(code-127); 0 -> 2^-127; 255 -> NaN."""
    c = codes.to(torch.int32)
    bits = torch.where(c == 0, 0x00400000, c << 23)
    bits = torch.where(c == 255, 0x7FC00000, bits)
    return bits.view(torch.float32)


def gather_plan(seq_lens: torch.Tensor, gather_lens: torch.Tensor | None, max_rows: int):
    """(request index, token index, position) of every row that is written."""
    seq = seq_lens.to(torch.int64)
    gathered = seq if gather_lens is None else gather_lens.to(torch.int64)
    rows = gathered.clamp(min=0, max=max(max_rows, 0))
    token = torch.arange(max(max_rows, 0), device=seq.device)
    req_idx, tok_idx = (token[None, :] < rows[:, None]).nonzero(as_tuple=True)
    pos = (seq - gathered)[req_idx] + tok_idx
    return req_idx, tok_idx, pos


def dequantize_records(k_cache: torch.Tensor, block_size: int, page: torch.Tensor,
                       row: torch.Tensor) -> torch.Tensor:
    """bf16 [n, head_dim] for the records at (page, row): the one decoding every path shares."""
    fmt = format_of(k_cache)
    fp8_dim, group, head_dim = fmt.values, fmt.scale_group, fmt.head_dim
    data_bytes = fmt.data_bytes
    if bool(((page < 0) | (page >= k_cache.shape[0])).any()):
        raise ValueError("a page index lies outside k_cache")
    # Views of each page's two regions (data rows, then scale rows) over k_cache's storage.
    page_stride = k_cache.stride(0)
    base = k_cache.storage_offset()
    data = k_cache.as_strided((k_cache.shape[0], block_size, data_bytes), (page_stride, data_bytes, 1), base)
    scale = k_cache.as_strided((k_cache.shape[0], block_size, fmt.scale_bytes),
                               (page_stride, fmt.scale_bytes, 1), base + block_size * data_bytes)
    records = data[page, row]  # [n, data_bytes]
    codes = scale[page, row, : fp8_dim // group]  # the padding codes are never read

    values = decode_e4m3(records[:, :fp8_dim].contiguous())
    values = values * decode_ue8m0(codes).repeat_interleave(group, dim=1)
    result = torch.empty((records.shape[0], head_dim), dtype=torch.bfloat16, device=k_cache.device)
    result[:, :fp8_dim] = values.to(torch.bfloat16)
    if fp8_dim < head_dim:
        result[:, fp8_dim:] = records[:, fp8_dim:].contiguous().view(torch.bfloat16)
    return result


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
