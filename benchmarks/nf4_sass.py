"""The NF4 kernel's SASS, built here without a GPU: `nvcc -arch=sm_90 -cubin` on `nf4_cuda.source()`, then
`cuobjdump -sass`; prints the registers, spills and the instructions per 64-value block of the main loop
(the distance between the first MMAs of consecutive blocks of the unrolled ring):

    python benchmarks/nf4_sass.py [--config depth=3,minb=4] [--two] [--keep OUT.sass]

Needs `nvcc` (the CUDA toolkit) and `cuobjdump` on PATH or in $CUOBJDUMP (the `nvidia-cuda-cuobjdump` wheel
has one).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def block_lengths(sass: str) -> list[int]:
    """Instructions between the first MMAs of consecutive 64-value blocks (an MMA with a zero accumulator,
    `RZ`, starts a block's sum)."""
    lines = [line for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", line)]
    starts = [i for i, line in enumerate(lines) if "HMMA" in line and re.search(r"RZ\s*;", line)]
    firsts = [i for n, i in enumerate(starts) if n == 0 or i - starts[n - 1] > 4]
    return [b - a for a, b in zip(firsts, firsts[1:])]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="", help="as EVENTSPEC_NF4_CUDA, e.g. depth=4,minb=3")
    parser.add_argument("--two", action="store_true", help="the 9-16 row kernel (else at most 8 rows)")
    parser.add_argument("--keep", type=Path, help="write the SASS here")
    args = parser.parse_args()
    import torch
    from workers.engine.kernels import nf4_cuda
    config = nf4_cuda.parse_config(args.config, allow_probe=True)
    text, name = nf4_cuda.source(torch.bfloat16, config, args.two)
    cuobjdump = os.environ.get("CUOBJDUMP") or shutil.which("cuobjdump")
    if not shutil.which("nvcc") or not cuobjdump:
        print("needs nvcc and cuobjdump (set CUOBJDUMP)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="es-sass-") as tmp:
        src, cubin = Path(tmp) / "k.cu", Path(tmp) / "k.cubin"
        src.write_text(text)
        build = subprocess.run(["nvcc", "-arch=sm_90", "-cubin", "-o", str(cubin), str(src), "-Xptxas", "-v"],
                               capture_output=True, text=True)
        if build.returncode:
            print(build.stderr, file=sys.stderr)
            return 1
        sass = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    if args.keep:
        args.keep.write_text(sass)
    usage = [line.strip() for line in build.stderr.splitlines() if "registers" in line or "spill" in line]
    print(name, config)
    print("\n".join(usage))
    lengths = block_lengths(sass)
    print(f"SASS instructions per block of the unrolled ring: {lengths}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
