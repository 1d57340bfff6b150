"""Compile the NF4 CUDA kernels with an NVRTC library on a machine without a GPU (e.g. the `nvidia-cuda-nvrtc`
wheel unpacked somewhere): the compile errors and ptxas' register and spill report (`-Xptxas -v`) per variant,
before device time is spent on them.

    python benchmarks/nvrtc_check.py --nvrtc /tmp/nvrtc/nvidia/cu13/lib/libnvrtc.so.13 --configs ";depth=4,minb=3"

Used in the eleventh session to check a warpgroup-MMA variant's registers and spills before running it (its
source is in commit 4d34a7a; BENCHMARKS.md, eleventh session).
"""
from __future__ import annotations

import argparse
import ctypes
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from workers.engine.kernels import nf4_cuda  # noqa: E402


def compile_source(lib, text: str, name: str, arch: str) -> tuple[bool, str]:
    """(compiled, log) of `text` for sm_`arch`, with ptxas' verbose report in the log."""
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), text.encode(), f"{name}.cu".encode(), 0, None, None):
        raise RuntimeError("nvrtcCreateProgram failed")
    options = [f"--gpu-architecture=sm_{arch}".encode(), b"-Xptxas", b"-v"]
    res = lib.nvrtcCompileProgram(prog, len(options), (ctypes.c_char_p * len(options))(*options))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return res == 0, log.value.decode(errors="replace")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nvrtc", required=True, help="path of libnvrtc.so (its builtins library beside it)")
    parser.add_argument("--configs", default=";dq=1", help="EVENTSPEC_NF4_CUDA forms separated by ';'")
    parser.add_argument("--arch", default="90", help="sm_ARCH, e.g. 90 (H100/H200), 89 (RTX 4090), 90a")
    args = parser.parse_args(argv)
    lib = ctypes.CDLL(args.nvrtc)
    failed = 0
    configs = [nf4_cuda.parse_config(text, allow_probe=True) for text in args.configs.split(";")]
    for config, two, pdl in itertools.product(configs, (False, True), (False, True)):
        source, name = nf4_cuda.source(torch.bfloat16, config, two, pdl, bool(config.dq))
        ok, log = compile_source(lib, source, name, args.arch)
        failed += not ok
        print(f"{'ok ' if ok else 'ERR'} {name} sm_{args.arch}")
        for line in log.splitlines():
            if "error" in line or "registers" in line or "spill" in line or "warning" in line.lower():
                print("    " + line.strip())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
