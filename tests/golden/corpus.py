"""The golden corpus: seeded cases, their expected digests, a few full expected tensors.

    python -m tests.golden.corpus            # check the torch reference against the digests
    python -m tests.golden.corpus --update   # rewrite them (`make golden`), printing what changed

Each case is computed twice, by the torch reference and by kvgen/oracle.py (an
independent decoder written from docs/semantics.md), and accepted only where
the two agree: a disagreement names the case and its first differing element,
and nothing is written.

A digest is the sha256 of the whole `out` tensor (poisoned before the call,
so untouched rows count too) after every NaN other than the poison is
canonicalised to 0x7FC0: kvgen's comparison rule lets NaN payloads differ.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Callable

import torch

from kvgen.families.dequant_gather.oracle import dequantize_and_gather_oracle, dequantize_and_gather_sparse_oracle
from kvgen.families.dequant_gather.reference import dequantize_and_gather_sparse_torch, dequantize_and_gather_torch
from kvgen.runtime.validate import format_of
from kvgen.testing import POISON_BF16, Case, SparseCase, first_mismatch, make_case, make_sparse_case
from tests.golden.digests import Disagreement
from tests.golden.digests import main as digests_main

HERE = Path(__file__).resolve().parent
DIGESTS = HERE / "digests.json"
EXPECTED_DIR = HERE / "expected"
FULL_TENSOR_CASES = ("tiny_b16", "edge_fp8_bytes_b16", "edge_tail_specials")

# FP8 / scale / tail special values the corpus must cover.
SCALE_EDGES = (0, 1, 2, 126, 127, 128, 253, 254, 255)
TAIL_SPECIALS = (0x7F80, 0xFF80, 0x7FC0, 0xFFC1, 0x7F81, 0x0001, 0x8001, 0x8000, 0x0000, 0x7F7F, 0xFF7F, 0x0080)


def _overwrite_records(case, fill: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]):
    """Rewrite every record in place: fill(fp8 bytes [n, fp8_dim], codes [n, groups], tail u16 [n, 64])."""
    layout = format_of(case.k_cache)
    kc = case.k_cache
    bs, data_bytes = case.block_size, layout.data_bytes
    data = kc.as_strided((kc.shape[0], bs, data_bytes), (kc.stride(0), data_bytes, 1), kc.storage_offset())
    codes = kc.as_strided((kc.shape[0], bs, layout.scale_bytes), (kc.stride(0), layout.scale_bytes, 1),
                          kc.storage_offset() + bs * data_bytes)
    n = kc.shape[0] * bs
    fp8 = torch.empty((n, layout.values), dtype=torch.uint8)
    scale = torch.empty((n, layout.num_scales), dtype=torch.uint8)
    tail = torch.empty((n, 64), dtype=torch.int32)
    fill(fp8, scale, tail)
    data[..., : layout.values] = fp8.view(kc.shape[0], bs, -1)
    tail_bytes = data_bytes - layout.values
    data[..., layout.values:] = tail[:, : tail_bytes // 2].to(torch.int16).view(torch.uint8).view(kc.shape[0], bs, -1)
    codes[..., : scale.shape[1]] = scale.view(kc.shape[0], bs, -1)
    return case


def _every_fp8_byte(fp8, scale, tail):
    n = fp8.shape[0]
    token = torch.arange(n)[:, None]
    fp8[:] = ((torch.arange(fp8.shape[1])[None, :] + 37 * token) % 256).to(torch.uint8)
    edges = torch.tensor(SCALE_EDGES, dtype=torch.uint8)
    scale[:] = edges[(torch.arange(scale.shape[1])[None, :] + token) % len(edges)]
    tail[:] = torch.randint(0, 1 << 16, tail.shape, generator=torch.Generator().manual_seed(5)) - (1 << 15)


def _tail_specials(fp8, scale, tail):
    fp8[:] = torch.tensor([0x00, 0x80, 0x7F, 0xFF, 0x7E, 0xFE, 0x01, 0x81, 0x07, 0x08, 0x38, 0xB8],
                          dtype=torch.uint8).repeat(fp8.shape[1] // 12 + 1)[: fp8.shape[1]]
    scale[:] = torch.tensor(SCALE_EDGES[: scale.shape[1]], dtype=torch.uint8)
    specials = torch.tensor([v - (1 << 16) if v >= 1 << 15 else v for v in TAIL_SPECIALS], dtype=torch.int32)
    tail[:] = specials.repeat(tail.shape[1] // len(specials) + 1)[: tail.shape[1]]


def _cases() -> dict[str, Callable[[], Case]]:
    c: dict[str, Callable[[], Case]] = {}
    for bs in (16, 32, 64, 128, 256):
        # seq_len not a multiple of block_size, whole sequences
        c[f"quantized_b{bs}"] = lambda bs=bs: make_case(seq_lens=[bs * 3 + 5, 7, bs + 1], block_size=bs, seed=bs)
        c[f"raw_bytes_b{bs}"] = lambda bs=bs: make_case(seq_lens=[bs * 2 + 3, bs - 1], block_size=bs,
                                                        raw_bytes=True, seed=bs + 1)
        c[f"partial_gather_b{bs}"] = lambda bs=bs: make_case(
            seq_lens=[bs * 4 + 9, 3 * bs, 11], gather_lens=[bs + 2, 3 * bs, 0], block_size=bs, offset=2, seed=bs + 2)
    c["tiny_b16"] = lambda: make_case(seq_lens=[3, 2], gather_lens=[2, 2], block_size=16, seed=11)
    c["gather_zero"] = lambda: make_case(seq_lens=[100, 50], gather_lens=[0, 0], block_size=64, max_tokens=4, seed=12)
    c["gather_equals_seq"] = lambda: make_case(seq_lens=[130, 64], gather_lens=[130, 64], block_size=64, seed=13)
    c["gather_none_offset"] = lambda: make_case(seq_lens=[77, 5], block_size=32, offset=9, seed=14)
    c["out_rows_beyond_gather"] = lambda: make_case(seq_lens=[40, 3], gather_lens=[20, 3], block_size=16,
                                                    offset=1, max_tokens=64, seed=15)
    c["empty_batch"] = lambda: make_case(seq_lens=[], block_size=64, seed=16)
    c["one_long_request"] = lambda: make_case(seq_lens=[3001], gather_lens=[2999], block_size=256, seed=17)
    c["many_requests_256"] = lambda: make_case(
        seq_lens=[(i * 37) % 90 + 1 for i in range(256)], gather_lens=[(i * 37) % 90 // 2 + 1 for i in range(256)],
        block_size=16, seed=18)
    c["padded_page_stride"] = lambda: make_case(seq_lens=[200, 33], block_size=64, page_pad=48, seed=19)
    c["strided_block_table"] = lambda: make_case(seq_lens=[90, 150], gather_lens=[60, 150], block_size=32,
                                                 block_table_pad=5, seed=20)
    c["padded_and_strided_raw"] = lambda: make_case(seq_lens=[300, 1, 64], gather_lens=[290, 1, 33], block_size=128,
                                                    page_pad=16, block_table_pad=3, raw_bytes=True, offset=4, seed=21)
    c["tiny_values_amax_clamp"] = lambda: make_case(seq_lens=[70], block_size=64, value_scale=1e-7, seed=22)
    c["large_values"] = lambda: make_case(seq_lens=[70], block_size=64, value_scale=3e4, seed=23)
    c["edge_fp8_bytes_b16"] = lambda: _overwrite_records(make_case(seq_lens=[20, 9], block_size=16, seed=24),
                                                         _every_fp8_byte)
    c["edge_fp8_bytes_b256"] = lambda: _overwrite_records(make_case(seq_lens=[300], gather_lens=[270], block_size=256,
                                                                    seed=25), _every_fp8_byte)
    c["edge_tail_specials"] = lambda: _overwrite_records(make_case(seq_lens=[4], block_size=16, seed=26),
                                                         _tail_specials)

    # DeepSeek-V4.1 528-byte records, dense: the same edge classes.
    for bs in (16, 32, 64, 128, 256):
        c[f"v41_quantized_b{bs}"] = lambda bs=bs: make_case(seq_lens=[bs * 2 + 5, 9], block_size=bs,
                                                            format="v41_528", seed=100 + bs)
        c[f"v41_raw_partial_b{bs}"] = lambda bs=bs: make_case(
            seq_lens=[bs * 3 + 1, 2 * bs, 4], gather_lens=[bs + 3, 2 * bs, 0], block_size=bs, offset=1,
            format="v41_528", raw_bytes=True, seed=101 + bs)
    c["v41_padded_strided"] = lambda: make_case(seq_lens=[150, 70], gather_lens=[149, 1], block_size=64,
                                                format="v41_528", page_pad=32, block_table_pad=2, seed=102)
    c["v41_empty_batch"] = lambda: make_case(seq_lens=[], block_size=32, format="v41_528", seed=103)
    c["v41_many_requests"] = lambda: make_case(seq_lens=[(i * 13) % 40 + 1 for i in range(256)], block_size=16,
                                               format="v41_528", seed=104)
    c["v41_edge_fp8_bytes"] = lambda: _overwrite_records(
        make_case(seq_lens=[40, 3], block_size=32, format="v41_528", seed=105), _every_fp8_byte)
    c["v41_tiny_values"] = lambda: make_case(seq_lens=[33], block_size=16, format="v41_528", value_scale=1e-7, seed=106)

    # Sparse slot-index gathers, both layouts: -1 slots, random slots, [..., 512] outputs.
    for layout in ("dsv4_584", "v41_528"):
        for bs in (16, 32, 64, 128, 256):
            c[f"sparse_{layout}_b{bs}"] = lambda bs=bs, layout=layout: make_sparse_case(
                num_slots=3 * bs + 7, valid=0.7, block_size=bs, format=layout, seed=200 + bs)
        c[f"sparse_{layout}_raw_3pct"] = lambda layout=layout: make_sparse_case(
            num_slots=500, valid=0.03, block_size=64, format=layout, raw_bytes=True, seed=201)
        c[f"sparse_{layout}_all_valid_3d_out"] = lambda layout=layout: make_sparse_case(
            num_slots=96, valid=1.0, block_size=32, format=layout, out_shape=(4, 24), page_pad=16, seed=202)
        c[f"sparse_{layout}_none_valid"] = lambda layout=layout: make_sparse_case(
            num_slots=40, valid=0.0, block_size=16, format=layout, seed=203)
        c[f"sparse_{layout}_empty"] = lambda layout=layout: make_sparse_case(num_slots=0, block_size=16,
                                                                             format=layout, seed=204)
        c[f"sparse_{layout}_edge_bytes"] = lambda layout=layout: _overwrite_records(
            make_sparse_case(num_slots=64, valid=0.9, block_size=16, format=layout, seed=205), _every_fp8_byte)
    c["sparse_dsv4_584_tail_specials"] = lambda: _overwrite_records(
        make_sparse_case(num_slots=20, valid=0.8, block_size=16, seed=206), _tail_specials)
    return c


CASES = _cases()


def build_case(name: str) -> Case:
    return CASES[name]()


def canonical_digest(out: torch.Tensor) -> str:
    bits = out.detach().cpu().contiguous().view(torch.int16).clone()
    nan = torch.isnan(out.detach().cpu().float()) & (bits != POISON_BF16)
    bits[nan] = 0x7FC0
    return hashlib.sha256(bits.numpy().tobytes()).hexdigest()


def reference_output(case: Case | SparseCase) -> torch.Tensor:
    out = case.out.clone()
    reference = dequantize_and_gather_sparse_torch if isinstance(case, SparseCase) else dequantize_and_gather_torch
    reference(*case.args(out=out))
    return out


def oracle_output(case: Case | SparseCase) -> torch.Tensor:
    out = case.out.clone()
    oracle = dequantize_and_gather_sparse_oracle if isinstance(case, SparseCase) else dequantize_and_gather_oracle
    oracle(*case.args(out=out))
    return out


def agreed_output(name: str) -> torch.Tensor:
    """The case's output, from the reference, after the oracle has given the same (else Disagreement)."""
    case = build_case(name)
    out = reference_output(case)
    problem = first_mismatch(out, oracle_output(case))
    if problem is not None:
        raise Disagreement(f"golden case {name!r}: the torch reference and the oracle disagree: {problem}")
    return out


def expected_text(out: torch.Tensor) -> str:
    """One line per (request, row): 512 bf16 bit patterns in hex."""
    lines = []
    bits = out.contiguous().view(torch.int16).reshape(out.shape[0], -1, out.shape[-1]).numpy().astype("uint16")
    for r in range(bits.shape[0]):
        for t in range(bits.shape[1]):
            lines.append(f"{r} {t} " + " ".join(f"{v:04x}" for v in bits[r, t]))
    return "\n".join(lines) + "\n"


def compute() -> dict[str, dict]:
    """Every case's digest; raises Disagreement (naming every case where reference and oracle differ)."""
    table, disagreements = {}, []
    for name in CASES:
        try:
            out = agreed_output(name)
        except Disagreement as err:
            disagreements.append(str(err))
            continue
        written = int((out.view(torch.int16) != POISON_BF16).any(-1).sum())  # rows written
        table[name] = {"sha256": canonical_digest(out), "shape": list(out.shape), "rows_written": written}
    if disagreements:
        raise Disagreement("\n".join(disagreements))
    return table


def _write_expected() -> None:
    EXPECTED_DIR.mkdir(exist_ok=True)
    for name in FULL_TENSOR_CASES:
        (EXPECTED_DIR / f"{name}.txt").write_text(expected_text(agreed_output(name)))


def main(argv=None) -> int:
    return digests_main(argv, __doc__, compute, len(CASES), DIGESTS, _write_expected)


if __name__ == "__main__":
    sys.exit(main())
