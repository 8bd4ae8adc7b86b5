"""What the DRAM gives this kernel's traffic (GPU; `python benchmarks/traffic_mix.py`).
1 GiB copy, write-only fill and read-only sum in the bench's harness, the
bandwidth a read:write mix would get if reads and writes each ran at their own
rate, and copies of the same bytes as each dense shape (CUDA-graph replays,
rotated past L2). Results: BENCHMARKS.md, "What is out of reach"."""

import statistics

import torch

from kvgen.tools import bench
from kvgen.tools.bench import _event_times, _set_count, graph_time

def median(fn) -> float:
    return statistics.median(_event_times(fn, reps=20))


def dram_rates() -> None:
    """The 1 GiB copy, fill and sum, and the mixes they imply (the buffers freed on return)."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    t_copy = median(lambda: dst.copy_(src))
    t_fill = median(lambda: dst.fill_(7))
    as_float = src.view(torch.float32)
    t_read = median(lambda: as_float.sum())
    bw_read, bw_write = n / t_read, n / t_fill
    print(f"1 GiB: copy {2 * n / t_copy / 1e9:.0f} GB/s (read + write), write-only fill {bw_write / 1e9:.0f} GB/s, "
          f"read-only sum {bw_read / 1e9:.0f} GB/s")
    for read, write, what in [(1, 1, "copy 1:1"), (584, 1024, "DSv4 584:1024"), (528, 1024, "V4.1 528:1024")]:
        print(f"  reads and writes each at their own rate, {what}: "
              f"{(read + write) / (read / bw_read + write / bw_write) / 1e9:.0f} GB/s")


bench.copy_bandwidth()  # ramps the clocks
dram_rates()
l2 = torch.cuda.get_device_properties(0).L2_cache_size
for tokens in (4096, 8192, 65536, 131072, 262144):
    working_set = tokens * (584 + bench.WRITE_BYTES)
    t = graph_time(bench.same_bytes_copy(working_set, _set_count(working_set, l2)))
    print(f"copy of {tokens} DSv4 tokens' bytes ({working_set / 1e6:.1f} MB): {t * 1e6:.2f} us, "
          f"{working_set / t / 1e9:.0f} GB/s", flush=True)
