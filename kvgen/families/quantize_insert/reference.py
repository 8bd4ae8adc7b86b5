"""The writer's torch path: kvgen's reference semantics for quantize_and_insert_k_cache, vectorised, on any device.

Every other backend (cubin, Triton) must write the same bytes as this one; see
docs/semantics.md ("Semantics of quantize_and_insert_k_cache" and "Three more
record formats", "Writing") for the contract in prose. In short, for token
i < slot_mapping.shape[0] with slot s >= 0 (page s // block_size, row
s % block_size), scale group g of G values, x_j the bf16 input as float32 and
a = max |x_j| over the group (NaN ignored, a group of NaNs gives 0):

  UE8M0 codes over e4m3 values (dsv4_584, v41_528):
    code  = ceil(log2(max(a, 1e-4) / 448)) + 127, exactly, from float32 bits; 255 for a = +Inf
    byte_j = e4m3_rne_satfinite(x_j * 2^(127 - code))            (the exact product)
  float32 scales over e4m3 values (v32_656, indexer_132):
    s     = max(a / 448, 2^-126); pow2_scale: s = 2^ceil(log2(s)), from s's bits
    byte_j = e4m3_rne_satfinite(x_j / s); the scale stored is s's 4 little-endian bytes
  e4m3 scales over e2m1 values (v41_288):
    s     = min(max(a / 6, 2^-9), 448); scale byte e4m3_rne(s), S its value
    v_j   = x_j / S; nibble_j = count of the thresholds |v| > 0.25, >= 0.75, > 1.25, >= 1.75, > 2.5,
            >= 3.5, > 5, | 8 for x_j's sign (NaN: 0x0); value 2i in the low nibble of byte i

Every division is one IEEE float32 division rounded to nearest even: a
float32 tensor divided by a float32 tensor on the same device (never by a
Python or CPU scalar, which CUDA's div turns into a multiply by a reciprocal).
The record is written through `Format.regions`: page_split (data rows: the
value bytes then the bf16 tail; scale rows: the scales then zero pad bytes)
or inline (one record per row: values, scales + zero pad, tail). Nothing else
in the cache is touched.

The UE8M0 exponent comes from integer bit arithmetic on a's float32 bits
(never log2), the product is one float32 multiply by an exact power of two;
the e4m3 rounding is torch's float8_e4m3fn cast after a clamp to +-448
(checked against the H100's cvt.rn.satfinite.e4m3x2.f32 on the edge cases,
tests/test_writer.py), with every NaN forced to 0x7F.
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
FLT_MIN = 2.0 ** -126  # the float32 scale's floor
E2M1_MAX = 6.0
E2M1_SCALE_MIN = 2.0 ** -9  # the smallest e4m3 subnormal: the e4m3 scale's floor
# e2m1 magnitude codes 0..7 are 0, 0.5, 1, 1.5, 2, 3, 4, 6: the code is the number of these that hold
# (round to nearest, ties to the even code, saturating at 6): (threshold, inclusive).
E2M1_THRESHOLDS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True),
                   (5.0, False))
E2M1_SIGN = 0x8


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


def div_rn(a: torch.Tensor, b: torch.Tensor | float) -> torch.Tensor:
    """a / b as IEEE float32 divisions rounded to nearest even, on any device. The divisor is made a float32
    tensor on a's device: CUDA's div computes a * (1 / b) when b is a CPU scalar, which is not the same."""
    if not isinstance(b, torch.Tensor):
        b = torch.full_like(a, b)
    return torch.div(a, b.to(device=a.device, dtype=torch.float32))


def pow2_ceil(s: torch.Tensor) -> torch.Tensor:
    """2^ceil(log2(s)) for positive normal float32 s (s itself for a power of two; +Inf stays +Inf), from bits:
    a non-zero mantissa carries into the exponent."""
    bits = s.view(torch.int32)
    return ((bits + 0x7FFFFF) & ~0x7FFFFF).view(torch.float32)


def group_amax(v: torch.Tensor) -> torch.Tensor:
    """max |x| over the last dimension, NaN ignored (a group of NaNs gives 0)."""
    mag = v.abs()
    return torch.where(torch.isnan(mag), torch.zeros_like(mag), mag).amax(dim=-1)


def e2m1_nibbles(v: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """int32 e2m1 nibbles of float32 v (already divided by its scale): the threshold count, then the sign bit
    where `negative` (NaN v: 0x0, as comparisons with NaN fail and the caller clears the sign)."""
    mag = v.abs()
    code = torch.zeros(v.shape, dtype=torch.int32, device=v.device)
    for threshold, inclusive in E2M1_THRESHOLDS:
        code += ((mag >= threshold) if inclusive else (mag > threshold)).to(torch.int32)
    return code | (negative.to(torch.int32) * E2M1_SIGN)


def _check_encode_args(values: torch.Tensor, tail: torch.Tensor | None, fmt: Format, pow2_scale: bool) -> None:
    if pow2_scale and fmt.scale_kind != "f32":
        raise ValueError(f"pow2_scale: only float32 scales can be rounded to a power of two; format {fmt.name} "
                         f"has {fmt.scale_kind} scales")
    if values.dim() != 2 or values.shape[1] != fmt.values:
        raise ValueError(f"values: expected [n, {fmt.values}], got {tuple(values.shape)}")
    if tail is not None and (tail.dim() != 2 or tuple(tail.shape) != (values.shape[0], fmt.tail)):
        raise ValueError(f"tail: expected [{values.shape[0]}, {fmt.tail}], got {tuple(tail.shape)}")


def encode_records(values: torch.Tensor, tail: torch.Tensor | None, fmt: Format,
                   pow2_scale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 values [n, fmt.values] -> (value bytes uint8 [n, fmt.value_bytes], scale bytes uint8
    [n, fmt.scale_bytes], pad bytes 0), by the format's value and scale kinds. `tail` (bf16 [n, fmt.tail], or
    None) is not encoded -- the writer copies its bits verbatim -- and is only checked for shape.
    `pow2_scale` rounds float32 scales up to powers of two (vLLM's scale_fmt="ue8m0"); other scale kinds
    refuse it (ValueError)."""
    _check_encode_args(values, tail, fmt, pow2_scale)
    n, group, groups = values.shape[0], fmt.scale_group, fmt.num_scales
    x = values.to(torch.float32).reshape(n, groups, group)  # exact
    a = group_amax(x)  # [n, groups]
    scale_bytes = torch.zeros((n, fmt.scale_bytes), dtype=torch.uint8, device=values.device)  # pad bytes 0
    used = groups * fmt.scale_size
    if fmt.scale_kind == "ue8m0":
        if fmt.value_kind != "e4m3":
            raise ValueError(f"format {fmt.name}: no encoding of {fmt.value_kind} values under ue8m0 scales")
        code = ue8m0_codes(a)
        value_bytes = e4m3_rne_satfinite(x * scale_of(code)[..., None]).reshape(n, fmt.values)
        scale_bytes[:, :used] = code.to(torch.uint8)
    elif fmt.scale_kind == "f32":
        if fmt.value_kind != "e4m3":
            raise ValueError(f"format {fmt.name}: no encoding of {fmt.value_kind} values under float32 scales")
        s = torch.clamp_min(div_rn(a, E4M3_MAX), FLT_MIN)  # +Inf for a group holding +-Inf
        if pow2_scale:
            s = pow2_ceil(s)
        value_bytes = e4m3_rne_satfinite(div_rn(x, s[..., None])).reshape(n, fmt.values)
        scale_bytes[:, :used] = s.contiguous().view(torch.uint8).reshape(n, used)  # little-endian float32
    elif fmt.scale_kind == "e4m3":
        if fmt.value_kind != "e2m1":
            raise ValueError(f"format {fmt.name}: no encoding of {fmt.value_kind} values under e4m3 scales")
        s = torch.clamp(div_rn(a, E2M1_MAX), E2M1_SCALE_MIN, E4M3_MAX)  # in range: e4m3_rne never saturates
        code = e4m3_rne_satfinite(s)
        big_s = code.view(torch.float8_e4m3fn).to(torch.float32)  # S, exact
        v = div_rn(x, big_s[..., None])
        negative = torch.signbit(x) & ~torch.isnan(x)  # -0 keeps its sign; NaN gives 0x0
        nibble = e2m1_nibbles(v, negative).reshape(n, fmt.values // 2, 2)
        value_bytes = (nibble[..., 0] | (nibble[..., 1] << 4)).to(torch.uint8)  # value 2i: the low nibble
        scale_bytes[:, :used] = code
    else:
        raise ValueError(f"format {fmt.name}: unknown scale kind {fmt.scale_kind!r}")
    return value_bytes, scale_bytes


def tail_bytes(tail: torch.Tensor | None, n: int, fmt: Format) -> torch.Tensor:
    """The bf16 tail's bits, little-endian, uint8 [n, fmt.tail_bytes] (no bytes when the format has no tail)."""
    if fmt.tail == 0:
        return torch.empty((n, 0), dtype=torch.uint8, device=tail.device if tail is not None else "cpu")
    if tail is None or tuple(tail.shape) != (n, fmt.tail):
        raise ValueError(f"tail: expected bf16 [{n}, {fmt.tail}], got "
                         f"{None if tail is None else tuple(tail.shape)}")
    return tail.contiguous().view(torch.uint8).reshape(n, fmt.tail_bytes)


def quantize_records(x: torch.Tensor, fmt: Format, pow2_scale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 [n, head_dim] -> (data uint8 [n, data_bytes]: the value bytes then the tail's bits,
    scales uint8 [n, scale_bytes], pad bytes 0): the bytes one token's record holds, whatever the placement."""
    values, tail = x[:, : fmt.values], (x[:, fmt.values:] if fmt.tail else None)
    value_bytes, scale_bytes = encode_records(values, tail, fmt, pow2_scale)
    data = torch.cat([value_bytes, tail_bytes(tail, x.shape[0], fmt).to(value_bytes.device)], dim=1)
    return data, scale_bytes


def region_views(k_cache: torch.Tensor, block_size: int, fmt: Format) -> dict[str, torch.Tensor]:
    """{part: view [num_blocks, block_size, part bytes]} for the parts ("values", "scales", "tail") of
    `fmt.regions(block_size)` that hold bytes, over k_cache's storage, pages k_cache.stride(0) bytes apart
    (the record view [.., record_bytes] and the byte view [.., block_bytes] alike)."""
    page_stride, start, num_blocks = k_cache.stride(0), k_cache.storage_offset(), k_cache.shape[0]
    return {part: k_cache.as_strided((num_blocks, block_size, size), (page_stride, row_stride, 1), start + base)
            for part, (base, row_stride, size) in fmt.regions(block_size).items() if size}


def quantize_and_insert_torch(k: torch.Tensor, k_cache: torch.Tensor, slot_mapping: torch.Tensor,
                              block_size: int, fmt: Format, tail: torch.Tensor | None = None,
                              pow2_scale: bool = False) -> None:
    """Write token i to slot slot_mapping[i] for every i < slot_mapping.shape[0] with a slot >= 0.

    With `tail` None, k is bf16 [T, head_dim] and the tail is k[:, values:]; otherwise k is bf16 [T, values]
    (the quantized part) and `tail` bf16 [T, fmt.tail] (vLLM's concat_and_cache_ds_mla: kv_c and k_pe).
    `pow2_scale` rounds float32 scales up to powers of two (ValueError for other scale kinds).
    Raises ValueError on a slot past the cache (a host-side check: it synchronises, fine here)."""
    if pow2_scale and fmt.scale_kind != "f32":
        raise ValueError(f"pow2_scale: only float32 scales can be rounded to a power of two; format {fmt.name} "
                         f"has {fmt.scale_kind} scales")
    (idx,) = (slot_mapping >= 0).nonzero(as_tuple=True)
    if idx.numel() == 0:
        return
    slot = slot_mapping[idx].to(torch.int64)
    page, row = slot // block_size, slot % block_size
    if bool((page >= k_cache.shape[0]).any()):
        raise ValueError("slot_mapping: a slot lies outside k_cache")
    rows = k[idx.to(k.device)]
    if tail is None:
        values, tail_rows = rows[:, : fmt.values], (rows[:, fmt.values:] if fmt.tail else None)
    else:
        values, tail_rows = rows[:, : fmt.values], tail[idx.to(tail.device)]
    value_bytes, scale_bytes = encode_records(values, tail_rows, fmt, pow2_scale)
    parts = {"values": value_bytes, "scales": scale_bytes, "tail": tail_bytes(tail_rows, idx.numel(), fmt)}
    for part, view in region_views(k_cache, block_size, fmt).items():
        view[page, row] = parts[part].to(k_cache.device)
