"""Probe (H100): the sparse bf16 gathers of the small-record formats, by slot
order and by valid fraction. GPU; run from the repo root:

    python benchmarks/sparse_order.py order [FORMAT ...]   # random against sorted slots, every slot valid
    python benchmarks/sparse_order.py valid [FORMAT ...]   # 3%, 25%, 100% valid slots, random

Run `valid` once as is and once with KVGEN_PDL=0 to compare the rows with
and without PDL (dispatch takes the row KVGEN_PDL asks for).

order: bench_formats' sparse shapes (a cache of as many slots as tokens), the
  public sparse op over the same cache with its slots in random order (as
  bench_formats) and in cache order (0, 1, 2, ...).
valid: 65536 slots over a cache of 65536 slots, a fraction valid (the rest -1).
Each variant is checked bit for bit against the torch path on every input set
(outputs poisoned), then timed (bench.graph_times: CUDA-graph replays,
interleaved rounds, inputs rotated past L2) beside a copy of the bytes moved
(records read and rows written for the valid slots). Results: BENCHMARKS.md,
log 41.
"""

from __future__ import annotations

import sys

import torch

import kvgen
from kvgen.families.dequant_gather import reference as rd
from kvgen.runtime.dispatch import pdl_requested
from kvgen.testing import as_format, mismatches, random_slots
from kvgen.tools.bench import COPY, graph_times, same_bytes_copy, token_bytes
from kvgen.tools.bench_formats import BLOCK_SIZE, _cache


def _checked_call(fmt, cache, slots):
    out = torch.empty((slots.shape[0], fmt.head_dim), dtype=torch.bfloat16, device="cuda")
    want = torch.empty_like(out)
    want.view(torch.uint8).fill_(0xA5)
    out.view(torch.uint8).fill_(0xA5)
    rd.dequantize_and_gather_sparse_torch(want, cache, slots, BLOCK_SIZE)

    def call():
        kvgen.dequantize_and_gather_k_cache_sparse(out, cache, slots, BLOCK_SIZE)

    call()
    torch.cuda.synchronize()
    assert mismatches(out, want) == 0, (fmt.name, slots.shape[0])
    return call


def _report(label: str, variants: dict, moved: dict, sets: int) -> None:
    t = graph_times({**variants, **{f"{COPY} {k}": same_bytes_copy(b, sets) for k, b in moved.items()}})
    cells = [f"{k} {t[k] * 1e6:.2f} us ({t[f'{COPY} {k}'] / t[k]:.3f})" for k in variants]
    print(f"{label} (PDL {'on' if pdl_requested() else 'off'}): " + "; ".join(cells), flush=True)


def order(fmt_name: str, n: int, sets: int = 6) -> None:
    fmt = as_format(fmt_name)
    variants = {"random": [], "sorted": []}
    for seed in range(sets):
        g = torch.Generator(device="cuda").manual_seed(seed)
        cache = _cache(fmt, n, g)
        variants["random"].append(_checked_call(fmt, cache, torch.randperm(n, generator=g, device="cuda")
                                                .to(torch.int32)))
        variants["sorted"].append(_checked_call(fmt, cache, torch.arange(n, dtype=torch.int32, device="cuda")))
    moved = n * token_bytes(fmt)
    _report(f"{fmt_name} sparse {n}", variants, {k: moved for k in variants}, sets)


def valid(fmt_name: str, n: int = 65536, sets: int = 6) -> None:
    fmt = as_format(fmt_name)
    variants, moved = {}, {}
    for fraction in (0.03, 0.25, 1.0):
        name = f"{round(fraction * 100)}%"
        variants[name], count = [], 0
        for seed in range(sets):
            g = torch.Generator(device="cuda").manual_seed(seed)
            cache = _cache(fmt, n, g)
            slots = random_slots(n, cache.shape[0] * BLOCK_SIZE, fraction, g)
            count = max(count, int((slots >= 0).sum()))
            variants[name].append(_checked_call(fmt, cache, slots))
        moved[name] = count * token_bytes(fmt)
    _report(f"{fmt_name} sparse {n} slots", variants, moved, sets)


if __name__ == "__main__":
    what, names = sys.argv[1], sys.argv[2:] or ("indexer_132", "v41_288", "v32_656")
    for name in names:
        if what == "order":
            for n in (65536, 262144):
                order(name, n)
        else:
            valid(name)
