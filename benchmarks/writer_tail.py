"""Probe (H100): is a writer's gap to a copy a fixed cost or a rate, and does it
step with the waves of CTAs?

    python benchmarks/writer_tail.py FORMAT N1,N2,... [ROW_SUBSTRING ...]
    python benchmarks/writer_tail.py light FORMAT N1,N2,... ROW L1,L2,...

For each token count N: the public op (dispatch's row) and each sm_90a block-64
int64-slot writer row of FORMAT (a format `quantize_and_insert_k_cache` writes:
v41_288, dsv4_584, v41_528) launched directly on its default grid, beside a
copy of the same bytes, input sets rotated past L2 (bench_formats' write case:
random bf16 rows into pages in random order). Each row is checked against the
torch path on the first set before it is timed. Then a least-squares line
time = fixed + N * rate for each, and each point's residual from it: a
staircase in the residuals, with steps where the grid crosses a whole wave of
resident CTAs, is a tail; equal rates with a larger fixed term is a start or
drain cost.

`light`: one row (its variant name, e.g. t4w4) on launch_grid's grids with
about L light CTAs (the template's light tail: a CTA past the `heavy` ones
loads one step of each lane group); L0 is one full CTA for every CTA_TOKENS
tokens, the grid before log 44, timed twice (first in the round, right after
the copy, and again mid-round); checked, then timed beside a copy.
"""

from __future__ import annotations

import sys

import torch

import kvgen
from kvgen.families.quantize_insert import op as insert
from kvgen.families.quantize_insert.config import tokens_per_step
from kvgen.families.quantize_insert.reference import quantize_and_insert_torch
from kvgen.testing import as_format
from kvgen.tools.bench import COPY, GROUP_S, graph_times, same_bytes_copy, token_bytes
from kvgen.tools.bench_formats import BLOCK_SIZE, write_inputs

from grid_sweep_formats import row_name, rows  # a sibling script: benchmarks/ is on sys.path when run


def checked_sets(fmt, n: int):
    """Input sets (bench_formats' write inputs) enough to rotate past L2, the
    bytes a write moves, and a check that a launch on the first set writes
    the cache the torch path writes."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    moved = n * token_bytes(fmt)
    sets = [write_inputs(fmt, n, torch.Generator(device="cuda").manual_seed(s))
            for s in range(max(2, -(-3 * l2 // moved)))]
    k, cache, slots = sets[0]
    quantize_and_insert_torch(k, cache, slots, BLOCK_SIZE, fmt)
    expected = cache.clone()

    def check(name: str, call) -> None:
        cache.fill_(0xA5)
        call()
        torch.cuda.synchronize()
        if not torch.equal(cache, expected):
            raise AssertionError(f"{fmt.name} {n} {name}: differs from the torch path")

    return sets, moved, check


def writer_rows(fmt_name: str) -> list:
    """The sm_90a block-64 int64-slot writer rows of a format, float32 scales as they are (not pow2_scale)."""
    return rows("qik", fmt_name, slot_dtype="int64", pow2_scale=False)


def resident_ctas(entry) -> str:
    """CTAs of this row an SM holds at once, from its registers (65536 an SM) and threads (2048)."""
    threads = entry.config["num_warps"] * 32
    per_cta = -(-entry.registers * threads // 256) * 256
    return str(min(65536 // per_cta, 2048 // threads, 32))


def probe(fmt_name: str, counts: list[int], wanted: list[str]) -> None:
    fmt = as_format(fmt_name)
    names = {row_name(e): e for e in writer_rows(fmt_name) if not wanted or any(w in row_name(e) for w in wanted)}
    times: dict[str, list[tuple[int, float]]] = {}
    for n in counts:
        sets, moved, check = checked_sets(fmt, n)
        variants = {"op": [lambda s=s: kvgen.quantize_and_insert_k_cache(s[0], s[1], s[2], BLOCK_SIZE) for s in sets]}
        for name, e in names.items():
            variants[name] = [lambda s=s, e=e: insert.launch_entry(e, *s, pdl=e.pdl) for s in sets]
        for name, calls in variants.items():
            check(name, calls[0])
        t = graph_times({**variants, COPY: same_bytes_copy(moved, len(sets))})
        grids = {name: insert.launch_grid(e, n)[0] for name, e in names.items()}
        print(f"{n:7d}", " ".join(f"[{name}: {v * 1e6:.2f}{' g%d' % grids[name] if name in grids else ''}]"
                                  for name, v in t.items()), flush=True)
        for name, v in t.items():
            times.setdefault(name, []).append((n, v * 1e6))
        del sets, check
        torch.cuda.empty_cache()
    print("resident CTAs an SM:", {name: resident_ctas(e) for name, e in names.items()})
    for name, points in times.items():
        xs = torch.tensor([p[0] for p in points], dtype=torch.float64)
        ys = torch.tensor([p[1] for p in points], dtype=torch.float64)
        a = torch.stack([torch.ones_like(xs), xs], 1)
        fixed, rate = torch.linalg.lstsq(a, ys[:, None]).solution[:, 0].tolist()
        residuals = " ".join(f"{r:+.2f}" for r in (ys - fixed - rate * xs).tolist())
        print(f"{name:>10}: fixed {fixed:6.2f} us, {rate * 65536:6.2f} us per 65536 tokens; residuals {residuals}")


def light_sweep(fmt_name: str, counts: list[int], row: str, lights: list[int]) -> None:
    fmt = as_format(fmt_name)
    entry = next(e for e in writer_rows(fmt_name) if row_name(e) == row)
    print(entry.name, "registers", entry.registers, "resident CTAs an SM", resident_ctas(entry))
    for n in counts:
        sets, moved, check = checked_sets(fmt, n)
        variants = {}
        cta = entry.config["num_warps"] * entry.config["tokens_per_warp"] * tokens_per_step(entry.format)
        for i, light in enumerate(lights):
            # L0: one full CTA for every CTA_TOKENS tokens (the grid before log 44), no light ones
            grid = insert.launch_grid(entry, n, light) if light else (-(-n // cta), 1, 1)
            variants[f"L{light}"] = [lambda s=s, g=grid: insert.launch_entry(entry, *s, grid=g, pdl=entry.pdl)
                                     for s in sets]
            if i == len(lights) // 2:  # L0 again, timed after a kvgen row rather than after the copy
                variants["L0 again"] = variants["L0"]
        for name, calls in variants.items():
            check(name, calls[0])
        copies = same_bytes_copy(moved, len(sets))
        for group_s in (0, GROUP_S):  # one replay a sample (the copy's dirty lines fall on L0), then groups
            t = graph_times({**variants, COPY: copies}, group_s=group_s)
            print(f"{n:7d} group {group_s * 1e3:.0f} ms", " ".join(f"[{name}: {v * 1e6:.2f} {t[COPY] / v:.3f}]"
                                                                  for name, v in t.items()), flush=True)
        del sets, check
        torch.cuda.empty_cache()


if __name__ == "__main__":
    if sys.argv[1] == "light":
        light_sweep(sys.argv[2], [int(n) for n in sys.argv[3].split(",")], sys.argv[4],
                    [int(v) for v in sys.argv[5].split(",")])
    else:
        probe(sys.argv[1], [int(n) for n in sys.argv[2].split(",")], sys.argv[3:])
