"""Is the dense kernel's gap to a copy its locate chain or its traffic?
GPU; run from the repo root: `python benchmarks/dense_as_sparse.py`.

The same dense inputs (random pages, the bench's shapes) gathered two ways,
every result checked bit for bit against the first dense row, then timed
side by side (bench.graph_times: CUDA-graph replays, interleaved rounds,
rotated past L2) with a copy of the same bytes:
  dense_*   shipped dense rows (seq_len, then a block-table lookup, then the
            record: two round trips before each record, CTAs request-major)
  sparse_*  shipped sparse rows over slots computed beforehand from the block
            table (slot = page * block_size + row: one round trip, CTAs in
            token order over the flattened output)
Results: BENCHMARKS.md, log 13.
"""

import torch

from kvgen import bench, ops
from kvgen.bench import _set_count, gpu_case, graph_times, same_bytes_copy
from kvgen.dispatch import CallKey, candidate_rows
from kvgen.loader import registry
from kvgen.testing import POISON_BF16, mismatches
from kvgen.tune import variant_of

LABELS = ("1x65536", "8x16384", "64x2048", "4x32768 b256")

bench.copy_bandwidth()  # ramps the clocks
copy_bw = bench.copy_bandwidth()
l2 = torch.cuda.get_device_properties(0).L2_cache_size
capability = torch.cuda.get_device_capability()
for shape in (s for s in bench.SHAPES if s.label in LABELS):
    working_set = shape.tokens * (584 + bench.WRITE_BYTES)
    sets = _set_count(working_set, l2)
    cases = [gpu_case(shape, seed) for seed in range(sets)]
    key = CallKey(shape.layout, shape.block_size, "dense", False, capability)
    variants = {}
    for e in candidate_rows(registry().entries, key):
        if e.pdl and e.config["num_warps"] == 4 and e.config["num_stages"] in (2, 4):
            variants["dense_" + variant_of(e.config)] = [
                (lambda a=a, e=e: ops.launch_entry(e, a[0], a[1], a[2], a[3], a[4], a[6], pdl=True)) for a in cases]
    flat = []
    for out, k_cache, _, _, table, bs, _ in cases:
        pos = torch.arange(out.shape[1], device="cuda")  # every request gathers all its rows here
        slots = (table[:, pos // bs].long() * bs + pos % bs).to(torch.int32).reshape(-1)
        flat.append((out.view(-1, out.shape[-1]), k_cache, slots))
    for e in candidate_rows(registry().entries, CallKey(shape.layout, shape.block_size, "sparse", False, capability)):
        if e.config["num_stages"] in (2, 4):
            variants["sparse_" + variant_of(e.config)] = [
                (lambda s=s, e=e: ops.launch_entry_sparse(e, *s)) for s in flat]

    # Every variant gives the first dense row's bits (the GPU tests check that row against torch).
    expected = []
    for name, calls in variants.items():
        for i, (args, call) in enumerate(zip(cases, calls)):
            args[0].view(torch.int16).fill_(POISON_BF16)
            call()
            torch.cuda.synchronize()
            if len(expected) < len(cases):
                expected.append(args[0].clone())
            elif mismatches(args[0], expected[i]):
                raise AssertionError(f"{shape.label} {name}: differs from {next(iter(variants))}")
    variants["copy"] = same_bytes_copy(working_set, sets)
    times = graph_times(variants)
    roofline = working_set / copy_bw
    print(f"{shape.label:<13} " + "  ".join(f"{k} {t * 1e6:.2f} us ({roofline / t:.3f})"
                                             for k, t in sorted(times.items(), key=lambda kv: kv[1])), flush=True)
