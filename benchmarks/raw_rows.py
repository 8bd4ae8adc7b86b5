"""Every shipped sm_90a row of the raw packed gather, side by side (GPU:
`python benchmarks/raw_rows.py [OUT.json]`).

Issue 15's raw gather (`kvgen.cp_gather_indexer_k_quant_cache`, indexer_132,
block size 64). Each row is launched directly on its dispatch grid
(op.launch_raw, with PDL where the row was built for it, as the op launches
it), beside the public op (whatever dispatch picks), its Triton
fallback and a device copy of the same bytes (record read + outputs written),
all timed in the same rounds (bench.graph_times: CUDA-graph replays,
interleaved, inputs rotated past L2). Every output is first checked byte for
byte against the op's. Two shapes of requests:
  even    8 requests of T/8 rows, pages in random order (bench_formats' raw
          shape): every chunk of rows is one run of one page
  ragged  about T/1024 requests of random lengths (mean 1024; staged, at most
          512), so requests start anywhere in a page and a chunk of rows
          splits into two runs where a page or a request begins inside it
  tiny    about T/8 requests of 1 .. 15 rows (more than a CTA stages: searched
          in global memory), so a chunk of rows is many runs
"""

import json
import sys

import torch
from raw_run_probe import raw_case

import kvgen
from kvgen.families.dequant_gather import op as ops
from kvgen.runtime.loader import registry
from kvgen.testing import as_format
from kvgen.tools.bench import graph_times, same_bytes_copy, with_env
from kvgen.tools.bench_formats import BLOCK_SIZE, _cache

TOKENS = (8192, 65536, 262144)


def ragged_case(tokens: int, seed: int, longest: int = 2047):
    """Requests of random lengths (1 .. longest) summing to `tokens`, each its own pages in random order."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    lens = []
    while sum(lens) < tokens:
        lens.append(min(int(torch.randint(1, longest + 1, (1,), generator=g)), tokens - sum(lens)))
    g = torch.Generator(device="cuda").manual_seed(seed)
    pages = [-(-n // BLOCK_SIZE) for n in lens]
    cache = _cache(as_format("indexer_132"), sum(pages) * BLOCK_SIZE, g)
    perm = torch.randperm(cache.shape[0], generator=g, device="cuda").to(torch.int32)
    width = max(pages)
    block_table = torch.zeros((len(lens), width), dtype=torch.int32, device="cuda")
    at = 0
    for r, n in enumerate(pages):
        block_table[r, :n] = perm[at:at + n]
        at += n
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32, device="cuda")
    cu[1:] = torch.tensor(lens, device="cuda").cumsum(0)
    dst_k = torch.empty((tokens, 128), dtype=torch.uint8, device="cuda")
    dst_s = torch.empty((tokens, 4), dtype=torch.uint8, device="cuda")
    return cache, dst_k, dst_s, block_table, cu


def main() -> None:
    here = torch.cuda.get_device_capability()
    rows = [e for e in registry().entries if e.family == "dqgk" and e.config.get("output") == "raw"
            and e.arch == "sm_90a" and e.config["block_size"] == BLOCK_SIZE and e.config["pdl"]]
    assert rows and here == (9, 0), (len(rows), here)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    results = []
    shapes = (("even", raw_case), ("ragged", ragged_case),
              ("tiny", lambda tokens, seed: ragged_case(tokens, seed, longest=15)))
    for shape, make_case in shapes:
        for tokens in TOKENS:
            moved = tokens * 2 * (128 + 4)
            sets = max(2, -(-3 * l2 // moved))
            cases = [make_case(tokens, seed) for seed in range(sets)]

            def op(c):
                return lambda: kvgen.cp_gather_indexer_k_quant_cache(*c)
            calls = {"kvgen": op, "triton": lambda c: with_env(op(c), KVGEN_BACKEND="triton")}
            for e in rows:
                calls[e.name.split("_packed_g0_")[1]] = lambda c, e=e: (lambda: ops.launch_raw(e, *c, pdl=e.pdl))
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
                    assert torch.equal(c[1], want_k) and torch.equal(c[2], want_s), (shape, tokens, name)
                variants[name] = [make(c) for c in cases]
            times = graph_times(variants)
            copy = times["copy"]
            row = {"shape": shape, "tokens": tokens, "requests": int(cases[0][4].shape[0] - 1),
                   "us": {k: round(t * 1e6, 3) for k, t in times.items()},
                   "of_copy": {k: round(copy / t, 3) for k, t in times.items() if k != "copy"}}
            results.append(row)
            print(f"{shape:<6} {tokens:<7} copy {copy * 1e6:7.2f} us  "
                  + "  ".join(f"{k} {v}" for k, v in row["of_copy"].items()), flush=True)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
