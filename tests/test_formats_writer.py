"""The writer on every record format (docs/semantics.md, "Three more record formats", "Writing"), on the CPU.

The torch reference (kvgen/families/quantize_insert/reference.py) against the
independent numpy oracle (.../oracle.py), byte for byte over the whole
poisoned storage under the cache: the shipped formats (dsv4_584, v41_528:
UE8M0 over e4m3; v41_288: e4m3 scales over e2m1; v32_656 inline and
indexer_132: float32 scales, with and without the power-of-two rounding) and
user formats (inline with pad bytes, inline UE8M0, a small NVFP4), on random
data of several magnitudes, random bit patterns and the edge inputs (zeros,
-0, NaN, +-Inf, every e2m1 tie, e4m3 scale-rounding ties, tiny, huge and
subnormal groups), with the tail passed inside k or apart. Then bytes worked
out by hand (which both encoders could not get equally wrong), the bytes a
call may touch, argument errors, and the round trip through the reader.
"""

from __future__ import annotations

import zlib
from fractions import Fraction

import numpy as np
import pytest
import torch

from kvgen.families.dequant_gather.reference import dequantize_and_gather_sparse_torch
from kvgen.families.quantize_insert import oracle
from kvgen.families.quantize_insert.oracle import encode_records, quantize_and_insert_oracle
from kvgen.families.quantize_insert.reference import encode_records as ref_encode_records
from kvgen.families.quantize_insert.reference import quantize_and_insert_torch, quantize_records
from kvgen.formats import Format
from kvgen.testing import POISON_BF16, as_format
from tests.golden import writer_corpus as wc
from tests.golden.writer_corpus import bf16, bits_of, storage_bytes, writer_case

SHIPPED = ("dsv4_584", "v41_528", "v41_288", "v32_656", "indexer_132")
USER_FORMATS = (
    Format("inl_f32", values=256, scale_group=128, tail=8, scale_kind="f32", placement="inline"),  # 8 pad bytes
    Format("inl_ue8m0", values=448, scale_group=64, tail=64, placement="inline"),  # 7 codes + 9 pad bytes
    Format("nv64", values=64, scale_group=16, value_kind="e2m1", scale_kind="e4m3"),  # 4-byte scale rows
)
FORMATS = {**{name: as_format(name) for name in SHIPPED}, **{f.name: f for f in USER_FORMATS}}
WRITERS = {"reference": quantize_and_insert_torch, "oracle": quantize_and_insert_oracle}


def pow2_options(fmt: Format) -> list[bool]:
    return [False, True] if fmt.scale_kind == "f32" else [False]


FORMAT_POW2 = [(name, p) for name, fmt in FORMATS.items() for p in pow2_options(fmt)]


# ---- inputs --------------------------------------------------------------------------------------------------


def exact_bf16_bits(values) -> np.ndarray:
    """bf16 bits of float64 values that bf16 holds exactly (asserted)."""
    f32 = np.asarray(values, dtype=np.float32)
    bits = f32.view(np.uint32)
    assert ((bits & 0xFFFF) == 0).all() and (f32.astype(np.float64) == np.asarray(values)).all(), "not bf16-exact"
    return (bits >> 16).astype(np.uint16)


E2M1_TIES = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
E2M1_STEPS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# e4m3 scales S (bytes' values) for the tie groups: normal, subnormal (3 * 2^-9, 2^-7), the largest.
TIE_SCALES = (1.0, 1.875, 0.3125, 3 * 2.0 ** -9, 2.0 ** -7, 240.0, 448.0)


def e2m1_tie_groups(S: float, G: int, rng) -> list[np.ndarray]:
    """bf16 bits of groups whose amax is 6 * S (so s = a / 6 = S exactly and the scale byte is S's), holding
    between them every e2m1 tie and step times S, either sign, and the bf16 neighbours of each tie."""
    ties = [t * S for t in E2M1_TIES]
    pool = ties + [t * S for t in E2M1_STEPS]
    bits = list(exact_bf16_bits(pool)) + list(exact_bf16_bits([-v for v in pool]))
    near = exact_bf16_bits(ties).astype(np.int64)
    bits += list(near + 1) + list(near - 1) + list((near + 1) | 0x8000) + list((near - 1) | 0x8000)
    bits = np.array(bits, dtype=np.int64)
    rng.shuffle(bits)
    amax = int(exact_bf16_bits([6 * S])[0]) | int(rng.integers(0, 2)) << 15
    return [np.resize(np.concatenate([[amax], bits[i: i + G - 1]]), G) for i in range(0, len(bits), G - 1)]


def below(amax: float, G: int, rng) -> np.ndarray:
    """bf16 bits of G values of either sign below amax in magnitude (float32 truncated: exact bf16)."""
    x = (amax * rng.random(G) * rng.choice([-1.0, 1.0], G)).astype(np.float32)
    return (x.view(np.uint32) >> 16).astype(np.int64)


def edge_groups(G: int, rng) -> list[np.ndarray]:
    """Groups of G bf16 bit patterns reaching each rule's edges, for any format."""
    normal = (rng.standard_normal(G).astype(np.float32).view(np.uint32) >> 16).astype(np.int64)
    groups = [np.zeros(G, np.int64), np.full(G, 0x8000), rng.choice([0x0000, 0x8000], G),  # +0, -0, both
              np.resize([0x7FC0, 0xFFC1, 0x7F81, 0xFFFF], G)]  # all NaN, either sign
    for special in (0x7FC0, 0xFFC0, 0x7F80, 0xFF80):  # one NaN / +Inf / -Inf among ordinary values
        g = normal.copy()
        g[rng.integers(G)] = special
        groups.append(g)
    g = normal.copy()
    g[:2] = [0x7F80, 0xFF80]  # both infinities
    groups.append(g)
    for S in TIE_SCALES:
        groups += e2m1_tie_groups(S, G, rng)
    # e4m3 scale-rounding ties: a / 6 = 1.0625 (a tie: to 1.0), 1.1875 (to 1.25), 1.5 * 2^-9 (to 2 * 2^-9),
    # 2.5 * 2^-9 (to 2 * 2^-9); a / 6 = 448 exactly, and past it (clamped).
    for amax in (6.375, 7.125, 9 * 2.0 ** -9, 15 * 2.0 ** -9, 448.0 * 6, 3072.0):
        g = below(amax, G, rng)
        g[0] = exact_bf16_bits([amax])[0]
        groups.append(g)
    # float32 scales: amax 448 (s = 1), 300 (s = 300/448; pow2: 1), 896, 1.5 * 2^-120 (s floored at 2^-126).
    for amax in (448.0, 300.0, 896.0, 1.5 * 2.0 ** -120):
        g = below(amax, G, rng)
        g[:4] = exact_bf16_bits([amax, -amax / 2, amax / 4, amax / 2])
        groups.append(g)
    groups.append(rng.integers(1, 0x80, G) | (rng.integers(0, 2, G) << 15))  # subnormals only (2^-133 ..)
    tiny = (rng.standard_normal(G) * 1e-6).astype(np.float32).view(np.uint32) >> 16  # amax < 2^-9 * 6, 1e-4
    groups.append(tiny.astype(np.int64))
    g = normal.copy()
    g[0], g[1] = 0x7F7F, 0xFF7F  # the largest bf16 among ordinary values
    groups += [g, np.resize([0x7F7F, 0xFF7F], G)]
    return groups


def fill_edges(tokens: int, fmt: Format, rng) -> torch.Tensor:
    """Every edge group, repeated over the tokens' groups; a tail of random bit patterns."""
    groups = edge_groups(fmt.scale_group, rng)
    n = tokens * fmt.num_scales
    order = np.resize(np.arange(len(groups)), n)
    values = np.stack([groups[i] for i in order]).reshape(tokens, fmt.values)
    tail = rng.integers(0, 1 << 16, (tokens, fmt.tail))
    return bf16(np.concatenate([values, tail], axis=1))


def fill_scaled(scale: float):
    def fill(tokens, fmt, rng):
        x = (rng.standard_normal((tokens, fmt.head_dim)) * scale).astype(np.float32)
        return bf16((x.view(np.uint32) >> 16).astype(np.uint16))  # truncated: exact bf16
    fill.__name__ = f"scaled_{scale:g}"
    return fill


FILLS = {"normal_1e-6": fill_scaled(1e-6), "normal_1": fill_scaled(1.0), "normal_3e4": fill_scaled(3e4),
         "normal_1e30": fill_scaled(1e30), "edges": fill_edges, "zeros": wc.fill_zeros, "tiny": wc.fill_tiny,
         "subnormal": wc.fill_subnormal, "ties": wc.fill_ties, "amax_edges": wc.fill_amax_edges,
         "extremes": wc.fill_extremes, "specials": wc.fill_specials, "random_bits": wc.fill_random_bits}


def tokens_for(fmt: Format) -> int:
    """Enough tokens that every edge group appears (the edge list holds ~30 groups)."""
    return max(24, -(-40 // fmt.num_scales))


def make_case(name: str, fill: str, seed: int, **kw):
    fmt = FORMATS[name]
    kw.setdefault("tokens", tokens_for(fmt))
    kw.setdefault("num_blocks", max(2, -(-kw["tokens"] // kw.get("block_size", 16))))
    return writer_case(format=fmt, block_size=kw.pop("block_size", 16), seed=seed, fill=FILLS[fill], **kw)


def write(case, writer: str, pow2: bool = False, split: bool = False) -> np.ndarray:
    """The whole storage under a fresh copy of the case's poisoned cache after the writer's call. `split`
    passes the tail apart (k [T, values] and a tail [T, tail] in its own strided buffer)."""
    k, k_cache, slots, bs = case.args()
    fmt = case.fmt
    if split:
        buffer = torch.full((k.shape[0], fmt.tail + 5), float("nan"), dtype=torch.bfloat16)
        tail = buffer[:, 3: 3 + fmt.tail]
        tail.copy_(k[:, fmt.values:])
        WRITERS[writer](k[:, : fmt.values], k_cache, slots, bs, fmt, tail=tail, pow2_scale=pow2)
    elif pow2:
        WRITERS[writer](k, k_cache, slots, bs, fmt, pow2_scale=True)
    else:
        WRITERS[writer](k, k_cache, slots, bs, fmt)  # the old positional call
    return storage_bytes(k_cache)


def placement(fmt: Format, block_size: int) -> dict[str, tuple[int, int, int]]:
    """{part: (base, row stride, bytes)} worked out from the docs' prose (not Format.regions)."""
    vb = fmt.values * {"e4m3": 8, "e2m1": 4}[fmt.value_kind] // 8
    sb = fmt.num_scales * {"ue8m0": 1, "e4m3": 1, "f32": 4}[fmt.scale_kind] + fmt.scale_pad
    tb = 2 * fmt.tail
    if fmt.placement == "inline":
        return {"values": (0, vb + sb + tb, vb), "scales": (vb, vb + sb + tb, sb), "tail": (vb + sb, vb + sb + tb, tb)}
    return {"values": (0, vb + tb, vb), "tail": (vb, vb + tb, tb), "scales": (block_size * (vb + tb), sb, sb)}


def addressed(case) -> dict[int, dict[str, np.ndarray]]:
    """{token: {part: byte addresses}} of every token written (distinct slots assumed)."""
    start, stride, fmt = case.k_cache.storage_offset(), case.k_cache.stride(0), case.fmt
    where = {}
    for i, slot in enumerate(case.slot_mapping.tolist()):
        if slot >= 0:
            page, row = divmod(slot, case.block_size)
            where[i] = {part: start + page * stride + base + row * step + np.arange(size)
                        for part, (base, step, size) in placement(fmt, case.block_size).items()}
    return where


# ---- reference == oracle, byte for byte ---------------------------------------------------------------------


@pytest.mark.parametrize("name,pow2", FORMAT_POW2)
@pytest.mark.parametrize("fill", sorted(FILLS))
def test_reference_and_oracle_agree(name, pow2, fill):
    """Every format, every fill, pow2 on and off for float32 scales: the same storage byte for byte, and
    the call wrote something."""
    case = make_case(name, fill, seed=zlib.crc32(f"{name}/{fill}".encode()) % 1000, valid=0.9)
    want = write(case, "oracle", pow2)
    got = write(case, "reference", pow2)
    differ = np.nonzero(got != want)[0]
    assert differ.size == 0, f"{differ.size} byte(s) differ, first at storage byte {differ[0]}"
    assert (want != storage_bytes(case.k_cache)).any()


@pytest.mark.parametrize("view", ["record", "byte_padded", "offset_strided"])
@pytest.mark.parametrize("name,pow2", FORMAT_POW2)
def test_views_strides_and_short_mappings(name, pow2, view):
    """Byte views with padded pages, storage offsets, strided k rows, int32 slots, mappings shorter than k,
    every block size: reference == oracle."""
    kw = {"record": dict(block_size=64, slot_dtype=torch.int32),
          "byte_padded": dict(block_size=32, byte_view=True, block_pad=48, page_pad=16, mapped=20),
          "offset_strided": dict(block_size=128, lead=32, k_row_pad=7, valid=0.5)}[view]
    case = make_case(name, "random_bits", seed=11, **kw)
    assert (write(case, "reference", pow2) == write(case, "oracle", pow2)).all()


@pytest.mark.parametrize("name,pow2", [(n, p) for n, p in FORMAT_POW2 if FORMATS[n].tail])
@pytest.mark.parametrize("fill", ["normal_1", "edges", "random_bits"])
def test_tail_apart_equals_tail_in_k(name, pow2, fill):
    """concat_and_cache_ds_mla's form (kv_c and k_pe apart, k_pe strided) writes what one k does."""
    case = make_case(name, fill, seed=21)
    whole = write(case, "oracle", pow2)
    for writer in WRITERS:
        assert (write(case, writer, pow2, split=True) == whole).all(), writer
    assert (write(case, "reference", pow2) == whole).all()


def test_encoders_agree_on_every_format():
    """reference.encode_records / quantize_records and oracle.encode_records / encode_values: the same bytes,
    shapes and dtypes, pad bytes 0."""
    rng = np.random.default_rng(3)
    for name, pow2 in FORMAT_POW2:
        fmt = FORMATS[name]
        x = fill_edges(37, fmt, rng)
        values, tail = x[:, : fmt.values], (x[:, fmt.values:] if fmt.tail else None)
        vb, sb = ref_encode_records(values, tail, fmt, pow2)
        assert vb.dtype == sb.dtype == torch.uint8
        assert vb.shape == (37, fmt.value_bytes) and sb.shape == (37, fmt.scale_bytes)
        o_values, o_scales = oracle.encode_values(bits_of(values), fmt, pow2)
        assert (vb.numpy() == o_values).all() and (sb.numpy() == o_scales).all(), name
        assert (o_scales[:, fmt.num_scales * fmt.scale_size:] == 0).all()
        data, scales = quantize_records(x, fmt, pow2)
        o_data, o_scales2 = encode_records(bits_of(x), fmt, pow2)
        assert data.shape == (37, fmt.data_bytes) and (data.numpy() == o_data).all() and (scales.numpy() == o_scales2).all()
        if fmt.tail:
            o_data3, _ = encode_records(bits_of(values), fmt, pow2, tail_bits=bits_of(tail))
            assert (o_data3 == o_data).all()
            assert (o_data[:, fmt.value_bytes:] == bits_of(tail).view(np.uint8).reshape(37, -1)).all()


# ---- bytes worked out by hand --------------------------------------------------------------------------------


def one_record(name: str, values: list[float] | np.ndarray, pow2: bool = False, tail_bits=None):
    """(value bytes, scale bytes, tail bytes) of a single token written at slot 3 of a 16-row page, by
    each writer (asserted equal), read from the page at the docs' placement. `values` may be float64 values
    (bf16-exact) or uint16 bits; the rest of the row is +0."""
    fmt = FORMATS[name]
    bits = np.zeros(fmt.head_dim, dtype=np.int64)
    v = np.asarray(values)
    bits[: len(v)] = v if v.dtype == np.uint16 else exact_bf16_bits(v)
    if tail_bits is not None:
        bits[fmt.values:] = tail_bits
    case = writer_case(format=fmt, block_size=16, seed=5, tokens=1, num_blocks=1,
                       fill=lambda t, f, r: bf16(bits[None, :]), slots=[3])
    storages = {writer: write(case, writer, pow2) for writer in WRITERS}
    assert (storages["reference"] == storages["oracle"]).all()
    at = addressed(case)[0]
    got = storages["reference"]
    return tuple(got[at[part]].tolist() for part in ("values", "scales", "tail"))


def nibbles_to_bytes(nibbles: list[int]) -> list[int]:
    return [lo | hi << 4 for lo, hi in zip(nibbles[0::2], nibbles[1::2])]


def test_v41_288_by_hand():
    steps = list(E2M1_STEPS)
    # Group 0: amax 6 -> s = 1.0, scale byte 0x38; each value an e2m1 step: its own code, -0 included.
    g0 = steps + [-v for v in steps]
    want0 = nibbles_to_bytes(list(range(8)) + list(range(8, 16)))
    assert want0 == [0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE]
    # Group 1: every tie at S = 1: 0.25 -> 0, 0.75 -> 1.0, 1.25 -> 1.0, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4.
    g1 = list(E2M1_TIES) + [6.0] + [-t for t in E2M1_TIES] + [-6.0]
    want1 = [0x20, 0x42, 0x64, 0x76, 0xA8, 0xCA, 0xEC, 0xFE]
    # Group 2: the same ties at S = 0.3125 (amax 1.875; scale byte 0x2A = 1.25 * 2^-2).
    g2 = [v * 0.3125 for v in g1]
    # Group 3: just past the ties (one bf16 step up) at S = 1: each rounds up.
    g3_bits = list(exact_bf16_bits(E2M1_TIES).astype(np.int64) + 1) + list(exact_bf16_bits([6.0]))
    g3 = [float(bf16(np.array([b])).float()) for b in g3_bits] + [0.0] * 8
    want3 = [0x21, 0x43, 0x65, 0x77, 0x00, 0x00, 0x00, 0x00]
    # Group 4: amax 6.375 -> s = 1.0625, an e4m3 tie -> 1.0 (0x38); 6.375 -> 6 (code 7), 0.1 -> 0, -0.1 -> -0.
    g4 = [6.375, 0.099609375, -0.099609375, -6.375] + [0.0] * 12
    want4 = [0x07, 0xF8] + [0] * 6
    # Group 5: amax 7.125 -> s = 1.1875, a tie between 1.125 (0x39) and 1.25 (0x3A): to 0x3A; 7.125/1.25 = 5.7.
    g5 = [7.125, -2.5] + [0.0] * 14  # -2.5 / 1.25 = -2 -> 0xC
    want5 = [0xC7] + [0] * 7
    values, scales, _ = one_record("v41_288", g0 + g1 + g2 + g3 + g4 + g5)
    assert values[:48] == want0 + want1 + want1 + want3 + want4 + want5
    assert scales[:6] == [0x38, 0x38, 0x2A, 0x38, 0x38, 0x3A]
    assert values[48:] == [0] * (256 - 48) and scales[6:] == [0x01] * 26  # zero groups: s = 2^-9 (0x01)

    # NaN, Inf, tiny, huge: all NaN (s = 2^-9, nibbles 0); a NaN of either sign among values (0x0);
    # +-Inf (s = min(Inf, 448): 0x7E; Inf -> 6, 1/448 -> 0); amax 1e-5 (s floored: 0x01; 1e-5 / 2^-9 -> 0);
    # the largest bf16 (s = 448; both ends saturate); a subnormal S: amax 18 * 2^-9 -> S = 3 * 2^-9 (0x03).
    nan = [0x7FC0, 0xFFC1] * 8
    some_nan = list(exact_bf16_bits([6.0, 1.0])) + [0xFFC0, 0x7FC0] + [0] * 12
    inf = [0x7F80, 0xFF80] + list(exact_bf16_bits([1.0, -1.0])) + [0] * 12
    tiny = [0x3728, 0xB728] + [0] * 14  # +-1.0014e-5
    huge = [0x7F7F, 0xFF7F] + list(exact_bf16_bits([448.0, -224.0])) + [0] * 12
    sub = list(exact_bf16_bits([18 * 2.0 ** -9, 3 * 2.0 ** -9, -4.5 * 2.0 ** -9])) + [0] * 13
    bits = np.array(nan + some_nan + inf + tiny + huge + sub, dtype=np.uint16)
    values, scales, _ = one_record("v41_288", bits)
    assert scales[:6] == [0x01, 0x38, 0x7E, 0x01, 0x7E, 0x03]
    assert values[0:8] == [0] * 8
    assert values[8:16] == [0x27, 0x00] + [0] * 6  # 6 -> 7, 1 -> 2; the NaNs -> 0x0 (no sign)
    assert values[16:24] == [0xF7, 0x80] + [0] * 6  # +Inf 7, -Inf 0xF; +-1/448 -> +0, -0
    assert values[24:32] == [0x80] + [0] * 7  # +-1e-5 / 2^-9 -> 0: +0, -0
    assert values[32:40] == [0xF7, 0x92] + [0] * 6  # +-max -> +-6; 448 / 448 = 1 -> 2; -224/448 = -0.5 -> 0x9
    assert values[40:48] == [0x27, 0x0B] + [0] * 6  # 6 -> 7, 1 -> 2, -1.5 -> 0xB


def f32_round(q: Fraction) -> float:
    """The float32 nearest a rational (ties to even, subnormals kept, overflow to Inf), worked out exactly."""
    if q == 0:
        return 0.0
    sign, mag = (-1.0 if q < 0 else 1.0), abs(q)
    e = mag.numerator.bit_length() - mag.denominator.bit_length()
    e = e if mag >= Fraction(2) ** e else e - 1  # 2^e <= mag < 2^(e+1)
    ulp = Fraction(2) ** (max(e, -126) - 23)
    n, rest = divmod(mag, ulp)
    n += 1 if rest * 2 > ulp or (rest * 2 == ulp and n % 2) else 0
    result = n * ulp
    return sign * (float("inf") if result >= Fraction(2) ** 128 else float(result))


def f32_bytes(value: float) -> list[int]:
    return list(np.array([value], dtype=np.float32).view(np.uint8))


def test_v32_656_by_hand():
    fmt = FORMATS["v32_656"]
    assert f32_bytes(1.0) == [0x00, 0x00, 0x80, 0x3F]
    # Group 0: amax 448 -> s = 1.0: the values themselves; group 1: amax 896 -> s = 2.0; group 2: +Inf ->
    # s = +Inf (00 00 80 7F): finite values -> +-0, Inf / Inf -> NaN (0x7F); group 3: zeros -> s = 2^-126.
    g0 = [448.0, 1.0, -2.0, 2.0 ** -9, -0.0, 0.0625 * 1.0625, -250.0] + [0.0] * 121
    g1 = [896.0, 3.0, -896.0] + [0.0] * 125
    tail = np.arange(64) * 0x0101 + 0x0102  # bit patterns, copied verbatim
    values = g0 + g1
    bits = list(exact_bf16_bits(values)) + [0x7F80, 0xFF80] + list(exact_bf16_bits([5.0, -5.0])) + [0] * 124
    bits += [0] * 128
    v, s, t = one_record("v32_656", np.array(bits, dtype=np.uint16), tail_bits=tail)
    assert v[:7] == [0x7E, 0x38, 0xC0, 0x01, 0x80, 0x18, 0xF8]  # 2^-4 * 1.0625: a tie -> 2^-4; -250 -> -256
    assert v[128:131] == [0x7E, 0x3C, 0xFE]  # 3 / 2 = 1.5
    assert v[256:260] == [0x7F, 0x7F, 0x00, 0x80]
    assert v[384:] == [0] * 128
    assert s == f32_bytes(1.0) + f32_bytes(2.0) + f32_bytes(float("inf")) + f32_bytes(2.0 ** -126)
    assert s[8:12] == [0x00, 0x00, 0x80, 0x7F] and s[12:] == [0x00, 0x00, 0x80, 0x00]
    assert t == list(tail.astype(np.uint16).view(np.uint8))
    # The inline record's bytes in order: values at 0, scales at 512, tail at 528.
    assert placement(fmt, 16) == {k: v for k, v in fmt.regions(16).items()}


def test_indexer_132_by_hand():
    # amax 300: s = fl32(300 / 448) (0.66964...); 300 / s rounds to 448 (0x7E). With pow2, s = 1.0 and
    # 300 -> 288 (0x79), 100 -> 96 (0x6C), -1 -> 0xB8.
    g = [300.0, 100.0, -1.0] + [0.0] * 125
    s = f32_round(Fraction(300, 448))
    assert 0.66 < s < 0.67
    v, scales, _ = one_record("indexer_132", g)
    assert scales == f32_bytes(s)
    q = [f32_round(Fraction(x) / Fraction(s)) for x in (300.0, 100.0, -1.0)]
    assert 447.9 < q[0] < 448.1 and 149.0 < q[1] < 149.5 and -1.5 < q[2] < -1.49
    assert v[:3] == [0x7E, 0x71, 0xBC]  # 448; 149.33 -> 144 (0x71); -1.4933 -> -1.5 (0xBC)
    v, scales, _ = one_record("indexer_132", g, pow2=True)
    assert scales == [0x00, 0x00, 0x80, 0x3F] and v[:3] == [0x79, 0x6C, 0xB8]
    # A subnormal bf16 group: amax 2^-133 / 448 < 2^-126 -> s = 2^-126 (00 00 80 00); 2^-133 / 2^-126 = 2^-7
    # (0x04 = 4 * 2^-9); pow2 keeps a power of two.
    for pow2 in (False, True):
        v, scales, _ = one_record("indexer_132", np.array([0x0001, 0x8001, 0x0003] + [0] * 125, np.uint16), pow2)
        assert scales == [0x00, 0x00, 0x80, 0x00] and v[:3] == [0x04, 0x84, 0x0C]
    # The largest bf16: s = fl32(max / 448) = 2^119.19..; pow2 -> 2^120 (00 00 80 7B); max / 2^120 = 255 -> 256.
    v, scales, _ = one_record("indexer_132", np.array([0x7F7F, 0xFF7F] + [0] * 126, np.uint16), pow2=True)
    assert scales == [0x00, 0x00, 0x80, 0x7B] and v[:2] == [0x78, 0xF8]
    v, scales, _ = one_record("indexer_132", np.array([0x7F7F, 0xFF7F] + [0] * 126, np.uint16))
    big = float(bf16(np.array([0x7F7F])).float())
    assert scales == f32_bytes(f32_round(Fraction(big) / 448)) and v[:2] == [0x7E, 0xFE]
    # A NaN among values is ignored by the amax and gives 0x7F; +-Inf -> s = Inf; all NaN -> s = 2^-126.
    v, scales, _ = one_record("indexer_132", np.array([0x7FC0, 0xFFC1] + list(exact_bf16_bits([448.0])) + [0] * 125,
                                                      np.uint16))
    assert scales == f32_bytes(1.0) and v[:3] == [0x7F, 0x7F, 0x7E]
    v, scales, _ = one_record("indexer_132", np.array([0xFFC1] * 128, np.uint16), pow2=True)
    assert scales == [0x00, 0x00, 0x80, 0x00] and v == [0x7F] * 128


def test_numpy_float32_division_is_correctly_rounded():
    """The oracle's one trusted float32 operation, against exact rational rounding (subnormal results too)."""
    rng = np.random.default_rng(9)
    num = np.concatenate([rng.integers(1, 256, 300) * np.ldexp(1.0, rng.integers(-140, 120, 300)),
                          [300.0, 1.0, 2.0 ** -133, 3.3895313892515355e38]])
    den = np.concatenate([np.array([f32_round(Fraction(float(d))) for d in rng.random(300) * 10.0 ** rng.integers(-5, 5, 300)]),
                          [448.0, 6.0, 448.0, 448.0]])
    got = oracle.f32_divide(num, den)
    want = np.array([f32_round(Fraction(float(a)) / Fraction(float(b))) for a, b in zip(num, den)])
    assert (got == want).all()


# ---- what is touched, and argument errors -------------------------------------------------------------------


@pytest.mark.parametrize("name,pow2", FORMAT_POW2)
def test_only_the_addressed_rows_change(name, pow2):
    """Only each written token's values, scales (pad bytes 0) and tail bytes change, at the docs' placement,
    holding the oracle's encoding; skipped tokens, tokens past the mapping and page padding keep their bytes."""
    fmt = FORMATS[name]
    case = make_case(name, "random_bits", seed=31, byte_view=True, block_size=32, block_pad=32, page_pad=16,
                     lead=16, mapped=tokens_for(fmt) - 3, valid=0.7)
    before = storage_bytes(case.k_cache)
    for writer in WRITERS:
        after = write(case, writer, pow2)
        where = addressed(case)
        mask = np.zeros(after.shape, dtype=bool)
        data, scales = encode_records(bits_of(case.k), fmt, pow2)
        for i, parts in where.items():
            for part in parts.values():
                mask[part] = True
            assert (after[parts["values"]] == data[i, : fmt.value_bytes]).all(), (writer, i)
            assert (after[parts["tail"]] == data[i, fmt.value_bytes:]).all(), (writer, i)
            assert (after[parts["scales"]] == scales[i]).all(), (writer, i)
            assert (after[parts["scales"][fmt.num_scales * fmt.scale_size:]] == 0).all()
        outside = np.nonzero((after != before) & ~mask)[0]
        assert outside.size == 0, f"{writer}: {outside.size} byte(s) changed outside the addressed rows"
        assert len(where) > 3 and (after[mask] != before[mask]).any()


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_argument_errors(writer):
    fn = WRITERS[writer]
    for name in ("dsv4_584", "v41_288"):  # pow2 only for float32 scales
        case = make_case(name, "normal_1", seed=1)
        k, k_cache, slots, bs = case.args()
        before = storage_bytes(k_cache)
        with pytest.raises(ValueError, match="pow2"):
            fn(k, k_cache, slots, bs, case.fmt, pow2_scale=True)
        assert (storage_bytes(k_cache) == before).all()
    case = make_case("v32_656", "normal_1", seed=1, slots=[0, -1, 2 * 16], num_blocks=2)  # slot 32: past the cache
    k, k_cache, slots, bs = case.args()
    before = storage_bytes(k_cache)
    with pytest.raises(ValueError, match="outside k_cache"):
        fn(k, k_cache, slots, bs, case.fmt)
    assert (storage_bytes(k_cache) == before).all()
    case = make_case("indexer_132", "normal_1", seed=1, slots=[-1, -1, -1])
    k, k_cache, slots, bs = case.args()
    fn(k, k_cache, slots, bs, case.fmt, pow2_scale=True)  # every token skipped: nothing written
    assert (storage_bytes(k_cache) == storage_bytes(case.k_cache)).all()
    if writer == "reference":
        fmt = FORMATS["v41_288"]
        with pytest.raises(ValueError, match="pow2"):
            ref_encode_records(torch.zeros((2, fmt.values), dtype=torch.bfloat16), None, fmt, pow2_scale=True)
        with pytest.raises(ValueError, match="values"):
            ref_encode_records(torch.zeros((2, fmt.values + 1), dtype=torch.bfloat16), None, fmt)


# ---- the round trip through the reader ----------------------------------------------------------------------


def half_steps(fmt: Format, x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Half the value format's step at |x| / scale, times the scale (x float64, scale per value)."""
    v = np.abs(x) / scale
    if fmt.value_kind == "e2m1":
        return np.where(v < 2, 0.25, np.where(v < 4, 0.5, 1.0)) * scale
    binade = np.maximum(np.frexp(v)[1] - 1, -6)  # e4m3 exponent of the scaled value (floor log2)
    return np.ldexp(1.0, binade - 4) * scale


def decoded_scales(fmt: Format, scales: np.ndarray) -> np.ndarray:
    """float64 [n, num_scales] of written scale bytes."""
    used = scales[:, : fmt.num_scales * fmt.scale_size]
    if fmt.scale_kind == "ue8m0":
        return np.ldexp(1.0, used.astype(np.int32) - 127)
    if fmt.scale_kind == "e4m3":
        return oracle.E4M3_TABLE[used]
    return np.ascontiguousarray(used).view("<f4").astype(np.float64)


@pytest.mark.parametrize("name", SHIPPED)
def test_round_trip_through_the_reader(name):
    """Reading written rows back (the sparse torch reader) gives the tail exactly and each finite value within
    half a step of its format at its scale (plus the float32 and bf16 roundings of the read's product where
    the scale is a float32)."""
    fmt = FORMATS[name]
    # e2m1 under an e4m3 scale reaches 6 * 448 = 2688 at most: larger groups saturate (checked below).
    for seed, scale in enumerate((1e-6, 1.0, 100.0 if fmt.value_kind == "e2m1" else 3e4, 3e4)):
        case = make_case(name, "normal_1", seed=300 + seed, tokens=40, block_size=32, num_blocks=2)
        case.k[:] = (case.k.float() * scale).to(torch.bfloat16)
        k, k_cache, slots, bs = case.args()
        quantize_and_insert_torch(k, k_cache, slots, bs, fmt)
        out = torch.empty((slots.shape[0], fmt.head_dim), dtype=torch.bfloat16)
        out.view(torch.int16).fill_(POISON_BF16)
        dequantize_and_gather_sparse_torch(out, k_cache, slots.to(torch.int32), bs)
        valid = (slots >= 0).numpy()
        got = out.float().numpy()[valid].astype(np.float64)
        want = k.float().numpy()[valid].astype(np.float64)
        assert (bits_of(out)[~valid] == POISON_BF16).all()
        assert (bits_of(out[valid])[:, fmt.values:] == bits_of(k[valid])[:, fmt.values:]).all()
        _, scales = encode_records(bits_of(k[valid]), fmt)
        group_scale = np.repeat(decoded_scales(fmt, scales), fmt.scale_group, axis=1)
        x = want[:, : fmt.values]
        bound = half_steps(fmt, x, group_scale) + 2.0 ** -23 * np.abs(x)
        if fmt.scale_kind == "f32":  # the read's product is rounded to float32 and then to bf16
            bound += 2.0 ** -8 * np.abs(got[:, : fmt.values]) + 2.0 ** -133
        error = np.abs(got[:, : fmt.values] - x)
        if fmt.value_kind == "e2m1" and scale == 3e4:  # S = 448: |x| > 5 * 448 reads back as +-2688
            assert (group_scale == 448).mean() > 0.9
            big = (np.abs(x) > 5 * 448) & (group_scale == 448)
            assert big.any() and (got[:, : fmt.values][big] == np.sign(x[big]) * 2688).all()
            continue
        assert (error <= bound).all(), (name, seed, float((error / bound).max()))
