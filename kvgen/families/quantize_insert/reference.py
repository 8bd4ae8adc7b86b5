"""The writer's torch path: kvgen's reference semantics for quantize_and_insert_k_cache, vectorised, on any device.

Every other backend (cubin, Triton) must write the same bytes as this one; see
docs/semantics.md ("Semantics of quantize_and_insert_k_cache") for the contract
in prose. In short, for token i < slot_mapping.shape[0] with slot s >= 0 (page
s // block_size, row s % block_size) and scale group g of G values:

    a     = max(max |x_j| over the group, NaN ignored, 1e-4)     (float32 0x38D1B717)
    code  = ceil(log2(a / 448)) + 127, exactly, from a's float32 bits; 255 for a = +Inf
    fp8_j = e4m3_rne_satfinite(x_j * 2^(127 - code))             (the exact product)

and the record is written page-split: the value bytes then the bf16 tail (bit
copy) into data row s % block_size, the codes then zero pad bytes into the
scale row. Nothing else in the cache is touched.

The exponent comes from integer bit arithmetic on a's float32 bits (never
log2); the product is one float32 multiply by an exact power of two (exact for
every result that can round to a non-zero e4m3 value); the rounding is torch's
float8_e4m3fn cast after a clamp to +-448 (checked against the H100's
cvt.rn.satfinite.e4m3x2.f32 on the edge cases, tests/test_writer.py), with
every NaN forced to 0x7F.
"""

from __future__ import annotations

import torch

from ...formats import Format

E4M3_MAX = 448.0
E4M3_NAN = 0x7F  # what cvt.rn.satfinite gives for a NaN of either sign
AMAX_FLOOR_BITS = 0x38D1B717  # the float32 nearest 1e-4
INF_CODE = 255
MANTISSA_175 = 0x600000  # float32 mantissa bits of 1.75: f > 1.75 rounds the exponent up once more
SCALE_2_POW_M128 = 0x00200000  # 2^-128, a float32 subnormal: the scale of code 255


def ue8m0_codes(amax: torch.Tensor) -> torch.Tensor:
    """int32 codes of float32 group maxima (NaN already ignored, >= 0): ceil(log2(max(a, 1e-4) / 448)) + 127,
    exactly; +Inf gives 255."""
    floor = torch.tensor(AMAX_FLOOR_BITS, dtype=torch.int32, device=amax.device).view(torch.float32)
    a = torch.maximum(amax, floor)
    bits = a.view(torch.int32)
    # a = f * 2^E with f in [1, 2): ceil(log2(a / 448)) = E - 8, plus 1 when f > 1.75; code = that + 127.
    code = ((bits >> 23) & 0xFF) - 8 + ((bits & 0x7FFFFF) > MANTISSA_175).to(torch.int32)
    return torch.where(torch.isinf(a), INF_CODE, code)


def scale_of(code: torch.Tensor) -> torch.Tensor:
    """float32 2^(127 - code), exactly (code 255: 2^-128, a float32 subnormal)."""
    bits = torch.where(code == INF_CODE, SCALE_2_POW_M128, (254 - code) << 23)
    return bits.to(torch.int32).view(torch.float32)


def e4m3_rne_satfinite(x: torch.Tensor) -> torch.Tensor:
    """float32 -> uint8 OCP E4M3 bytes: nearest, ties to even; +-Inf and magnitudes past 448 give +-448;
    any NaN gives 0x7F; results that round to zero keep their sign."""
    y = x.clamp(-E4M3_MAX, E4M3_MAX)  # clamp keeps NaN and -0
    q = y.to(torch.float8_e4m3fn).view(torch.uint8)
    return torch.where(torch.isnan(y), torch.full_like(q, E4M3_NAN), q)


def quantize_records(x: torch.Tensor, fmt: Format) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 [n, head_dim] -> (data rows uint8 [n, data_bytes], scale rows uint8 [n, scale_bytes]),
    pad bytes 0: the bytes one token's record holds."""
    n = x.shape[0]
    values, group, groups = fmt.values, fmt.scale_group, fmt.num_scales
    v = x[:, :values].to(torch.float32).reshape(n, groups, group)  # exact
    mag = v.abs()
    mag = torch.where(torch.isnan(mag), torch.zeros_like(mag), mag)  # NaN ignored (a group of NaNs gives 0)
    code = ue8m0_codes(mag.amax(dim=-1))
    product = v * scale_of(code)[..., None]  # exact wherever the result can be non-zero in e4m3
    data = torch.empty((n, fmt.data_bytes), dtype=torch.uint8, device=x.device)
    data[:, :values] = e4m3_rne_satfinite(product).reshape(n, values)
    if fmt.tail:
        data[:, values:] = x[:, values:].contiguous().view(torch.uint8)  # bf16 bits, little-endian
    codes = torch.zeros((n, fmt.scale_bytes), dtype=torch.uint8, device=x.device)
    codes[:, :groups] = code.to(torch.uint8)
    return data, codes


def record_views(k_cache: torch.Tensor, block_size: int, fmt: Format) -> tuple[torch.Tensor, torch.Tensor]:
    """(data rows [num_blocks, block_size, data_bytes], scale rows [num_blocks, block_size, scale_bytes]):
    views of each page's two regions over k_cache's storage, pages k_cache.stride(0) bytes apart
    (the record view [.., record_bytes] and the byte view [.., block_bytes] alike)."""
    page_stride, base, num_blocks = k_cache.stride(0), k_cache.storage_offset(), k_cache.shape[0]
    data = k_cache.as_strided((num_blocks, block_size, fmt.data_bytes), (page_stride, fmt.data_bytes, 1), base)
    scale = k_cache.as_strided((num_blocks, block_size, fmt.scale_bytes), (page_stride, fmt.scale_bytes, 1),
                               base + block_size * fmt.data_bytes)
    return data, scale


def quantize_and_insert_torch(k: torch.Tensor, k_cache: torch.Tensor, slot_mapping: torch.Tensor,
                              block_size: int, fmt: Format) -> None:
    """Write k[i] to slot slot_mapping[i] for every i < slot_mapping.shape[0] with a slot >= 0.
    Raises ValueError on a slot past the cache (a host-side check: it synchronises, fine here)."""
    (idx,) = (slot_mapping >= 0).nonzero(as_tuple=True)
    if idx.numel() == 0:
        return
    slot = slot_mapping[idx].to(torch.int64)
    page, row = slot // block_size, slot % block_size
    if bool((page >= k_cache.shape[0]).any()):
        raise ValueError("slot_mapping: a slot lies outside k_cache")
    data, codes = quantize_records(k[idx.to(k.device)], fmt)
    data_rows, scale_rows = record_views(k_cache, block_size, fmt)
    data_rows[page, row] = data
    scale_rows[page, row] = codes
