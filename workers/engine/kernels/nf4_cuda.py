"""NF4 skinny matmuls on tensor cores: split-K partials `part[s, m, n]` of `x @ W.T` for 1–16 rows of x
per program (more rows: another program column), W in bitsandbytes' NF4 layout as users load it. CUDA C,
compiled at run time by NVRTC (`torch.cuda._compile_kernel`, no CUDA toolkit needed); on the CPU, or where
NVRTC is missing, the step keeps `nf4_rows.py`'s Triton kernels.

Why CUDA: Triton cannot put a looked-up weight straight into an MMA operand register, nor keep a lookup
table in shared memory per lane; `nf4_rows.py` spends ~17 instructions per packed byte (Nsight Compute) and
streams ~1 TB/s on an H200. Here a packed byte becomes one MMA operand register with one shared-memory load:

- A weight byte holds two neighbouring columns (first value in the high nibble). A 256-entry table maps a
  byte to the 16-bit codes of its two values, packed as the register pair an `mma.m16n8k16` A fragment
  wants (low half = even column). The table is copied once per lane (32 KB), so the 32 lanes of a warp
  read 32 different banks: no conflicts.
- Weights are the MMA's A operand (16 output rows), x its B operand (8 rows of x per MMA, two MMAs for 9–16
  rows). The MMA's k order is permuted so that lane (g, t) reads 8 consecutive bytes of weight rows g and
  g + 8 and 8 consecutive words of x row g: plain coalesced loads.
- The weight bytes are laid out tile-major once (`tile_packed`, `Config.layout`, the default): a block's 16
  rows of a tile are 512 contiguous bytes, so a warp's load of 8 rows is 256 contiguous bytes (two whole
  lines) instead of 8 pieces of 32 bytes in 8 lines of bitsandbytes' row-major bytes; 14–19 % faster a launch,
  8–12 % a step on an H200 (BENCHMARKS.md, fifth session). The loads alone then stream at ~2.7 TB/s marginal
  (2.2 row-major), against 3.8 TB/s for the dense bf16 kernel: what still limits this kernel
  (`benchmarks/kernel_fit.py`).
- A 64-value NF4 block is 4 MMAs into a zeroed accumulator, multiplied by the block's absmax (float32 FMA)
  and added to the running sum; so a weight is code · absmax with the code rounded to 16 bits, where
  bitsandbytes rounds code · absmax (the same quantized values; results agree to that rounding).
- A program = `Config.tiles` tiles of 16 weight rows × a K split × 16 rows of x; for each tile its 8 warps
  take every 8th block of the split and add their sums in warp order in shared memory. The split count
  depends on the weight's shape only, and which program computes a tile changes none of its sums.
- The absmax values are re-laid out once (`tile_absmax`): a block's 16 scales of a tile are one 64-byte
  run. Read in bitsandbytes' order they were 16 cache lines per block, most of the L1 traffic (Nsight
  Compute: L1/TEX 74 % busy at 1.2 TB/s).
  Each warp keeps `Config.depth` blocks of weight bytes in flight (registers); x, small and read by every
  program on the same K range, is loaded when its block is computed (or rides in the ring: `xring`).
- Two other ways of feeding the MMAs were built, proved bit-identical on an H200 and measured slower in
  every shape, so they are gone (BENCHMARKS.md, fifth session; the source is in commit 999609c and its parent):
  persistent programs with a per-lane cp.async ring in shared memory across items, and bulk copies (the
  tensor memory accelerator, one 256-byte row piece a copy) into mbarrier-counted shared-memory stages.
- The table is built from the 16 codes, passed as kernel arguments (`Config.argtable`, `fill_table_args`): a
  program's first instructions are its table stores and its first weight loads, with no global load ahead of
  them. Copied from a 256-entry table in global memory, as before, the table's load (an L2 hit behind the
  memory system's queue) came first and every program's weight loads waited for it: an EventGPT nf4 step
  2.48–2.50 → 2.33–2.42 ms on an H200 (BENCHMARKS.md, eighth session).
- Launched with programmatic dependent launch where the step uses it (`kernels.pdl_on`: compute capability
  9+; `cuda_launch.launch`), a program fills its table while the kernel ahead still runs and waits
  (`wait_inputs`) before it reads x: an EventGPT nf4 step 2.61 → 2.45 ms on an H200. The source issues the
  first ring of weight loads before the wait too, but ptxas schedules the wait (SASS `ACQBULK`) ahead of them;
  `Config.early` predicates the wait on their values so they go first: launched back to back 3–13 % faster at
  one row, in the step not measurably faster (eighth session): off. Asking L2 for a program's whole weight
  range first (`Config.prefetch`) made single launches faster and the step slower (seventh session): off.
- The weight bytes and scales are loaded without allocating in L1 (`Config.wcache`, `ld.global.nc.L1::no_allocate`):
  they are read once, while x is read by every program of a split and waits in each block's critical path.
  With plain loads the weight stream evicted x from L1 and each block's x load went to L2: the loads alone
  cost 5 µs a layer more with x than without (one row); an EventGPT nf4 step 2.28–2.40 → 2.21–2.23 ms on an
  H200 (BENCHMARKS.md, ninth session).
- `Config.dq=1` keeps bitsandbytes' double-quantized scales as they are (a byte a block, a float32 per 256
  blocks, each stacked module's offset per tile) and computes each absmax in the kernel with bitsandbytes'
  rounding (product, then sum), so the sums are the float32 scales' bit for bit; a quarter of the scales'
  bytes (0.28 GiB of a 7B model), but the byte's lookup and the two roundings per block cost more than the
  bytes saved: off (BENCHMARKS.md, tenth session).
- `Config.persist` runs as many programs as take the fewest rounds of (tile, split) items, each warp's ring
  running on from one item into the next: the same sums, and no faster on an H200 (ninth session): off.
- `Config.probe` builds measurement-only variants (loads alone, loads and lookups, no table fill, whole-line
  loads) whose sums are wrong: which part of the kernel limits it (BENCHMARKS.md, fourth session).

Row-invariant: a column of an MMA depends only on its own row of x, every row runs the same instructions
(rows past M are zeros in the second MMA), and all sums have a fixed order; M = 1 and M = 9 give the same
bits for a row, which `tests/test_nf4_cuda.py` checks on the GPU.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, replace

import torch

from . import pdl_on
from . import cuda_launch

WARPS = 8
TABLE_WORDS = 256 * 32
SHARED_BYTES = 4 * TABLE_WORDS + 4 * WARPS * 16 * 16 + 4 * 256     # table, the warps' sums, the DQ code
ROWS_PER_PROGRAM = 16
TARGET_PROGRAMS = 512          # programs a weight aims at (an H200 has 132 SMs, ~3 programs resident on each)
MIN_SPLIT_BLOCKS = 16          # NF4 blocks per split at least (8 warps × 2)

SOURCE = r"""
#define WARPS 8
#define DEPTH DEPTH_VALUE
#define XRING XRING_VALUE
#define PROBE PROBE_VALUE       // measurement only, wrong sums: 1 = the loads alone, 2 = loads and table lookups,
                                // 3 = the loads alone and no table fill, 4 = the loads in whole lines, 5 = the weight
                                // and scale loads (no x), 6 = the weight loads alone, 7 = 6 without the table fill
#define FILL (PROBE != 3 && PROBE != 7)
#define LOAD_X (PROBE < 5)
#define LOAD_S (PROBE < 6)
#define TILED TILED_VALUE     // 1: weights tile-major (`tile_packed`): a block's 16 rows are 512 contiguous bytes
#define BSTRIDE (TILED ? 64 : 4)   // uint2 words from a block of a weight row to the next block
#define TWO TWO_VALUE           // 1: programs may hold 9-16 rows of x (a second MMA per k step); 0: at most 8
#define TABLE_WORDS (256 * 32)
#define PREFETCH PREFETCH_VALUE // 1: each program first asks L2 for its tile's weight bytes and scales, a prefetch a
                                // line; 2: the same as bulk prefetches of 4 KB (compute capability 9+)
#define ARGTABLE ARGTABLE_VALUE // 1: the table is built from the 16 codes passed as kernel arguments (`c0`..`c7`), no
                                // global load before the first weight loads; 0: copied from `pairs` in global memory
#define EARLY EARLY_VALUE       // 1: the wait for the kernel ahead is predicated on the first ring's loaded values, so
                                // ptxas cannot schedule it before those loads (it did: ACQBULK ahead of every LDG)
#define WCACHE WCACHE_VALUE     // weight and scale loads: 0 plain, 1 L1::no_allocate (L1 keeps x), 2 evict-first (.cs)
#define PERSIST PERSIST_VALUE   // 1: persistent programs whose rings run on from one (tile, split) item into the next
#define DQ DQ_VALUE             // 1: the scales are bitsandbytes' double-quantized bytes (`absmax` holds a tile's uint8
                                // pairs), turned into the float32 absmax in the kernel: code2[q] · absmax2[i / 256] + offset
#if DQ && (PERSIST || PROBE == 4 || XRING)
#error "double-quantized scales are read by the ring of the default path only"
#endif
#define TRIGGER TRIGGER_VALUE   // PDL: 0 the next kernel may be scheduled once this one's wait is over, 1 from its entry
#define PDL PDL_VALUE           // 1: launched with programmatic dependent launch: x is read and `out` written only
                                // after the kernel ahead has finished (`wait_inputs`); weights are read before

__device__ __forceinline__ void mma(float* d, unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                    unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.DT.DT.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Programmatic dependent launch: wait until the kernel ahead has finished and its writes are visible, then let
// the next kernel be scheduled. Everything before it reads only the weights, the scales and the pair table,
// which no kernel of a step writes, and writes only shared memory; without the launch attribute it returns at once
__device__ __forceinline__ void wait_inputs() {
#if PDL && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#if !TRIGGER
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
#endif
}

// wait_inputs(), ordered after the loads that produced `dep`: the wait is predicated on a value computed from
// them (`dep | nonzero` != 0, always true; `nonzero` is a kernel argument, so ptxas cannot prove it), so it
// cannot be issued before they have landed. Without it ptxas hoists the wait above the ring's first loads
__device__ __forceinline__ void wait_inputs_after(unsigned dep, unsigned nonzero) {
#if PDL && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("{\n.reg .pred p;\n.reg .b32 v;\nor.b32 v, %0, %1;\nsetp.ne.u32 p, v, 0;\n@p griddepcontrol.wait;\n}\n"
                 :: "r"(dep), "r"(nonzero) : "memory");
#if !TRIGGER
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
#endif
}

// a weight word pair and a scale pair from global memory, cached in L1 as `WCACHE` says: the weights are read once,
// x by every block, so x may stay in L1 if the weights do not go there
__device__ __forceinline__ uint2 load_w(const uint2* p) {
#if WCACHE == 1
    uint2 v;
    asm("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "l"(p));
    return v;
#elif WCACHE == 2
    return __ldcs(p);
#else
    return *p;
#endif
}

// a tile's two double-quantized scale bytes of one block (rows g, g + 8), cached as the weights are
__device__ __forceinline__ unsigned load_q(const unsigned short* p) {
#if WCACHE == 1
    unsigned short v;
    asm("ld.global.nc.L1::no_allocate.u16 %0, [%1];\n" : "=h"(v) : "l"(p));
    return v;
#elif WCACHE == 2
    return __ldcs(p);
#else
    return *p;
#endif
}

// bitsandbytes' absmax of a block from its double-quantized byte: the product rounded, then the offset added
// (as `nf4.Nested.expand` and `nf4.unpack_bnb` compute it), so the same float32 as the expanded scales
__device__ __forceinline__ float dq_scale(const float* code2, unsigned q, float absmax2, float offset) {
    return __fadd_rn(__fmul_rn(code2[q], absmax2), offset);
}

// the absmax2 values a row's blocks [b_begin, ...) of one split use: v0 below block `boundary`, v1 from it on
// (a row holds K / 64 <= 256 blocks, so a split crosses at most one group of 256)
__device__ __forceinline__ void dq_groups(const float* absmax2, int n2, int row, int KB, int b_begin,
                                          float& v0, float& v1, int& boundary) {
    const int first = row * KB + b_begin, g0 = first >> 8;
    boundary = ((g0 + 1) << 8) - row * KB;
    v0 = __ldg(absmax2 + min(g0, n2 - 1));
    v1 = __ldg(absmax2 + min(g0 + 1, n2 - 1));
}

__device__ __forceinline__ float2 load_s(const float2* p) {
    const uint2 v = load_w((const uint2*)p);
    return make_float2(__uint_as_float(v.x), __uint_as_float(v.y));
}

// `bytes` (a multiple of 16, 16-byte aligned) from `p` into L2, spread over the program's threads
__device__ __forceinline__ void prefetch_l2(const char* p, unsigned bytes, int tid) {
#if PREFETCH == 2 && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    for (unsigned off = (unsigned)tid * 4096u; off < bytes; off += 4096u * 32u * WARPS) {
        const unsigned n = min(4096u, bytes - off);
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" :: "l"(p + off), "r"(n) : "memory");
    }
#elif PREFETCH
    for (unsigned off = (unsigned)tid * 128u; off < bytes; off += 128u * 32u * WARPS)
        asm volatile("prefetch.global.L2 [%0];\n" :: "l"(p + off));
#endif
}

// a tile's weight bytes and scales of blocks [b_begin, b_end) into L2 (tile-major bytes: two contiguous runs)
__device__ __forceinline__ void prefetch_tile(const unsigned char* w, const float2* absmax, int tile, int KB,
                                              int b_begin, int b_end, int tid) {
#if PREFETCH && TILED
    const size_t first = (size_t)tile * KB + b_begin;
    prefetch_l2((const char*)(w + first * 512), (unsigned)(b_end - b_begin) * 512u, tid);
    prefetch_l2((const char*)(absmax + first * 8), (unsigned)(b_end - b_begin) * 64u, tid);
#endif
}

// the lane's copy of table entry `byte` of `word`: a byte permute and a shift-add give the shared address
// (`lane_base` = the table's shared address + 4 · lane), so a lookup is 2 integer instructions and 1 LDS
__device__ __forceinline__ unsigned lut(unsigned lane_base, unsigned word, int byte) {
    const unsigned entry = __byte_perm(word, 0u, 0x4440u + byte);
    unsigned v;
    asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(v) : "r"(lane_base + (entry << 7)));
    return v;
}

// acc += part · the block's absmax (rows g and g + 8), explicit FMAs so every variant rounds alike
__device__ __forceinline__ void add_scaled(float* acc, const float* part, float sa, float sb) {
#pragma unroll
    for (int i = 0; i < 4 + 4 * TWO; ++i) acc[i] = __fmaf_rn(part[i], (i & 2) ? sb : sa, acc[i]);
}

// One NF4 block (64 columns) of weight rows g, g + 8 against x rows g (and 8 + g when two): 4 MMAs per
// 8 x rows, permuted k: MMA s takes bytes 2s, 2s + 1 of the lane's 8 and words 2s, 2s + 1 of x.
__device__ __forceinline__ void block_mma(float* part, unsigned lt, uint2 wa, uint2 wb, const unsigned* xw0,
                                          const unsigned* xw1, bool two) {
#pragma unroll
    for (int s = 0; s < 4; ++s) {
        unsigned ra = s < 2 ? wa.x : wa.y;
        unsigned rb = s < 2 ? wb.x : wb.y;
        int lo = 2 * (s & 1);
        unsigned a0 = lut(lt, ra, lo), a1 = lut(lt, rb, lo), a2 = lut(lt, ra, lo + 1), a3 = lut(lt, rb, lo + 1);
        mma(part, a0, a1, a2, a3, xw0[2 * s], xw0[2 * s + 1]);
#if TWO
        if (two) mma(part + 4, a0, a1, a2, a3, xw1[2 * s], xw1[2 * s + 1]);
#endif
    }
}

// a block's 16 words of an x row (two 16-byte loads) as the 8 words of the lane's B fragments
__device__ __forceinline__ void unpack_x(unsigned* xw, uint4 lo, uint4 hi) {
    xw[0] = lo.x; xw[1] = lo.y; xw[2] = lo.z; xw[3] = lo.w; xw[4] = hi.x; xw[5] = hi.y; xw[6] = hi.z; xw[7] = hi.w;
}

// the lookup table, one copy per lane: word e * 32 + l = pairs[e]; 16-byte stores of four copies
__device__ __forceinline__ void fill_table(unsigned* shared, const unsigned* pairs, int tid) {
    for (int i = tid; i < TABLE_WORDS / 4; i += 32 * WARPS) {
        const unsigned v = pairs[i >> 3];
        ((uint4*)shared)[i] = make_uint4(v, v, v, v);
    }
}

// The same table from the 16 codes as kernel arguments (`c[j]` = code 2j | code 2j + 1 << 16): no memory read, so
// nothing for the first weight loads to wait behind. Thread tid writes entries e = tid / 8 + 32 j (j = 0..7):
// their low nibble (e & 15 = tid / 8 & 15) is one code for all eight, their high nibble's code is 2 j + (tid / 128)
__device__ __forceinline__ void fill_table_args(unsigned* shared, const unsigned* c, int tid) {
    const int base = tid >> 3, lo = base & 15, parity = base >> 4;
    unsigned w = c[0];
#pragma unroll
    for (int j = 1; j < 8; ++j) w = (lo >> 1) == j ? c[j] : w;
    const unsigned low_code = (lo & 1) ? (w >> 16) : (w & 0xFFFFu);      // code[e & 15]: the word's high half
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        const unsigned high_code = parity ? (c[j] >> 16) : (c[j] & 0xFFFFu);   // code[e >> 4] = code[2 j + parity]
        const unsigned v = high_code | (low_code << 16);
        ((uint4*)shared)[tid + j * 32 * WARPS] = make_uint4(v, v, v, v);
    }
}

// The 8 warps' sums of one tile, added in warp order through shared memory `red` and stored as the split's
// partial (rows past M or N are not stored); every thread of the program calls it, `red` is free again after
__device__ __forceinline__ void reduce_tile(float* red, const float* acc, float* out, int tid, int tile, int split,
                                            int M, int N, int m0, int here) {
    const int lane = tid & 31, g = lane >> 2, t = lane & 3;
    // C fragment: (weight row g, x rows 2t, 2t + 1), (g + 8, 2t, 2t + 1); the second MMA: x rows + 8
    float* mine = red + (tid >> 5) * 256;
    mine[g * 16 + 2 * t] = acc[0];
    mine[g * 16 + 2 * t + 1] = acc[1];
    mine[(g + 8) * 16 + 2 * t] = acc[2];
    mine[(g + 8) * 16 + 2 * t + 1] = acc[3];
    mine[g * 16 + 8 + 2 * t] = acc[4];
    mine[g * 16 + 8 + 2 * t + 1] = acc[5];
    mine[(g + 8) * 16 + 8 + 2 * t] = acc[6];
    mine[(g + 8) * 16 + 8 + 2 * t + 1] = acc[7];
    __syncthreads();
    const int nl = tid & 15, ml = tid >> 4;
    float sum = red[nl * 16 + ml];
#pragma unroll
    for (int v = 1; v < WARPS; ++v) sum += red[v * 256 + nl * 16 + ml];
    const int n = tile * 16 + nl;
    if (ml < here && n < N) out[((size_t)split * M + m0 + ml) * N + n] = sum;
    __syncthreads();                                       // the next tile reuses `red`
}

// PERSIST: a warp's place in its sequence of blocks: block q of item `item` = tile · S + split, which holds `nb`
// blocks of this warp (every warp the same: K / 64 and the split are multiples of 8)
struct Cursor {
    int item, tile, split, q, nb;
};

__device__ __forceinline__ Cursor cursor_at(int item, int S, int KB, int split_blocks) {
    const int tile = item / S, split = item - tile * S;
    return Cursor{item, tile, split, 0, min(split_blocks, KB - split * split_blocks) >> 3};
}

// the next block of the warp's sequence: the next of the item, or the first of the program's next item
__device__ __forceinline__ void advance(Cursor& c, int S, int KB, int split_blocks) {
    if (++c.q == c.nb) c = cursor_at(c.item + gridDim.x, S, KB, split_blocks);
}

// PERSIST: the weight bytes and scales of the block at `c` (tile-major bytes)
__device__ __forceinline__ void load_item_block(const unsigned char* w, const float2* absmax, const Cursor& c,
                                                int KB, int split_blocks, int warp, int g, int t,
                                                uint2& a, uint2& b, float2& s) {
    const size_t off = (size_t)c.tile * KB + c.split * split_blocks + warp + 8 * c.q;
    const uint2* pa = (const uint2*)(w + off * 512) + 4 * g + t;
    a = load_w(pa);
    b = load_w(pa + 32);
    s = load_s(absmax + off * 8 + g);
}

#if PROBE
// what `Config.probe` keeps of a block: its loads (1), or its loads and 16 table lookups (2), folded into
// one value so nothing is dead code; no MMA
__device__ __forceinline__ float block_probe(unsigned lt, uint2 wa, uint2 wb, const unsigned* xw0, float scale) {
    unsigned h = wa.x ^ wa.y ^ wb.x ^ wb.y;
#pragma unroll
    for (int i = 0; i < 8; ++i) h ^= xw0[i];
#if PROBE == 2
#pragma unroll
    for (int s = 0; s < 4; ++s) {
        unsigned ra = s < 2 ? wa.x : wa.y, rb = s < 2 ? wb.x : wb.y;
        int lo = 2 * (s & 1);
        h ^= lut(lt, ra, lo) ^ lut(lt, rb, lo) ^ lut(lt, ra, lo + 1) ^ lut(lt, rb, lo + 1);
    }
#endif
    return __uint_as_float((h & 0x007fffffu) | 0x3f800000u) * scale;
}
#endif

extern "C" __global__ void __launch_bounds__(256, MINB_VALUE) NAME(
        const unsigned* __restrict__ x,            // [M, K / 2] words, two 16-bit values each
        const unsigned char* __restrict__ w,       // [N, K / 2] packed bytes (bitsandbytes' layout)
        const float2* __restrict__ absmax,         // [N / 16, K / 64, 8]: (row g, row g + 8) of a tile
        const unsigned* __restrict__ pairs,        // [256]: byte -> code[b >> 4] | code[b & 15] << 16
        float* __restrict__ out,                   // [S, M, N] float32 partials
        int M, int N, int K, int split_blocks,
        unsigned c0, unsigned c1, unsigned c2, unsigned c3,   // the codes (ARGTABLE): code 2j | code 2j + 1 << 16
        unsigned c4, unsigned c5, unsigned c6, unsigned c7,
        const float* __restrict__ absmax2,         // DQ: [n2] float32, one per 256 blocks (bitsandbytes' order)
        const float* __restrict__ code2,           // DQ: [256] float32, the second-level code
        const float* __restrict__ tile_offset,     // DQ: [tiles] float32, the offset of each tile's module
        int n2) {
    extern __shared__ unsigned shared[];
#if PDL && TRIGGER && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");   // the next kernel may be scheduled now
#endif
    float* red = (float*)(shared + TABLE_WORDS);
    float* code2s = red + WARPS * 256;                     // DQ: the second-level code (1 KB)
    (void)absmax2; (void)code2; (void)tile_offset; (void)n2; (void)code2s;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int KB = K >> 6, KW = K >> 1;
    const int split = blockIdx.y, m0 = blockIdx.z * 16;
    const int b_begin = split * split_blocks;
    const int b_end = min(b_begin + split_blocks, KB);
    const int tiles = (N + 15) >> 4;
    prefetch_tile(w, absmax, blockIdx.x, KB, b_begin, b_end, tid);
#if ARGTABLE
    {
        const unsigned codes[8] = {c0, c1, c2, c3, c4, c5, c6, c7};
        if (FILL) fill_table_args(shared, codes, tid);
    }
#else
    if (FILL) fill_table(shared, pairs, tid);
#endif

    const int g = lane >> 2, t = lane & 3;
    const int here = min(16, M - m0);
    const bool two = TWO && here > 8;                // the same for every lane
    const bool x_ok0 = g < here, x_ok1 = 8 + g < here;
    const unsigned lt = (unsigned)__cvta_generic_to_shared(shared) + 4u * lane;
    // the ring's x rows: a row past M reads row m0 instead (its column's sums are never stored)
    const uint4* xc0_row = (const uint4*)(x + (size_t)(m0 + (x_ok0 ? g : 0)) * KW) + 2 * t;
    const uint4* xc1_row = (const uint4*)(x + (size_t)(m0 + (x_ok1 ? 8 + g : 0)) * KW) + 2 * t;

#if PERSIST && TILED && !PROBE
    // Persistent programs (the host launches them only where K / 64 and the split are multiples of 8, so every
    // warp has the same number of blocks in an item): program p takes the items (tile, split) p, p + gridDim.x,
    // ... and each warp's ring runs on from one item into the next, so no item but the first starts with an
    // empty ring. A warp still adds its blocks of an item in order and the warps are added in warp order
    // (`reduce_tile`), so an item's sums are the other path's, whichever program computes it.
    {
        (void)split; (void)b_begin; (void)b_end;
        const int S = (KB + split_blocks - 1) / split_blocks, items = tiles * S;
        Cursor load = cursor_at(blockIdx.x, S, KB, split_blocks);     // the next block to load
        Cursor comp = load;                                            // the next block to compute
        uint2 ring_a[DEPTH], ring_b[DEPTH];
        float2 ring_s[DEPTH];
#pragma unroll
        for (int d = 0; d < DEPTH; ++d) {
            if (load.item < items) {
                load_item_block(w, absmax, load, KB, split_blocks, warp, g, t, ring_a[d], ring_b[d], ring_s[d]);
                advance(load, S, KB, split_blocks);
            }
        }
        wait_inputs();
        __syncthreads();
        float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        while (comp.item < items) {
#pragma unroll
            for (int d = 0; d < DEPTH; ++d) {
                if (comp.item < items) {                    // the same for every warp: items end together
                    const int b = comp.split * split_blocks + warp + 8 * comp.q;
                    unsigned xw0[8], xw1[8];
                    unpack_x(xw0, xc0_row[(size_t)b * 8], xc0_row[(size_t)b * 8 + 1]);
#if TWO
                    unpack_x(xw1, xc1_row[(size_t)b * 8], xc1_row[(size_t)b * 8 + 1]);
#endif
                    float part[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
                    block_mma(part, lt, ring_a[d], ring_b[d], xw0, xw1, two);
                    add_scaled(acc, part, ring_s[d].x, ring_s[d].y);
                    if (load.item < items) {                // refill this slot with the block DEPTH ahead
                        load_item_block(w, absmax, load, KB, split_blocks, warp, g, t, ring_a[d], ring_b[d], ring_s[d]);
                        advance(load, S, KB, split_blocks);
                    }
                    if (comp.q + 1 == comp.nb) {            // the item's last block: its sums out
                        reduce_tile(red, acc, out, tid, comp.tile, comp.split, M, N, m0, here);
#pragma unroll
                        for (int i = 0; i < 8; ++i) acc[i] = 0.f;
                    }
                    advance(comp, S, KB, split_blocks);
                }
            }
        }
    }
#else
    // a program takes tiles blockIdx.x, + gridDim.x, ...: the table is filled once for all of them
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        if (tile + (int)gridDim.x < tiles) prefetch_tile(w, absmax, tile + gridDim.x, KB, b_begin, b_end, tid);
        const int n_a = tile * 16 + g, n_b = n_a + 8;
        const float2* scales = absmax + (size_t)tile * KB * 8 + g;

        float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#if PROBE == 4
        {
            // probe 4: the tile's weight bytes in the dense kernels' load shape (warp w reads rows 2w, 2w + 1,
            // 16 bytes a lane, 256 contiguous bytes a row per load: whole lines), the scales and x as the ring
            // reads them; wrong sums, measurement only
            const int row = min(tile * 16 + 2 * warp + (lane >> 4), N - 1), piece = lane & 15;
            const uint4* q = (const uint4*)(w + (size_t)row * KW + (size_t)b_begin * 32) + piece;
            const int runs = (b_end - b_begin + 7) / 8;              // 8 blocks: 256 bytes of a row
            unsigned h = 0;
            wait_inputs();
#pragma unroll 8
            for (int r = 0; r < runs; ++r) {
                if (b_begin + r * 8 + (piece >> 1) < b_end) {
                    const uint4 u = q[r * 16];
                    h ^= u.x ^ u.y ^ u.z ^ u.w;
                }
            }
            float sc = 0.f;
#pragma unroll 8
            for (int b = b_begin + warp; b < b_end; b += WARPS) {
                const float2 s2 = scales[(size_t)b * 8];
                const uint4 lo = xc0_row[(size_t)b * 8], hi = xc0_row[(size_t)b * 8 + 1];
                sc += s2.x + s2.y;
                h ^= lo.x ^ lo.y ^ lo.z ^ lo.w ^ hi.x ^ hi.y ^ hi.z ^ hi.w;
            }
            __syncthreads();                                         // as the ring waits for the table
            acc[0] += __uint_as_float((h & 0x007fffffu) | 0x3f800000u) * sc;
        }
#else
        // a ring of DEPTH blocks of weights and absmax in flight per warp (XRING: and of x rows 0..7); the
        // loads are issued before the table is complete, so they overlap its stores. Running pointers with
        // constant offsets: per block, no address arithmetic beyond one pointer step per DEPTH blocks (the
        // compiler had re-derived every address each block, ~40 % of the loop's instructions). Rows past N
        // (and x rows past M) read a valid row instead: a column of an MMA never meets another, and their sums
        // are never stored, so no load needs a predicate
        const int first = b_begin + warp;
#if TILED
        const uint2* pa = (const uint2*)(w + ((size_t)tile * KB + first) * 512) + 4 * g + t;
        const uint2* pb = pa + 32;
        (void)n_b;
#else
        const uint2* pa = (const uint2*)(w + (size_t)min(n_a, N - 1) * KW) + t + (size_t)first * 4;
        const uint2* pb = (const uint2*)(w + (size_t)min(n_b, N - 1) * KW) + t + (size_t)first * 4;
#endif
        const float2* ps = scales + (size_t)first * 8;
#if DQ
        const unsigned short* pq = (const unsigned short*)absmax + ((size_t)tile * KB + first) * 8 + g;
        float a2a0, a2a1, a2b0, a2b1;
        int bnd_a, bnd_b;
        dq_groups(absmax2, n2, min(n_a, N - 1), KB, b_begin, a2a0, a2a1, bnd_a);
        dq_groups(absmax2, n2, min(n_b, N - 1), KB, b_begin, a2b0, a2b1, bnd_b);
        const float offset = tile_offset[tile];
        unsigned ring_q[DEPTH];
#endif
        const uint4* px0 = xc0_row + (size_t)first * 8;
#if TWO
        const uint4* px1 = xc1_row + (size_t)first * 8;
#endif
        uint2 ring_a[DEPTH], ring_b[DEPTH];
        float2 ring_s[DEPTH];
#if EARLY
#pragma unroll
        for (int d = 0; d < DEPTH; ++d) { ring_a[d] = make_uint2(0u, 0u); ring_b[d] = ring_a[d]; ring_s[d] = make_float2(0.f, 0.f); }
#endif
#if XRING
        uint4 ring_x[DEPTH][2];
        wait_inputs();                                      // the ring holds x
#endif
#pragma unroll
        for (int d = 0; d < DEPTH; ++d) {
            if (first + d * WARPS < b_end) {
                ring_a[d] = load_w(pa + d * WARPS * BSTRIDE);
                ring_b[d] = load_w(pb + d * WARPS * BSTRIDE);
#if DQ
                ring_q[d] = LOAD_S ? load_q(pq + d * WARPS * 8) : 0u;
#else
                ring_s[d] = LOAD_S ? load_s(ps + d * WARPS * 8) : make_float2(1.f, 1.f);
#endif
#if XRING
                ring_x[d][0] = px0[d * WARPS * 8];
                ring_x[d][1] = px0[d * WARPS * 8 + 1];
#endif
            }
        }
#if !XRING && EARLY
        {                                                   // the ring holds weights and scales only: wait once
            unsigned dep = 0u;                              // they have landed (EARLY)
#pragma unroll
#if DQ
            for (int d = 0; d < DEPTH; ++d) dep ^= ring_a[d].x ^ ring_b[d].y ^ ring_q[d];
#else
            for (int d = 0; d < DEPTH; ++d) dep ^= ring_a[d].x ^ ring_b[d].y ^ __float_as_uint(ring_s[d].x);
#endif
            wait_inputs_after(dep, (unsigned)K);
        }
#elif !XRING
        wait_inputs();                                      // the ring holds weights and scales only
#endif
#if DQ
        if (tile == (int)blockIdx.x && tid < 256) code2s[tid] = code2[tid];   // once, after the ring's loads
#endif
        __syncthreads();
        for (int b0 = first; b0 < b_end; b0 += DEPTH * WARPS) {
#pragma unroll
            for (int d = 0; d < DEPTH; ++d) {
                if (b0 + d * WARPS < b_end) {
                    unsigned xw0[8], xw1[8];
#if XRING
                    const uint4 lo = ring_x[d][0], hi = ring_x[d][1];
#else
                    const uint4 lo = LOAD_X ? px0[d * WARPS * 8] : make_uint4(0u, 0u, 0u, 0u);
                    const uint4 hi = LOAD_X ? px0[d * WARPS * 8 + 1] : make_uint4(0u, 0u, 0u, 0u);
#endif
                    unpack_x(xw0, lo, hi);
#if TWO
                    unpack_x(xw1, px1[d * WARPS * 8], px1[d * WARPS * 8 + 1]);
#endif
#if DQ
                    const int b = b0 + d * WARPS;
                    const float sa = dq_scale(code2s, ring_q[d] & 255u, b < bnd_a ? a2a0 : a2a1, offset);
                    const float sb = dq_scale(code2s, ring_q[d] >> 8, b < bnd_b ? a2b0 : a2b1, offset);
#else
                    const float sa = ring_s[d].x, sb = ring_s[d].y;
#endif
#if PROBE
                    acc[0] += block_probe(lt, ring_a[d], ring_b[d], xw0, sa + sb);
                    (void)xw1;
#else
                    float part[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
                    block_mma(part, lt, ring_a[d], ring_b[d], xw0, xw1, two);
                    add_scaled(acc, part, sa, sb);
#endif
                    if (b0 + (DEPTH + d) * WARPS < b_end) {     // refill this slot with the block DEPTH ahead
                        ring_a[d] = load_w(pa + (DEPTH + d) * WARPS * BSTRIDE);
                        ring_b[d] = load_w(pb + (DEPTH + d) * WARPS * BSTRIDE);
#if DQ
                        ring_q[d] = LOAD_S ? load_q(pq + (DEPTH + d) * WARPS * 8) : 0u;
#else
                        ring_s[d] = LOAD_S ? load_s(ps + (DEPTH + d) * WARPS * 8) : make_float2(1.f, 1.f);
#endif
#if XRING
                        ring_x[d][0] = px0[(DEPTH + d) * WARPS * 8];
                        ring_x[d][1] = px0[(DEPTH + d) * WARPS * 8 + 1];
#endif
                    }
                }
            }
            pa += DEPTH * WARPS * BSTRIDE; pb += DEPTH * WARPS * BSTRIDE; ps += DEPTH * WARPS * 8; px0 += DEPTH * WARPS * 8;
#if DQ
            pq += DEPTH * WARPS * 8;
#endif
#if TWO
            px1 += DEPTH * WARPS * 8;
#endif
        }
#endif
        reduce_tile(red, acc, out, tid, tile, split, M, N, m0, here);
    }
#endif
}
"""

_MMA_TYPE = {torch.bfloat16: "bf16", torch.float16: "f16"}
_lock = threading.Lock()
_kernels: dict = {}
_failure: dict = {}


@dataclass(frozen=True)
class Config:
    """Compile-time and launch choices; none changes a row's arithmetic, only speed (measured by
    `benchmarks/step_bench.py` with `EVENTSPEC_NF4_CUDA`, e.g. `depth=4,xring=1,minb=2,programs=1024`)."""

    depth: int = 3          # NF4 blocks of weights in flight per warp
    depth1: int = 0         # the same for the kernel of 1–8 rows (no second MMA: registers to spare); 0 = `depth`.
                            # Only the loads' timing changes, so both kernels still give a row the same bits
    xring: int = 0          # 1: x rows 0..7 ride in the ring too (more registers, no x latency per block)
    minb: int = 4           # programs per SM the compiler budgets registers for (4: 64 registers; the 9–16
                            # row kernel then runs 10 % faster, measured: verify8 3.69 instead of 4.07 ms)
    minb1: int = 0          # the same for the kernel of 1–8 rows; 0 = `minb`. 5 (48 registers: 5 programs of 41 KB shared
                            # memory per SM) compiles without spills there, where the 9–16-row kernel spills
                            # (`benchmarks/nvrtc_check.py`); no faster a step on an H200 (eleventh session): off.
                            # Only occupancy changes, not a row's arithmetic
    programs: int = TARGET_PROGRAMS     # programs a weight aims at (sets the split of K)
    tiles: int = 1          # tiles of 16 weight rows per program: the 32 KB table is filled once for them all
    layout: int = 1         # 1: the weight bytes tile-major (`tile_packed`): a warp's load is 256 contiguous
                            # bytes, whole lines (14–19 % faster a launch than 0, bitsandbytes' rows, on an H200)
    argtable: int = 1       # 1: the lookup table built from the 16 codes as kernel arguments (no global load
                            # ahead of the first weight loads; an EventGPT nf4 step −3 to −7 % on an H200);
                            # 0: copied from the `pairs` tensor
    wcache: int = 1         # weight and scale loads: 1 L1::no_allocate, so L1 keeps x (an EventGPT nf4 step 2.28–2.40
                            # → 2.21–2.23 ms on an H200, ninth session), 2 evict-first (.cs), 0 plain loads
    persist: int = 0        # 1: persistent programs (as many as are resident, each taking every G-th (tile, split)
                            # item) whose rings run on across items; where K / 64 and the split are multiples of 8
    early: int = 0          # 1: the wait for the kernel ahead (PDL) depends on the first ring's loads, so they are
                            # issued before it; 0: ptxas schedules the wait ahead of them (read in the SASS)
    dq: int = 0             # 1: a weight whose bitsandbytes scales are double-quantized keeps them so (uint8 a block,
                            # float32 per 256 blocks) and the kernel computes each absmax as bitsandbytes does: the
                            # same bits, 0.28 GiB less GPU memory for a 7B model, and on an H200 ~2 % slower a
                            # decode step (2.25-2.26 against 2.21-2.26 ms) and 5 % a verification of 8 (tenth
                            # session); 0: float32 absmax expanded once. Per worker: ExactStepModel(nf4_scales=)
    trigger: int = 0        # PDL: 1 lets the next kernel be scheduled from this one's entry (it may then be resident
                            # while this one runs), 0 only after this one's wait for the kernel ahead; 1 with the
                            # Triton kernels' early trigger made a step 4 % slower on an H200 (tenth session)
    prefetch: int = 0       # 1: each program first prefetches its tile's weight bytes and scales into L2 (a
                            # prefetch a line), 2: as 4 KB bulk prefetches (compute capability 9+); tile-major only
    probe: int = 0          # measurement only (kernel_probe.py), the sums are wrong: 1 = the weight, scale and
                            # x loads alone, 2 = loads and table lookups, no MMA, 3 = 1 without the table
                            # fill, 4 = the weight loads in whole 128-byte lines (the dense kernels' shape),
                            # 5 = the weight and scale loads (no x), 6 = the weight loads alone, 7 = 6 without
                            # the table fill; which part limits the kernel

    def shared_bytes(self) -> int:
        return SHARED_BYTES


def parse_changes(text: str, *, allow_probe: bool = False) -> dict:
    """The `Config` fields named in 'key=int,key=int' (EVENTSPEC_NF4_CUDA's form); probes only where asked for."""
    fields = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, _, value = item.partition("=")
        if key not in Config.__dataclass_fields__ or not value.isdigit():
            raise ValueError(f"EVENTSPEC_NF4_CUDA: expected key=int with keys {sorted(Config.__dataclass_fields__)};"
                             f" got {item!r}")
        fields[key] = int(value)
    if fields.get("probe") and not allow_probe:
        raise ValueError("EVENTSPEC_NF4_CUDA: probe is for benchmarks/kernel_probe.py only (its sums are wrong)")
    return fields


def parse_config(text: str, *, allow_probe: bool = False) -> Config:
    """A `Config` from 'key=int,key=int', the other fields at their defaults."""
    return Config(**parse_changes(text, allow_probe=allow_probe))


def _config_from_env() -> Config:
    return parse_config(os.environ.get("EVENTSPEC_NF4_CUDA", ""))


CONFIG = _config_from_env()


def source(dtype: torch.dtype, config: Config = CONFIG, two: bool = True, pdl: bool = False,
           dq: bool = False) -> tuple[str, str]:
    """(CUDA C source, kernel name) for 16-bit x of `dtype` under `config`; `two`: programs of 9–16 rows
    (else at most 8: no second MMA, no loads of x rows 8–15; a row's arithmetic is the same in both); `pdl`:
    the kernel is launched with programmatic dependent launch and waits for its inputs after its first
    weight loads (`launch`); `dq`: the scales are double-quantized bytes (`tile_scale_bytes`)."""
    kind = _MMA_TYPE[dtype]
    depth = config.depth1 if config.depth1 and not two else config.depth
    minb = config.minb1 if config.minb1 and not two else config.minb
    name = (f"eventspec_nf4_partials_{kind}_d{depth}x{config.xring}m{minb}r{1 + two}"
            + (f"p{config.probe}" if config.probe else "") + ("t" if config.layout else "")
            + (f"f{config.prefetch}" if config.prefetch else "") + ("e" if config.early else "") + (f"c{config.wcache}" if config.wcache else "") + ("s" if config.persist else "") + ("a" if config.argtable else "")
            + ("g" if config.trigger else "") + ("q" if dq else "") + ("w" if pdl else ""))
    text = (SOURCE.replace("DEPTH_VALUE", str(depth)).replace("XRING_VALUE", str(config.xring))
            .replace("PROBE_VALUE", str(config.probe)).replace("PREFETCH_VALUE", str(config.prefetch))
            .replace("PDL_VALUE", str(int(pdl))).replace("WCACHE_VALUE", str(config.wcache)).replace("PERSIST_VALUE", str(int(bool(config.persist)))).replace("EARLY_VALUE", str(int(bool(config.early))))
            .replace("TRIGGER_VALUE", str(int(bool(config.trigger)))).replace("DQ_VALUE", str(int(dq)))
            .replace("ARGTABLE_VALUE", str(int(bool(config.argtable))))
            .replace("TWO_VALUE", str(int(two))).replace("TILED_VALUE", str(int(bool(config.layout))))
            .replace("MINB_VALUE", str(minb)).replace(".DT.DT.", f".{kind}.{kind}."))
    return text.replace("NAME", name), name


def _compile(device: torch.device, dtype: torch.dtype, config: Config = CONFIG, two: bool = True,
             pdl: bool = False, dq: bool = False):
    key = (device.index, dtype, config, two, pdl) + ((True,) if dq else ())
    with _lock:
        if key in _kernels:
            return _kernels[key]
        if key in _failure:
            return None
        try:
            text, name = source(dtype, config, two, pdl, dq)
            with torch.cuda.device(device):
                kernel = torch.cuda._compile_kernel(text, name)
                if config.shared_bytes() >= 48 * 1024:
                    kernel.set_shared_memory_config(config.shared_bytes())
        except Exception as exc:  # noqa: BLE001 - no NVRTC, an old torch or an unsupported GPU: Triton path
            _failure[key] = f"{type(exc).__name__}: {exc}"
            return None
        _kernels[key] = kernel
        return kernel


def _pdl(device: torch.device) -> bool:
    """Whether this kernel launches with programmatic dependent launch on `device`: where the step's kernels do
    (`pdl_on`) and the driver has `cuLaunchKernelEx`; else it launches plainly, compiled without the wait."""
    return pdl_on(device) and cuda_launch.available()


def unavailable_reason(device) -> str | None:
    """Why the CUDA kernel cannot run on `device` (None when it can); compiles it for both 16-bit types."""
    device = torch.device(device)
    if device.type != "cuda" or not hasattr(torch.cuda, "_compile_kernel"):
        return "not a CUDA device" if device.type != "cuda" else "this torch has no torch.cuda._compile_kernel"
    major, _ = torch.cuda.get_device_capability(device)
    if major < 8:
        return "bf16 MMAs need compute capability 8.0 or newer"
    pdl = _pdl(device)
    for dtype in _MMA_TYPE:
        for two in (False, True):
            if _compile(device, dtype, CONFIG, two, pdl) is None:
                return _failure[(device.index, dtype, CONFIG, two, pdl)]
    return None


def splits_for(n: int, k: int, programs: int | None = None) -> tuple[int, int]:
    """(split count, NF4 blocks per split) for a weight [n, k]: a function of the shape only."""
    tiles = -(-n // 16)
    blocks = k // 64
    splits = max(1, min(blocks // MIN_SPLIT_BLOCKS, round((programs or CONFIG.programs) / tiles)))
    per_split = -(-blocks // splits)
    return -(-blocks // per_split), per_split


def persistent_programs(items: int, slots: int) -> int:
    """`Config.persist`'s program count for `items` (tile, split) items when `slots` programs are resident at once
    (programs per SM × SMs): the fewest programs that still take the fewest rounds of items (a function of the
    shape and the GPU only)."""
    rounds = -(-items // slots)
    return -(-items // rounds)


def tile_absmax(absmax: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """bitsandbytes-order float32 absmax [n·k/64] → the kernel's [ceil(n/16), k/64, 8, 2]: for each tile of
    16 weight rows and each block, the pairs (row g, row g + 8), so a warp reads a block's 16 scales as one
    64-byte run (the rows' own layout puts them 16 lines apart: most of the kernel's L1 traffic)."""
    tiles, blocks = -(-n // 16), k // 64
    padded = torch.zeros((tiles * 16, blocks), dtype=torch.float32, device=absmax.device)
    padded[:n] = absmax.reshape(n, blocks).float()
    return padded.reshape(tiles, 2, 8, blocks).permute(0, 3, 2, 1).contiguous()


@dataclass
class DoubleQuant:
    """The rest of a weight's double-quantized scales, beside its `tile_scale_bytes` (`Config.dq`): absmax =
    code2[q] · absmax2[(row · K / 64 + block) // 256] + the offset of the row's tile (stacked modules each keep
    their own offset; a tile never straddles two)."""

    absmax2: torch.Tensor       # float32 [n2]
    code2: torch.Tensor         # float32 [256]
    tile_offset: torch.Tensor   # float32 [tiles]

    def expand_tiles(self, q_tiles: torch.Tensor, k: int, t0: int = 0, t1: int | None = None) -> torch.Tensor:
        """The float32 scales of tiles t0..t1 in `tile_absmax`'s layout, from their bytes: the same values
        (the product rounded, then the offset added) the kernel computes."""
        t1 = q_tiles.shape[0] if t1 is None else t1
        kb = k // 64
        dev = q_tiles.device
        tile = torch.arange(t0, t1, device=dev)[:, None, None, None]
        block = torch.arange(kb, device=dev)[None, :, None, None]
        g = torch.arange(8, device=dev)[None, None, :, None]
        h = torch.arange(2, device=dev)[None, None, None, :]
        group = ((tile * 16 + h * 8 + g) * kb + block) // 256
        group = group.clamp_max(self.absmax2.numel() - 1)
        products = self.code2[q_tiles[t0:t1].long()] * self.absmax2[group]
        return products + self.tile_offset[t0:t1, None, None, None]


def double_quant(parts, k: int) -> tuple[torch.Tensor, DoubleQuant] | None:
    """A stack of modules' double-quantized scales (`nf4.Nested` each, in stacking order) as (bytes in
    bitsandbytes' order [N·K/64], DoubleQuant with per-tile offsets), or None where the kernel cannot read them
    (a module not double-quantized, groups other than 256 blocks, rows not a multiple of 16, a module's
    blocks not whole groups, K / 64 > 256, or different second-level codes)."""
    kb = k // 64
    if not parts or any(p is None for p in parts) or kb > 256:
        return None
    if any(p.group != 256 or p.q.numel() % kb or (p.q.numel() // kb) % 16 or p.q.numel() % 256 for p in parts):
        return None
    if any(not torch.equal(p.code2, parts[0].code2) or p.code2.numel() != 256 for p in parts):
        return None
    offsets = torch.cat([torch.full((p.q.numel() // kb // 16,), p.offset, dtype=torch.float32, device=p.q.device)
                         for p in parts])
    q = torch.cat([p.q for p in parts]).contiguous()
    absmax2 = torch.cat([p.absmax2 for p in parts]).float().contiguous()
    return q, DoubleQuant(absmax2, parts[0].code2.float().contiguous(), offsets.contiguous())


def tile_scale_bytes(q: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Double-quantized scale bytes in bitsandbytes' order [n·k/64] → `tile_absmax`'s layout as uint8
    [ceil(n/16), k/64, 8, 2]: a lane reads its rows g and g + 8 of a block as one 16-bit word."""
    tiles, blocks = -(-n // 16), k // 64
    padded = torch.zeros((tiles * 16, blocks), dtype=torch.uint8, device=q.device)
    padded[:n] = q.reshape(n, blocks)
    return padded.reshape(tiles, 2, 8, blocks).permute(0, 3, 2, 1).contiguous()


def tile_packed(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """bitsandbytes' row-major packed bytes [n·k/2] → tile-major [ceil(n/16), k/64, 16, 32] (`Config.layout`):
    each block's 16 rows of a tile are 512 contiguous bytes (rows past n are zeros; their sums are never
    stored), so a warp's load of 8 rows is 256 contiguous bytes instead of 8 pieces 32 bytes long."""
    tiles, blocks = -(-n // 16), k // 64
    padded = torch.zeros((tiles * 16, blocks, 32), dtype=torch.uint8, device=packed.device)
    padded[:n] = packed.reshape(n, blocks, 32)
    return padded.reshape(tiles, 16, blocks, 32).permute(0, 2, 1, 3).contiguous()


def pair_table(code: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """256 int32: byte b → the 16-bit code[b >> 4] (low half) and code[b & 15] (high half) in `dtype`."""
    b = torch.arange(256, device=code.device)
    bits = code.to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF
    table = (bits[b >> 4] | (bits[b & 15] << 16)).to(torch.int32).contiguous()
    table.code_words = code_words(code, dtype)         # read once here (a host copy), never while a graph records
    return table


def code_words(code: torch.Tensor, dtype: torch.dtype) -> tuple[int, ...]:
    """The 16 codes in `dtype` as 8 kernel arguments (`Config.argtable`): word j = code 2j | code 2j + 1 << 16,
    as signed 32-bit ints (how the launch passes an int)."""
    bits = [int(v) & 0xFFFF for v in code.to(dtype).view(torch.int16).cpu().tolist()]
    words = [bits[2 * j] | bits[2 * j + 1] << 16 for j in range(8)]
    return tuple(w - (1 << 32) if w >= 1 << 31 else w for w in words)


def partials(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, pairs: torch.Tensor, n: int, k: int,
             out: torch.Tensor, per_split: int | None = None, config: Config = CONFIG,
             dq: DoubleQuant | None = None) -> torch.Tensor:
    """Float32 split partials out [S, M, n] of x [M, k] @ W.T; `absmax` from `tile_absmax` (float32), or with
    `dq` the bytes from `tile_scale_bytes` (uint8), `pairs` from `pair_table` in x's dtype.
    `per_split` (NF4 blocks per split) and `config` override the step's choice for
    benchmarks/kernel_probe.py's sweep."""
    m = x.shape[0]
    splits, default = splits_for(n, k)
    if per_split is None:
        per_split = default
    splits = -(-(k // 64) // per_split)
    if out.shape != (splits, m, n) or out.dtype != torch.float32:
        raise ValueError(f"expected float32 partials of shape {(splits, m, n)}; got {tuple(out.shape)} {out.dtype}")
    if absmax.shape != (-(-n // 16), k // 64, 8, 2):
        raise ValueError(f"absmax must come from tile_absmax: shape {(-(-n // 16), k // 64, 8, 2)}; got {tuple(absmax.shape)}")
    if (absmax.dtype == torch.uint8) != (dq is not None):
        raise ValueError(f"uint8 scales (tile_scale_bytes) go with their DoubleQuant, float32 ones without; got "
                         f"{absmax.dtype} and dq={'given' if dq is not None else 'None'}")
    if dq is not None and (config.persist or config.probe == 4 or config.xring or not config.layout):
        raise ValueError("double-quantized scales are read by the default path only (no persist, xring, probe 4; layout 1)")
    want = (-(-n // 16), k // 64, 16, 32)
    if config.layout and tuple(packed.shape) != want:
        raise ValueError(f"Config.layout=1 reads tile_packed weights of shape {want}; got {tuple(packed.shape)}")
    if x.data_ptr() % 16 or packed.data_ptr() % 8:
        raise ValueError("x must be 16-byte aligned and the packed weight 8-byte aligned")
    two = m > 8
    tiles = -(-n // 16)
    grid = (-(-tiles // max(1, config.tiles)), splits, -(-m // ROWS_PER_PROGRAM))
    if config.persist:
        if config.layout and config.probe == 0 and (k // 64) % 8 == 0 and per_split % 8 == 0:
            sms = torch.cuda.get_device_properties(x.device).multi_processor_count
            grid = (persistent_programs(tiles * splits, config.minb * sms), 1, grid[2])
        else:
            config = replace(config, persist=0)
    pdl = _pdl(x.device)
    kernel = _compile(x.device, x.dtype, config, two, pdl, dq is not None)
    if kernel is None:
        raise RuntimeError("the NF4 CUDA kernel is not available: "
                           f"{_failure.get((x.device.index, x.dtype, config, two, pdl) + ((True,) if dq else ()))}")
    words = getattr(pairs, "code_words", None)
    if words is None:
        raise ValueError("pairs must come from pair_table (it carries the codes as kernel arguments)")
    extra = [dq.absmax2, dq.code2, dq.tile_offset, dq.absmax2.numel()] if dq is not None else [x, x, x, 1]
    cuda_launch.launch(kernel, grid, (32 * WARPS, 1, 1), [x, packed, absmax, pairs, out, m, n, k, per_split, *words, *extra],
           config.shared_bytes(), pdl=pdl)
    return out
