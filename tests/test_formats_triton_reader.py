"""The Triton reader for every record format (docs/semantics.md, "Three more
record formats"): dense, sparse, packed and raw packed gathers through
kvgen/families/dequant_gather/triton.py, bit for bit against the torch
reference and against a small numpy decoder written here from the contract
(float64 products, numpy's float32 rounding, bf16 rounding by np.round: no
code shared with either), on random quantized caches, raw random bytes, and
edge records (every e2m1 nibble with every e4m3 scale byte; every e4m3 byte
with float32 scales 0, -0, subnormal, huge, Inf, NaN and products that are
float32 and bf16 subnormals or round twice).

Without a GPU the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1,
set before Triton is imported); with one, on the GPU, against the references
run on CPU copies. Every output lives in a poisoned buffer that is compared
whole, so a row written that should not be is caught.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated: before kvgen imports Triton

from kvgen.families.dequant_gather import reference
from kvgen.families.dequant_gather.triton import (dequantize_and_gather_packed_triton, dequantize_and_gather_sparse_triton,
                                                  dequantize_and_gather_triton, gather_raw_packed_triton)
from kvgen.formats import Format
from kvgen.testing import (POISON_BF16, as_format, clone_strided, first_mismatch, make_case, make_packed_case, make_raw_packed_case,
                           make_sparse_case, random_block_table)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OLD_FORMATS = ("dsv4_584", "v41_528")
NEW_FORMATS = ("v41_288", "v32_656", "indexer_132")
FORMATS = OLD_FORMATS + NEW_FORMATS

pytestmark = [
    pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                       reason="Triton on CPU tensors needs TRITON_INTERPRET=1 (set before Triton is imported)"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),  # the interpreter's 0 x Inf
]


# ------------------------------------------------------------------ caches
def region(kc: torch.Tensor, fmt: Format, bs: int, part: str) -> torch.Tensor:
    """uint8 [num_blocks, bs, nbytes]: part ("values", "scales", "tail") of every row, a view into kc's storage."""
    base, row_stride, nbytes = fmt.regions(bs)[part]
    return kc.as_strided((kc.shape[0], bs, nbytes), (kc.stride(0), row_stride, 1), kc.storage_offset() + base)


def new_cache(fmt: Format, num_blocks: int, bs: int, g: torch.Generator, quantized: bool, page_pad: int = 0):
    """A paged cache [num_blocks, bs, record_bytes] of raw random bytes (pad and
    page padding included), or with writer-like records: no NaN value bytes,
    positive normal scales, tails from randn."""
    page_bytes = bs * fmt.record_bytes + page_pad
    storage = torch.randint(0, 256, (num_blocks * page_bytes,), dtype=torch.uint8, generator=g)
    kc = storage.as_strided((num_blocks, bs, fmt.record_bytes), (page_bytes, fmt.record_bytes, 1))
    if quantized:
        n = (num_blocks, bs)
        values = region(kc, fmt, bs, "values")
        if fmt.value_kind == "e4m3":
            values[values & 0x7F == 0x7F] ^= 1  # NaN bytes -> +-448
        scales = region(kc, fmt, bs, "scales")[..., : fmt.num_scales * fmt.scale_size]
        if fmt.scale_kind == "ue8m0":
            scales.copy_(torch.randint(100, 140, scales.shape, generator=g).to(torch.uint8))
        elif fmt.scale_kind == "e4m3":
            scales.copy_(torch.randint(0x08, 0x7F, scales.shape, generator=g).to(torch.uint8))
        else:
            amax = torch.randn((*n, fmt.num_scales), generator=g).abs() * torch.exp2(
                torch.randint(-20, 6, (*n, fmt.num_scales), generator=g).float()) + 1e-4
            scales.copy_((amax / 448).view(torch.uint8).reshape(scales.shape))
        tail = region(kc, fmt, bs, "tail")
        tail.copy_(torch.randn((*n, fmt.tail), generator=g).to(torch.bfloat16).view(torch.uint8).reshape(tail.shape))
    return kc


def poisoned(*shape: int) -> torch.Tensor:
    t = torch.empty(shape, dtype=torch.bfloat16)
    t.view(torch.int16).fill_(POISON_BF16)
    return t


def on_device(t: torch.Tensor | None) -> torch.Tensor | None:
    """t on DEVICE with its strides and the whole storage under it (padding included)."""
    if t is None or DEVICE == "cpu":
        return None if t is None else t
    flat = t.as_strided((t.untyped_storage().nbytes() // t.element_size(),), (1,), 0).to(DEVICE)
    return flat.as_strided(t.shape, t.stride(), t.storage_offset())


# ------------------------------------------------------- the numpy decoder
E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def np_e4m3(b: np.ndarray) -> np.ndarray:
    b = b.astype(np.int64)
    e, m = (b >> 3) & 0xF, b & 0x7
    mag = np.where(e == 0, m * 2.0 ** -9, (1 + m / 8) * np.exp2(e - 7.0))
    v = np.where(b & 0x80, -mag, mag)
    return np.where(b & 0x7F == 0x7F, np.nan, v)


def np_bf16_bits(x32: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits, nearest even (np.round), subnormals kept, overflow to Inf; NaN 0x7FC0."""
    x = x32.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        _, e = np.frexp(np.where(np.isfinite(x), x, 0.0))
        quantum = np.ldexp(1.0, np.maximum(e - 1, -126) - 7)  # a bf16 step at x's binade
        r = np.where(np.isfinite(x), np.round(x / quantum) * quantum, x)
        bits = (r.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), bits)


def np_decode(kc: torch.Tensor, fmt: Format, bs: int, page: np.ndarray, row: np.ndarray) -> np.ndarray:
    """uint16 bf16 bits [n, head_dim] of the records at (page, row), from docs/semantics.md."""
    part = {p: region(kc, fmt, bs, p).numpy()[page, row] for p in ("values", "scales", "tail")}
    n = len(page)
    raw = part["values"].astype(np.int64)
    if fmt.value_kind == "e2m1":
        nib = np.stack([raw & 0xF, raw >> 4], axis=-1).reshape(n, fmt.values)
        mag = E2M1[nib & 7]
        value = np.where(nib & 8, -mag, mag)
    else:
        value = np_e4m3(raw)
    codes = np.ascontiguousarray(part["scales"][:, : fmt.num_scales * fmt.scale_size])
    if fmt.scale_kind == "ue8m0":
        c = codes.astype(np.int64)
        scale = np.where(c == 255, np.nan, np.exp2(c - 127.0))
    elif fmt.scale_kind == "e4m3":
        scale = np_e4m3(codes)
    with np.errstate(invalid="ignore", over="ignore"):
        if fmt.scale_kind == "f32":
            scale = codes.view("<f4").astype(np.float64)
        product = value * np.repeat(scale, fmt.scale_group, axis=1)  # exact in float64 (<= 28 bits)
        out = np.empty((n, fmt.head_dim), dtype=np.uint16)
        out[:, : fmt.values] = np_bf16_bits(product.astype(np.float32))  # the one float32 rounding
    out[:, fmt.values:] = np.ascontiguousarray(part["tail"]).view("<u2")
    return out


def as_bf16(bits: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(bits.astype(np.uint16).view(np.int16)).view(torch.bfloat16)


# -------------------------------------------------------------- references
def check(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    problem = first_mismatch(got.cpu(), expected)
    assert problem is None, f"{what}: {problem}"


def dense_case(fmt: Format, seed: int, quantized: bool):
    g = torch.Generator().manual_seed(seed)
    bs = (16, 32, 64)[seed % 3]
    seq_lens = [37, 0, 70, 5, 2 * bs + 1]
    gather_lens = [37, 0, 50, 5, bs - 3]
    pages = [-(-s // bs) for s in seq_lens]
    kc = new_cache(fmt, sum(pages) + 2, bs, g, quantized, page_pad=16 * (seed % 3))
    block_table = random_block_table(pages, kc.shape[0], g, pad=seed % 2)
    offset, max_tokens = 3, 3 + 45  # request 2 is cut at 45 rows
    base = poisoned(len(seq_lens), max_tokens + 2, fmt.head_dim + 8)  # padded rows and requests
    view = lambda b: b[:, :max_tokens, : fmt.head_dim]  # noqa: E731
    args = (torch.tensor(seq_lens, dtype=torch.int32), torch.tensor(gather_lens, dtype=torch.int32), block_table,
            bs, offset)
    return kc, base, view, args


def np_dense(kc, fmt, base, view, seq_lens, gather_lens, block_table, bs, offset):
    expected = base.clone()
    out = view(expected)
    for r, (s, gl) in enumerate(zip(seq_lens.tolist(), gather_lens.tolist())):
        rows = min(gl, out.shape[1] - offset)
        if rows <= 0:
            continue
        pos = np.arange(s - gl, s - gl + rows)
        page = block_table[r].numpy()[pos // bs]
        out[r, offset: offset + rows] = as_bf16(np_decode(kc, fmt, bs, page, pos % bs))
    return expected


def run_triton(fn, base, view, kc, *args):
    dev = on_device(base.clone())
    fn(view(dev), on_device(kc), *[on_device(a) if isinstance(a, torch.Tensor) else a for a in args])
    return dev.cpu()


# -------------------------------------------------------------------- tests
@pytest.mark.parametrize("quantized", [True, False], ids=["quantized", "raw"])
@pytest.mark.parametrize("name", FORMATS)
def test_dense(name, quantized):
    fmt = as_format(name)
    for seed in range(2):
        kc, base, view, args = dense_case(fmt, seed, quantized)
        got = run_triton(dequantize_and_gather_triton, base, view, kc, *args)
        check(got, np_dense(kc, fmt, base, view, *args), f"{name} seed {seed}: Triton vs numpy")
        expected = base.clone()
        reference.dequantize_and_gather_torch(view(expected), kc, *args)
        check(got, expected, f"{name} seed {seed}: Triton vs torch")


@pytest.mark.parametrize("quantized", [True, False], ids=["quantized", "raw"])
@pytest.mark.parametrize("name", FORMATS)
def test_sparse(name, quantized):
    fmt = as_format(name)
    g = torch.Generator().manual_seed(7)
    bs, n = 16, 53
    kc = new_cache(fmt, 5, bs, g, quantized, page_pad=32)
    slots = torch.randint(0, 5 * bs, (n,), generator=g, dtype=torch.int32)
    slots[torch.rand(n, generator=g) < 0.3] = -1
    base = poisoned(n, fmt.head_dim + 16)
    view = lambda b: b[:, : fmt.head_dim]  # noqa: E731
    got = run_triton(dequantize_and_gather_sparse_triton, base, view, kc, slots, bs)
    expected = base.clone()
    ok = (slots >= 0).numpy()
    s = slots.numpy()[ok]
    view(expected)[torch.from_numpy(ok)] = as_bf16(np_decode(kc, fmt, bs, s // bs, s % bs))
    check(got, expected, f"{name}: Triton vs numpy")
    expected = base.clone()
    reference.dequantize_and_gather_sparse_torch(view(expected), kc, slots, bs)
    check(got, expected, f"{name}: Triton vs torch")


def packed_case(fmt: Format, seed: int, quantized: bool, with_seq_starts: bool, lens=(20, 0, 33, 9, 17)):
    """Requests packed from row 5 (rows 0..4 belong to none), one of them empty;
    starts has an entry past num_reqs (ignored); rows strided."""
    g = torch.Generator().manual_seed(100 + seed)
    bs = (16, 32)[seed % 2]
    num_reqs = len(lens)
    starts = np.concatenate([[5], 5 + np.cumsum(lens)[:-1]])
    seq_starts = [3, 40, 0, bs - 1, 2 * bs][:num_reqs] if with_seq_starts else [0] * num_reqs
    pages = [-(-(s + n) // bs) for s, n in zip(seq_starts, lens)]
    kc = new_cache(fmt, sum(pages) + 2, bs, g, quantized, page_pad=16)
    block_table = random_block_table(pages, kc.shape[0], g, pad=1)
    rows = int(starts[-1]) + lens[-1]
    base = poisoned(rows + 4, fmt.head_dim + 8)
    view = lambda b: b[:rows, : fmt.head_dim]  # noqa: E731
    starts_t = torch.tensor([*starts, 10**6], dtype=torch.int32)  # an entry past num_reqs: never read
    seq_t = torch.tensor([*seq_starts, 10**6], dtype=torch.int32) if with_seq_starts else None
    return kc, base, view, (block_table, starts_t, num_reqs, seq_t, bs)


def np_packed(kc, fmt, base, view, block_table, starts, num_reqs, seq_starts, bs):
    expected = base.clone()
    out = view(expected)
    page, row, ts = [], [], []
    for t in range(out.shape[0]):
        owners = [r for r in range(num_reqs) if int(starts[r]) <= t]
        if not owners:
            continue
        r = owners[-1]
        p = t - int(starts[r]) + (int(seq_starts[r]) if seq_starts is not None else 0)
        page.append(int(block_table[r, p // bs]))
        row.append(p % bs)
        ts.append(t)
    if ts:
        out[ts] = as_bf16(np_decode(kc, fmt, bs, np.array(page), np.array(row)))
    return expected


@pytest.mark.parametrize("with_seq_starts", [False, True], ids=["no_seq_starts", "seq_starts"])
@pytest.mark.parametrize("name", FORMATS)
def test_packed(name, with_seq_starts):
    fmt = as_format(name)
    for seed, quantized in enumerate((True, False)):
        kc, base, view, args = packed_case(fmt, seed, quantized, with_seq_starts)
        got = run_triton(dequantize_and_gather_packed_triton, base, view, kc, *args)
        assert (got[:5].view(torch.int16) == POISON_BF16).all(), "rows before starts[0] were written"
        check(got, np_packed(kc, fmt, base, view, *args), f"{name} seed {seed}: Triton vs numpy")
        expected = base.clone()
        reference.dequantize_and_gather_packed_torch(view(expected), kc, *args)
        check(got, expected, f"{name} seed {seed}: Triton vs torch")


@pytest.mark.parametrize("num_reqs", [0, 1, 2, 3])
def test_packed_few_requests(num_reqs):
    """0 requests: nothing written; 1..3: binary searches of 1 and 2 steps (the last request owns every later row)."""
    fmt = as_format("v32_656")
    lens = (30, 0, 7)[:num_reqs] or (30,)
    kc, base, view, (bt, starts, _, seq, bs) = packed_case(fmt, 0, True, True, lens)
    args = (bt, starts, num_reqs, seq, bs)
    got = run_triton(dequantize_and_gather_packed_triton, base, view, kc, *args)
    check(got, np_packed(kc, fmt, base, view, *args), f"num_reqs = {num_reqs}")
    if num_reqs == 0:
        assert (got.view(torch.int16) == POISON_BF16).all(), "num_reqs = 0 wrote a row"


def raw_case(fmt: Format, seed: int):
    """cu_seq_lens from row 3 (rows 0..2 and past the end belong to none), one
    request empty; dst rows strided (wider buffers)."""
    g = torch.Generator().manual_seed(200 + seed)
    bs = (16, 64)[seed % 2]
    lens = [11, 0, 40, 7]
    cu = torch.tensor(np.concatenate([[3], 3 + np.cumsum(lens)]), dtype=torch.int32)
    pages = [-(-n // bs) for n in lens]
    kc = new_cache(fmt, sum(pages) + 2, bs, g, quantized=False, page_pad=16)
    block_table = random_block_table(pages, kc.shape[0], g, pad=2)
    rows = int(cu[-1]) + 6  # rows past cu[B]: not touched
    scale_bytes = fmt.num_scales * fmt.scale_size
    dst_k = torch.randint(0, 256, (rows, fmt.value_bytes + 16 * (seed % 2)), dtype=torch.uint8, generator=g)
    dst_scale = torch.randint(0, 256, (rows, scale_bytes + 4 * seed + (seed % 2)), dtype=torch.uint8, generator=g)
    return kc, dst_k, dst_scale, block_table, cu, bs


def np_raw(kc, fmt, dst_k, dst_scale, block_table, cu, bs):
    k, s = dst_k.clone(), dst_scale.clone()
    values, scales = region(kc, fmt, bs, "values"), region(kc, fmt, bs, "scales")
    for r in range(cu.shape[0] - 1):
        for t in range(int(cu[r]), int(cu[r + 1])):
            p = t - int(cu[r])
            page = int(block_table[r, p // bs])
            k[t, : fmt.value_bytes] = values[page, p % bs]
            s[t, : fmt.num_scales * fmt.scale_size] = scales[page, p % bs, : fmt.num_scales * fmt.scale_size]
    return k, s


@pytest.mark.parametrize("name", FORMATS)
def test_raw_packed(name):
    fmt = as_format(name)
    for seed in range(2):
        kc, dst_k, dst_scale, block_table, cu, bs = raw_case(fmt, seed)
        vb, sb = fmt.value_bytes, fmt.num_scales * fmt.scale_size
        k_dev, s_dev = on_device(dst_k.clone()), on_device(dst_scale.clone())
        gather_raw_packed_triton(k_dev[:, :vb], s_dev[:, :sb], on_device(kc), on_device(block_table), on_device(cu),
                                 bs)
        want_k, want_s = np_raw(kc, fmt, dst_k, dst_scale, block_table, cu, bs)
        assert torch.equal(k_dev.cpu(), want_k), f"{name} seed {seed}: dst_k"
        assert torch.equal(s_dev.cpu(), want_s), f"{name} seed {seed}: dst_scale"
        ref_k, ref_s = dst_k.clone(), dst_scale.clone()
        reference.gather_raw_packed_torch(ref_k[:, :vb], ref_s[:, :sb], kc, block_table, cu, bs)
        assert torch.equal(k_dev.cpu(), ref_k) and torch.equal(s_dev.cpu(), ref_s), f"{name} seed {seed}: torch"


# ------------------------------------------- the shared case builders (kvgen.testing)
@pytest.mark.parametrize("raw_bytes", [False, True], ids=["quantized", "raw"])
@pytest.mark.parametrize("name", FORMATS)
def test_shared_cases_against_the_torch_reference(name, raw_bytes):
    """kvgen.testing's builders (their quantizer's records, or raw bytes): dense,
    sparse, packed (with and without seq_starts) and raw packed, Triton == torch."""
    common = dict(format=name, raw_bytes=raw_bytes, page_pad=16, seed=len(name) + raw_bytes)
    dense = make_case(seq_lens=[40, 3, 0, 19], gather_lens=[33, 3, 0, 10], block_size=16, offset=2, **common)
    got_dev = on_device(clone_strided(dense.out))
    dequantize_and_gather_triton(*dense.args(DEVICE, out=got_dev))
    expected = clone_strided(dense.out)
    reference.dequantize_and_gather_torch(*dense.args("cpu", out=expected))
    check(got_dev, expected, f"{name} dense")

    sparse = make_sparse_case(num_slots=37, valid=0.7, block_size=32, out_shape=(37,), **common)
    got_dev = on_device(clone_strided(sparse.out))
    dequantize_and_gather_sparse_triton(*sparse.args(DEVICE, out=got_dev))
    expected = clone_strided(sparse.out)
    reference.dequantize_and_gather_sparse_torch(*sparse.args("cpu", out=expected))
    check(got_dev, expected, f"{name} sparse")

    for seq_starts in (None, [5, 0, 17]):
        packed = make_packed_case(seq_lens=[21, 0, 30], seq_starts=seq_starts, block_size=16, workspace_gap=3,
                                  rows=3 + 51 + 6, row_pad=8, **common)
        got_dev = on_device(clone_strided(packed.out))
        dequantize_and_gather_packed_triton(*packed.reference_args(DEVICE, out=got_dev))
        expected = clone_strided(packed.out)
        reference.dequantize_and_gather_packed_torch(*packed.reference_args("cpu", out=expected))
        check(got_dev, expected, f"{name} packed, seq_starts {seq_starts}")

    raw = make_raw_packed_case(seq_lens=[9, 0, 26], block_size=16, first_row=2, extra_rows=3, **common)
    k_dev, s_dev = on_device(raw.dst_k.clone()), on_device(raw.dst_scale.clone())
    gather_raw_packed_triton(*raw.reference_args(DEVICE, dst_k=k_dev, dst_scale=s_dev))
    want_k, want_s = raw.dst_k.clone(), raw.dst_scale.clone()
    reference.gather_raw_packed_torch(*raw.reference_args("cpu", dst_k=want_k, dst_scale=want_s))
    assert torch.equal(k_dev.cpu(), want_k) and torch.equal(s_dev.cpu(), want_s), f"{name} raw packed"


# -------------------------------------------------------------- edge records
F32_EDGES = [0.0, -0.0, 1.0, -1.0, 2.0 ** -149, -(2.0 ** -149), 2.0 ** -126, 2.0 ** -133, 1.5 * 2.0 ** -140,
             3.0e38, -3.4028234663852886e38, float("inf"), float("-inf"), float("nan"), 1 / 448, 448.0]
# Products that round twice, worked out in test_every_e4m3_byte_with_edge_f32_scales.
DOUBLE_ROUNDING = [11315882 * 2.0 ** -24, 78643 * 2.0 ** -149, 50331520 * 2.0 ** -149]
F32_EDGES += DOUBLE_ROUNDING
# Mantissa patterns whose products round twice (float32, then bf16) or sit on bf16 ties.
LOW_BITS = [0x0000, 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x10000, 0x17FFF, 0x18000, 0x18001, 0x7FFFFF, 0x3FFF, 0x4000]


def f32_scales(g: torch.Generator) -> np.ndarray:
    """float32 scale bit patterns: the edges; subnormal and tiny ones whose
    products with e4m3 values are float32 and bf16 subnormals (or round to 0);
    huge ones that overflow; tie and double-rounding mantissas at every range."""
    edges = np.array(F32_EDGES, dtype=np.float32).view(np.uint32)
    rand = lambda lo, hi, k: torch.randint(lo, hi, (k,), generator=g).numpy().astype(np.uint32)  # noqa: E731
    exps = np.concatenate([rand(0, 12, 40), rand(100, 140, 16), rand(240, 255, 16)])
    lows = np.array(LOW_BITS, dtype=np.uint32)[rand(0, len(LOW_BITS), len(exps))]
    high = rand(0, 1 << 6, len(exps)) << 17
    sign = rand(0, 2, len(exps)) << 31
    patterned = sign | (exps << 23) | ((high | lows) & 0x7FFFFF)
    return np.concatenate([edges, patterned, rand(0, 1 << 31, 16) * 2 + rand(0, 2, 16)]).astype(np.uint32)


def edge_cache(fmt: Format, values: np.ndarray, scales: np.ndarray, bs: int = 16):
    """A cache holding records with these value bytes [n, value_bytes] and scale
    bytes [n, num_scales * scale_size] (random tails), in slot order."""
    n = values.shape[0]
    blocks = -(-n // bs)
    kc = new_cache(fmt, blocks, bs, torch.Generator().manual_seed(n), quantized=False)
    pad = lambda a: np.concatenate([a, np.zeros((blocks * bs - n, a.shape[1]), a.dtype)])  # noqa: E731
    region(kc, fmt, bs, "values").copy_(torch.from_numpy(pad(values)).view(blocks, bs, -1))
    region(kc, fmt, bs, "scales")[..., : scales.shape[1]] = torch.from_numpy(pad(scales)).view(blocks, bs, -1)
    return kc, bs, n


def check_edges(fmt: Format, kc: torch.Tensor, bs: int, n: int) -> torch.Tensor:
    """Gather records 0..n-1 through the sparse and packed Triton kernels; both
    must equal the numpy decoder (and the torch reference, where it knows the format)."""
    base = poisoned(n, fmt.head_dim)
    slots = torch.arange(n, dtype=torch.int32)
    expected = as_bf16(np_decode(kc, fmt, bs, np.arange(n) // bs, np.arange(n) % bs))
    got = run_triton(dequantize_and_gather_sparse_triton, base, lambda b: b, kc, slots, bs)
    check(got, expected, f"{fmt.name} edges, sparse: Triton vs numpy")
    block_table = torch.arange(kc.shape[0], dtype=torch.int32)[None, :]
    starts = torch.zeros(1, dtype=torch.int32)
    packed = run_triton(dequantize_and_gather_packed_triton, base, lambda b: b, kc, block_table, starts, 1, None, bs)
    check(packed, expected, f"{fmt.name} edges, packed: Triton vs numpy")
    ref = base.clone()
    reference.dequantize_and_gather_sparse_torch(ref, kc, slots, bs)
    check(got, ref, f"{fmt.name} edges: Triton vs torch")
    return got


def test_every_e2m1_nibble_with_every_e4m3_scale():
    """v41_288: group G (16 values: nibbles 0..15, 0x8 the -0) has scale byte G % 256;
    the nibbles shuffled per record so both halves of a byte see every nibble."""
    fmt = as_format("v41_288")
    n = 2 * 256 // fmt.num_scales  # 256 scale bytes, twice
    nibbles = np.tile(np.arange(16), (n, fmt.num_scales))
    nibbles[1::2] = np.roll(nibbles[1::2], 1, axis=1)  # odd records: each nibble in the other half of its byte
    values = (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).astype(np.uint8)
    scales = (np.arange(n * fmt.num_scales) % 256).reshape(n, fmt.num_scales).astype(np.uint8)
    got = check_edges(fmt, *edge_cache(fmt, values, scales))
    bits = got.view(torch.int16).numpy().astype(np.int64) & 0xFFFF
    # Worked out from the contract: nibble 0x8 (-0) x 1.0 (0x38) is -0; 0x7 (6) x 448 (0x7E) is 2688 (0x4528);
    # 0x1 (0.5) x 2^-9 (0x01) is 2^-10 (0x3A80); anything x NaN (0x7F) is NaN.
    g38, g7e, g01, g7f = 0x38, 0x7E, 0x01, 0x7F  # record r, group j has scale byte r * 32 + j

    def at(scale_byte: int, nib: int) -> int:
        """The output bits of nibble `nib` times the e4m3 scale `scale_byte` (its first group)."""
        r, j = divmod(scale_byte, fmt.num_scales)
        return int(bits[r, 16 * j + (nib + r % 2) % 16])  # odd records: rolled by one

    assert at(g38, 8) == 0x8000 and at(g38, 0) == 0x0000
    assert at(g7e, 7) == 0x4528 and at(g7e, 15) == 0xC528
    assert at(g01, 1) == 0x3A80 and at(0x80, 1) == 0x8000  # 0.5 x -0 = -0
    assert all((at(g7f, k) & 0x7FFF) > 0x7F80 for k in range(16))


@pytest.mark.parametrize("name", ["v32_656", "indexer_132"])
def test_every_e4m3_byte_with_edge_f32_scales(name):
    """Every e4m3 byte against every scale of f32_scales, and the contract's
    worked values. Both formats have 128-value groups: scale i fills groups 2i
    (bytes 0..127) and 2i + 1 (bytes 128..255)."""
    fmt = as_format(name)
    assert fmt.scale_group == 128
    scales = f32_scales(torch.Generator().manual_seed(11))
    groups = np.repeat(scales, 2)
    n = -(-len(groups) // fmt.num_scales)
    groups = np.resize(groups, n * fmt.num_scales)  # the last record's spare groups repeat the first scales
    half = np.arange(n * fmt.num_scales) % 2 * 128
    values = (half[:, None] + np.arange(128)).reshape(n, fmt.values).astype(np.uint8)
    scale_bytes = groups.reshape(n, fmt.num_scales).view(np.uint8).reshape(n, -1)
    got = check_edges(fmt, *edge_cache(fmt, values, scale_bytes))
    bits = got.view(torch.int16).numpy().astype(np.int64) & 0xFFFF

    def at(scale: float, byte: int) -> int:
        """The output bits of value byte `byte` times float32 `scale`."""
        pattern = np.array([scale], dtype=np.float32).view(np.uint32)[0]
        group = 2 * int(np.flatnonzero(scales == pattern)[0]) + byte // 128
        return int(bits[group // fmt.num_scales, group % fmt.num_scales * 128 + byte % 128])

    assert at(0.0, 0x38) == 0x0000 and at(-0.0, 0x38) == 0x8000 and at(-0.0, 0xB8) == 0x0000
    assert at(1.0, 0x80) == 0x8000 and at(-1.0, 0x7E) == 0xC3E0  # -0 kept; 448 x -1
    assert at(float("inf"), 0x38) == 0x7F80 and at(float("-inf"), 0x38) == 0xFF80
    assert at(float("inf"), 0x00) & 0x7FFF > 0x7F80  # 0 x Inf is NaN
    assert at(3.0e38, 0x7E) == 0x7F80  # 448 x 3e38 overflows float32
    assert at(2.0 ** -149, 0x38) == 0x0000  # a float32 subnormal that bf16 rounds to 0
    assert at(2.0 ** -149, 0x77) == 0x0000 and at(2.0 ** -149, 0x7E) == 0x0000  # 240 and 448 x 2^-149: < 2^-134
    assert at(2.0 ** -133, 0x38) == 0x0001 and at(2.0 ** -133, 0xB8) == 0x8001  # bf16's smallest subnormal
    assert at(2.0 ** -133, 0x30) == 0x0000  # 0.5 x 2^-133: a tie, to even (0)
    assert at(2.0 ** -133, 0x3C) == 0x0002  # 1.5 x 2^-133: a tie, to even (2)
    assert at(2.0 ** -133, 0x3A) == 0x0001  # 1.25 x 2^-133: below the tie
    assert at(1.5 * 2.0 ** -140, 0x7E) == 0x0005  # 448 x 1.5 x 2^-140 = 5.25 x 2^-133 -> 5
    # Double rounding: the exact product lies just below a bf16 tie, float32 rounds it onto the tie, and
    # bf16 breaks the tie to even (upwards here); one rounding of the exact product would go down.
    assert at(DOUBLE_ROUNDING[0], 0x3C) == 0x3F82  # 1.5 x s = 1 + 3 x 2^-8 - 2^-24 -> 1 + 3 x 2^-8 -> 1 + 2^-6
    assert at(DOUBLE_ROUNDING[1], 0x3A) == 0x0002  # 1.25 x 78643 x 2^-149 = 98303.75 x 2^-149 -> 3 x 2^-134 -> 2^-132
    assert at(DOUBLE_ROUNDING[2], 0x01) == 0x0002  # 2^-9 x (a normal scale): the same subnormal product
    assert at(float("nan"), 0x00) & 0x7FFF > 0x7F80


@pytest.mark.parametrize("name", OLD_FORMATS)
def test_old_formats_every_scale_edge(name):
    """The old formats through the generalised tile: random value bytes with every UE8M0 code."""
    fmt = as_format(name)
    g = torch.Generator().manual_seed(3)
    n = -(-256 // fmt.num_scales) * 2
    values = torch.randint(0, 256, (n, fmt.value_bytes), generator=g, dtype=torch.uint8).numpy()
    scales = (np.arange(n * fmt.num_scales) % 256).reshape(n, fmt.num_scales).astype(np.uint8)
    check_edges(fmt, *edge_cache(fmt, values, scales))


# A user's formats no shipped tree has: e2m1 values beside a bf16 tail (each column loads its
# byte; once with a power-of-two head), inline records of e2m1 values with UE8M0 scales and of
# e4m3 values with float32 scales.
USER_FORMATS = (
    Format("e2m1_tail", values=256, tail=64, value_kind="e2m1", scale_group=16, scale_kind="e4m3"),
    Format("e2m1_p2_head", values=192, tail=64, value_kind="e2m1", scale_group=16, scale_kind="e4m3"),  # head 256
    Format("e2m1_inline", values=256, tail=32, value_kind="e2m1", scale_group=32, placement="inline"),
    Format("f32_inline_small", values=64, tail=16, scale_group=32, scale_kind="f32", placement="inline"),
)


@pytest.mark.parametrize("fmt", USER_FORMATS, ids=lambda f: f.name)
def test_user_formats(fmt, monkeypatch):
    """Formats of a user's tree (format_of answers them here): dense and packed on raw bytes,
    Triton == numpy == torch."""
    import kvgen.families.dequant_gather.triton as triton_module

    monkeypatch.setattr(triton_module, "format_of", lambda k_cache: fmt)
    monkeypatch.setattr(reference, "format_of", lambda k_cache: fmt)
    kc, base, view, args = dense_case(fmt, 1, quantized=False)
    got = run_triton(dequantize_and_gather_triton, base, view, kc, *args)
    check(got, np_dense(kc, fmt, base, view, *args), f"{fmt.name} dense: Triton vs numpy")
    expected = base.clone()
    reference.dequantize_and_gather_torch(view(expected), kc, *args)
    check(got, expected, f"{fmt.name} dense: Triton vs torch")
    kc, base, view, args = packed_case(fmt, 0, False, True)
    got = run_triton(dequantize_and_gather_packed_triton, base, view, kc, *args)
    check(got, np_packed(kc, fmt, base, view, *args), f"{fmt.name} packed: Triton vs numpy")
