"""The NF4 tensor-core kernel (workers/engine/kernels/nf4_cuda.py) on a CUDA GPU: its split partials
against a float64 reference of the same quantized weights, a row's bits independent of the rows beside it
(1 … 33), and the pair table it looks bytes up in. Skipped without CUDA (the kernel is CUDA C)."""
from __future__ import annotations

import pytest
import torch

from workers.engine import nf4
from workers.engine.kernels import nf4_cuda

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the NF4 tensor-core kernel is CUDA C")


def test_pair_table_puts_the_even_column_in_the_low_half():
    code = nf4.code_tensor("cpu")
    table = nf4_cuda.pair_table(code, torch.bfloat16)
    byte = 0x3C                                    # high nibble 3 (even column), low nibble 12 (odd column)
    word = int(table[byte]) & 0xFFFFFFFF
    low = torch.tensor([word & 0xFFFF], dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    high = torch.tensor([word >> 16], dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    assert low.item() == code[3].to(torch.bfloat16).item() and high.item() == code[12].to(torch.bfloat16).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_codes_as_kernel_arguments_rebuild_the_pair_table(dtype):
    """`Config.argtable`: thread tid of a program writes the table's 16-byte words tid + 256 j (j = 0..7), each
    four copies of entry (tid / 8 + 32 j), from the 8 code words alone; the same index arithmetic as
    `fill_table_args`, checked here against `pair_table`'s 256 entries (the GPU test checks the sums)."""
    table = nf4_cuda.pair_table(nf4.code_tensor("cpu"), dtype)
    c = [w & 0xFFFFFFFF for w in table.code_words]
    assert len(c) == 8 and all(-(1 << 31) <= w < (1 << 31) for w in table.code_words)
    built = [None] * 2048
    for tid in range(256):
        base = tid >> 3
        low_nibble, parity = base & 15, base >> 4
        word = c[low_nibble >> 1]
        low_code = word >> 16 if low_nibble & 1 else word & 0xFFFF
        for j in range(8):
            high_code = c[j] >> 16 if parity else c[j] & 0xFFFF
            built[tid + 256 * j] = high_code | low_code << 16
    assert built == [int(table[i >> 3]) & 0xFFFFFFFF for i in range(2048)]


def test_splits_depend_on_the_shape_only_and_cover_k():
    for n, k in [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (40, 320)]:
        splits, per = nf4_cuda.splits_for(n, k)
        assert splits * per >= k // 64 > (splits - 1) * per
        assert splits == 1 or per >= nf4_cuda.MIN_SPLIT_BLOCKS


def test_tiled_absmax_pairs_rows_g_and_g_plus_8_of_each_block():
    n, k = 40, 192                                   # 3 tiles (the last padded with zeros), 3 blocks
    absmax = torch.arange(n * k // 64, dtype=torch.float32) + 1
    tiles = nf4_cuda.tile_absmax(absmax, n, k)
    assert tiles.shape == (3, 3, 8, 2)
    rows = absmax.reshape(n, 3)
    for t, b, g in [(0, 0, 0), (1, 2, 5), (2, 1, 7)]:
        assert tiles[t, b, g, 0] == rows[16 * t + g, b]
        expected = rows[16 * t + g + 8, b] if 16 * t + g + 8 < n else 0
        assert tiles[t, b, g, 1] == expected
    assert tiles[2, :, :, 1].eq(0).all()              # rows 40..47 do not exist


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(256, 4096), (4096, 11008), (40, 320), (24, 1024)])
def test_partials_are_right_and_row_invariant(dtype, shape):
    reason = nf4_cuda.unavailable_reason("cuda")
    if reason:
        pytest.skip(f"NF4 CUDA kernel unavailable: {reason}")
    n, k = shape
    gen = torch.Generator().manual_seed(n + k)
    packed, absmax = nf4.quantize(torch.randn(n, k, generator=gen))
    packed, absmax = packed.cuda(), absmax.cuda()
    tiles = nf4_cuda.tile_absmax(absmax, n, k)
    code = nf4.code_tensor("cuda")
    pairs = nf4_cuda.pair_table(code, dtype)
    splits, _ = nf4_cuda.splits_for(n, k)
    x = torch.randn(33, k, generator=gen).to("cuda", dtype)

    weight = nf4_cuda.tile_packed(packed, n, k) if nf4_cuda.CONFIG.layout else packed

    def run(rows):
        out = torch.full((splits, rows, n), float("nan"), device="cuda")
        return nf4_cuda.partials(x[:rows].contiguous(), weight, tiles, pairs, n, k, out)

    full = run(33)
    assert not full.isnan().any()
    for rows in (1, 2, 3, 8, 9, 16, 17):
        assert torch.equal(run(rows), full[:, :rows]), f"{rows} rows differ from the same rows among 33"
    q = torch.stack([packed.cpu() >> 4, packed.cpu() & 15], dim=1).reshape(-1).long()
    w = (code.cpu().to(dtype).double()[q].reshape(-1, 64) * absmax.cpu().double()[:, None]).reshape(n, k)
    ref = x.cpu().double() @ w.T
    got = full.sum(0).cpu().double()
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


@cuda
@pytest.mark.parametrize("shape", [(256, 4096), (4096, 11008), (40, 320)])
def test_ring_depth_x_ring_and_tiles_per_program_give_the_same_bits(shape):
    """`Config.depth` and `xring` change only how far ahead each warp loads, `Config.tiles` only which
    program computes a tile, `layout` (tile-major weight bytes) only where a lane finds its bytes and
    `prefetch` only what L2 holds when the loads come, `wcache` only whether L1 keeps the weights: their
    partials must equal bitsandbytes' row-major layout's, bit for bit, for 1, 9 and 17 rows, a partial tile
    and a short split."""
    from dataclasses import replace
    if nf4_cuda.unavailable_reason("cuda"):
        pytest.skip("NF4 CUDA kernel unavailable")
    n, k = shape
    gen = torch.Generator().manual_seed(n * 3 + k)
    packed, absmax = nf4.quantize(torch.randn(n, k, generator=gen))
    packed, tiles = packed.cuda(), nf4_cuda.tile_absmax(absmax.cuda(), n, k)
    pairs = nf4_cuda.pair_table(nf4.code_tensor("cuda"), torch.bfloat16)
    splits, per = nf4_cuda.splits_for(n, k)
    for rows in (1, 9, 17):
        x = torch.randn(rows, k, generator=gen).to("cuda", torch.bfloat16)
        ring = torch.full((splits, rows, n), float("nan"), device="cuda")
        nf4_cuda.partials(x, packed, tiles, pairs, n, k, ring, per,
                          replace(nf4_cuda.CONFIG, depth=3, xring=0, tiles=1, layout=0, argtable=0, early=0, wcache=0))
        assert not ring.isnan().any()
        for change in (dict(tiles=3, layout=0), dict(depth=2, layout=0), dict(depth=6, minb=3, layout=0),
                       dict(xring=1, minb=3, layout=0), dict(layout=1), dict(layout=1, depth=2),
                       dict(layout=1, depth=4, minb=3), dict(layout=1, tiles=3), dict(layout=1, prefetch=1),
                       dict(layout=1, prefetch=2), dict(layout=1, prefetch=1, tiles=3), dict(layout=1, early=1),
                       dict(layout=1, early=1, tiles=3), dict(layout=1, argtable=1),
                       dict(layout=1, argtable=1, early=1), dict(layout=1, argtable=1, tiles=3),
                       dict(layout=1, argtable=0), dict(layout=1, wcache=0), dict(layout=1, wcache=2),
                       dict(layout=1, depth1=5), dict(layout=1, minb1=5), dict(layout=1, persist=1), dict(layout=1, persist=1, wcache=2)):
            other = torch.full((splits, rows, n), float("nan"), device="cuda")
            weight = nf4_cuda.tile_packed(packed, n, k) if change.get("layout") else packed
            nf4_cuda.partials(x, weight, tiles, pairs, n, k, other, per, replace(nf4_cuda.CONFIG, **change))
            assert torch.equal(ring, other), f"{rows} rows, {change}"


def test_tile_packed_puts_a_blocks_16_rows_in_512_contiguous_bytes():
    n, k = 20, 128
    packed = torch.arange(n * k // 2, dtype=torch.int64).remainder(251).to(torch.uint8)
    tiled = nf4_cuda.tile_packed(packed, n, k)
    assert tiled.shape == (2, 2, 16, 32)
    rows = packed.reshape(n, k // 2)
    assert torch.equal(tiled[1, 1, 3], rows[16 + 3, 32:64])        # tile 1, block 1, row 3 of the tile
    assert torch.equal(tiled[0, 0].reshape(-1)[32 * 5: 32 * 6], rows[5, :32])
    assert not tiled[1, :, 4:].any()                               # rows past n are zeros


@cuda
def test_dequantize_tiled_rounds_as_bitsandbytes_dequantization():
    """The prefill's weights from tile-major bytes are bitsandbytes' own dequantized weights, bit for bit,
    for any rows of a stacked weight (row ranges that do not start or end on a tile)."""
    bnb = pytest.importorskip("bitsandbytes")
    from workers.engine.kernels.nf4_dequant import dequantize_tiled
    n, k = 72, 512
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    q, state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    want = bnb.functional.dequantize_4bit(q, state)
    packed = q.reshape(-1)
    tiled = nf4_cuda.tile_packed(packed, n, k)
    absmax = nf4_cuda.tile_absmax(state.absmax.float(), n, k)
    got = dequantize_tiled(tiled, absmax, state.code, 0, n, k, torch.bfloat16)
    assert torch.equal(got, want)
    assert torch.equal(dequantize_tiled(tiled, absmax, state.code, 21, 30, k, torch.bfloat16), want[21:51])


@pytest.mark.parametrize("shape", [(40, 320), (72, 512)])
def test_dequantize_tiled_gives_the_row_major_dequantization(shape):
    """The tile-major bytes dequantize to the rows `nf4.dequantize` gives from bitsandbytes' own layout (code ·
    absmax in float32, rounded to bf16), for the whole weight and for rows not aligned to tiles."""
    from workers.engine.kernels import usable_on
    from workers.engine.kernels.nf4_dequant import dequantize_tiled
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not usable_on(device):
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
    n, k = shape
    packed, absmax = nf4.quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(n)))
    want = nf4.dequantize(packed, absmax, n, k, torch.bfloat16).to(device)
    tiled = nf4_cuda.tile_packed(packed.to(device), n, k)
    scales = nf4_cuda.tile_absmax(absmax.to(device), n, k)
    code = nf4.code_tensor(device)
    assert torch.equal(dequantize_tiled(tiled, scales, code, 0, n, k, torch.bfloat16), want)
    assert torch.equal(dequantize_tiled(tiled, scales, code, 5, 30, k, torch.bfloat16), want[5:35])
    with pytest.raises(ValueError, match="outside"):
        dequantize_tiled(tiled, scales, code, n - 3, 20, k, torch.bfloat16)


def test_wcache_and_depth1_change_only_the_loads_of_the_kernel_they_name():
    """`wcache` picks the weight and scale loads' cache hint and nothing else; `depth1` sets the ring of the
    1–8-row kernel only (the 9–16-row kernel keeps `depth`)."""
    from dataclasses import replace
    base = replace(nf4_cuda.CONFIG, wcache=0, depth=3, depth1=0)
    plain, _ = nf4_cuda.source(torch.bfloat16, base, two=False)
    hinted, _ = nf4_cuda.source(torch.bfloat16, replace(base, wcache=1), two=False)
    assert "#define WCACHE 0 " in plain and "#define WCACHE 1 " in hinted
    assert plain.replace("WCACHE 0", "WCACHE 1").replace("m4r1ta", "m4r1tc1a") == hinted
    one, one_name = nf4_cuda.source(torch.bfloat16, replace(base, depth1=5), two=False)
    two, two_name = nf4_cuda.source(torch.bfloat16, replace(base, depth1=5), two=True)
    assert "#define DEPTH 5\n" in one and "_d5x" in one_name
    assert "#define DEPTH 3\n" in two and "_d3x" in two_name
    assert nf4_cuda.parse_config("wcache=2,depth1=4") == replace(nf4_cuda.Config(), wcache=2, depth1=4)


def test_persistent_programs_take_the_fewest_rounds_with_the_fewest_programs():
    assert nf4_cuda.persistent_programs(768, 528) == 384          # two rounds: 384 programs, not 528
    assert nf4_cuda.persistent_programs(1536, 528) == 512
    assert nf4_cuda.persistent_programs(100, 528) == 100
    for items in (1, 527, 528, 529, 1376, 5504):
        programs = nf4_cuda.persistent_programs(items, 528)
        rounds = -(-items // programs)
        assert programs <= 528 and rounds == -(-items // 528)


@cuda
@pytest.mark.parametrize("per", [8, 24, 64])
def test_persistent_programs_give_the_same_bits_for_any_split(per):
    """Persistent programs whose rings run on across items compute each (tile, split) item as the other path
    does, for splits of 8 blocks, a last split shorter than the others (24, 24, 16) and one split."""
    from dataclasses import replace
    if nf4_cuda.unavailable_reason("cuda"):
        pytest.skip("NF4 CUDA kernel unavailable")
    n, k = 208, 4096
    gen = torch.Generator().manual_seed(per)
    packed, absmax = nf4.quantize(torch.randn(n, k, generator=gen))
    tiled, scales = nf4_cuda.tile_packed(packed.cuda(), n, k), nf4_cuda.tile_absmax(absmax.cuda(), n, k)
    pairs = nf4_cuda.pair_table(nf4.code_tensor("cuda"), torch.bfloat16)
    splits = -(-(k // 64) // per)
    for rows in (1, 9, 17):
        x = torch.randn(rows, k, generator=gen).to("cuda", torch.bfloat16)
        want = torch.full((splits, rows, n), float("nan"), device="cuda")
        got = torch.full((splits, rows, n), float("nan"), device="cuda")
        nf4_cuda.partials(x, tiled, scales, pairs, n, k, want, per, replace(nf4_cuda.CONFIG, persist=0))
        nf4_cuda.partials(x, tiled, scales, pairs, n, k, got, per, replace(nf4_cuda.CONFIG, persist=1))
        assert not want.isnan().any()
        assert torch.equal(want, got), f"{rows} rows, {per} blocks a split"


def _nested(rows: int, k: int, gen: torch.Generator, offset: float) -> nf4.Nested:
    """A made-up double quantization of a [rows, k] weight's absmax (random bytes and second-level scales)."""
    blocks = rows * k // 64
    return nf4.Nested(q=torch.randint(0, 256, (blocks,), dtype=torch.uint8, generator=gen),
                      absmax2=torch.rand(-(-blocks // 256), generator=gen) + 0.5,
                      code2=torch.sort(torch.rand(256, generator=gen)).values, offset=offset, group=256)


def test_double_quantized_scale_bytes_expand_to_the_float32_scales_of_each_tile():
    """`Config.dq`: a stack of two modules (their own offsets; K / 64 = 172, so a row's blocks cross a group of
    256) keeps its scale bytes tile by tile, and expanding a tile's bytes as the kernel does (`expand_tiles`)
    gives `tile_absmax` of bitsandbytes' float32 absmax, bit for bit, also for a slice of tiles."""
    k = 11008
    gen = torch.Generator().manual_seed(5)
    parts = [_nested(64, k, gen, 0.25), _nested(128, k, gen, -0.125)]
    parts[1].code2 = parts[0].code2.clone()
    q, dq = nf4_cuda.double_quant(parts, k)
    n = 192
    want = nf4_cuda.tile_absmax(torch.cat([p.expand() for p in parts]), n, k)
    q_tiles = nf4_cuda.tile_scale_bytes(q, n, k)
    assert q_tiles.dtype == torch.uint8 and q_tiles.shape == want.shape == (12, 172, 8, 2)
    assert dq.tile_offset.tolist() == [0.25] * 4 + [-0.125] * 8
    assert torch.equal(dq.expand_tiles(q_tiles, k), want)
    assert torch.equal(dq.expand_tiles(q_tiles, k, 3, 7), want[3:7])
    # where the kernel cannot read them, the weight keeps float32 scales
    assert nf4_cuda.double_quant([parts[0], None], k) is None
    assert nf4_cuda.double_quant([parts[0], _nested(64, k, gen, 0.0)], k) is None      # another second-level code
    assert nf4_cuda.double_quant([_nested(32, k, gen, 0.0)], k) is None                 # blocks not whole groups
    assert nf4_cuda.double_quant([_nested(64, 16448, gen, 0.0)], 16448) is None         # K / 64 > 256


@cuda
@pytest.mark.parametrize("shape", [(256, 4096), (4096, 11008)])
def test_double_quantized_scales_give_the_kernel_the_float32_scales_bits(shape):
    """The kernel reading the scale bytes (`dq`) and computing each absmax gives the partials of the float32
    scales, bit for bit, for 1, 9 and 17 rows: two stacked modules with their own offsets."""
    if nf4_cuda.unavailable_reason("cuda"):
        pytest.skip("NF4 CUDA kernel unavailable")
    n, k = shape
    gen = torch.Generator().manual_seed(n + k)
    packed, _ = nf4.quantize(torch.randn(n, k, generator=gen))
    parts = [_nested(n // 2, k, gen, 0.5), _nested(n // 2, k, gen, 0.0625)]
    parts[1].code2 = parts[0].code2.clone()
    q, dq = nf4_cuda.double_quant(parts, k)
    dq = nf4_cuda.DoubleQuant(dq.absmax2.cuda(), dq.code2.cuda(), dq.tile_offset.cuda())
    scales = nf4_cuda.tile_absmax(torch.cat([p.expand() for p in parts]).cuda(), n, k)
    q_tiles = nf4_cuda.tile_scale_bytes(q.cuda(), n, k)
    weight = nf4_cuda.tile_packed(packed.cuda(), n, k)
    pairs = nf4_cuda.pair_table(nf4.code_tensor("cuda"), torch.bfloat16)
    splits, per = nf4_cuda.splits_for(n, k)
    for rows in (1, 9, 17):
        x = torch.randn(rows, k, generator=gen).to("cuda", torch.bfloat16)
        want = torch.full((splits, rows, n), float("nan"), device="cuda")
        got = torch.full((splits, rows, n), float("nan"), device="cuda")
        nf4_cuda.partials(x, weight, scales, pairs, n, k, want, per)
        nf4_cuda.partials(x, weight, q_tiles, pairs, n, k, got, per, dq=dq)
        assert not want.isnan().any() and torch.equal(want, got), f"{rows} rows"
