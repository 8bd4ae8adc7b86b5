"""Page runs against the ring, and the pages' order (GPU, nvcc on PATH;
`python benchmarks/page_run_probe.py [SHAPE ...]`).

Timed side by side (bench.graph_times: CUDA-graph replays, interleaved rounds,
rotated past L2), on the DSv4 dense shapes with at least 65536 tokens:
  kvgen            the public op (dispatch's row), pages in random physical order
  page_run         the shipped page_run row of run 32 (launched directly)
  probe_rR         benchmarks/page_run_probe.cu, runs of R tokens (the CUDA C
                   probe the template's page_run schedule was written from)
  copy             a device-to-device copy of the same bytes
each also with the pages in physical order (block table = arange: "_in_order"),
every output checked bit-exact against the op's first. Results: BENCHMARKS.md, log 30.
"""

import ctypes
import sys
from pathlib import Path

import torch
from cuda_probe import launcher, load_kernels

import kvgen
from kvgen.families.dequant_gather import op as ops
from kvgen.runtime.loader import registry
from kvgen.testing import POISON_BF16
from kvgen.tools import bench
from kvgen.tools.bench import Shape, gpu_case, graph_times, in_physical_order

PROBES = {"probe_r64": (64, 256), "probe_r32": (32, 256), "probe_r16": (16, 128)}  # run tokens, threads
SHAPES = (Shape("1x65536", (65536,)), Shape("1x262144", (262144,)), Shape("8x16384", (16384,) * 8),
          Shape("64x2048", (2048,) * 64), Shape("256x256", (256,) * 256),
          Shape("4x32768 b256", (32768,) * 4, block_size=256),
          # Uneven lengths: most of each short request's CTAs find no run.
          Shape("[131072,100,2000,7]", (131072, 100, 2000, 7)), Shape("131072+63x100", (131072,) + (100,) * 63))


def load_probes() -> dict:
    names = {name: f"page_r{run}_t{threads}_s1_c0" for name, (run, threads) in PROBES.items()}
    kernels = load_kernels(Path(__file__).with_suffix(".cu"), names.values())
    return {name: kernels[symbol] for name, symbol in names.items()}


def probe_call(kernel, run: int, threads: int, args):
    """One probe launch over a dense call's arguments, with PDL as kvgen launches."""
    out, k_cache, seq_lens, _, block_table, block_size, _ = args
    smem = run * 576 + -(-run * 8 // 16) * 16 + 16 + 8
    types = (ctypes.c_void_p,) * 4 + (ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong) + (ctypes.c_int,) * 3
    values = (out.data_ptr(), k_cache.data_ptr(), seq_lens.data_ptr(), block_table.data_ptr(), block_table.stride(0),
              k_cache.stride(0), out.stride(0), out.shape[1], block_size, 1)
    grid_y = -(-int(seq_lens.max()) // run)
    return launcher(kernel, (out.shape[0], grid_y), threads, smem, values, types)


def main(only: list[str]) -> None:
    kernels = load_probes()
    bench.copy_bandwidth()  # ramps the clocks
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    for shape in SHAPES:
        if only and shape.label not in only:
            continue
        working_set = shape.tokens * (584 + bench.WRITE_BYTES)
        sets = bench._set_count(working_set, l2)
        shuffled = [gpu_case(shape, seed) for seed in range(sets)]
        page_run = next(e for e in registry().entries if e.name == f"dqgk_dsv4_584_f448_b{shape.block_size}_s1_w8_"
                        f"dense_g0_page_run_p1_sm_90a_r32")
        variants = {"copy": bench.same_bytes_copy(working_set, sets)}
        orders = [("", shuffled)]
        if len(set(shape.seq_lens)) == 1:  # physical order: every request's pages, back to back
            orders.append(("_in_order", [in_physical_order(c, shape) for c in shuffled]))
        for order, cases in orders:
            calls = {"kvgen": lambda a: lambda: kvgen.dequantize_and_gather_k_cache(*a),
                     "page_run": lambda a: lambda: ops.launch_entry(page_run, a[0], a[1], a[2], a[3], a[4], a[6],
                                                                    pdl=True)}
            calls.update({name: lambda a, k=kernels[name], rt=PROBES[name]: probe_call(k, *rt, a) for name in PROBES})
            expected = []
            for args in cases:
                kvgen.dequantize_and_gather_k_cache(*args)
                expected.append(args[0].clone())
            for name, make in calls.items():
                for args, want in zip(cases, expected):
                    args[0].view(torch.int16).fill_(POISON_BF16)
                    make(args)()
                    torch.cuda.synchronize()
                    assert torch.equal(args[0].view(torch.int16), want.view(torch.int16)), (shape.label, name, order)
                variants[name + order] = [make(args) for args in cases]
        times = graph_times(variants)
        copy = times["copy"]
        print(f"{shape.label:<14} copy {copy * 1e6:.2f} us  "
              + "  ".join(f"{k} {copy / t:.3f}" for k, t in times.items() if k != "copy"), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
