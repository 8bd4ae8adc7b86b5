"""Is the dense kernel's gap to a copy its locate chain or its traffic?
GPU; run from the repo root: `python benchmarks/dense_as_sparse.py`.

The same dense inputs (random pages, the bench's shapes) gathered two ways,
every result checked bit for bit against the torch path, then timed
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

from kvgen.families.dequant_gather import op as ops
from kvgen.tools import bench
from kvgen.tools.bench import _time_variants, workload
from kvgen.runtime.dispatch import CallKey, candidate_rows, split_by_image
from kvgen.runtime.loader import registry
from kvgen.tools.tune import variant_of

LABELS = ("1x65536", "8x16384", "64x2048", "4x32768 b256")


def sparse_over_slots(entry):
    """The sparse call that gathers what dense case `a` (every request gathering all its rows) does."""
    def make(a):
        out, k_cache, _, _, table, bs, _ = a
        pos = torch.arange(out.shape[1], device=out.device)
        slots = (table[:, pos // bs].long() * bs + pos % bs).to(torch.int32).reshape(-1)
        return lambda: ops.launch_entry_sparse(entry, out.view(-1, out.shape[-1]), k_cache, slots)
    return make


bench.copy_bandwidth()  # ramps the clocks
copy_bw = bench.copy_bandwidth()
l2 = torch.cuda.get_device_properties(0).L2_cache_size
for shape in (s for s in bench.SHAPES if s.label in LABELS):
    w = workload(shape, l2)
    dense_rows = [e for e in split_by_image(candidate_rows(registry().entries, w.key))[0]
                  if e.pdl and e.config["num_warps"] == 4 and e.config["num_stages"] in (2, 4)]
    variants = bench.entry_variants(dense_rows, lambda e: "dense_" + variant_of(e.config))
    sparse_key = CallKey("dqgk", shape.format, shape.block_size, (("indexing", "sparse"), ("gather_lens", False)),
                         w.key.capability)
    for e in split_by_image(candidate_rows(registry().entries, sparse_key))[0]:
        if e.config["num_stages"] in (2, 4):
            variants["sparse_" + variant_of(e.config)] = sparse_over_slots(e)
    # Checked bit for bit against the torch path (poisoned first), then timed beside a same-bytes copy.
    timed = _time_variants(shape.label, w.cases, w.expected, variants, w.working_set, w.working_set / copy_bw,
                           w.reference)
    timed.pop("torch")
    print(f"{shape.label:<13} " + "  ".join(f"{k} {t['us']:.2f} us ({t['fraction']:.3f})"
                                             for k, t in sorted(timed.items(), key=lambda kv: kv[1]["us"])), flush=True)
