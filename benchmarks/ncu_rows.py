"""One launch of the NF4 one-row kernel (kernels/nf4_rows.py) at the qkv shape, for Nsight Compute:

    ncu --section SpeedOfLight --section WarpStateStats --section Occupancy --section LaunchStats \
        --section SchedulerStats --section InstructionStats -k regex:_rows_kernel -s 3 -c 1 \
        python benchmarks/ncu_rows.py [LOOKUP]

(the command behind benchmarks/2026-12-03-h200/ncu-nf4-rows-lookup1.txt, with LOOKUP 1)
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from workers.engine import nf4  # noqa: E402
from workers.engine.kernels import nf4_rows  # noqa: E402

n, k, bn, bk, splits = 12288, 4096, 32, 256, 4
lookup = int(sys.argv[1]) if len(sys.argv) > 1 else 1
w = torch.randn(n, k, device="cuda") / 64
packed, absmax = nf4.quantize(w)
code = nf4.code_tensor("cuda")
x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
k_split = k // splits
out = torch.empty((splits, 1, n), device="cuda")
for _ in range(5):
    nf4_rows._rows_kernel[(n // bn, splits, 1)](x, packed, absmax, code, out, 1, n, k, k_split, SPLITS=splits,
                                              BLOCK_N=bn, BLOCK_K=bk, LOOKUP=lookup, EMULATE=False, num_warps=4)
torch.cuda.synchronize()
