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
Dense, sparse and packed (bf16) cases digest their `out` so (a packed case's
`out` is dst, [T, head_dim]). A raw packed case (cp_gather_indexer_k_quant_cache)
digests its two uint8 outputs, both poisoned with POISON_BYTE before the call,
together: the sha256 of torch.cat([dst_k, dst_scale], dim=1) (row t is dst_k[t]
then dst_scale[t]), bytes as they stand (no NaN rule: nothing is decoded).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Callable

import torch

from kvgen.families.dequant_gather.oracle import (dequantize_and_gather_oracle, dequantize_and_gather_packed_oracle,
                                                  dequantize_and_gather_sparse_oracle, gather_raw_packed_oracle)
from kvgen.families.dequant_gather.reference import (dequantize_and_gather_packed_torch,
                                                     dequantize_and_gather_sparse_torch, dequantize_and_gather_torch,
                                                     gather_raw_packed_torch)
from kvgen.runtime.validate import format_of
from kvgen.testing import (POISON_BF16, POISON_BYTE, Case, PackedCase, RawPackedCase, SparseCase, clone_strided,
                           first_mismatch, make_case, make_packed_case, make_raw_packed_case, make_sparse_case)
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
    """Rewrite every record in place, wherever the format places its parts (Format.regions: page_split
    or inline): fill(value bytes [n, value_bytes], scale bytes [n, num_scales * scale_size] (uint8; for
    UE8M0 one code a column), tail int32 [n, 64] (bf16 bits, the first `tail` columns used)). Scale pad
    bytes are left as they were."""
    fmt = format_of(case.k_cache)
    kc, bs = case.k_cache, case.block_size
    n = kc.shape[0] * bs
    parts = {"values": torch.empty((n, fmt.value_bytes), dtype=torch.uint8),
             "scales": torch.empty((n, fmt.num_scales * fmt.scale_size), dtype=torch.uint8)}
    tail = torch.empty((n, 64), dtype=torch.int32)
    fill(parts["values"], parts["scales"], tail)
    parts["tail"] = tail[:, : fmt.tail].to(torch.int16).view(torch.uint8)
    for part, (base, row_stride, _) in fmt.regions(bs).items():
        src = parts[part]
        if src.shape[1] == 0:
            continue
        view = kc.as_strided((kc.shape[0], bs, src.shape[1]), (kc.stride(0), row_stride, 1), kc.storage_offset() + base)
        view[:] = src.view(kc.shape[0], bs, -1)
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


# float32 scale bit patterns: 0, -0, the least subnormal, the largest finite, +Inf, NaN, then -Inf, 1,
# FLT_MIN, 2^-10 and -3.5.
F32_SCALE_EDGES = (0x00000000, 0x80000000, 0x00000001, 0x7F7FFFFF, 0x7F800000, 0x7FC00000,
                   0xFF800000, 0x3F800000, 0x00800000, 0x3A800000, 0xC0600000)


def _f32(bits) -> torch.Tensor:
    return torch.tensor([b - (1 << 32) if b >= 1 << 31 else b for b in bits], dtype=torch.int32)


def _every_fp8_byte_f32_scales(fp8, scale, tail):
    """Every e4m3 value byte, under every float32 scale edge (cycled per token and scale)."""
    n = fp8.shape[0]
    token = torch.arange(n)[:, None]
    fp8[:] = ((torch.arange(fp8.shape[1])[None, :] + 37 * token) % 256).to(torch.uint8)
    edges = _f32(F32_SCALE_EDGES)
    k = scale.shape[1] // 4
    scale.view(torch.int32)[:] = edges[(torch.arange(k)[None, :] + token) % len(edges)]
    tail[:] = torch.randint(0, 1 << 16, tail.shape, generator=torch.Generator().manual_seed(7)) - (1 << 15)


def _tail_specials_f32(fp8, scale, tail):
    """The tail specials of _tail_specials, under float32 scales 1 and 2^-10 (inline records)."""
    _tail_specials(fp8, torch.empty((fp8.shape[0], 0), dtype=torch.uint8), tail)
    scale.view(torch.int32)[:] = _f32((0x3F800000, 0x3A800000))[torch.arange(scale.shape[1] // 4) % 2]


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

    # The three formats of docs/semantics.md's "Three more record formats": dense and sparse gathers at
    # every block size (few rows: the Triton interpreter runs every case), raw bytes, edge bytes.
    for i, fmt in enumerate(("v41_288", "v32_656", "indexer_132")):
        x = 300 + 100 * i
        for bs in (16, 32, 64, 128, 256):
            # rows past a page boundary up to block size 32 (small pages keep the cases cheap)
            # at block size 32 random record bytes (NaN and Inf scales...), padded pages, a strided block table
            c[f"{fmt}_dense_b{bs}"] = lambda bs=bs, fmt=fmt, x=x: make_case(
                seq_lens=[min(bs, 32) + 3, 5], gather_lens=[min(bs, 32) + 2, 5], block_size=bs, offset=1, format=fmt,
                extra_pages=1, raw_bytes=bs == 32, page_pad=16 * (bs == 32), block_table_pad=2 * (bs == 32),
                seed=x + bs)
            # at block size 16 random record bytes
            c[f"{fmt}_sparse_b{bs}"] = lambda bs=bs, fmt=fmt, x=x: make_sparse_case(
                num_slots=24, valid=0.75, block_size=bs, format=fmt, extra_pages=1, raw_bytes=bs == 16,
                seed=x + 1 + bs)
    # e2m1: every value byte (every nibble, 0x8 = -0 included) under the e4m3 scale edges of SCALE_EDGES
    # (0x00, 0x01 subnormal, 0x7E = 448, 0x7F NaN, 0x80 = -0, 0xFE = -448, 0xFF NaN, ...).
    c["v41_288_edge_bytes"] = lambda: _overwrite_records(
        make_case(seq_lens=[20, 3], block_size=16, format="v41_288", seed=310), _every_fp8_byte)
    c["v41_288_sparse_edge_bytes"] = lambda: _overwrite_records(
        make_sparse_case(num_slots=24, valid=0.9, block_size=16, format="v41_288", seed=311), _every_fp8_byte)
    # float32 scales: 0, -0, subnormal, the largest finite, +-Inf, NaN; inline and page_split.
    for fmt, x in (("v32_656", 410), ("indexer_132", 510)):
        c[f"{fmt}_edge_f32_scales"] = lambda fmt=fmt, x=x: _overwrite_records(
            make_case(seq_lens=[12, 11], block_size=16, format=fmt, seed=x), _every_fp8_byte_f32_scales)
        c[f"{fmt}_sparse_edge_f32_scales"] = lambda fmt=fmt, x=x: _overwrite_records(
            make_sparse_case(num_slots=24, valid=0.9, block_size=16, format=fmt, seed=x + 1),
            _every_fp8_byte_f32_scales)
        c[f"{fmt}_packed_edge_f32_scales"] = lambda fmt=fmt, x=x: _overwrite_records(
            make_packed_case(seq_lens=[7, 9], block_size=16, format=fmt, seq_starts=[3, 0], seed=x + 2),
            _every_fp8_byte_f32_scales)
    c["v32_656_tail_specials"] = lambda: _overwrite_records(
        make_case(seq_lens=[4], block_size=16, format="v32_656", seed=420), _tail_specials_f32)

    # Packed gathers (cp_gather_and_upconvert_fp8_kv_cache), every format and block size: with seq_starts
    # (b16, b64, b256) and without, rows before workspace_starts[0] (left poisoned: b32, b64, b128), rows
    # past the last request's seq_lens (its own: b32), an empty request, strided dst rows and random
    # record bytes (b64).
    for i, fmt in enumerate(("dsv4_584", "v41_528", "v41_288", "v32_656", "indexer_132")):
        x = 800 + 50 * i
        for j, bs in enumerate((16, 32, 64, 128, 256)):
            with_starts = j % 2 == 0
            c[f"packed_{fmt}_b{bs}"] = lambda bs=bs, fmt=fmt, x=x, j=j, with_starts=with_starts: make_packed_case(
                seq_lens=[5, 0, 6] if j == 2 else [5, 3, 6], block_size=bs, format=fmt, extra_pages=1,
                seq_starts=[min(bs, 32) - 2, 5, min(bs, 32) + 1] if with_starts else None, workspace_gap=j % 3,
                rows=15 + 4 if j == 1 else None, raw_bytes=j == 2, row_pad=8 * (j == 2), seed=x + j)
    c["packed_v41_288_edge_bytes"] = lambda: _overwrite_records(
        make_packed_case(seq_lens=[10, 8], block_size=16, format="v41_288", workspace_gap=2, seed=1010),
        _every_fp8_byte)
    c["packed_empty_batch"] = lambda: make_packed_case(seq_lens=[], block_size=16, format="v32_656", rows=3,
                                                       seed=1011)
    # 17 requests with runs of empty ones: five levels of the kernels' request search.
    many = [3, 0, 0, 5, 1, 0, 7, 2, 0, 4, 6, 0, 1, 1, 0, 3, 2]
    c["packed_many_requests"] = lambda: make_packed_case(
        seq_lens=many, block_size=16, format="indexer_132", workspace_gap=2, seq_starts=[i % 3 for i in range(17)],
        rows=2 + sum(many) + 3, seed=1012)
    c["raw_packed_many_requests"] = lambda: make_raw_packed_case(
        seq_lens=many, block_size=16, format="indexer_132", first_row=2, seed=1013)

    # Raw packed gathers (cp_gather_indexer_k_quant_cache) of indexer_132, every block size.
    for j, bs in enumerate((16, 32, 64, 128, 256)):
        c[f"raw_packed_indexer_132_b{bs}"] = lambda bs=bs, j=j: make_raw_packed_case(
            seq_lens=[min(bs, 32) + 1, 0, 4], block_size=bs, first_row=j % 2 * 3, raw_bytes=j % 2 == 1,
            extra_pages=1, seed=1100 + j)
    c["raw_packed_indexer_132_edge_f32_scales"] = lambda: _overwrite_records(
        make_raw_packed_case(seq_lens=[11, 13], block_size=16, first_row=1, page_pad=16, seed=1110),
        _every_fp8_byte_f32_scales)
    return c


CASES = _cases()


AnyCase = Case | SparseCase | PackedCase | RawPackedCase


def build_case(name: str) -> AnyCase:
    return CASES[name]()


def canonical_digest(out: torch.Tensor) -> str:
    """bf16: the sha256 of the bits, every NaN but the poison as 0x7FC0. uint8 (a raw case's
    torch.cat([dst_k, dst_scale], 1), see raw_output): the sha256 of the bytes as they stand."""
    if out.dtype == torch.uint8:
        return hashlib.sha256(out.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
    bits = out.detach().cpu().contiguous().view(torch.int16).clone()
    nan = torch.isnan(out.detach().cpu().float()) & (bits != POISON_BF16)
    bits[nan] = 0x7FC0
    return hashlib.sha256(bits.numpy().tobytes()).hexdigest()


def raw_output(dst_k: torch.Tensor, dst_scale: torch.Tensor) -> torch.Tensor:
    """A raw case's two outputs as the one uint8 tensor its digest covers: row t is dst_k[t] then dst_scale[t]."""
    return torch.cat([dst_k.detach().cpu(), dst_scale.detach().cpu()], dim=1)


def _output(case: AnyCase, dense, sparse, packed, raw) -> torch.Tensor:
    if isinstance(case, RawPackedCase):
        dst_k, dst_scale = case.dst_k.clone(), case.dst_scale.clone()
        raw(*case.reference_args(dst_k=dst_k, dst_scale=dst_scale))
        return raw_output(dst_k, dst_scale)
    out = clone_strided(case.out)  # strides kept: a packed dst may have padded rows
    if isinstance(case, PackedCase):
        packed(*case.reference_args(out=out))
    else:
        (sparse if isinstance(case, SparseCase) else dense)(*case.args(out=out))
    return out


def reference_output(case: AnyCase) -> torch.Tensor:
    return _output(case, dequantize_and_gather_torch, dequantize_and_gather_sparse_torch,
                   dequantize_and_gather_packed_torch, gather_raw_packed_torch)


def oracle_output(case: AnyCase) -> torch.Tensor:
    return _output(case, dequantize_and_gather_oracle, dequantize_and_gather_sparse_oracle,
                   dequantize_and_gather_packed_oracle, gather_raw_packed_oracle)


def _first_mismatch(a: torch.Tensor, b: torch.Tensor) -> str | None:
    if a.dtype != torch.uint8:
        return first_mismatch(a, b)
    differ = (a != b).nonzero()
    if differ.numel() == 0:
        return None
    row, col = (int(i) for i in differ[0])
    return (f"{differ.shape[0]} byte(s) differ; first at row {row}, byte {col} of dst_k ‖ dst_scale: "
            f"0x{int(a[row, col]):02x} vs 0x{int(b[row, col]):02x}")


def rows_written(out: torch.Tensor) -> int:
    if out.dtype == torch.uint8:
        return int((out != POISON_BYTE).any(-1).sum())
    return int((out.view(torch.int16) != POISON_BF16).any(-1).sum())


def agreed_output(name: str) -> torch.Tensor:
    """The case's output, from the reference, after the oracle has given the same (else Disagreement)."""
    case = build_case(name)
    out = reference_output(case)
    problem = _first_mismatch(out, oracle_output(case))
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
        written = rows_written(out)
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


def run_public(case, device: str) -> tuple[torch.Tensor, bool]:
    """The case through kvgen's public op on `device`: (its output -- a raw
    case's raw_output(dst_k, dst_scale) --, whether a kernel was launched)."""
    import kvgen

    if isinstance(case, RawPackedCase):
        dst_k, dst_scale = case.dst_k.to(device), case.dst_scale.to(device)
        kvgen.cp_gather_indexer_k_quant_cache(*case.args(device, dst_k=dst_k, dst_scale=dst_scale))
        launched = int(case.cu_seq_lens[-1] - case.cu_seq_lens[0]) > 0
    elif isinstance(case, PackedCase):
        out = clone_strided(case.out, device)
        kvgen.cp_gather_and_upconvert_fp8_kv_cache(*case.args(device, out=out))
        launched = case.batch_size > 0 and out.shape[0] > int(case.workspace_starts[0])
    elif isinstance(case, SparseCase):
        out = case.out.to(device)
        kvgen.dequantize_and_gather_k_cache_sparse(*case.args(device, out=out))
        launched = case.slot_indices.numel() > 0
    else:
        out = case.out.to(device)
        kvgen.dequantize_and_gather_k_cache(*case.args(device, out=out))
        launched = case.seq_lens.numel() > 0
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)  # the device addressed, which need not be the current one
    return (raw_output(dst_k, dst_scale) if isinstance(case, RawPackedCase) else out), launched


def public_mismatches(device: str, backend: str) -> list[str]:
    """Every case through kvgen's public op on `device`: a line for each case
    served by another backend than `backend` (the one the caller's setting
    must lead to) or whose output's digest differs from the committed one."""
    import kvgen

    digests = json.loads(DIGESTS.read_text())["cases"]
    wrong = []
    for name in sorted(CASES):
        out, launched = run_public(build_case(name), device)
        if launched and kvgen.last_backend() != backend:
            wrong.append(f"{name}: served by {kvgen.last_backend()}")
        elif canonical_digest(out) != digests[name]["sha256"]:
            wrong.append(f"{name}: digest differs on {device}")
    return wrong
