"""Benchmark of the three formats of issue 15 and the packed gathers (H100):
every new reader and writer at >= 65536 tokens, kvgen's cubin and its Triton
fallback against a device copy of the same bytes measured in the same rounds
(bytes = record read + outputs written for readers, inputs read + record
written for writers). Each backend is first checked against the torch path on
every input set (outputs poisoned before the call); then all are timed as
CUDA-graph replays, interleaved, inputs rotated past L2 (kvgen/tools/bench.py).

    python -m kvgen.tools.bench_formats benchmarks/results/formats_h100.json
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch

from ..testing import as_format
from .bench import COPY, Shape, SparseShape, graph_times, same_bytes_copy, token_bytes, with_env

READ_TOKENS = (65536, 262144)
WRITE_TOKENS = (65536, 262144)
BLOCK_SIZE = 64


@dataclass(frozen=True)
class Bench:
    label: str
    format: str
    op: str  # dense, sparse, packed, raw, write
    tokens: int


# `python -m kvgen tune --family raw`: the raw gather has rows to choose among
# (the ring, and page runs of two chunk sizes), short and long. `--family
# dense_formats`, `sparse_formats` and `packed_formats`: the bf16 gathers of
# the small tail-less records (the ring, and the direct schedule's rows),
# dense ones short, long and of many requests (pages in random order), sparse
# ones short and long at 3%, 25% and 100% valid slots (random slots over the
# cache, as the sparse family's), packed ones short and long (8 requests).
TUNE_FAMILIES = {
    "raw": tuple(Bench(f"indexer_132 raw {n}", "indexer_132", "raw", n) for n in (8192,) + READ_TOKENS),
    "dense_formats": tuple(Shape(f"{len(lens)}x{lens[0]} {fmt}", lens, format=fmt)
                           for fmt in ("indexer_132", "v41_288")
                           for lens in ((1024,) * 8, (8192,) * 8, (32768,) * 8, (2048,) * 64)),
    "packed_formats": tuple(Bench(f"{fmt} packed {n}", fmt, "packed", n)
                            for fmt in ("indexer_132", "v41_288") for n in (8192,) + READ_TOKENS),
    "sparse_formats": tuple(SparseShape(f"sparse {n} {round(v * 100)}% {fmt}", n, v, fmt)
                            for fmt in ("indexer_132", "v41_288") for n in (8192,) + READ_TOKENS
                            for v in (0.03, 0.25, 1.0)),
}

SHAPES = tuple(
    [Bench(f"{fmt} {op} {n}", fmt, op, n) for fmt in ("v41_288", "v32_656", "indexer_132")
     for op in ("dense", "sparse", "packed") for n in READ_TOKENS]
    + [Bench(f"indexer_132 raw {n}", "indexer_132", "raw", n) for n in READ_TOKENS]
    + [Bench(f"{fmt} write {n}", fmt, "write", n) for fmt in ("v41_288", "v32_656", "indexer_132")
       for n in WRITE_TOKENS]
)


def _cache(fmt, tokens: int, g: torch.Generator) -> torch.Tensor:
    """A cache of well-formed records (written by the torch writer), pages in order."""
    from ..families.quantize_insert.reference import quantize_and_insert_torch

    num_blocks = -(-tokens // BLOCK_SIZE)
    k = torch.randn((num_blocks * BLOCK_SIZE, fmt.head_dim), generator=g, device="cuda").to(torch.bfloat16)
    cache = torch.empty((num_blocks, BLOCK_SIZE, fmt.record_bytes), dtype=torch.uint8, device="cuda")
    quantize_and_insert_torch(k, cache, torch.arange(k.shape[0], device="cuda"), BLOCK_SIZE, fmt)
    return cache


def write_inputs(fmt, tokens: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A write's k (random bf16 rows), its cache of exactly `tokens` slots, and
    slots filling the pages in random page order."""
    num_blocks = -(-tokens // BLOCK_SIZE)
    k = torch.randn((tokens, fmt.head_dim), generator=g, device="cuda").to(torch.bfloat16)
    cache = torch.empty((num_blocks, BLOCK_SIZE, fmt.record_bytes), dtype=torch.uint8, device="cuda")
    pages = torch.randperm(num_blocks, generator=g, device="cuda")
    t = torch.arange(tokens, device="cuda")
    return k, cache, pages[t // BLOCK_SIZE] * BLOCK_SIZE + t % BLOCK_SIZE


class Case(NamedTuple):
    call: Callable[[], None]  # the public op on this input set
    outs: list  # the outputs to poison and compare
    torch_path: Callable[[], None]  # the torch path, writing into outs
    moved: int  # bytes moved
    args: tuple[Any, ...] = ()  # a packed gather's arguments (a manifest row is launched on them)


def _case(b: Bench, seed: int) -> Case:
    import kvgen
    from ..families.dequant_gather import reference as rd
    from ..families.quantize_insert.reference import quantize_and_insert_torch

    fmt = as_format(b.format)
    g = torch.Generator(device="cuda").manual_seed(seed)
    n = b.tokens
    moved = n * token_bytes(fmt)  # every op but the raw gather, which moves its value and scale bytes
    if b.op == "write":
        k, cache, slots = write_inputs(fmt, n, g)
        if fmt.name == "v32_656":
            kv_c, k_pe = k[:, : fmt.values].contiguous(), k[:, fmt.values:].contiguous()
            call = lambda: kvgen.concat_and_cache_ds_mla(kv_c, k_pe, cache, slots)  # noqa: E731
        elif fmt.name == "indexer_132":
            call = lambda: kvgen.indexer_k_quant_and_cache(k, cache, slots, fmt.scale_group, "ue8m0")  # noqa: E731
        else:
            call = lambda: kvgen.quantize_and_insert_k_cache(k, cache, slots, BLOCK_SIZE)  # noqa: E731
        pow2 = fmt.name == "indexer_132"
        torch_path = lambda: quantize_and_insert_torch(k, cache, slots, BLOCK_SIZE, fmt, pow2_scale=pow2)  # noqa
        return Case(call, [cache], torch_path, moved)
    cache = _cache(fmt, n, g)
    num_blocks = cache.shape[0]
    perm = torch.randperm(num_blocks, generator=g, device="cuda").to(torch.int32)
    if b.op == "dense":  # 8 requests of n / 8 tokens
        reqs = 8
        per = n // reqs
        block_table = perm[: reqs * (per // BLOCK_SIZE)].reshape(reqs, per // BLOCK_SIZE).contiguous()
        out = torch.empty((reqs, per, fmt.head_dim), dtype=torch.bfloat16, device="cuda")
        seq_lens = torch.full((reqs,), per, dtype=torch.int32, device="cuda")
        args = (out, cache, seq_lens, None, block_table, BLOCK_SIZE, 0)
        call = lambda: kvgen.dequantize_and_gather_k_cache(*args)  # noqa: E731
        torch_path = lambda: rd.dequantize_and_gather_torch(*args)  # noqa: E731
        outs = [out]
    elif b.op == "sparse":  # every slot valid, in random order
        slots = torch.randperm(n, generator=g, device="cuda").to(torch.int32)
        out = torch.empty((n, fmt.head_dim), dtype=torch.bfloat16, device="cuda")
        call = lambda: kvgen.dequantize_and_gather_k_cache_sparse(out, cache, slots, BLOCK_SIZE)  # noqa: E731
        torch_path = lambda: rd.dequantize_and_gather_sparse_torch(out, cache, slots, BLOCK_SIZE)  # noqa: E731
        outs = [out]
    else:  # packed: 8 requests one after another
        reqs = 8
        per = n // reqs
        block_table = perm[: reqs * (per // BLOCK_SIZE)].reshape(reqs, per // BLOCK_SIZE).contiguous()
        starts = torch.arange(reqs + 1, dtype=torch.int32, device="cuda") * per
        if b.op == "packed":
            out = torch.empty((n, fmt.head_dim), dtype=torch.bfloat16, device="cuda")
            args = (cache, out, block_table, starts[:reqs], reqs, None)
            call = lambda: kvgen.cp_gather_and_upconvert_fp8_kv_cache(*args)  # noqa: E731
            torch_path = lambda: rd.dequantize_and_gather_packed_torch(out, cache, block_table, starts[:reqs], reqs,
                                                                      None, BLOCK_SIZE)
            return Case(call, [out], torch_path, moved, args)
        else:
            dst_k = torch.empty((n, fmt.value_bytes), dtype=torch.uint8, device="cuda")
            dst_s = torch.empty((n, fmt.num_scales * fmt.scale_size), dtype=torch.uint8, device="cuda")
            args = (cache, dst_k, dst_s, block_table, starts)
            call = lambda: kvgen.cp_gather_indexer_k_quant_cache(*args)  # noqa: E731
            torch_path = lambda: rd.gather_raw_packed_torch(dst_k, dst_s, cache, block_table, starts, BLOCK_SIZE)
            # the value and scale bytes, read from the record and written out
            moved = n * 2 * (fmt.value_bytes + fmt.num_scales * fmt.scale_size)
            return Case(call, [dst_k, dst_s], torch_path, moved, args)
    return Case(call, outs, torch_path, moved)


def _forced(backend: str, call: Callable[[], None]) -> Callable[[], None]:
    return with_env(call, KVGEN_BACKEND=backend)


def _poison(outs) -> None:
    for t in outs:
        t.view(torch.uint8).fill_(0xA5)


def _cases(b: Bench, l2_bytes: int) -> tuple[list[Case], list[list[torch.Tensor]]]:
    """Input sets enough to rotate past L2, and the torch path's outputs on each."""
    first = _case(b, 0)
    sets = max(2, -(-3 * l2_bytes // first.moved))
    cases = [first] + [_case(b, s) for s in range(1, sets)]
    expected = []
    for c in cases:
        _poison(c.outs)
        c.torch_path()
        expected.append([t.clone() for t in c.outs])
    return cases, expected


def _checked_times(b: Bench, cases: list[Case], expected: list, variants: dict[str, list]) -> dict[str, float]:
    """Each variant (one call per input set) checked against the torch path on
    every set (outputs poisoned first), then all timed with a copy of the same
    bytes: {name: seconds per call}."""
    for name, calls in variants.items():
        for c, call, ref in zip(cases, calls, expected):
            _poison(c.outs)
            call()
            torch.cuda.synchronize()
            for got, want in zip(c.outs, ref):
                same = got.view(torch.uint8) == want.view(torch.uint8)
                if got.dtype == torch.bfloat16:  # NaN matches any NaN
                    same = same.view(-1, 2).all(-1) | (torch.isnan(got) & torch.isnan(want)).view(-1)
                if not bool(same.all()):
                    raise AssertionError(f"{b.label} {name}: differs from the torch path")
    return graph_times({**variants, COPY: same_bytes_copy(cases[0].moved, len(cases))})


def bench_one(b: Bench, l2_bytes: int) -> dict:
    cases, expected = _cases(b, l2_bytes)
    variants = {"kvgen" if backend == "cubin" else backend: [_forced(backend, c.call) for c in cases]
                for backend in ("cubin", "triton")}
    seconds = _checked_times(b, cases, expected, variants)
    return {"shape": b.label, "tokens": b.tokens, "bytes": cases[0].moved, "sets": len(cases),
            "us": {name: t * 1e6 for name, t in seconds.items()}}


def time_packed_rows(b: Bench, rows: dict, l2_bytes: int) -> dict[str, float]:
    """`python -m kvgen tune --family raw` (`packed_formats`): each of `rows`
    ({name: manifest row} of the raw, or bf16, packed gather) launched directly
    on its dispatch grid, PDL as the row was built, checked against the torch
    path, then timed: {name: us}."""
    from ..families.dequant_gather import op as ops

    launch = ops.launch_raw if b.op == "raw" else ops.launch_packed
    cases, expected = _cases(b, l2_bytes)
    variants = {name: [lambda c=c, e=e: launch(e, *c.args, pdl=e.pdl) for c in cases]
                for name, e in rows.items()}
    seconds = _checked_times(b, cases, expected, variants)
    return {name: seconds[name] * 1e6 for name in rows}


def run(shapes=SHAPES) -> dict:
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    rows = []
    for b in shapes:
        rows.append(bench_one(b, l2))
        torch.cuda.empty_cache()
    return {"device": torch.cuda.get_device_name(0), "rows": rows}


def markdown(report: dict) -> str:
    lines = [f"Device: {report['device']}. kvgen / copy = copy µs / kvgen µs (1.0 = a copy's speed).", "",
             "| shape | MB moved | copy µs | kvgen µs | kvgen / copy | triton µs | kvgen / triton speedup |",
             "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        us = r["us"]
        lines.append(f"| {r['shape']} | {r['bytes'] / 1e6:.1f} | {us[COPY]:.2f} | {us['kvgen']:.2f} | "
                     f"{us[COPY] / us['kvgen']:.3f} | {us['triton']:.2f} | {us['triton'] / us['kvgen']:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    import json
    import sys

    # python -m kvgen.tools.bench_formats [OUT.json [SUBSTRING]]: only the shapes whose label holds SUBSTRING.
    only = sys.argv[2] if len(sys.argv) > 2 else ""
    report = run(tuple(b for b in SHAPES if only in b.label))
    print(markdown(report))
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(report, f, indent=1)
