"""Launches of the NF4 tensor-core kernel (kernels/nf4_cuda.py) at the gate/up shape, one row, for Nsight
Compute:

    ncu --section SpeedOfLight --section WarpStateStats --section Occupancy --section LaunchStats \\
        --section SchedulerStats --section MemoryWorkloadAnalysis -k regex:eventspec_nf4 -s 3 -c 1 \\
        python benchmarks/ncu_nf4_cuda.py [ROWS]

(`EVENTSPEC_NF4_CUDA` picks a kernel configuration, as for the step.)
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from workers.engine import nf4  # noqa: E402
from workers.engine.kernels import nf4_cuda  # noqa: E402

n, k = 22016, 4096
rows = int(sys.argv[1]) if len(sys.argv) > 1 else 1
packed, absmax = nf4.quantize(torch.randn(n, k, device="cuda") / 64)
tiles = nf4_cuda.tile_absmax(absmax, n, k)
pairs = nf4_cuda.pair_table(nf4.code_tensor("cuda"), torch.bfloat16)
x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
splits, _ = nf4_cuda.splits_for(n, k)
out = torch.empty((splits, rows, n), device="cuda")
if nf4_cuda.CONFIG.layout:
    packed = nf4_cuda.tile_packed(packed, n, k)
for _ in range(5):
    nf4_cuda.partials(x, packed, tiles, pairs, n, k, out)
torch.cuda.synchronize()
