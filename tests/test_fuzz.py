"""Fuzz: seeded random calls, every backend against the independent oracle (kvgen/oracle.py), bit for bit.

For each family (dense or sparse, each layout) the seeds cycle through the
block sizes and draw shapes, strides (padded out rows and requests, strided
block tables, padded pages), raw random cache bytes (or quantized ones),
gather windows (or none) and offsets, or -1 slots and a [..., 512] output.
`out` lies inside a larger poisoned buffer and the whole buffer is compared,
so a write outside the addressed rows is caught too. On the CPU the torch path
and the Triton interpreter are checked; with a CUDA device (`gpu` marker), the
cubins, against the oracle run on CPU copies. A failure names the seed, which
`fuzz_case(seed, indexing, layout)` rebuilds. Below the fuzz: values worked
out by hand from docs/semantics.md, and every (e4m3 byte, scale code) pair.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch

import kvgen
from kvgen.families.dequant_gather import oracle
from kvgen.testing import as_format

HEAD_DIM = 512  # both shipped formats' head dim
LAYOUTS = ("dsv4_584", "v41_528")
from kvgen.families.dequant_gather.oracle import dequantize_and_gather_oracle, dequantize_and_gather_sparse_oracle
from kvgen.testing import POISON_BF16, Case, SparseCase, first_mismatch, make_case, make_sparse_case

BLOCK_SIZES = (16, 32, 64, 128, 256)
SEEDS_PER_FAMILY = 150  # x 4 families, torch path against the oracle: ~5 s
TRITON_SEEDS_PER_FAMILY = 30  # the first of them through the Triton interpreter too: ~15 s on 2 cores
GPU_SEEDS_PER_FAMILY = SEEDS_PER_FAMILY


@dataclass
class Fuzzed:
    """A random call whose `out` is a view into `base`, a larger poisoned buffer."""

    seed: int
    label: str
    case: Case | SparseCase
    base: torch.Tensor
    view: Callable[[torch.Tensor], torch.Tensor]  # base -> out
    family: tuple  # (layout, indexing, block_size, has gather_lens), as the manifest's rows

    def run(self, fn, device: str = "cpu") -> torch.Tensor:
        """Call fn on a fresh copy of the poisoned buffer on `device`; the buffer afterwards, on the CPU."""
        base = self.base.clone().to(device)  # clone: .to("cpu") alone would hand back self.base itself
        fn(*self.case.args(device, out=self.view(base)))
        if device == "cuda":
            torch.cuda.synchronize()
        return base.cpu()

    @property
    def launches(self) -> bool:
        """Whether the op launches anything (else last_backend() is None)."""
        if isinstance(self.case, SparseCase):
            return self.case.slot_indices.numel() > 0
        return self.case.seq_lens.numel() > 0 and self.case.out.shape[1] > self.case.offset


def _poisoned(*shape: int) -> torch.Tensor:
    base = torch.empty(shape, dtype=torch.bfloat16)
    base.view(torch.int16).fill_(POISON_BF16)
    return base


def fuzz_case(seed: int, indexing: str, layout: str) -> Fuzzed:
    rng = random.Random(seed)
    bs = BLOCK_SIZES[seed % len(BLOCK_SIZES)]
    raw = rng.random() < 0.75  # raw bytes: every e4m3 pattern and scale code, NaNs and edge codes included
    data = dict(block_size=bs, format=layout, raw_bytes=raw, page_pad=16 * rng.randint(0, 3), seed=seed,
                value_scale=rng.choice([1e-7, 1.0, 3e4]),
                extra_pages=rng.randint(1, 3))  # >= 1: write_pages cannot build a cache of 0 pages
    row_pad = 8 * rng.randint(0, 2)  # out's row stride: 512 or 520 (16-byte multiples, so cubins serve it too)
    if indexing == "dense":
        seq_lens = [rng.randint(0, min(3 * bs + 9, 700)) for _ in range(rng.randint(1, 4))]
        gather_lens = None if rng.random() < 0.35 else [rng.randint(0, s) for s in seq_lens]
        offset = rng.randint(0, 5)
        rows = max(gather_lens or seq_lens)
        max_tokens = max(offset, offset + rows + rng.randint(-6, 3))  # sometimes too short: a clamped gather
        case = make_case(seq_lens=seq_lens, gather_lens=gather_lens, offset=offset, max_tokens=max_tokens,
                         block_table_pad=rng.randint(0, 3), **data)
        req_pad = rng.randint(0, 2)  # spare rows between requests
        base = _poisoned(len(seq_lens), max_tokens + req_pad, HEAD_DIM + row_pad)
        view = lambda b, t=max_tokens: b[:, :t, :HEAD_DIM]  # noqa: E731
        label = (f"dense {layout} block_size={bs} seq_lens={seq_lens} gather_lens={gather_lens} offset={offset} "
                 f"out rows={max_tokens}")
        family = (layout, "dense", bs, gather_lens is not None)
    else:
        num_slots = rng.randint(0, min(3 * bs + 20, 400))
        valid = rng.random()
        shape = (4, num_slots // 4) if num_slots % 4 == 0 and rng.random() < 0.5 else (num_slots,)
        case = make_sparse_case(num_slots=num_slots, valid=valid, **data)
        base = _poisoned(num_slots, HEAD_DIM + row_pad)
        view = lambda b, shape=shape: b[:, :HEAD_DIM].view(*shape, HEAD_DIM)  # noqa: E731
        label = f"sparse {layout} block_size={bs} {num_slots} slots ({valid:.0%} valid) out {list(shape)}x512"
        family = (layout, "sparse", bs, False)
    case.out = view(base)
    return Fuzzed(seed, f"{label}, raw_bytes={raw}, page_pad={data['page_pad']}, row_pad={row_pad}",
                  case, base, view, family)


def _oracle(f: Fuzzed) -> torch.Tensor:
    return f.run(dequantize_and_gather_sparse_oracle if isinstance(f.case, SparseCase) else dequantize_and_gather_oracle)


def _op(f: Fuzzed):
    return kvgen.dequantize_and_gather_k_cache_sparse if isinstance(f.case, SparseCase) else kvgen.dequantize_and_gather_k_cache


def _check(f: Fuzzed, backend: str, expected: torch.Tensor, monkeypatch, device: str = "cpu") -> None:
    monkeypatch.setenv("KVGEN_BACKEND", backend)
    got = f.run(_op(f), device)
    if f.launches:
        assert kvgen.last_backend() == backend, f"seed {f.seed}: served by {kvgen.last_backend()}"
    problem = first_mismatch(got, expected)
    assert problem is None, (f"seed {f.seed} ({f.label}): {backend} vs the oracle, over out's whole buffer "
                             f"(columns >= 512 are row padding): {problem}")


@pytest.fixture
def coverage(monkeypatch):
    """The e4m3 bytes and scale codes the oracle actually read (so, those every backend decoded)."""
    seen = {"fp8": np.zeros(256, bool), "codes": np.zeros(256, bool)}
    read = oracle.read_records

    def recording(k_cache, block_size, page, row):
        data, codes = read(k_cache, block_size, page, row)
        seen["fp8"][data[:, : oracle.format_of(k_cache).values]] = True
        seen["codes"][codes] = True
        return data, codes

    monkeypatch.setattr(oracle, "read_records", recording)
    return seen


FAMILIES = [(indexing, layout) for indexing in ("dense", "sparse") for layout in LAYOUTS]


@pytest.mark.parametrize("indexing, layout", FAMILIES)
def test_fuzz_torch_and_triton_against_the_oracle(indexing, layout, coverage, monkeypatch):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (set by conftest without a GPU)")
    offset = 1000 * FAMILIES.index((indexing, layout))
    for seed in range(offset, offset + SEEDS_PER_FAMILY):
        f = fuzz_case(seed, indexing, layout)
        expected = _oracle(f)
        for backend in ("torch", "triton") if seed < offset + TRITON_SEEDS_PER_FAMILY else ("torch",):
            _check(f, backend, expected, monkeypatch)
    # Over the run, every e4m3 byte pattern and every scale code was decoded.
    assert coverage["fp8"].all(), np.flatnonzero(~coverage["fp8"])
    assert coverage["codes"].all(), np.flatnonzero(~coverage["codes"])


@pytest.mark.gpu
@pytest.mark.parametrize("indexing, layout", FAMILIES)
def test_fuzz_cubins_against_the_oracle(indexing, layout, monkeypatch):
    """The shipped cubins on the GPU against the oracle run on the CPU copies."""
    from kvgen.runtime.loader import registry

    shipped = {(e.config["format"], e.config["indexing"], e.config["block_size"], e.config["gather_lens"])
               for e in registry().entries if e.family == "dqgk"}
    offset = 1000 * FAMILIES.index((indexing, layout))
    checked = 0
    for seed in range(offset, offset + GPU_SEEDS_PER_FAMILY):
        f = fuzz_case(seed, indexing, layout)
        if f.family not in shipped:
            continue  # the cubin backend serves only the manifest's families
        _check(f, "cubin", _oracle(f), monkeypatch, device="cuda")
        checked += 1
    assert checked >= GPU_SEEDS_PER_FAMILY // 2


# ------------------------------------------------------- values from the contract
NAN = None
# (e4m3 byte, scale code, bf16 bits): worked out by hand from docs/semantics.md, not by any decoder.
CONTRACT_VALUES = [
    (0x38, 127, 0x3F80),  # 1.0 * 1
    (0x7E, 127, 0x43E0),  # 448 = 1.75 * 2^8, the largest e4m3
    (0xFE, 128, 0xC460),  # -448 * 2 = -1.75 * 2^9
    (0x00, 200, 0x0000), (0x80, 3, 0x8000),  # +-0 survive scaling, sign included
    (0x01, 127, 0x3B00),  # 2^-9, the smallest e4m3 subnormal
    (0x07, 130, 0x3DE0),  # 7 * 2^-9 * 2^3 = 1.75 * 2^-4
    (0x38, 1, 0x0080),  # 2^-126, the smallest bf16 normal
    (0x38, 0, 0x0040),  # code 0 is 2^-127: a bf16 subnormal (64 * 2^-133), not zero
    (0x01, 3, 0x0001),  # 2^-133, the smallest bf16 subnormal
    (0x01, 0, 0x0000),  # 2^-136 = 0.125 * 2^-133: rounds to +0
    (0x81, 0, 0x8000),  # ... and to -0
    (0x07, 0, 0x0001),  # 7 * 2^-136 = 0.875 * 2^-133: rounds up
    (0x04, 0, 0x0000),  # 0.5 * 2^-133: a tie, to even (0)
    (0x0C, 0, 0x0002),  # 12 * 2^-136 = 1.5 * 2^-133: a tie, to even (2)
    (0x12, 0, 0x0002),  # 1.25 * 2^-5 * 2^-127 = 2.5 * 2^-133: a tie, to even (2)
    (0x96, 0, 0x8004),  # -1.75 * 2^-5 * 2^-127 = -3.5 * 2^-133: a tie, to even (-4)
    (0x7E, 246, 0x7F60),  # 1.75 * 2^127, the largest finite bf16
    (0x7E, 247, 0x7F80),  # 1.75 * 2^128 overflows: +Inf
    (0xFE, 254, 0xFF80),  # -448 * 2^127: -Inf
    (0x7F, 127, NAN), (0xFF, 1, NAN),  # the e4m3 NaNs
    (0x38, 255, NAN), (0x00, 255, NAN),  # code 255 is NaN, for zeros too
]


def _gather_v41(fp8: torch.Tensor, codes: torch.Tensor, backend: str, monkeypatch) -> torch.Tensor:
    """Records with these fp8 bytes [n, 512] and scale codes [n, 16] (a 528-byte cache,
    16-token pages), gathered in order by a sparse call through `backend` or the oracle."""
    layout, bs, n = as_format("v41_528"), 16, fp8.shape[0]
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1")
    pages = -(-n // bs)
    k_cache = torch.zeros((pages, bs, layout.record_bytes), dtype=torch.uint8)
    page_bytes = k_cache.view(pages, -1)
    padded = lambda t: torch.cat([t, t.new_zeros(pages * bs - n, t.shape[1])]).view(pages, -1)  # noqa: E731
    page_bytes[:, : bs * layout.values] = padded(fp8)  # data rows first...
    page_bytes[:, bs * layout.values:] = padded(codes)  # ...then scale rows
    out = _poisoned(n, HEAD_DIM)
    slots = torch.arange(n, dtype=torch.int32)
    if backend == "oracle":
        dequantize_and_gather_sparse_oracle(out, k_cache, slots, bs)
    else:
        monkeypatch.setenv("KVGEN_BACKEND", backend)
        kvgen.dequantize_and_gather_k_cache_sparse(out, k_cache, slots, bs)
        assert kvgen.last_backend() == backend
    return out


@pytest.mark.parametrize("backend", ["oracle", "torch", "triton"])
def test_values_worked_out_from_the_contract(backend, monkeypatch):
    """One value per record, at fp8 element 0 (scale group 0)."""
    fp8 = torch.zeros((len(CONTRACT_VALUES), 512), dtype=torch.uint8)
    codes = torch.full((len(CONTRACT_VALUES), 16), 127, dtype=torch.uint8)
    fp8[:, 0] = torch.tensor([byte for byte, _, _ in CONTRACT_VALUES], dtype=torch.uint8)
    codes[:, 0] = torch.tensor([code for _, code, _ in CONTRACT_VALUES], dtype=torch.uint8)
    out = _gather_v41(fp8, codes, backend, monkeypatch)
    got = (out[:, 0].view(torch.int16).numpy().astype(np.int64) & 0xFFFF).tolist()
    for (byte, code, want), bits in zip(CONTRACT_VALUES, got):
        if want is NAN:
            assert (bits & 0x7F80) == 0x7F80 and bits & 0x7F and bits != POISON_BF16, (hex(byte), code, hex(bits))
        else:
            assert bits == want, f"e4m3 0x{byte:02x} * ue8m0 {code}: got 0x{bits:04x}, want 0x{want:04x}"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_every_e4m3_byte_with_every_scale_code(backend, monkeypatch):
    """All 256 x 256 (byte, code) pairs, each value once: 2048 groups of 32 values,
    group G holding code G // 8 and bytes 32 * (G % 8) .. + 31."""
    group = torch.arange(128 * 16).reshape(128, 16)  # 128 records of 16 groups
    fp8 = ((group % 8)[..., None] * 32 + torch.arange(32)).reshape(128, 512).to(torch.uint8)
    codes = (group // 8).to(torch.uint8)
    expected = _gather_v41(fp8, codes, "oracle", monkeypatch)
    problem = first_mismatch(_gather_v41(fp8, codes, backend, monkeypatch), expected)
    assert problem is None, f"{backend} vs the oracle, (record, value): {problem}"


def test_out_of_range_values_raise_like_the_torch_path():
    from kvgen.families.dequant_gather.reference import dequantize_and_gather_sparse_torch, dequantize_and_gather_torch

    case = make_case(seq_lens=[40, 17], gather_lens=[30, 17], block_size=16, seed=3)
    bad = {
        "gather_lens": dict(gather_lens=torch.tensor([41, 17], dtype=torch.int32)),
        "block_table": dict(block_table=case.block_table[:, :1]),  # 40 tokens need 3 columns
        "page": dict(block_table=torch.full_like(case.block_table, case.k_cache.shape[0])),
    }
    for what, change in bad.items():
        args = dict(zip(["out", "k_cache", "seq_lens", "gather_lens", "block_table", "block_size", "offset"],
                        case.args(out=case.out.clone())))
        args.update(change)
        for fn in (dequantize_and_gather_oracle, dequantize_and_gather_torch):
            before = args["out"].clone()
            with pytest.raises(ValueError, match=what):
                fn(**args)
            assert first_mismatch(args["out"], before) is None, (what, fn.__name__)  # nothing written first
    sparse = make_sparse_case(num_slots=10, block_size=16, seed=4)
    slots = sparse.slot_indices.clone()
    slots[3] = sparse.k_cache.shape[0] * 16  # one past the last slot
    for fn in (dequantize_and_gather_sparse_oracle, dequantize_and_gather_sparse_torch):
        with pytest.raises(ValueError, match="page"):
            fn(sparse.out.clone(), sparse.k_cache, slots, 16)
