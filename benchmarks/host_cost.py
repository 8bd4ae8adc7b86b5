"""Host (CPU) time of one eager call of each public op, beside native torch ops.

    PYTHONPATH=$PWD python benchmarks/host_cost.py [OUT.json]          # on a CUDA machine
    PYTHONPATH=$PWD python benchmarks/host_cost.py --fake-driver       # anywhere: CPU tensors
    PYTHONPATH=$PWD python benchmarks/host_cost.py --fake-driver --miss  # and each op's plan miss

Per call: perf_counter around a loop of calls on tiny inputs (the GPU work is
a few microseconds, so the host's time is what is measured), 3000 calls after a
warm-up, in chunks of 200 with a torch.cuda.synchronize between chunks (outside
the timed loop) so the launch queue never fills and blocks the host; the median
of several repeats, every function timed in each repeat (interleaved). Each op
is timed direct (`kvgen.op(...)`) and through the dispatcher
(`torch.ops.kvgen.op(...)`), against a native `Tensor.copy_` of 4 KiB and
`torch.add(out=)` measured in the same process: the issue's targets are direct
<= 2x native and torch.ops <= 1.25x direct.

--fake-driver runs the whole cubin path (dispatch, validation, argument
packing, the driver calls) on CPU tensors, with a device of compute capability
9.0 faked and the driver's entry points answering at once: only the host's own
work is measured, so compare its numbers by ratio with one another, not with a
GPU host's (its native ops launch nothing either).

Each timed call repeats the one before it, so a direct call finds its launch
plan (kvgen.runtime.plans) at every call. --miss also times each direct call
with the plans forgotten before it (the dispatch decisions kept, as for a call
whose shape is new but of a known shape class): the "miss" column, beside the
hits ("direct"); forgetting the plans costs ~0.03 us of it.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from typing import Callable

import torch

CHUNK = 200  # calls between synchronisations: well inside the launch queue


def fake_driver() -> None:
    """Serve the cubin path on CPU tensors: a faked H100 (capability 9.0), a
    driver whose entry points succeed at once, torch's CUDA calls stubbed."""
    from kvgen.runtime import backend, driver, launch

    class FakeDriver:
        """The driver's methods, each answering at once; raw cu* entry points return CUDA_SUCCESS."""

        def __getattr__(self, name):
            if name.startswith("cu"):
                return lambda *args: 0
            raise AttributeError(name)

        def check(self, code, what):
            pass

        def init(self):
            pass

        def load_library(self, image, what):
            return 1

        def get_kernel(self, library, symbol):
            return 1

        def set_max_dynamic_smem(self, kernel, smem_bytes, ordinal):
            pass

        def device(self, ordinal):
            return ordinal

        def primary_context(self, ordinal):
            return 1

        def current_context(self):
            return 1

        def push_context(self, context):
            pass

        def pop_context(self):
            pass

    driver._driver = FakeDriver()  # what driver.driver() hands every module
    backend.device_info = lambda device: ("cuda", (9, 0), "NVIDIA H100 80GB HBM3")
    launch._raw_stream = lambda device: 0  # torch's current stream
    torch.cuda.init = lambda: None


def cases(device: str) -> dict[str, tuple[Callable[[], None], Callable[[], None]]]:
    """Each public op on tiny inputs: (direct call, the same through torch.ops.kvgen)."""
    import kvgen
    from kvgen.testing import as_format, make_packed_case, make_raw_packed_case
    from kvgen.tools.bench import Shape, SparseShape, WriterShape, gpu_case, gpu_sparse_case, gpu_writer_case

    ops = torch.ops.kvgen
    dense = gpu_case(Shape("tiny", (16,), block_size=16), 0, device=device)
    sparse = gpu_sparse_case(SparseShape("tiny", 16, 0.5, block_size=16), 0, device=device)
    packed = make_packed_case(seq_lens=[8, 8], block_size=16, format="v32_656").args(device)
    raw = make_raw_packed_case(seq_lens=[8, 8], block_size=16, format="indexer_132").args(device)
    writer = gpu_writer_case(WriterShape("tiny", 16, block_size=16), 0, device=device)

    g = torch.Generator().manual_seed(0)
    slots = torch.randperm(32, generator=g)[:16].to(device)
    v32, indexer = as_format("v32_656"), as_format("indexer_132")
    kv_c = torch.randn(16, v32.values, generator=g).to(torch.bfloat16).to(device)
    k_pe = torch.randn(16, v32.tail, generator=g).to(torch.bfloat16).to(device)
    mla_cache = torch.zeros(2, 16, v32.record_bytes, dtype=torch.uint8, device=device)
    ds_mla = (kv_c, k_pe, mla_cache, slots)
    k_idx = torch.randn(16, indexer.head_dim, generator=g).to(torch.bfloat16).to(device)
    idx_cache = torch.zeros(2, 16, indexer.record_bytes, dtype=torch.uint8, device=device)
    idx = (k_idx, idx_cache, slots, indexer.scale_group, "ue8m0")

    def pair(name, args):
        direct, through = getattr(kvgen, name), getattr(ops, name)
        return (lambda: direct(*args)), (lambda: through(*args))

    return {
        "dequantize_and_gather_k_cache": pair("dequantize_and_gather_k_cache", dense),
        "dequantize_and_gather_k_cache_sparse": pair("dequantize_and_gather_k_cache_sparse", sparse),
        "cp_gather_and_upconvert_fp8_kv_cache": pair("cp_gather_and_upconvert_fp8_kv_cache", packed),
        "cp_gather_indexer_k_quant_cache": pair("cp_gather_indexer_k_quant_cache", raw),
        "quantize_and_insert_k_cache": pair("quantize_and_insert_k_cache", writer),
        "concat_and_cache_ds_mla": pair("concat_and_cache_ds_mla", ds_mla),
        "indexer_k_quant_and_cache": pair("indexer_k_quant_and_cache", idx),
    }


def natives(device: str) -> dict[str, Callable[[], None]]:
    src = torch.rand(1024, device=device)  # 4 KiB of float32
    dst, other = torch.empty_like(src), torch.rand(1024, device=device)
    return {"copy_4KiB": lambda: dst.copy_(src), "add_out": lambda: torch.add(src, other, out=dst)}


def time_all(functions: dict[str, Callable[[], None]], sync: Callable[[], None], calls: int,
             repeats: int) -> dict[str, float]:
    """Median over `repeats` of each function's microseconds per call (the functions
    interleaved within each repeat, so a slow spell of the host hits all of them)."""
    samples: dict[str, list[float]] = {name: [] for name in functions}
    for fn in functions.values():  # warm-up: first-call work (loading, deciding) out of the numbers
        for _ in range(CHUNK):
            fn()
    sync()
    for _ in range(repeats):
        for name, fn in functions.items():
            total = 0.0
            for start in range(0, calls, CHUNK):
                n = min(CHUNK, calls - start)
                sync()
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                total += time.perf_counter() - t0
            samples[name].append(total / calls * 1e6)
    return {name: statistics.median(values) for name, values in samples.items()}


def measure(fake: bool = False, calls: int = 3000, repeats: int = 5, miss: bool = False) -> dict:
    if fake:
        fake_driver()
    device = "cpu" if fake else "cuda"
    import kvgen
    from kvgen.runtime.loader import registry

    sync = (lambda: None) if fake else torch.cuda.synchronize
    ops = cases(device)
    backends = {}
    for name, (direct, _) in ops.items():
        direct()
        backends[name] = kvgen.last_backend()
    functions = dict(natives(device))
    for name, (direct, through) in ops.items():
        functions[f"{name} direct"] = direct
        functions[f"{name} torch.ops"] = through
        if miss:  # the plans forgotten, the decisions kept: validation, dispatch and planning at every call
            functions[f"{name} miss"] = lambda direct=direct: (registry().plans.clear(), direct())
    us = time_all(functions, sync, calls, repeats)
    copy, add = us["copy_4KiB"], us["add_out"]
    report = {
        "device": "CPU, faked driver" if fake else torch.cuda.get_device_name(),
        "host": platform.processor() or platform.machine(), "python": platform.python_version(),
        "torch": torch.__version__, "calls": calls, "repeats": repeats,
        "native_us": {"copy_4KiB": copy, "add_out": add}, "ops": {},
    }
    for name in ops:
        direct, through = us[f"{name} direct"], us[f"{name} torch.ops"]
        report["ops"][name] = {"backend": backends[name], "direct_us": direct, "torch_ops_us": through,
                               "direct_vs_copy": direct / copy, "direct_vs_add": direct / add,
                               "torch_ops_vs_direct": through / direct}
        if miss:
            report["ops"][name]["miss_us"] = us[f"{name} miss"]
    return report


def table(report: dict) -> str:
    native = report["native_us"]
    lines = [f"{report['device']}, torch {report['torch']}, Python {report['python']}: us per call "
             f"(median of {report['repeats']} x {report['calls']} calls)",
             f"native: Tensor.copy_ 4 KiB {native['copy_4KiB']:.2f}, torch.add(out=) {native['add_out']:.2f}",
             f"{'op':40} {'backend':8} {'direct':>8} {'torch.ops':>10} {'direct/copy_':>13} {'direct/add':>11} "
             f"{'ops/direct':>11}" + (f" {'miss':>8}" if any("miss_us" in r for r in report["ops"].values()) else "")]
    for name, r in report["ops"].items():
        lines.append(f"{name:40} {str(r['backend']):8} {r['direct_us']:8.2f} {r['torch_ops_us']:10.2f} "
                     f"{r['direct_vs_copy']:13.2f} {r['direct_vs_add']:11.2f} {r['torch_ops_vs_direct']:11.2f}"
                     + (f" {r['miss_us']:8.2f}" if "miss_us" in r else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", help="write the report here as JSON")
    parser.add_argument("--fake-driver", action="store_true", help="CPU tensors, a faked GPU and driver")
    parser.add_argument("--calls", type=int, default=3000, help="timed calls per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--miss", action="store_true",
                        help="also time each direct call with its launch plan forgotten (the decisions kept)")
    args = parser.parse_args(argv)
    if not args.fake_driver and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or pass --fake-driver")
    report = measure(args.fake_driver, args.calls, args.repeats, args.miss)
    print(table(report))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
