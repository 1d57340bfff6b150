"""Read bandwidth of access patterns alone, no arithmetic: which order of weight reads lets one kernel stream
near the GPU's datasheet bandwidth. Each pattern reads a buffer the size of a LLaMA-7B NF4 weight (qkv 25 MB,
gate/up 45 MB, o 8.4 MB) with 256-thread programs, xor-folds what it read (one word a thread is written, so no load
is dead), and is timed as back-to-back launches in a CUDA graph over copies larger than L2:

    python benchmarks/stream_probe.py > stream.json        # one line per (pattern, size, vector, depth, programs)

A "window" is 4 KB: what 8 warps read in one step of the NF4 kernel (`nf4_cuda.py`, tile-major bytes: warp w
reads bytes 512 w .. 512 w + 511 of a block-group as two 256-byte loads of 8 bytes a lane). Patterns:
- chunk: program p reads windows [p·c, (p + 1)·c) in order (c = windows ÷ programs): the NF4 kernel's order, a
  program streaming its own tile's contiguous bytes while every other program streams its own, c windows away;
- interleave: program p reads windows p, p + P, p + 2P, …: at any moment the programs read neighbouring windows;
- rotate: chunk, each program starting at window (p · 5) mod c of its own range;
- rows: the dense kernels' shape: 64 rows of 8 KB (a bf16 row of K = 4096) a program, 256 bytes of each row a
  step (16 KB), programs over row blocks and a K split of 4.
Vector 8 (two 8-byte loads a lane per window, as the NF4 kernel) or 16 (one 16-byte load); depth = windows in
flight per program (a ring, refilled as each is folded).
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.kernel_probe import graph_ms  # noqa: E402
from workers.engine.kernels import cuda_launch  # noqa: E402

SOURCE = r"""
#define DEPTH DEPTH_VALUE
#define VEC VEC_VALUE
#define PATTERN PATTERN_VALUE     // 0 chunk, 1 interleave, 2 rotate, 3 rows

__device__ __forceinline__ unsigned fold(uint4 v) { return v.x ^ v.y ^ v.z ^ v.w; }

// the byte offset of window i (0 <= i < per) of program p
__device__ __forceinline__ size_t window(long long i, int p, int programs, long long per) {
#if PATTERN == 0
    return (size_t)(p * per + i) * 4096;
#elif PATTERN == 1
    return (size_t)(p + i * programs) * 4096;
#else
    return (size_t)(p * per + (i + p * 5) % per) * 4096;
#endif
}

__device__ __forceinline__ uint4 load_window(const unsigned char* src, size_t base, int tid) {
#if VEC == 16
    return *(const uint4*)(src + base + (size_t)tid * 16);
#else
    const int warp = tid >> 5, lane = tid & 31;
    const uint2 a = *(const uint2*)(src + base + warp * 512 + lane * 8);
    const uint2 b = *(const uint2*)(src + base + warp * 512 + 256 + lane * 8);
    return make_uint4(a.x, a.y, b.x, b.y);
#endif
}

extern "C" __global__ void __launch_bounds__(256, MINB_VALUE) NAME(const unsigned char* __restrict__ src,
                                                                   unsigned* __restrict__ out, long long per,
                                                                   int programs, int row_blocks) {
    const int tid = threadIdx.x, p = blockIdx.x;
    unsigned h = 0;
#if PATTERN == 3
    // 64 rows of 8192 bytes from row block p % row_blocks, K quarter p / row_blocks: 2048 bytes of each row, 256 a
    // step: a step is 64 pieces of 256 bytes, 4 per 16-byte lane load (16 lanes a piece)
    const int rb = p % row_blocks, q = p / row_blocks;
    const unsigned char* base = src + (size_t)rb * 64 * 8192 + q * 2048;
    uint4 ring[DEPTH][4];
#pragma unroll
    for (int d = 0; d < DEPTH; ++d)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int piece = j * 16 + (tid >> 4);
            ring[d][j] = *(const uint4*)(base + (size_t)piece * 8192 + d * 256 + (tid & 15) * 16);
        }
    for (int s0 = 0; s0 < 8; s0 += DEPTH) {
#pragma unroll
        for (int d = 0; d < DEPTH; ++d) {
            if (s0 + d < 8) {
#pragma unroll
                for (int j = 0; j < 4; ++j) h ^= fold(ring[d][j]);
                if (s0 + d + DEPTH < 8)
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        const int piece = j * 16 + (tid >> 4);
                        ring[d][j] = *(const uint4*)(base + (size_t)piece * 8192 + (s0 + d + DEPTH) * 256 + (tid & 15) * 16);
                    }
            }
        }
    }
#else
    uint4 ring[DEPTH];
#pragma unroll
    for (int d = 0; d < DEPTH; ++d)
        if (d < per) ring[d] = load_window(src, window(d, p, programs, per), tid);
    for (long long i0 = 0; i0 < per; i0 += DEPTH) {
#pragma unroll
        for (int d = 0; d < DEPTH; ++d) {
            if (i0 + d < per) {
                h ^= fold(ring[d]);
                if (i0 + d + DEPTH < per) ring[d] = load_window(src, window(i0 + d + DEPTH, p, programs, per), tid);
            }
        }
    }
#endif
    out[(size_t)p * 256 + tid] = h;
}
"""

PATTERNS = {"chunk": 0, "interleave": 1, "rotate": 2, "rows": 3}
SIZES = {"o": 4096 * 4096 // 2, "qkv": 12288 * 4096 // 2, "gate_up": 22016 * 4096 // 2}
_kernels: dict = {}


def kernel(pattern: str, vec: int, depth: int, minb: int):
    key = (pattern, vec, depth, minb)
    if key not in _kernels:
        name = f"stream_{pattern}_v{vec}_d{depth}_m{minb}"
        text = (SOURCE.replace("DEPTH_VALUE", str(depth)).replace("VEC_VALUE", str(vec))
                .replace("PATTERN_VALUE", str(PATTERNS[pattern])).replace("MINB_VALUE", str(minb))
                .replace("NAME", name))
        _kernels[key] = torch.cuda._compile_kernel(text, name)
    return _kernels[key]


def probe(pattern: str, size_name: str, vec: int, depth: int, programs: int, shared: int, minb: int = 4) -> dict:
    nbytes = SIZES[size_name]
    if pattern == "rows":
        row_blocks = nbytes // (64 * 8192)
        programs, per = row_blocks * 4, 0
        nbytes = row_blocks * 64 * 8192
    else:
        row_blocks = 0
        per = nbytes // 4096 // programs
        nbytes = per * programs * 4096
    copies = max(2, -(-320 * 2**20 // nbytes))
    bufs = [torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda") for _ in range(copies)]
    out = torch.empty(programs * 256, dtype=torch.int32, device="cuda")
    k = kernel(pattern, vec, depth, minb)
    if shared >= 48 * 1024:
        k.set_shared_memory_config(shared)
    ms = graph_ms(lambda c: cuda_launch.launch(k, (programs, 1, 1), (256, 1, 1), [bufs[c], out, per, programs, row_blocks],
                                               shared), copies, replays=15)
    del bufs
    return dict(pattern=pattern, size=size_name, bytes=nbytes, vec=vec, depth=depth, programs=programs,
                shared=shared, minb=minb, us=round(ms * 1e3, 2), tbs=round(nbytes / ms / 1e9, 3))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="qkv,gate_up,o")
    args = parser.parse_args()
    torch.cuda.init()
    rows = []
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for size in args.sizes.split(","):
        configs = [("rows", 16, d, 0, 0) for d in (2, 4)]
        for pattern in ("chunk", "interleave", "rotate"):
            for vec, depth in ((8, 3), (8, 6), (16, 3), (16, 8)):
                for programs in (sms * 4, 768 if size == "qkv" else sms * 8):
                    configs.append((pattern, vec, depth, programs, 40 * 1024))
        for pattern, vec, depth, programs, shared in configs:
            try:
                row = probe(pattern, size, vec, depth, programs, shared)
            except Exception as exc:  # noqa: BLE001 - a config that fails is reported, not fatal
                row = dict(pattern=pattern, size=size, vec=vec, depth=depth, programs=programs, error=str(exc)[:160])
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = graph_ms(lambda c: dst.copy_(src), 1, replays=15)
    print(json.dumps({"device": torch.cuda.get_device_name(0), "copy_read_tbs": round((1 << 30) / ms / 1e9, 3),
                      "results": rows}))


if __name__ == "__main__":
    main()
