"""Probe (H100): one call of a bench_formats shape, for ncu.

    ncu --section SpeedOfLight -k regex:qik_v41_288 python benchmarks/ncu_one_call.py "v41_288 write 65536"
"""

import sys

import torch

from kvgen.tools.bench_formats import SHAPES, _case, _forced

shape = next(b for b in SHAPES if b.label == sys.argv[1])
call = _case(shape, 0).call
for _ in range(3):
    _forced("cubin", call)()
torch.cuda.synchronize()
