"""How fast can any sparse bf16 gather of the small records go in random slot
order? (GPU, nvcc on PATH: `python benchmarks/record_gather_probe.py [OUT.json]`;
BENCHMARKS.md, log 46.)

Issue 15's sparse bf16 gathers of the 132-byte indexer and 288-byte NVFP4
records read 0.886-0.899 of a copy of their bytes with the slots in random
order, 0.90-0.95 with the slots sorted (log 41). Is the rest kvgen's decoding
and pipeline, or the order of the records in DRAM? record_gather_probe.cu
gathers the same records in the same order and writes the same bytes with no
decoding at all (each output word is a stored byte or nibble beside its scale
byte), a warp holding UNROLL records in flight, for UNROLL = 1, 2, 4, 8; and,
for the indexer, the same kernel with its real decode (bf16(e4m3 * float32
scale)), 2 * PASSES records a warp in flight, PASSES = 2, 4.

On bench_formats' sparse shapes (a cache of as many slots as tokens, block
size 64, every slot valid), timed side by side (bench.graph_times: CUDA-graph
replays, groups of replays, interleaved rounds, inputs rotated past L2), each
with its slots in random order (bench_formats' order) and sorted:
  kvgen     the public sparse op (the shipped row), checked bit for bit against the torch path
  uU        the probe, checked word for word against the same function in torch
  dP        the indexer's decoding probe, checked bit for bit against the torch path
  copy      a device-to-device copy of the same bytes (records read + bf16 rows written)
"""

from __future__ import annotations

import ctypes
import json
import sys
from pathlib import Path

import torch
from cuda_probe import launcher, load_kernels
from sparse_order import _checked_call

from kvgen.families.dequant_gather import reference as rd
from kvgen.testing import as_format
from kvgen.tools import bench
from kvgen.tools.bench import graph_times, same_bytes_copy
from kvgen.tools.bench_formats import BLOCK_SIZE, _cache

FORMATS = {"indexer_132": "indexer", "v41_288": "nvfp4"}  # format: the probe's kernel family
UNROLLS = (1, 2, 4, 8)
DECODE_PASSES = (2, 4)  # the indexer's decoding probe: 2 records a warp a pass
WARPS = 8  # the probe's warps a CTA


def expected_words(fmt, cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """The probe's output (int32 words, one a value) for `slots`, in torch."""
    pages = cache.reshape(cache.shape[0], -1)
    base = BLOCK_SIZE * fmt.data_bytes
    data = pages[:, :base].reshape(-1, BLOCK_SIZE, fmt.data_bytes)
    scales = pages[:, base:].reshape(-1, BLOCK_SIZE, fmt.scale_bytes)
    page, row = slots.long() // BLOCK_SIZE, slots.long() % BLOCK_SIZE
    d, s = data[page, row].int(), scales[page, row].int()
    if fmt.value_kind == "e2m1":
        d = torch.stack((d & 0xF, d >> 4), dim=-1).reshape(d.shape[0], -1)
        group = torch.arange(fmt.values, device=d.device) // fmt.scale_group
    else:
        group = torch.arange(fmt.values, device=d.device) % fmt.scale_bytes
    return d | (s[:, group] << 8)


def probe_call(kernel, unroll: int, fmt, cache: torch.Tensor, slots: torch.Tensor):
    out = torch.empty((slots.shape[0], fmt.values), dtype=torch.int16, device="cuda")
    types = (ctypes.c_void_p,) * 3 + (ctypes.c_int, ctypes.c_int, ctypes.c_longlong)
    values = (slots.data_ptr(), cache.data_ptr(), out.data_ptr(), slots.shape[0], BLOCK_SIZE, cache.stride(0))
    grid = -(-slots.shape[0] // (unroll * WARPS))
    call = launcher(kernel, (grid, 1), WARPS * 32, 0, values, types)
    out.fill_(-1)
    call()
    torch.cuda.synchronize()
    got = out.int() & 0xFFFF
    assert torch.equal(got, expected_words(fmt, cache, slots)), (fmt.name, unroll)
    return call


def decode_call(kernel, passes: int, cache: torch.Tensor, slots: torch.Tensor, want: torch.Tensor):
    out = torch.empty_like(want)
    types = (ctypes.c_void_p,) * 3 + (ctypes.c_int, ctypes.c_int, ctypes.c_longlong)
    values = (slots.data_ptr(), cache.data_ptr(), out.data_ptr(), slots.shape[0], BLOCK_SIZE, cache.stride(0))
    grid = -(-slots.shape[0] // (2 * passes * WARPS))
    call = launcher(kernel, (grid, 1), WARPS * 32, 0, values, types)
    out.view(torch.uint8).fill_(0xA5)
    call()
    torch.cuda.synchronize()
    assert torch.equal(out.view(torch.int16), want.view(torch.int16)), passes
    return call


def main(out_path: str | None) -> None:
    names = {(family, u): f"gather_{family}_u{u}" for family in FORMATS.values() for u in UNROLLS}
    loaded = load_kernels(Path(__file__).with_suffix(".cu"), names.values())
    kernels = {key: loaded[symbol] for key, symbol in names.items()}
    decoders = load_kernels(Path(__file__).with_suffix(".cu"), [f"decode_indexer_p{p}" for p in DECODE_PASSES])
    bench.copy_bandwidth()  # ramps the clocks
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    results = {"device": torch.cuda.get_device_name(), "rows": []}
    for fmt_name, family in FORMATS.items():
        fmt = as_format(fmt_name)
        for n in (65536, 262144):
            moved = n * bench.token_bytes(fmt)
            sets = bench._set_count(moved, l2)
            variants: dict[str, list] = {}
            for seed in range(sets):
                g = torch.Generator(device="cuda").manual_seed(seed)
                cache = _cache(fmt, n, g)
                orders = {"random": torch.randperm(n, generator=g, device="cuda").to(torch.int32),
                          "sorted": torch.arange(n, dtype=torch.int32, device="cuda")}
                for order, slots in orders.items():
                    kvgen_call = _checked_call(fmt, cache, slots)
                    variants.setdefault(f"kvgen {order}", []).append(kvgen_call)
                    if family == "indexer":
                        want = torch.empty((n, fmt.head_dim), dtype=torch.bfloat16, device="cuda")
                        rd.dequantize_and_gather_sparse_torch(want, cache, slots, BLOCK_SIZE)
                        for p in DECODE_PASSES:
                            variants.setdefault(f"d{p} {order}", []).append(
                                decode_call(decoders[f"decode_indexer_p{p}"], p, cache, slots, want))
                    for u in UNROLLS:
                        variants.setdefault(f"u{u} {order}", []).append(
                            probe_call(kernels[(family, u)], u, fmt, cache, slots))
            variants["copy"] = same_bytes_copy(moved, sets)
            t = graph_times(variants)
            row = {"format": fmt_name, "slots": n, "sets": sets,
                   "us": {k: v * 1e6 for k, v in t.items()},
                   "of_copy": {k: t["copy"] / v for k, v in t.items()}}
            results["rows"].append(row)
            cells = "  ".join(f"{k} {v * 1e6:.2f} us ({t['copy'] / v:.3f})" for k, v in t.items())
            print(f"{fmt_name} sparse {n}: {cells}", flush=True)
    if out_path:
        Path(out_path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
