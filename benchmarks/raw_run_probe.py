"""The raw indexer gather by page runs (GPU, nvcc on PATH:
`python benchmarks/raw_run_probe.py`; BENCHMARKS.md, log 33).

Issue 15's raw gather (`kvgen.cp_gather_indexer_k_quant_cache`) runs at 0.83 /
0.89 of a copy of its bytes at 65536 / 262144 rows (BENCHMARKS.md, log 28),
level with its Triton fallback. Its rows are each request's consecutive
positions, so a page holds runs of contiguous 128-byte data rows and 4-byte
scale rows that go to contiguous output rows. benchmarks/raw_run_probe.cu
moves a run of RUN rows per CTA with one block-table lookup, three ways (see
its header: bulk copies in and out, bulk in and thread stores out, thread
loads and stores with no shared memory). Timed side by side on bench_formats'
raw shapes (8 requests of T/8 rows, pages in random order, block size 64;
bench.graph_times: CUDA-graph replays, interleaved rounds, rotated past L2):
  kvgen      the public op (the shipped row)
  triton     its Triton fallback
  rR_mM      the probe kernel, runs of R rows, mode M, one run a CTA
  copy       a device-to-device copy of the same bytes
every output first checked byte for byte against the op's.
"""

import ctypes
from pathlib import Path

import torch
from cuda_probe import launcher, load_kernels

import kvgen
from kvgen.tools import bench
from kvgen.tools.bench import graph_times, same_bytes_copy, with_env
from kvgen.tools.bench_formats import BLOCK_SIZE, READ_TOKENS, Bench, _case

PROBES = tuple((run, 128, mode) for run in (64, 32) for mode in (0, 1, 2))  # (run rows, threads, mode)
REQS = 8  # bench_formats' raw shape's requests: the probe's grid is (REQS, runs a request)


def load_probes() -> dict:
    names = {probe: "raw_run_r{}_t{}_m{}".format(*probe) for probe in PROBES}
    kernels = load_kernels(Path(__file__).with_suffix(".cu"), names.values())
    return {probe: kernels[symbol] for probe, symbol in names.items()}


def raw_case(tokens: int, seed: int):
    """bench_formats' raw shape (8 requests of tokens / 8 rows, pages in random
    order): the op's arguments (kv_cache, dst_k, dst_scale, block_table, cu_seq_lens)."""
    return _case(Bench(f"indexer_132 raw {tokens}", "indexer_132", "raw", tokens), seed).args


def probe_call(kernel, run: int, threads: int, mode: int, case):
    cache, dst_k, dst_s, block_table, cu_seq_lens = case
    smem = 0 if mode == 2 else run * 128 + (run + 4) * 4 + 8
    types = (ctypes.c_void_p,) * 5 + (ctypes.c_int, ctypes.c_longlong, ctypes.c_int)
    values = (dst_k.data_ptr(), dst_s.data_ptr(), cache.data_ptr(), block_table.data_ptr(), cu_seq_lens.data_ptr(),
              block_table.stride(0), cache.stride(0), BLOCK_SIZE)
    grid_y = -(-(dst_k.shape[0] // REQS) // run)
    return launcher(kernel, (REQS, grid_y), threads, smem, values, types)


def main() -> None:
    kernels = load_probes()
    bench.copy_bandwidth()  # ramps the clocks
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    for tokens in READ_TOKENS:
        moved = tokens * 2 * (128 + 4)
        sets = max(2, -(-3 * l2 // moved))
        cases = [raw_case(tokens, seed) for seed in range(sets)]

        def op(c):
            return lambda: kvgen.cp_gather_indexer_k_quant_cache(c[0], c[1], c[2], c[3], c[4])
        calls = {"kvgen": op, "triton": lambda c: with_env(op(c), KVGEN_BACKEND="triton")}
        calls.update({f"r{run}_m{mode}": (lambda c, k=kernels[(run, t, mode)], p=(run, t, mode): probe_call(k, *p, c))
                      for run, t, mode in PROBES})
        expected = []
        for c in cases:
            op(c)()
            expected.append((c[1].clone(), c[2].clone()))
        variants = {"copy": same_bytes_copy(moved, sets)}
        for name, make in calls.items():
            for c, (want_k, want_s) in zip(cases, expected):
                c[1].fill_(0xA5)
                c[2].fill_(0xA5)
                make(c)()
                torch.cuda.synchronize()
                assert torch.equal(c[1], want_k) and torch.equal(c[2], want_s), (tokens, name)
            variants[name] = [make(c) for c in cases]
        times = graph_times(variants)
        copy = times["copy"]
        print(f"raw {tokens:<7} copy {copy * 1e6:.2f} us  "
              + "  ".join(f"{k} {t * 1e6:.2f} us {copy / t:.3f}" for k, t in times.items() if k != "copy"), flush=True)


if __name__ == "__main__":
    main()
