"""The reader for every record format (docs/semantics.md, "Three more record formats"): the torch
reference against the independent numpy oracle, bit for bit, on random quantized caches, raw random
bytes and hand-made edge records, through dense, sparse, packed and raw packed gathers; plus values
computed by hand, so that the two cannot pass by being equally wrong. CPU only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvgen.families.dequant_gather import oracle
from kvgen.families.dequant_gather.oracle import (dequantize_and_gather_oracle, dequantize_and_gather_packed_oracle,
                                                  dequantize_and_gather_sparse_oracle, gather_raw_packed_oracle)
from kvgen.families.dequant_gather.reference import (dequantize_and_gather_packed_torch, dequantize_and_gather_torch,
                                                     dequantize_and_gather_sparse_torch, gather_raw_packed_torch,
                                                     packed_plan, raw_records)
from kvgen.testing import (POISON_BF16, POISON_BYTE, as_format, first_mismatch, make_cache, make_case,
                           make_packed_case, make_raw_packed_case, make_sparse_case, poisoned_out, whole_storage,
                           write_pages)

FORMATS = ("dsv4_584", "v41_528", "v41_288", "v32_656", "indexer_132")
NEW_FORMATS = ("v41_288", "v32_656", "indexer_132")
PAGE_SPLIT = ("dsv4_584", "v41_528", "v41_288", "indexer_132")

# float32 scale words: zeros, subnormals, the smallest normal, huge, Inf, NaN, and ordinary ones
# (0x3FBF6276 makes a double rounding differ from a single one: see test_v32_656_by_hand).
F32_EDGES = (0x00000000, 0x80000000, 0x00000001, 0x80000001, 0x007FFFFF, 0x807FFFFF, 0x00800000, 0x00400000,
             0x7F7FFFFF, 0xFF7FFFFF, 0x7F000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001, 0x7F800001,
             0x3F800000, 0x40400000, 0xBF800000, 0x3FBF6276, 0x3F7FFFFF, 0x3F808000, 0x3F818000, 0x0D800000,
             0x33800000, 0x2E000000, 0x5F000000, 0x62000000)
# e4m3 scale bytes: +-0, subnormals, 1.0, +-448, NaNs (then every byte, row by row).
E4M3_SCALE_EDGES = (0x00, 0x80, 0x01, 0x81, 0x07, 0x08, 0x38, 0xB8, 0x7E, 0xFE, 0x7F, 0xFF)


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.int16).numpy().view(np.uint16)


def _agree(reference, oracle_fn, args_of, out: torch.Tensor, label: str = "") -> torch.Tensor:
    """Run both on copies of `out`; they must agree under the comparison rule. Returns the reference's."""
    a, b = out.clone(), out.clone()
    reference(*args_of(a))
    oracle_fn(*args_of(b))
    problem = first_mismatch(a, b)
    assert problem is None, f"{label}: reference vs oracle: {problem}"
    return a


# ---- random caches: quantized and raw bytes ----------------------------------------------------

@pytest.mark.parametrize("raw", [False, True], ids=["quantized", "raw"])
@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("fmt", FORMATS)
def test_dense_random(fmt, block_size, raw):
    case = make_case(seq_lens=[2 * block_size + 3, 5, 40], gather_lens=[block_size + 1, 5, 0], block_size=block_size,
                     format=fmt, raw_bytes=raw, page_pad=16, block_table_pad=2, offset=1, seed=block_size + raw)
    out = _agree(dequantize_and_gather_torch, dequantize_and_gather_oracle, lambda o: case.args(out=o), case.out,
                 f"{fmt} b{block_size}")
    head_dim = as_format(fmt).head_dim
    assert out.shape[-1] == head_dim
    written = _bits(out[:, 1:]) != POISON_BF16
    assert written[0, : block_size + 1].all() and not written[0, block_size + 1:].any()
    assert written[1, :5].all() and not written[2].any()
    assert (_bits(out[:, 0]) == POISON_BF16).all()  # rows before offset


@pytest.mark.parametrize("raw", [False, True], ids=["quantized", "raw"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_sparse_random(fmt, raw):
    case = make_sparse_case(num_slots=70, valid=0.8, block_size=32, format=fmt, raw_bytes=raw, page_pad=32,
                            out_shape=(7, 10), seed=7 + raw)
    out = _agree(dequantize_and_gather_sparse_torch, dequantize_and_gather_sparse_oracle,
                 lambda o: case.args(out=o), case.out, fmt)
    skipped = (case.slot_indices < 0).reshape(7, 10)
    assert ((_bits(out) == POISON_BF16).all(-1) == skipped.numpy()).all()


@pytest.mark.parametrize("raw", [False, True], ids=["quantized", "raw"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_caches_are_plausible(fmt, raw):
    """Quantized caches hold finite records: no NaN value bytes or scales (those are raw_bytes' job)."""
    f = as_format(fmt)
    cache = make_cache(4, 16, f, torch.Generator().manual_seed(3), raw_bytes=raw)
    page, row = torch.arange(4).repeat_interleave(16), torch.arange(16).repeat(4)
    values, scales = raw_records(cache, 16, page, row)
    assert values.shape == (64, f.value_bytes) and scales.shape == (64, f.num_scales * f.scale_size)
    if raw:
        return
    if f.value_kind == "e4m3":
        assert not ((values & 0x7F) == 0x7F).any()
    if f.scale_kind == "e4m3":
        assert not ((scales & 0x7F) == 0x7F).any() and not (scales & 0x80).any()
    if f.scale_kind == "f32":
        s = scales.reshape(64, f.num_scales, 4).contiguous().view(torch.float32)
        assert torch.isfinite(s).all() and (s > 0).all()


@pytest.mark.parametrize("fmt", NEW_FORMATS)
def test_quantized_caches_without_an_encoder(fmt, monkeypatch):
    """Where the writer's reference has no encode_records, make_cache draws plausible records itself."""
    from kvgen.families.quantize_insert import reference as writer

    monkeypatch.delattr(writer, "encode_records", raising=False)
    f = as_format(fmt)
    cache = make_cache(2, 16, f, torch.Generator().manual_seed(3))
    values, scales = raw_records(cache, 16, torch.arange(2).repeat_interleave(16), torch.arange(16).repeat(2))
    if f.value_kind == "e4m3":
        assert not ((values & 0x7F) == 0x7F).any()
    if f.scale_kind == "e4m3":
        assert ((scales >= 0x30) & (scales <= 0x50)).all()
    else:
        s = scales.reshape(32, f.num_scales, 4).contiguous().view(torch.float32)
        assert torch.isfinite(s).all() and (s > 0).all()
    out = poisoned_out(1, 32, head_dim=f.head_dim)[0]
    out = _agree(dequantize_and_gather_sparse_torch, dequantize_and_gather_sparse_oracle,
                 lambda o: (o, cache, torch.arange(32, dtype=torch.int32), 16), out, fmt)
    assert torch.isfinite(out.float()).all()


# ---- packed gathers ------------------------------------------------------------------------------

PACKED_SHAPES = {
    "plain": dict(seq_lens=[20, 33, 7]),
    "seq_starts": dict(seq_lens=[20, 33, 7], seq_starts=[5, 0, 70]),
    "gap_empty_requests": dict(seq_lens=[0, 18, 0, 0, 25], seq_starts=[3, 1, 0, 9, 2], workspace_gap=3),
    "rows_past_the_requests": dict(seq_lens=[10, 12], workspace_gap=2, rows=40),
    "rows_cut_short": dict(seq_lens=[10, 12, 30], rows=15),
    "empty_batch": dict(seq_lens=[], rows=4),
}


@pytest.mark.parametrize("raw", [False, True], ids=["quantized", "raw"])
@pytest.mark.parametrize("shape", sorted(PACKED_SHAPES))
@pytest.mark.parametrize("fmt", FORMATS)
def test_packed_random(fmt, shape, raw):
    spec = PACKED_SHAPES[shape]
    case = make_packed_case(**spec, block_size=16, format=fmt, raw_bytes=raw, page_pad=16, row_pad=8,
                            seed=len(shape) + raw)
    out = _agree(dequantize_and_gather_packed_torch, dequantize_and_gather_packed_oracle,
                 lambda o: case.reference_args(out=o), case.out, f"{fmt} {shape}")
    rows = out.shape[0]
    first = int(case.workspace_starts[0]) if case.batch_size else rows
    poisoned = (_bits(out) == POISON_BF16).all(-1)
    assert poisoned[:first].all() and not poisoned[first:].any()  # rows before starts[0] untouched, the rest written
    # The row padding between dst rows is never written.
    storage = whole_storage(out).view(torch.int16).numpy().view(np.uint16).reshape(rows, -1)
    assert (storage[:, out.shape[1]:] == POISON_BF16).all()


@pytest.mark.parametrize("raw", [False, True], ids=["quantized", "raw"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_raw_packed_random(fmt, raw):
    f = as_format(fmt)
    case = make_raw_packed_case(seq_lens=[20, 0, 37, 3], block_size=16, format=fmt, first_row=2, extra_rows=3,
                                raw_bytes=raw, page_pad=16, seed=11 + raw)
    got = {}
    for name, fn in (("torch", gather_raw_packed_torch), ("oracle", gather_raw_packed_oracle)):
        dst_k, dst_scale = case.dst_k.clone(), case.dst_scale.clone()
        fn(*case.reference_args(dst_k=dst_k, dst_scale=dst_scale))
        got[name] = dst_k, dst_scale
    assert torch.equal(got["torch"][0], got["oracle"][0]) and torch.equal(got["torch"][1], got["oracle"][1])
    dst_k, dst_scale = got["torch"]
    cu = case.cu_seq_lens.tolist()
    # Rows before cu_seq_lens[0] and past cu_seq_lens[-1]: untouched.
    for t in [*range(cu[0]), *range(cu[-1], dst_k.shape[0])]:
        assert (dst_k[t] == POISON_BYTE).all() and (dst_scale[t] == POISON_BYTE).all()
    # Every other row: exactly the record's bytes, found here by the placement's arithmetic.
    storage = whole_storage(case.k_cache)
    regions = f.regions(16)
    for r in range(len(cu) - 1):
        for t in range(cu[r], cu[r + 1]):
            p = t - cu[r]
            start = case.k_cache.storage_offset() + int(case.block_table[r, p // 16]) * case.k_cache.stride(0)
            (vb, vs, _), (sb, ss, _) = regions["values"], regions["scales"]
            at_v = start + vb + (p % 16) * vs
            at_s = start + sb + (p % 16) * ss
            assert torch.equal(dst_k[t], storage[at_v: at_v + f.value_bytes])
            assert torch.equal(dst_scale[t], storage[at_s: at_s + f.num_scales * f.scale_size])


def test_packed_plan_by_hand():
    starts = torch.tensor([2, 5, 5, 9], dtype=torch.int32)
    seq_starts = torch.tensor([0, 3, 7, 1], dtype=torch.int32)
    # Rows 0, 1: no request; 2..4: request 0 (positions 0..2); request 1 owns no row (request 2 also starts
    # at 5 and is the last with starts <= t); 5..8: request 2 (7..10); 9..11: request 3 (1..3).
    rows, reqs, pos = list(range(2, 12)), [0] * 3 + [2] * 4 + [3] * 3, [0, 1, 2, 7, 8, 9, 10, 1, 2, 3]
    for plan in (packed_plan(starts, 4, 12, False, seq_starts),
                 oracle._packed_rows(starts.numpy().astype(np.int64), 4, 12, False,
                                     seq_starts.numpy().astype(np.int64))):
        assert [list(map(int, x)) for x in plan] == [rows, reqs, pos]
    # Bounded (cu_seq_lens [2, 5, 5, 9]: three requests): rows >= 9 are not written; positions from 0.
    t, r, p = packed_plan(starts, 3, 12, True)
    assert t.tolist() == list(range(2, 9)) and r.tolist() == [0] * 3 + [2] * 4 and p.tolist() == [0, 1, 2, 0, 1, 2, 3]
    # Decreasing starts are refused (the unchecked GPU paths give no defined answer), bound included.
    dec = torch.tensor([0, 6, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match="in order"):
        packed_plan(dec, 3, 8, False)
    with pytest.raises(ValueError, match="in order"):
        oracle._packed_rows(dec.numpy().astype(np.int64), 3, 8, False, None)
    with pytest.raises(ValueError, match="in order"):
        packed_plan(torch.tensor([0, 6, 3], dtype=torch.int32), 2, 8, True)  # cu_seq_lens [0, 6, 3]
    equal = torch.tensor([4, 4, 4], dtype=torch.int32)  # equal starts: the last request owns every row
    assert packed_plan(equal, 3, 6, False)[1].tolist() == [2, 2]
    # No requests, no rows.
    assert all(x.numel() == 0 for x in packed_plan(starts, 0, 12, False))
    assert all(x.numel() == 0 for x in packed_plan(starts, 4, 0, False))


@pytest.mark.parametrize("fmt", ["v32_656", "indexer_132"])
def test_packed_rows_are_the_dense_rows(fmt):
    """A packed gather's row t is the same record a sparse gather of its slot decodes."""
    case = make_packed_case(seq_lens=[9, 0, 21], seq_starts=[4, 2, 17], workspace_gap=1, block_size=16,
                            format=fmt, seed=5)
    out = case.out.clone()
    dequantize_and_gather_packed_torch(*case.reference_args(out=out))
    starts, seq_starts = case.workspace_starts.tolist(), case.seq_starts.tolist()
    slots = []
    for t in range(1, out.shape[0]):
        r = max(i for i in range(case.batch_size) if starts[i] <= t)
        p = t - starts[r] + seq_starts[r]
        slots.append(int(case.block_table[r, p // 16]) * 16 + p % 16)
    expected = poisoned_out(1, len(slots), head_dim=as_format(fmt).head_dim)[0]
    dequantize_and_gather_sparse_oracle(expected, case.k_cache, torch.tensor(slots, dtype=torch.int32), 16)
    assert first_mismatch(out[1:], expected) is None


@pytest.mark.parametrize("fn", [dequantize_and_gather_packed_torch, dequantize_and_gather_packed_oracle])
def test_packed_refuses_positions_outside_the_table(fn):
    case = make_packed_case(seq_lens=[5, 6], seq_starts=[0, 0], block_size=16, format="v32_656", seed=1)
    width = case.block_table.shape[1]
    with pytest.raises(ValueError, match="block_table"):  # a position past the request's row
        fn(*case.reference_args(out=case.out.clone())[:5], torch.tensor([0, 16 * width], dtype=torch.int32), 16)
    table = case.block_table.clone()
    table[1, 0] = case.k_cache.shape[0]  # a page past the cache
    args = list(case.reference_args(out=case.out.clone()))
    args[2] = table
    with pytest.raises(ValueError, match="page"):
        fn(*args)


@pytest.mark.parametrize("fn", [gather_raw_packed_torch, gather_raw_packed_oracle])
def test_raw_packed_refuses_pages_outside_the_cache(fn):
    case = make_raw_packed_case(seq_lens=[5, 6], block_size=16, format="indexer_132", seed=1)
    args = list(case.reference_args())
    args[3] = case.block_table.clone()
    args[3][0, 0] = -1
    with pytest.raises(ValueError, match="page"):
        fn(*args)


# ---- hand-made edge records ----------------------------------------------------------------------

def _edge_records(f, n: int, seed: int):
    """(value bytes [n, value_bytes], used scale bytes [n, num_scales * scale_size], tail bytes) of n
    records covering every value byte (so every e2m1 nibble pair), every e4m3 / ue8m0 scale byte, and the
    float32 edge words, in many combinations."""
    g = torch.Generator().manual_seed(seed)
    row = torch.arange(n)[:, None]
    values = ((torch.arange(f.value_bytes)[None, :] + 37 * row) % 256).to(torch.uint8)
    k = torch.arange(f.num_scales)[None, :] + 5 * row
    if f.scale_kind == "f32":
        words = list(F32_EDGES) + torch.randint(0, 1 << 32, (64,), generator=g, dtype=torch.int64).tolist()
        w = torch.tensor(words, dtype=torch.int64)[k % len(words)]
        scales = torch.stack([(w >> (8 * i)) & 0xFF for i in range(4)], dim=-1).to(torch.uint8).reshape(n, -1)
    else:
        pool = torch.tensor(list(E4M3_SCALE_EDGES) + list(range(256)), dtype=torch.uint8)
        scales = pool[k % len(pool)]
    tail = torch.randint(0, 256, (n, f.tail_bytes), generator=g, dtype=torch.uint8)
    tail[:, 0:24] = torch.tensor([0x80, 0x7F, 0xC1, 0x7F, 0x01, 0x80, 0x00, 0x80, 0x80, 0xFF, 0x01, 0x00,
                                  0x00, 0x00, 0x81, 0x7F, 0x7F, 0x7F, 0xC0, 0xFF, 0x40, 0x00, 0x01, 0x00],
                                 dtype=torch.uint8)[: f.tail_bytes]
    return values, scales, tail


def _cache_of(f, block_size: int, values, scales, tail, seed: int = 0, page_pad: int = 16, pad_byte: int = 0x7F):
    """A cache holding the given records in slot order; pad bytes after the scales are `pad_byte`
    (a NaN for byte scales: reading one would show)."""
    n = values.shape[0]
    assert n % block_size == 0
    codes = torch.full((n, f.scale_bytes), pad_byte, dtype=torch.uint8)
    codes[:, : scales.shape[1]] = scales
    data = torch.cat([values, tail], dim=1)
    return write_pages(n // block_size, block_size, f, data, codes, torch.Generator().manual_seed(seed), page_pad)


@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("fmt", FORMATS)
def test_edge_records(fmt, block_size):
    f = as_format(fmt)
    n = 2 * block_size if block_size >= 64 else 4 * block_size
    values, scales, tail = _edge_records(f, n, seed=block_size)
    cache = _cache_of(f, block_size, values, scales, tail)
    slots = torch.randperm(n, generator=torch.Generator().manual_seed(1)).to(torch.int32)
    slots[::7] = -1
    out = poisoned_out(1, n, head_dim=f.head_dim)[0]
    out = _agree(dequantize_and_gather_sparse_torch, dequantize_and_gather_sparse_oracle,
                 lambda o: (o, cache, slots, block_size), out, f"{fmt} b{block_size}")
    bits = _bits(out)[slots.numpy() >= 0, : f.values].astype(np.int64)
    mag = bits & 0x7FFF
    # The edge classes were met: NaN, zeros of both signs, bf16 subnormals; Inf where the scales reach it.
    assert (mag > 0x7F80).any() and (bits == 0).any() and (bits == 0x8000).any()
    if fmt != "v41_288":  # e2m1 * e4m3 products lie between 2^-10 and 6 * 448 (or are 0 or NaN)
        assert ((mag > 0) & (mag < 0x80)).any() and (mag == 0x7F80).any()
    # The tail is the record's bits, whatever they are.
    if f.tail:
        got = _bits(out)[slots.numpy() >= 0, f.values:]
        want = tail[slots[slots >= 0].long()].contiguous().view(torch.int16).numpy().view(np.uint16)
        assert (got == want).all()
    # Dense and packed calls read the same records the same way.
    pages = n // block_size
    table = torch.randperm(pages, generator=torch.Generator().manual_seed(2)).to(torch.int32)[None, :]
    dense_out = poisoned_out(1, n, head_dim=f.head_dim)
    _agree(dequantize_and_gather_torch, dequantize_and_gather_oracle,
           lambda o: (o, cache, torch.tensor([n], dtype=torch.int32), None, table, block_size, 0), dense_out, fmt)
    packed_out = poisoned_out(1, n + 2, head_dim=f.head_dim)[0]
    starts = torch.tensor([2, 2 + n // 3], dtype=torch.int32)
    table2 = torch.cat([table, table], dim=0)
    _agree(dequantize_and_gather_packed_torch, dequantize_and_gather_packed_oracle,
           lambda o: (o, cache, table2, starts, 2, torch.tensor([0, 1], dtype=torch.int32), block_size),
           packed_out, fmt)


# ---- values computed by hand ---------------------------------------------------------------------

def _decode_one(fmt: str, values: list[int], scales: list[int], tail: list[int] = ()) -> np.ndarray:
    """bf16 bits of one hand-made record (the rest of its value and scale bytes zero; float32 scales
    given as words) at page 1, row 5 of a 16-row cache, decoded by both; they must agree."""
    f = as_format(fmt)
    n = 32
    g = torch.Generator().manual_seed(9)
    v = torch.randint(0, 256, (n, f.value_bytes), generator=g, dtype=torch.uint8)
    s = torch.randint(0, 256, (n, f.num_scales * f.scale_size), generator=g, dtype=torch.uint8)
    t = torch.randint(0, 256, (n, f.tail_bytes), generator=g, dtype=torch.uint8)
    v[21] = 0
    v[21, : len(values)] = torch.tensor(values, dtype=torch.uint8)
    s[21] = 0
    if f.scale_kind == "f32":
        s[21, : 4 * len(scales)] = torch.tensor(np.array(scales, dtype="<u4").view(np.uint8))
    else:
        s[21, : len(scales)] = torch.tensor(scales, dtype=torch.uint8)
    t[21] = 0
    if tail:
        t[21, : 2 * len(tail)] = torch.tensor(np.array(tail, dtype="<u2").view(np.uint8))
    cache = _cache_of(f, 16, v, s, t)
    out = poisoned_out(1, 1, head_dim=f.head_dim)[0]
    out = _agree(dequantize_and_gather_sparse_torch, dequantize_and_gather_sparse_oracle,
                 lambda o: (o, cache, torch.tensor([21], dtype=torch.int32), 16), out, fmt)
    return _bits(out)[0]


def _is_nan(b: int) -> bool:
    return (b & 0x7FFF) > 0x7F80


def test_v41_288_by_hand():
    # e2m1: element 2i is byte i's low nibble; magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6; bit 3 the sign.
    values = [0] * 256
    values[0], values[1] = 0x87, 0xF1  # 6, -0 | 0.5, -6          (group 0, scale 0x38 = 1.0)
    values[8] = 0x07  # 6 * 448 = 2688, 0                          (group 1, scale 0x7E = 448)
    values[16] = 0x00  # 0 * NaN                                   (group 2, scale 0x7F = NaN)
    values[24] = 0x07  # 6 * -0 = -0, +0 * -0 = -0                 (group 3, scale 0x80 = -0)
    values[32] = 0x21  # 0.5 * 2^-9 = 2^-10, 1 * 2^-9              (group 4, scale 0x01 = 2^-9)
    values[40] = 0x0F  # -6 * +0 = -0, 0                           (group 5, scale 0x00)
    values[48] = 0x9A  # -1 * -1 = 1, -0.5 * -1 = 0.5              (group 6, scale 0xB8 = -1.0)
    values[56] = 0x53  # 1.5 * 2^-6, 3 * 2^-6                      (group 7, scale 0x08 = 2^-6)
    scales = [0x38, 0x7E, 0x7F, 0x80, 0x01, 0x00, 0xB8, 0x08] + [0x38] * 24
    b = _decode_one("v41_288", values, scales)
    assert list(b[:4]) == [0x40C0, 0x8000, 0x3F00, 0xC0C0]
    assert list(b[16:18]) == [0x4528, 0x0000]
    assert _is_nan(b[32]) and _is_nan(b[33]) and _is_nan(b[47])
    assert list(b[48:50]) == [0x8000, 0x8000]
    assert list(b[64:66]) == [0x3A80, 0x3B00]
    assert list(b[80:82]) == [0x8000, 0x0000]
    assert list(b[96:98]) == [0x3F80, 0x3F00]
    assert list(b[112:114]) == [0x3CC0, 0x3D40]
    assert (b[128:] == 0).all()  # zero bytes times 1.0


def test_v32_656_by_hand():
    # Inline: values 0..511, four float32 scales at 512..527, the bf16 tail at 528..655.
    values = [0] * 512
    values[0:3] = [0x38, 0x80, 0x3D]  # 1, -0, 1.625  times 3.0
    values[128:130] = [0x3D, 0x38]  # 1.625, 1  times 0x3FBF6276 (1.49519...)
    values[256:259] = [0x38, 0x00, 0xB8]  # 1, 0, -1  times +Inf
    values[384:388] = [0x7E, 0xFE, 0x38, 0x01]  # 448, -448, 1, 2^-9  times FLT_MAX
    tail = [0x7FC1, 0x8001, 0xFF80, 0x0000, 0x3F80]
    b = _decode_one("v32_656", values, [0x40400000, 0x3FBF6276, 0x7F800000, 0x7F7FFFFF], tail)
    assert list(b[:3]) == [0x4040, 0x8000, 0x409C]  # 3, -0, 4.875
    # 1.625 * 0x3FBF6276 = 2.4296875 - 2^-25 exactly: float32 rounds it to 2.4296875, the tie between bf16
    # 0x401B and 0x401C, which bf16 rounds to even, 0x401C; one rounding of the exact product gives 0x401B.
    assert b[128] == 0x401C and b[129] == 0x3FBF
    assert b[256] == 0x7F80 and _is_nan(b[257]) and b[258] == 0xFF80  # x * Inf, 0 * Inf, -1 * Inf
    assert list(b[384:388]) == [0x7F80, 0xFF80, 0x7F80, 0x7B00]  # float32 overflow; FLT_MAX -> bf16 Inf; 2^119
    assert list(b[512:517]) == tail  # tail bits copied, NaN payload and all

    values = [0] * 512
    values[0:3] = [0x38, 0xB8, 0x7E]  # times 2^-149: 2^-149 and -2^-149 round to +-0 in bf16; 448 * 2^-149 too
    values[128:130] = [0x38, 0xB8]  # times the largest float32 subnormal: rounds up to bf16's smallest normal
    values[256:259] = [0x38, 0x01, 0x08]  # times 2^-126: 2^-126, 2^-135 (-> 0), 2^-132 (bf16 subnormal 2)
    values[384:386] = [0x38, 0xB8]  # times -0
    b = _decode_one("v32_656", values, [0x00000001, 0x007FFFFF, 0x00800000, 0x80000000])
    assert list(b[:3]) == [0x0000, 0x8000, 0x0000]
    assert list(b[128:130]) == [0x0080, 0x8080]
    assert list(b[256:259]) == [0x0080, 0x0000, 0x0002]
    assert list(b[384:386]) == [0x8000, 0x0000]
    assert (b[512:] == 0).all()

    b = _decode_one("v32_656", [0x38, 0x00], [0x7FC00000, 0x3F800000, 0xFF800000, 0x7F800001])
    assert _is_nan(b[0]) and _is_nan(b[1]) and _is_nan(b[384]) and b[128] == 0
    assert _is_nan(b[256])  # 0 * -Inf


def test_indexer_132_by_hand():
    b = _decode_one("indexer_132", [0x40, 0x7E, 0x7F, 0xC0, 0x01], [0x3F000000])  # times 0.5
    assert list(b[:2]) == [0x3F80, 0x4360] and _is_nan(b[2])  # 2 * .5, 448 * .5, NaN
    assert b[3] == 0xBF80 and b[4] == 0x3A80  # -2 * .5 = -1; 2^-9 * .5 = 2^-10
    assert (b[5:] == 0).all()


@pytest.mark.parametrize("fmt", ["dsv4_584", "v41_528"])
def test_ue8m0_formats_by_hand(fmt):
    f = as_format(fmt)
    values = [0x38, 0x7E, 0x01] + [0] * (f.value_bytes - 3)
    values[f.scale_group] = 0x38
    values[2 * f.scale_group] = 0x38
    b = _decode_one(fmt, values, [127, 0, 255] + [127] * (f.num_scales - 3), [0x7F81] if f.tail else ())
    assert list(b[:3]) == [0x3F80, 0x43E0, 0x3B00]  # 1, 448, 2^-9 times 2^0
    assert b[f.scale_group] == 0x0040  # 1 * 2^-127 (code 0): a bf16 subnormal
    assert _is_nan(b[2 * f.scale_group])  # code 255
    if f.tail:
        assert b[f.values] == 0x7F81


def test_pad_bytes_are_never_read():
    """dsv4_584's scale rows hold one pad byte after the 7 codes: 0xFF (NaN as a code) there changes nothing."""
    f = as_format("dsv4_584")
    values, scales, tail = _edge_records(f, 32, seed=3)
    outs = []
    for pad in (0x00, 0xFF):
        cache = _cache_of(f, 16, values, scales, tail, pad_byte=pad)
        out = poisoned_out(1, 32, head_dim=f.head_dim)[0]
        outs.append(_agree(dequantize_and_gather_sparse_torch, dequantize_and_gather_sparse_oracle,
                           lambda o, cache=cache: (o, cache, torch.arange(32, dtype=torch.int32), 16), out, "pad"))
    assert first_mismatch(outs[0], outs[1]) is None


# ---- placement -----------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_write_pages_places_records_by_the_format(fmt):
    f = as_format(fmt)
    bs, pages = 16, 3
    n = bs * pages
    g = torch.Generator().manual_seed(4)
    data = torch.randint(0, 256, (n, f.data_bytes), generator=g, dtype=torch.uint8)
    codes = torch.randint(0, 256, (n, f.scale_bytes), generator=g, dtype=torch.uint8)
    cache = write_pages(pages, bs, f, data, codes, g, page_pad=32)
    assert cache.shape == (pages, bs, f.record_bytes) and cache.stride(0) == bs * f.record_bytes + 32
    storage = whole_storage(cache)
    for slot in (0, 5, bs + 3, n - 1):
        page, row = divmod(slot, bs)
        start = page * cache.stride(0)
        if f.placement == "inline":  # one contiguous record per row: values, scales (+ pad), tail
            record = torch.cat([data[slot, : f.value_bytes], codes[slot], data[slot, f.value_bytes:]])
            assert torch.equal(cache[page, row], record)
        else:  # block_size data rows, then block_size scale rows
            assert torch.equal(storage[start + row * f.data_bytes: start + (row + 1) * f.data_bytes], data[slot])
            at = start + bs * f.data_bytes + row * f.scale_bytes
            assert torch.equal(storage[at: at + f.scale_bytes], codes[slot])
        values, scales = raw_records(cache, bs, torch.tensor([page]), torch.tensor([row]))
        assert torch.equal(values[0], data[slot, : f.value_bytes])
        assert torch.equal(scales[0], codes[slot, : f.num_scales * f.scale_size])
