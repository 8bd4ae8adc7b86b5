"""How far is a sparse gather at 3% and 25% valid from one over only its valid slots?
(GPU; `python benchmarks/sparse_compacted.py`)

For each layout and valid fraction, the bench's sparse input sets (65536 random
slots over the cache, the rest -1), timed side by side (bench.graph_times):
  kvgen        the public op over all 65536 slots (dispatch's row)
  compacted    the public op over the valid slots alone, in the same order:
               the same records read and the same rows written, with no -1 slot
               to skip -- what a perfect compaction of the slots would leave
  compacted_strided  the same, through the strided row of 4 stages (dispatch
               gives calls of at most 16384 slots a strided row -- 2 stages for
               DSv4 by its tuned rule -- and longer ones the ballot row)
  copy         a device-to-device copy of the valid bytes
every compacted output checked against the valid rows of the full one.
Results: BENCHMARKS.md, log 31.
"""

import torch

import kvgen
from kvgen.families.dequant_gather import op as ops
from kvgen.runtime.loader import registry
from kvgen.testing import POISON_BF16, as_format
from kvgen.tools import bench
from kvgen.tools.bench import SparseShape, gpu_sparse_case, graph_times


def main() -> None:
    bench.copy_bandwidth()  # ramps the clocks
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    for fmt in ("dsv4_584", "v41_528"):
        for valid in (0.03, 0.25, 1.0):
            shape = SparseShape(f"sparse 65536 {int(valid * 100)}% {fmt}", 65536, valid, fmt)
            layout = as_format(fmt)
            strided = next(e for e in registry().entries
                           if e.name == f"dqgk_{fmt}_f{layout.values}_b64_s4_w4_sparse_g0_strided_p0_sm_90a")
            probe = gpu_sparse_case(shape, 0)
            tokens = int((probe[2] >= 0).sum())
            working_set = tokens * bench.token_bytes(as_format(fmt))
            sets = bench._set_count(working_set, l2)
            full = [probe] + [gpu_sparse_case(shape, seed) for seed in range(1, sets)]
            compacted = []
            for out, k_cache, slots, block_size in full:
                kvgen.dequantize_and_gather_k_cache_sparse(out, k_cache, slots, block_size)
                kept = slots[slots >= 0].contiguous()
                dense_out = torch.empty((len(kept), out.shape[-1]), dtype=out.dtype, device=out.device)
                dense_out.view(torch.int16).fill_(POISON_BF16)
                kvgen.dequantize_and_gather_k_cache_sparse(dense_out, k_cache, kept, block_size)
                torch.cuda.synchronize()
                assert torch.equal(dense_out.view(torch.int16), out[slots >= 0].view(torch.int16)), shape.label
                compacted.append([dense_out, k_cache, kept, block_size])
            times = graph_times({
                "kvgen": [lambda a=a: kvgen.dequantize_and_gather_k_cache_sparse(*a) for a in full],
                "compacted": [lambda a=a: kvgen.dequantize_and_gather_k_cache_sparse(*a) for a in compacted],
                "compacted_strided": [lambda a=a: ops.launch_entry_sparse(strided, a[0], a[1], a[2])
                                      for a in compacted],
                "copy": bench.same_bytes_copy(working_set, sets),
            })
            copy = times["copy"]
            print(f"{shape.label:<28} valid {tokens:>6}  copy {copy * 1e6:6.2f} us  "
                  + "  ".join(f"{k} {t * 1e6:6.2f} us {copy / t:.3f}" for k, t in times.items() if k != "copy"),
                  flush=True)


if __name__ == "__main__":
    main()
