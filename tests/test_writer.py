"""The writer (quantize_and_insert_k_cache): every backend against the golden digests and the independent oracle.

On the CPU: the torch reference, the Triton kernel (in the interpreter) and
the numpy oracle (kvgen/families/quantize_insert/) are called directly, on
every golden case (tests/golden/writer_corpus.py; the digest covers the whole
poisoned storage under the cache) and on a seeded fuzz (random shapes,
strides, paddings, storage offsets, bf16 bit patterns, slots with negatives,
both shipped formats and user formats, every block size). Then: the bytes no
call may touch, duplicate slots, the round trip through the reader, a user's
format, the H100's cvt.rn.satfinite.e4m3x2.f32 facts for every E4M3 encoder,
and the scale code for every bf16 amax. With a CUDA device (`gpu` marker):
the public op under each KVGEN_BACKEND against the digests.
"""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from kvgen.families.dequant_gather.reference import dequantize_and_gather_sparse_torch
from kvgen.families.quantize_insert import oracle
from kvgen.families.quantize_insert.oracle import encode_records, quantize_and_insert_oracle
from kvgen.families.quantize_insert.reference import (e4m3_rne_satfinite, quantize_and_insert_torch,
                                                      quantize_records, ue8m0_codes)
from kvgen.families.quantize_insert.triton import _e4m3_rne_satfinite, quantize_and_insert_triton
from kvgen.formats import Format
from kvgen.testing import POISON_BF16, _to, as_format, whole_storage
from tests.golden import writer_corpus
from tests.golden.writer_corpus import (BLOCK_SIZES, CASES, DIGESTS, LAYOUTS, WriterCase, bf16, bits_of, build_case,
                                        digest, first_difference, run_case, storage_bytes, writer_case)

DIGEST_TABLE = json.loads(DIGESTS.read_text())["cases"]
BACKENDS = {"torch": quantize_and_insert_torch, "triton": quantize_and_insert_triton,
            "oracle": quantize_and_insert_oracle}
USER_FORMATS = (Format("w384", values=384, tail=128, scale_group=64),  # the brief's user format
                Format("g48", values=480, tail=16, scale_group=48))  # groups of 48, 10 codes + 6 pad bytes
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # conftest sets it without a GPU
FUZZ_SEEDS = 60  # torch and the oracle on each: ~1 s
TRITON_FUZZ_SEEDS = 30  # the first of them through the Triton interpreter too: ~3 s


def run(case: WriterCase, backend: str, device: str = "cpu") -> torch.Tensor:
    """The case's poisoned cache after `backend`'s call, on the CPU. Triton runs in the interpreter on CPU
    tensors where TRITON_INTERPRET=1, else on CUDA copies (so on the GPU machine these tests check the
    compiled kernel)."""
    if backend == "triton" and not INTERPRETED:
        if not torch.cuda.is_available():
            pytest.skip("Triton needs TRITON_INTERPRET=1 or a CUDA device")
        device = "cuda"
    if device == "cpu":
        return run_case(case, BACKENDS[backend])
    k, k_cache, slots, block_size = case.args(device)
    k, kw = case.extra(k)  # the tail apart, pow2 scales: as the case asks
    BACKENDS[backend](k, k_cache, slots, block_size, case.fmt, **kw)
    torch.cuda.synchronize()
    return _to(k_cache, "cpu")


# ---- the golden corpus -------------------------------------------------------------------------------------


def test_writer_corpus_is_complete_and_committed():
    assert set(DIGEST_TABLE) == set(CASES), "run `python -m tests.golden.writer_corpus --update` and commit"


def test_writer_corpus_covers_formats_block_sizes_views_and_slot_dtypes():
    cases = [build_case(name) for name in CASES]
    assert {(c.fmt.name, c.block_size) for c in cases} >= {(f, b) for f in LAYOUTS for b in BLOCK_SIZES}
    for layout in LAYOUTS:
        mine = [c for c in cases if c.fmt.name == layout]
        assert {c.slot_mapping.dtype for c in mine} == {torch.int32, torch.int64}
        assert any(c.byte_view and c.k_cache.shape[1] > c.block_size * c.fmt.record_bytes for c in mine)
        assert any(c.byte_view and c.k_cache.stride(0) > c.k_cache.shape[1] for c in mine)
        assert any(not c.byte_view and c.k_cache.stride(0) > c.block_size * c.fmt.record_bytes for c in mine)
        assert any(c.k_cache.storage_offset() > 0 for c in mine)
        assert any(c.k.stride(0) > c.fmt.head_dim for c in mine)
        assert any(c.slot_mapping.shape[0] < c.k.shape[0] for c in mine)
        assert any(c.slot_mapping.shape[0] == 0 for c in mine)
        assert any(bool((c.slot_mapping < 0).all()) and c.slot_mapping.numel() for c in mine)
        dup = [c for c in mine if c.slot_mapping[c.slot_mapping >= 0].unique().numel() < (c.slot_mapping >= 0).sum()]
        assert dup, "a case with duplicate slots"


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_case(name, backend):
    """Each backend leaves the whole poisoned storage as the digest says (reference and oracle vouched for it)."""
    cache = run(build_case(name), backend)
    assert digest(cache) == DIGEST_TABLE[name]["sha256"], (name, backend)


def test_a_disagreement_names_the_case_and_byte_and_writes_nothing(monkeypatch, tmp_path, capsys):
    names = ["v4_random_b16", "v41_specials_b32"]
    monkeypatch.setattr(writer_corpus, "CASES", {n: CASES[n] for n in names})
    digests = tmp_path / "writer_digests.json"
    monkeypatch.setattr(writer_corpus, "DIGESTS", digests)
    bad = build_case("v41_specials_b32")  # one wrong byte: the first written token's scale row, byte 3
    page, row = divmod(int(bad.slot_mapping[(bad.slot_mapping >= 0).nonzero()[0, 0]]), bad.block_size)
    at = (bad.k_cache.storage_offset() + page * bad.k_cache.stride(0) + bad.block_size * bad.fmt.data_bytes
          + row * bad.fmt.scale_bytes + 3)

    def broken_oracle(case):
        cache = run_case(case, quantize_and_insert_oracle)
        if case.fmt.name == "v41_528":
            whole_storage(cache)[at] ^= 1
        return cache

    monkeypatch.setattr(writer_corpus, "oracle_cache", broken_oracle)
    assert writer_corpus.main(["--update"]) == 1
    printed = capsys.readouterr().out
    assert "'v41_specials_b32'" in printed and f"page {page}, scale row {row}, byte 3" in printed, printed
    assert "1 byte(s) differ" in printed and "v4_random_b16" not in printed, printed
    assert not digests.exists()


# ---- fuzz ----------------------------------------------------------------------------------------------------


def _fuzz_values(tokens: int, fmt: Format, rng: np.random.Generator) -> torch.Tensor:
    """Per group, one class of bf16 bits: normal at a random scale, random bit patterns (NaN, Inf,
    subnormals...), zeros, subnormals, or normals with a NaN or an Inf dropped in."""
    n, g = tokens * fmt.num_scales, fmt.scale_group
    normal = rng.standard_normal((n, g)) * 10.0 ** rng.integers(-9, 36, (n, 1))
    normal = (normal.astype(np.float32).view(np.uint32) >> 16).astype(np.int64)  # truncated: bf16
    raw = rng.integers(0, 1 << 16, (n, g))
    zeros = rng.integers(0, 2, (n, g)) << 15
    sub = rng.integers(0, 0x80, (n, g)) | zeros
    special = normal.copy()
    special[np.arange(n), rng.integers(0, g, n)] = rng.choice([0x7F80, 0xFF80, 0x7FC0, 0xFFC1, 0x7F81], n)
    kind = rng.integers(0, 5, n)[:, None]
    bits = np.select([kind == 0, kind == 1, kind == 2, kind == 3], [normal, raw, zeros, sub], special)
    tail = rng.integers(0, 1 << 16, (tokens, fmt.tail))
    return bf16(np.concatenate([bits.reshape(tokens, fmt.values), tail], axis=1))


def fuzz_case(seed: int) -> WriterCase:
    rng = random.Random(seed)
    fmt = as_format(rng.choice([*LAYOUTS, *LAYOUTS, *USER_FORMATS]))
    bs = BLOCK_SIZES[seed % len(BLOCK_SIZES)]
    num_blocks = rng.randint(1, 3)
    tokens = rng.randint(0, min(num_blocks * bs, 40))
    mapped = tokens if rng.random() < 0.6 else rng.randint(0, tokens)
    slots = np.random.default_rng(seed).permutation(num_blocks * bs)[:mapped]
    valid = rng.choice([0.0, 0.5, 0.9, 1.0])
    skip = np.random.default_rng(seed + 1).random(mapped) >= valid
    slots[skip] = np.random.default_rng(seed + 2).choice([-1, -1, -1, -2, -1000], int(skip.sum()))
    byte_view = rng.random() < 0.4
    return writer_case(format=fmt, block_size=bs, seed=seed, tokens=tokens, num_blocks=num_blocks,
                       fill=_fuzz_values, slots=slots.tolist(), slot_dtype=rng.choice([torch.int32, torch.int64]),
                       byte_view=byte_view, block_pad=16 * rng.randint(0, 2) if byte_view else 0,
                       page_pad=16 * rng.randint(0, 3), lead=16 * rng.randint(0, 3), k_row_pad=rng.randint(0, 9))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fuzz_against_the_oracle(backend):
    seeds = range(FUZZ_SEEDS if backend == "torch" else TRITON_FUZZ_SEEDS)
    for seed in seeds:
        case = fuzz_case(seed)
        expected = run_case(case, quantize_and_insert_oracle)
        problem = first_difference(case, run(case, backend), expected)
        assert problem is None, f"seed {seed} ({case.fmt.name}, block_size {case.block_size}): {problem}"


# ---- what is written, and what is not ------------------------------------------------------------------------


def addressed(case: WriterCase) -> np.ndarray:
    """bool over the cache's storage: the data and scale row bytes of every written token."""
    mask = np.zeros(case.k_cache.untyped_storage().nbytes(), dtype=bool)
    fmt, bs = case.fmt, case.block_size
    for slot in case.slot_mapping.tolist():
        if slot < 0:
            continue
        page, row = divmod(slot, bs)
        start = case.k_cache.storage_offset() + page * case.k_cache.stride(0)
        mask[start + row * fmt.data_bytes: start + (row + 1) * fmt.data_bytes] = True
        scale = start + bs * fmt.data_bytes + row * fmt.scale_bytes
        mask[scale: scale + fmt.scale_bytes] = True
    return mask


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_only_the_addressed_rows_change(backend):
    names = ["v4_byte_view_strided_b32", "v41_record_view_padded_b16", "v4_storage_offset_b256",
             "v41_short_mapping_b16", "v4_all_skipped_b16"]
    cases = [build_case(n) for n in names] + [fuzz_case(seed) for seed in range(100, 110)]
    for case in cases:
        before = storage_bytes(case.k_cache)
        after = storage_bytes(run(case, backend))
        mask = addressed(case)
        outside = np.nonzero((before != after) & ~mask)[0]
        assert outside.size == 0, f"{backend}: wrote {outside.size} byte(s) outside the rows, first at " \
                                  f"{writer_corpus.locate(case, int(outside[0]))}"
        # Inside: exactly each token's record (pad bytes 0 included), as the oracle encodes it (distinct slots).
        fmt, slots = case.fmt, case.slot_mapping.tolist()
        data, codes = encode_records(bits_of(case.k[: len(slots)]), fmt)
        start = case.k_cache.storage_offset()
        for i, slot in enumerate(slots):
            if slot >= 0:
                page, row = divmod(slot, case.block_size)
                at = start + page * case.k_cache.stride(0)
                assert (after[at + row * fmt.data_bytes:][: fmt.data_bytes] == data[i]).all()
                scale = at + case.block_size * fmt.data_bytes + row * fmt.scale_bytes
                assert (after[scale: scale + fmt.scale_bytes] == codes[i]).all()
                assert (codes[i, fmt.num_scales:] == 0).all()


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("layout", [*LAYOUTS, "w384"])
def test_duplicate_slots_write_bytes_of_one_candidate(backend, layout):
    fmt = USER_FORMATS[0] if layout == "w384" else as_format(layout)
    rng = np.random.default_rng(7)
    case = writer_case(format=fmt, block_size=16, seed=77, tokens=20, fill=_fuzz_values,
                       slots=[5, 5, 9, 20, 21, 5, -1, 33, 9, 40] + list(range(22, 32)), byte_view=layout == "w384")
    # Make the duplicates' records differ everywhere: different magnitudes, so different codes and bytes.
    rows = [0, 1, 5]
    case.k[rows] = (torch.from_numpy(rng.standard_normal((3, fmt.head_dim))).float()
                    * torch.tensor([1.0, 1e3, 1e-3])[:, None]).to(torch.bfloat16)
    after = storage_bytes(run(case, backend))
    start = case.k_cache.storage_offset()

    def rows_of(slot):  # byte addresses of a slot's data row and scale row (page 0)
        return np.concatenate([start + slot * fmt.data_bytes + np.arange(fmt.data_bytes),
                               start + 16 * fmt.data_bytes + slot * fmt.scale_bytes + np.arange(fmt.scale_bytes)])

    duplicated = np.zeros(after.shape, dtype=bool)
    duplicated[rows_of(5)] = duplicated[rows_of(9)] = True
    # Every other byte: as the oracle writes the call without the duplicates.
    alone = writer_case(format=fmt, block_size=16, seed=77, tokens=20, fill=_fuzz_values,
                        slots=[-1, -1, -1, 20, 21, -1, -1, 33, -1, 40] + list(range(22, 32)),
                        byte_view=layout == "w384")
    alone.k[:] = case.k
    expected = storage_bytes(run_case(alone, quantize_and_insert_oracle))
    assert (after[~duplicated] == expected[~duplicated]).all()
    # Slot 5 (tokens 0, 1, 5, records differing everywhere) and slot 9 (tokens 2, 8): each byte from one of them.
    for slot, tokens in ((5, rows), (9, [2, 8])):
        data, codes = encode_records(bits_of(case.k[tokens]), fmt)
        candidates = np.concatenate([data, codes], axis=1)
        assert ((after[rows_of(slot)][None, :] == candidates).any(axis=0)).all(), slot
    data, codes = encode_records(bits_of(case.k[rows]), fmt)
    assert (codes[0, :fmt.num_scales] != codes[1, :fmt.num_scales]).all()


# ---- round trip and a user's format --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_round_trip_through_the_reader(backend, layout):
    """Gathering written rows returns the tail exactly and each value within half an e4m3 step at its scale."""
    fmt = as_format(layout)
    for seed, scale in enumerate((1e-6, 1.0, 3e4)):
        case = writer_case(format=layout, block_size=32, seed=300 + seed, tokens=40, num_blocks=2)
        case.k[:] = (case.k.float() * scale).to(torch.bfloat16)
        k, slots, bs = case.k, case.slot_mapping, case.block_size
        k_cache = run(case, backend)
        out = torch.empty((slots.shape[0], fmt.head_dim), dtype=torch.bfloat16)
        out.view(torch.int16).fill_(POISON_BF16)
        dequantize_and_gather_sparse_torch(out, k_cache, slots.to(torch.int32), bs)
        valid = (slots >= 0).numpy()
        got = out.float().numpy()[valid].astype(np.float64)
        want = k[: slots.shape[0]].float().numpy()[valid].astype(np.float64)
        assert (bits_of(out)[~valid] == POISON_BF16).all()
        assert (bits_of(out[valid])[:, fmt.values:] == bits_of(k[: slots.shape[0]][valid])[:, fmt.values:]).all()
        _, codes = encode_records(bits_of(k[: slots.shape[0]][valid]), fmt)
        group_scale = np.ldexp(1.0, codes[:, : fmt.num_scales].astype(np.int32) - 127)
        group_scale = np.repeat(group_scale, fmt.scale_group, axis=1)
        scaled = np.abs(want[:, : fmt.values]) / group_scale
        binade = np.maximum(np.frexp(scaled)[1] - 1, -6)  # e4m3 exponent of the scaled value (floor log2)
        half_step = group_scale * np.ldexp(1.0, binade - 3) / 2
        error = np.abs(got[:, : fmt.values] - want[:, : fmt.values])
        assert (error <= half_step).all(), (seed, float((error / half_step).max()))


@pytest.mark.parametrize("fmt", USER_FORMATS, ids=lambda f: f.name)
def test_a_user_format_passed_directly(fmt):
    for seed, kw in enumerate([dict(), dict(byte_view=True, block_pad=32, lead=16),
                               dict(fill=_fuzz_values, k_row_pad=3, page_pad=16, slot_dtype=torch.int32)]):
        case = writer_case(format=fmt, block_size=(16, 64, 32)[seed], seed=500 + seed, tokens=30, **kw)
        expected = run_case(case, quantize_and_insert_oracle)
        assert storage_bytes(expected).tolist() != storage_bytes(case.k_cache).tolist()
        for name in ("torch", "triton"):
            assert first_difference(case, run(case, name), expected) is None, (fmt.name, seed, name)


# ---- the H100's cvt.rn.satfinite.e4m3x2.f32 and the scale code -----------------------------------------------

# (float32 input, byte the H100 gives): NaN of any sign or payload, +-Inf, saturation, ties to even,
# subnormal rounding, signed zeros, float32 denormals.
H100_FACTS = [(0x7FC00000, 0x7F), (0xFFC00000, 0x7F), (0x7F800001, 0x7F), (0xFFFFFFFF, 0x7F), (0x7FBFFFFF, 0x7F),
              (0x7F800000, 0x7E), (0xFF800000, 0xFE)] + [
    (np.float32(v).view(np.uint32), b) for v, b in [
        (464.0, 0x7E), (480.0, 0x7E), (32768.0, 0x7E), (-464.0, 0xFE), (-480.0, 0xFE), (-32768.0, 0xFE),
        (448.0, 0x7E), (3.0e38, 0x7E),
        (1.0625, 0x38), (1.1875, 0x3A), (-1.0625, 0xB8), (-1.1875, 0xBA),
        (2.0 ** -10, 0x00), (1.5 * 2.0 ** -10, 0x01), (1.5 * 2.0 ** -9, 0x02), (1.25 * 2.0 ** -9, 0x01),
        (-(2.0 ** -10), 0x80), (-1.5 * 2.0 ** -10, 0x81), (7.5 * 2.0 ** -9, 0x08), (-0.0, 0x80), (0.0, 0x00)]] + [
    (0x00000001, 0x00), (0x007FFFFF, 0x00), (0x80000001, 0x80), (0x807FFFFF, 0x80)]  # float32 denormals


@triton.jit
def _e4m3_of_float32_kernel(x_ptr, out_ptr, n, B: tl.constexpr):
    """The Triton backend's E4M3 rounding on float32 bits (finite ones: its caller's NaN/Inf rules too)."""
    i = tl.program_id(0) * B + tl.arange(0, B)
    b = tl.load(x_ptr + i, mask=i < n, other=0)
    mag = b & 0x7FFFFFFF
    e = (mag >> 23) & 0xFF
    sig = (mag & 0x7FFFFF) | tl.where(e > 0, 0x800000, 0)
    sign = (b >> 31) & 1
    byte = _e4m3_rne_satfinite(sign, sig, tl.maximum(e, 1) - 150)
    byte = tl.where(mag == 0x7F800000, 0x7E | (sign << 7), byte)
    byte = tl.where(mag > 0x7F800000, 0x7F, byte)
    tl.store(out_ptr + i, byte.to(tl.uint8), mask=i < n)


def _triton_e4m3(bits: np.ndarray) -> np.ndarray:
    device = "cpu" if INTERPRETED else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("Triton needs TRITON_INTERPRET=1 or a CUDA device")
    x = torch.from_numpy(bits.astype(np.uint32).view(np.int32).copy()).to(device)
    out = torch.empty(x.shape, dtype=torch.uint8, device=device)
    _e4m3_of_float32_kernel[(triton.cdiv(x.numel(), 4096),)](x, out, x.numel(), B=4096)
    return out.cpu().numpy()


def _three_encoders(bits: np.ndarray) -> dict[str, np.ndarray]:
    f32 = bits.astype(np.uint32).view(np.float32)
    with np.errstate(invalid="ignore"):  # signalling NaN patterns
        wide = f32.astype(np.float64)
    found = {"torch": e4m3_rne_satfinite(torch.from_numpy(f32.copy())).numpy(), "oracle": oracle.e4m3_nearest(wide),
             "triton": _triton_e4m3(bits)}
    if torch.cuda.is_available():  # torch's float8 cast on the GPU too
        found["torch_cuda"] = e4m3_rne_satfinite(torch.from_numpy(f32.copy()).cuda()).cpu().numpy()
    return found


def test_every_e4m3_encoder_gives_the_h100_bytes():
    bits = np.array([int(b) for b, _ in H100_FACTS], dtype=np.uint32)
    want = np.array([b for _, b in H100_FACTS], dtype=np.uint8)
    for name, got in _three_encoders(bits).items():
        bad = np.nonzero(got != want)[0]
        assert bad.size == 0, f"{name}: " + ", ".join(f"0x{bits[i]:08x} -> 0x{got[i]:02x}, not 0x{want[i]:02x}"
                                                       for i in bad)


def test_e4m3_encoders_agree_on_many_float32s():
    rng = np.random.default_rng(3)
    grid = np.ldexp(np.arange(256, dtype=np.float64)[None, :], np.arange(-160, 12)[:, None]).astype(np.float32)
    near = (rng.random(1 << 15) * 512).astype(np.float32) * np.ldexp(1.0, rng.integers(-16, 1, 1 << 15)).astype(
        np.float32)
    bits = np.concatenate([grid.ravel().view(np.uint32), near.view(np.uint32),
                           rng.integers(0, 1 << 32, 1 << 15, dtype=np.uint64).astype(np.uint32)])
    bits = np.concatenate([bits, bits | 0x80000000])
    got = _three_encoders(bits)
    for name in set(got) - {"oracle"}:
        bad = np.nonzero(got[name] != got["oracle"])[0]
        assert bad.size == 0, f"{name}: {bad.size} differ, first 0x{bits[bad[0]]:08x}"


def test_scale_codes_for_every_bf16_amax():
    """Every finite non-negative bf16 amax (and +Inf): the reference's bit formula equals the oracle's search."""
    amax_bits = np.arange(0, 0x7F81, dtype=np.uint32)
    amax = (amax_bits << 16).view(np.float32)
    code = ue8m0_codes(torch.from_numpy(amax.copy())).numpy()
    a = np.maximum(amax.astype(np.float64), oracle.AMAX_FLOOR)
    finite = np.isfinite(a)
    searched = np.where(finite, oracle.scale_exponent(np.where(finite, a, 1.0)) + 127, 255)
    assert (code == searched).all()
    assert code[amax_bits < 0x3800].max() == 105 and code[0x7F7F] == 247 and code[0x7F80] == 255
    assert code[np.float32(448.0).view(np.uint32) >> 16] == 127 and code[np.float32(450.0).view(np.uint32) >> 16] == 128


def test_scale_codes_for_every_bf16_amax_through_the_kernels():
    """The same amax values as group maxima through every backend (v41_528: 16 groups a token), either sign."""
    fmt = as_format("v41_528")
    amax_bits = np.arange(0, 0x7F81, dtype=np.int64)
    groups = -(-amax_bits.size // 16) * 16
    bits = np.zeros((groups, fmt.scale_group), dtype=np.int64)
    bits[: amax_bits.size, 3] = amax_bits | (np.arange(amax_bits.size) % 2 << 15)
    bits[: amax_bits.size, 7] = amax_bits >> 1  # a smaller value alongside
    tokens = groups // 16
    case = writer_case(format=fmt, block_size=256, seed=9, tokens=tokens, num_blocks=-(-tokens // 256),
                       fill=lambda t, f, r: bf16(bits.reshape(t, f.head_dim)), valid=1.0)
    expected = run_case(case, quantize_and_insert_oracle)
    for name in ("torch", "triton"):
        assert first_difference(case, run(case, name), expected) is None, name


def test_records_of_the_h100_facts_through_every_backend():
    """Whole records: a group of scale 1 (amax 448) holding the finite facts, a group with +Inf (code 255,
    scale 2^-128), all-NaN and all-zero groups (amax floor 1e-4: code 105)."""
    fmt = as_format("v41_528")
    finite = [448.0, 1.0625, 1.1875, 2.0 ** -10, 1.5 * 2.0 ** -10, 1.5 * 2.0 ** -9, 1.25 * 2.0 ** -9, -0.0,
              -1.0625, 7.5 * 2.0 ** -9, 440.0, -400.0]  # 440 -> 448; -400: a tie, to -384
    bits = np.zeros((2, fmt.values), dtype=np.int64)
    bits[0, : len(finite)] = np.array(finite, dtype=np.float32).view(np.uint32) >> 16
    bits[0, 12:14] = [0x7FC0, 0xFFC1]  # NaN of either sign, in a group of scale 1
    inf_group = [0x7F80, 0xFF80, 0x7F00, 0xFF00, 0x7F7F, 0x3F80, 0x8000]  # +-Inf, +-2^127, max finite, 1, -0
    bits[0, 32: 32 + len(inf_group)] = inf_group
    bits[0, 64:96] = 0x7FC0  # all NaN
    bits[0, 96:128] = 0x8000  # all -0
    bits[1] = bits[0]
    case = writer_case(format=fmt, block_size=16, seed=1, tokens=2, num_blocks=1,
                       fill=lambda t, f, r: bf16(bits), slots=[3, -1])
    want_values = [0x7E, 0x38, 0x3A, 0x00, 0x01, 0x02, 0x01, 0x80, 0xB8, 0x08, 0x7E, 0xFC, 0x7F, 0x7F]
    want_inf = [0x7E, 0xFE, 0x30, 0xB0, 0x38, 0x00, 0x80]  # 2^127 * 2^-128 = 0.5; max finite -> 0.996 -> 1.0
    for name in BACKENDS:
        storage = storage_bytes(run(case, name))
        start = case.k_cache.storage_offset()
        record = storage[start + 3 * fmt.data_bytes: start + 4 * fmt.data_bytes]
        codes = storage[start + 16 * fmt.data_bytes + 3 * fmt.scale_bytes:][: fmt.scale_bytes]
        assert record[: len(want_values)].tolist() == want_values, name
        assert record[32: 32 + len(want_inf)].tolist() == want_inf, name
        assert (record[64:96] == 0x7F).all() and (record[96:128] == 0x80).all(), name
        assert codes[:4].tolist() == [127, 255, 105, 105], name


def test_quantize_records_and_encode_records_agree_with_zero_pad():
    for fmt in (as_format("dsv4_584"), *USER_FORMATS):
        x = _fuzz_values(17, fmt, np.random.default_rng(11))
        data, codes = quantize_records(x, fmt)
        o_data, o_codes = encode_records(bits_of(x), fmt)
        assert data.dtype == codes.dtype == torch.uint8
        assert data.shape == (17, fmt.data_bytes) and codes.shape == (17, fmt.scale_bytes)
        assert (data.numpy() == o_data).all() and (codes.numpy() == o_codes).all()
        assert (o_codes[:, fmt.num_scales:] == 0).all()


# ---- the GPU: the public op, every backend, against the digests ----------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_writer_functions_on_cuda_tensors(backend):
    """The torch reference and the Triton kernel, called directly on CUDA tensors, against the digests."""
    wrong = [name for name in sorted(CASES)
             if digest(run(build_case(name), backend, "cuda")) != DIGEST_TABLE[name]["sha256"]]
    assert not wrong, wrong


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cubin", "triton", "torch"])
def test_writer_backends_on_gpu(backend, monkeypatch):
    import kvgen

    monkeypatch.setenv("KVGEN_BACKEND", backend)
    wrong = []
    for name in sorted(CASES):
        case = build_case(name)
        k, k_cache, slots, block_size = case.args("cuda")
        case.call_public(k, k_cache, slots, block_size)
        torch.cuda.synchronize()
        cache = _to(k_cache, "cpu")  # the whole storage, padding and poison around the pages included
        if slots.shape[0] and kvgen.last_backend() != backend:
            wrong.append(f"{name}: served by {kvgen.last_backend()}")
        elif digest(cache) != DIGEST_TABLE[name]["sha256"]:
            expected = run_case(case, quantize_and_insert_oracle)
            wrong.append(f"{name}: {first_difference(case, cache, expected)}")
    assert not wrong, "\n".join(wrong)
