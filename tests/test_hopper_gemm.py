"""hopper_gemm.py: the warp-specialized persistent GEMM against `reference()`.

On a CPU the kernel runs in Mosaic GPU's interpreter (`plgpu.force_gpu_interpret_mode` on an
abstract H200 with a few SMs, so each CTA of the persistent grid loops over several tiles); on
a Hopper GPU natively; on another GPU the numeric tests skip (wgmma is sm_90 only). The
interpreter does not check what only the CUDA lowering checks (wgmma operand layouts, TMA
shapes, SMEM size), so the tile configurations below are also lowered for CUDA, which needs
no GPU. Both layouts of w: (K, N), and (N, K) read transposed."""
import contextlib

import jax
import jax.numpy as jnp
import jax.experimental.pallas.mosaic_gpu as plgpu
import numpy as np
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

from kernels.hopper_gemm import (LOWRANK_TILES, SWIGLU_TILES, TAIL_TILES, Tiles, _split,
                                 gemm_lowrank, gemm_swiglu, lora_matmul, lora_reference, matmul,
                                 reference, swiglu_reference)
from kernels.lora_matmul import on_hopper

ON_GPU = jax.default_backend() == "gpu"
ON_HOPPER = on_hopper()
CAN_INTERPRET = hasattr(plgpu, "force_gpu_interpret_mode") and hasattr(plgpu,
                                                                        "InterpretGPUParams")


def _fake_h200(num_cores):
    dev = AbstractDevice(device_kind="NVIDIA H200", platform="gpu", num_cores=num_cores)
    return use_abstract_mesh(AbstractMesh((), (), abstract_device=dev))


@contextlib.contextmanager
def _mgpu_mode():
    """Native on a Hopper GPU; the interpreter on a fake 3-SM H200 on a CPU; else skip."""
    if ON_HOPPER:
        yield
    elif ON_GPU:
        pytest.skip(f"wgmma needs a Hopper GPU (sm_90), this is {jax.devices()[0].device_kind}")
    elif not CAN_INTERPRET:
        pytest.skip(f"jax {jax.__version__} has no Mosaic GPU interpreter")
    else:
        with _fake_h200(3), plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams()):
            yield


def custom_calls(f, *shapes, all_lines=False):
    """The custom-call lines of f lowered for CUDA on a fake H200 (132 SMs), for bf16 operands
    of `shapes`: lowering needs no GPU, and checks wgmma's operand views, the TMA shapes and
    the SMEM size, which the interpreter does not."""
    args = [jax.ShapeDtypeStruct(shape, jnp.bfloat16) for shape in shapes]
    with _fake_h200(132):
        text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    return [line for line in text.splitlines() if all_lines or "stablehlo.custom_call" in line]


def mosaic_calls(f, *shapes) -> int:
    return sum("@mosaic_gpu" in line for line in custom_calls(f, *shapes))


def operands(m, k, n, seed, w_transposed=False, dtype=jnp.bfloat16):
    """Fresh random x (M, K) and w, drawn directly in its layout: (N, K) when transposed."""
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (m, k)).astype(dtype)
    w = (jax.random.normal(kw, (n, k) if w_transposed else (k, n)) / np.sqrt(k)).astype(dtype)
    return x, w


def check(y, want):
    y, want = np.asarray(y, np.float32), np.asarray(want, np.float32)
    assert y.shape == want.shape and not np.isnan(y).any()
    # One rounding of the fp32 result to bf16 is at most half an ulp (2^-9 relative); 2^-7
    # allows for a different fp32 summation order near a rounding tie. Elementwise, so a
    # misplaced or missing tile fails.
    big = np.abs(want).max()
    bad = np.abs(y - want) > 2.0 ** -7 * np.abs(want) + 1e-5 * big
    assert not bad.any(), f"{bad.sum()} elements off, first at {np.argwhere(bad)[0]}"


# Tile configurations that must lower for CUDA at the Llama-2-7B shapes (each a Mosaic GPU call
# whose SMEM fits). Plain GEMM: 128 x 256 CTA tile (the two WGs side by side), the same stacked
# (256 x 128), a wgmma left in flight across steps, clusters of two CTAs sharing each w tile.
CONFIGS = (Tiles(), Tiles(split="m"), Tiles(in_flight=1), Tiles(cluster=2))
# 128 x 128 CTA tiles: twice the tiles of 128 x 256, so a ragged last wave wastes less of the SMs.
WAVE = (Tiles(tile_m=64, split="m"), Tiles(tile_m=64, split="m", stages=6), Tiles(tile_n=64),
        Tiles(tile_n=64, stages=6), Tiles(tile_m=64))
# gemm_lowrank: the default (4 stages, one epilogue buffer), 3 stages with two, the WGs
# stacked, a wgmma left in flight, clusters of two.
LOWRANK_CONFIGS = (LOWRANK_TILES, Tiles(stages=3), Tiles(split="m", epi_buffers=1),
                   Tiles(in_flight=1, epi_buffers=1), Tiles(epi_buffers=1, cluster=2))
# The in-loop lora_matmul: 64 x 64 and 128 x 64 WG tiles with 2 stages (both finish in the
# interpreter), and the default 128 x 128 with 3 stages.
LORA_CONFIGS = (dict(tile_m=64, tile_n=64, stages=2), dict(tile_m=128, tile_n=64, stages=2),
                dict(stages=3))

# Small tiles, so that a 256 x 256 output has 8 CTA tiles and the 3 CTAs loop over 2-3 each.
SMALL = dict(tile_m=64, tile_n=64)


@pytest.mark.parametrize("w_transposed", [False, True], ids=["w_kn", "w_nk"])
@pytest.mark.parametrize("m,k,n,tiles", [
    # n-split CTA tile 64 x 128, 2 slots cycled over 4 K steps, band of 2 tiles along M.
    (256, 256, 256, Tiles(**SMALL, stages=2, group=2)),
    # m-split CTA tile 128 x 64, 3 slots over 5 K steps (not a multiple), wgmma left in
    # flight one step (in_flight=1), bands along N, 32-wide epilogue sub-tiles.
    (256, 320, 192, Tiles(**SMALL, stages=3, split="m", group=2, group_dim="n", in_flight=1,
                          epi_n=32)),
    # clusters of 2 CTAs stacked along M sharing (multicasting) each w tile: 2 clusters of
    # 128 x 64 on 3 SMs (one cluster of 2 CTAs on the fake GPU) walk the 4 cluster tiles.
    (256, 256, 256, Tiles(**SMALL, stages=2, group=1, cluster=2)),
])
def test_matches_reference(m, k, n, tiles, w_transposed):
    x, w = operands(m, k, n, seed=m + k + n + w_transposed, w_transposed=w_transposed)
    with _mgpu_mode():
        y = matmul(x, w, w_transposed=w_transposed, tiles=tiles)
    assert y.dtype == x.dtype and y.shape == (m, n)
    check(y, reference(x, w, w_transposed=w_transposed))


@pytest.mark.parametrize("w_transposed", [False, True], ids=["w_kn", "w_nk"])
def test_default_tiles_one_step_f16(w_transposed):
    """The default 128 x 256 CTA tile (128 x 128 per WG, 2 x 2 epilogue sub-tiles each), one
    K step (the 4 slots shrink to 1), float16, 2 tiles on 3 SMs (one CTA idles)."""
    x, w = operands(256, 64, 256, seed=11, w_transposed=w_transposed, dtype=jnp.float16)
    with _mgpu_mode():
        y = matmul(x, w, w_transposed=w_transposed)
    assert y.dtype == jnp.float16
    check(y, reference(x, w, w_transposed=w_transposed))


def test_reference_orientations_agree():
    x, w = operands(64, 128, 192, seed=1)
    np.testing.assert_allclose(reference(x, w), reference(x, w.T, w_transposed=True))
    np.testing.assert_allclose(reference(x, w), np.asarray(x, np.float32) @ np.asarray(
        w, np.float32), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,kw,match", [
    ((200, 128, 256), {}, "M % cta_m"),
    ((256, 128, 320), {}, "N % cta_n"),
    ((256, 96, 256), {}, "K % tile_k"),
    ((256, 128, 256), {"tile_m": 96}, "tile_m"),
    ((256, 128, 256), {"tile_n": 512}, "tile_n"),
    ((256, 128, 256), {"tile_k": 32}, "tile_k"),
    ((256, 128, 256), {"stages": 5}, "SMEM"),
    ((256, 128, 256), {"stages": 1, "in_flight": 1}, "stages"),
    ((256, 128, 256), {"in_flight": 2}, "in_flight"),
    ((256, 128, 256), {"split": "k"}, "split"),
    ((256, 128, 256), {"group_dim": "k"}, "group_dim"),
    ((256, 128, 256), {"epi_m": 96}, "epi_m"),
    ((256, 128, 256), {"epi_n": 100}, "epi_n"),
    ((256, 128, 256), {"cluster": 3}, "cluster"),
    ((128, 128, 256), {"cluster": 2}, "M % cta_m \\* cluster"),
])
@pytest.mark.parametrize("w_transposed", [False, True], ids=["w_kn", "w_nk"])
def test_bad_shapes_and_tiles_raise(shape, kw, match, w_transposed):
    x, w = operands(*shape, seed=0, w_transposed=w_transposed)
    with pytest.raises(ValueError, match=match):
        matmul(x, w, w_transposed=w_transposed, tiles=Tiles(**kw))


def test_bad_operands_raise():
    x, w = operands(256, 128, 256, seed=0)
    with pytest.raises(ValueError, match=r"w\.shape\[0\] == x\.shape\[1\] \(K\)"):
        matmul(x, w[:64])
    with pytest.raises(ValueError, match=r"w\.shape\[1\] == x\.shape\[1\] \(K\)"):
        matmul(x, w[:, :64], w_transposed=True)   # as (N, K) = (128, 64): K 64 != 128
    with pytest.raises(ValueError, match="16-bit float dtype"):
        matmul(x, w.astype(jnp.float32))
    with pytest.raises(ValueError, match="2-D"):
        matmul(x[None], w)


@pytest.mark.parametrize("w_transposed", [False, True], ids=["w_kn", "w_nk"])
@pytest.mark.parametrize("tiles", CONFIGS + WAVE, ids=str)
def test_configs_lower_for_cuda(tiles, w_transposed):
    """Every configuration of CONFIGS and WAVE lowers for CUDA (no GPU needed) at a Llama
    shape, to one Mosaic GPU custom call: wgmma accepts the operand views (the transposed
    (cta_n, tile_k) w tile included), and the SMEM fits."""
    m, k, n = 2048, 4096, 11008 if 11008 % tiles.cta_n == 0 else 4096
    f = lambda x, w: matmul(x, w, w_transposed=w_transposed, tiles=tiles,   # noqa: E731
                            tail=None)
    calls = custom_calls(f, (m, k), (n, k) if w_transposed else (k, n))
    assert len(calls) == 1 and "@mosaic_gpu" in calls[0], calls


# Stage 2: the LoRA term fused (lora_matmul). In jax 0.11.2's interpreter it finishes with
# 64 x 64 and 128 x 64 WG tiles and 2 stages, but hangs (> 90 s) with tile_n = 128 or with 3
# stages (unresolved: an interpreter limit or a real deadlock; untested on a GPU).
@pytest.mark.parametrize("w_transposed", [False, True], ids=["w_kn", "w_nk"])
def test_lora_matches_reference(w_transposed):
    """R = 12 zero-padded to 16; scale 0.37 is not a power of two; 2 slots over 6 K steps."""
    m, k, n, r = 256, 384, 256, 12
    x, w = operands(m, k, n, seed=21 + w_transposed, w_transposed=w_transposed)
    ka, kb = jax.random.split(jax.random.key(5))
    a = (jax.random.normal(ka, (k, r)) / np.sqrt(k)).astype(jnp.bfloat16)
    b = jax.random.normal(kb, (r, n)).astype(jnp.bfloat16)   # rank term ~ as large as x @ w
    with _mgpu_mode():
        y = lora_matmul(x, w, a, b, 0.37, w_transposed=w_transposed,
                        tiles=Tiles(**SMALL, stages=2))
    want = np.asarray(lora_reference(x, w, a, b, 0.37, w_transposed=w_transposed))
    y = np.asarray(y, np.float32)
    # scale * xa is rounded to bf16 once before the rank-R product: 2^-8 relative of the
    # rank term on top of the output rounding.
    assert np.abs(y - want).max() <= 2e-2 * np.abs(want).max()
    without = np.asarray(reference(x, w, w_transposed=w_transposed))
    assert np.abs(y - without).max() > 0.1 * np.abs(want).max()   # the term is there


@pytest.mark.parametrize("w_transposed", [False, True], ids=["w_kn", "w_nk"])
def test_lora_lowers_for_cuda(w_transposed):
    """The default LoRA tiles (128 x 256 CTA tile, 3 stages) at a Llama shape, R = 16."""
    m, k, n, r = 2048, 4096, 11008, 16
    f = lambda x, w, a, b: lora_matmul(x, w, a, b, 2.0, w_transposed=w_transposed)  # noqa: E731
    assert mosaic_calls(f, (m, k), (n, k) if w_transposed else (k, n), (k, r), (r, n)) == 1


def test_lora_bad_operands_raise():
    x, w = operands(256, 128, 256, seed=0)
    a, b = jnp.zeros((128, 16), jnp.bfloat16), jnp.zeros((16, 256), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"\(R, N\)"):
        lora_matmul(x, w, a, b[:, :128], 1.0)
    with pytest.raises(ValueError, match="incompatible shapes"):
        lora_matmul(x, w, a[:64], b, 1.0)
    with pytest.raises(ValueError, match="R <= 64"):
        lora_matmul(x, w, jnp.zeros((128, 80), jnp.bfloat16), jnp.zeros((80, 256), jnp.bfloat16),
                    1.0, tiles=Tiles(stages=2))
    with pytest.raises(ValueError, match="SMEM"):
        lora_matmul(x, w, a, b, 1.0, tiles=Tiles())   # 4 stages + a, b, xa: 248 KiB


@pytest.mark.parametrize("tiles", LORA_CONFIGS, ids=lambda kw: str(Tiles(**kw)))
def test_lora_configs_lower_for_cuda(tiles):
    """Every LoRA configuration of LORA_CONFIGS lowers for CUDA at the widest Llama shape."""
    m, k, n, r = 2048, 4096, 11008, 16
    f = lambda x, w, a, b: lora_matmul(x, w, a, b, 2.0, tiles=Tiles(**tiles))   # noqa: E731
    assert mosaic_calls(f, (m, k), (k, n), (k, r), (r, n)) == 1


# gemm_lowrank: y = x @ w + u @ v, u and v TMA-loaded during the K loop (jora's kernel path).
@pytest.mark.parametrize("w_transposed", [False, True], ids=["w_kn", "w_nk"])
@pytest.mark.parametrize("tiles", [Tiles(**SMALL, stages=2, group=2),
                                   Tiles(**SMALL, stages=2, split="m", epi_buffers=1),
                                   Tiles(**SMALL, stages=2, cluster=2)], ids=str)
def test_lowrank_matches_reference(tiles, w_transposed):
    """R = 12 zero-padded to 16; the rank term about as large as x @ w; 3 CTAs loop over
    several tiles, so u and v are reloaded into the same SMEM for each."""
    m, k, n, r = 256, 384, 256, 12
    x, w = operands(m, k, n, seed=31 + w_transposed, w_transposed=w_transposed)
    ku, kv = jax.random.split(jax.random.key(7 + w_transposed))
    u = jax.random.normal(ku, (m, r)).astype(jnp.bfloat16)
    v = (jax.random.normal(kv, (r, n)) / np.sqrt(r)).astype(jnp.bfloat16)
    with _mgpu_mode():
        y = gemm_lowrank(x, w, u, v, w_transposed=w_transposed, tiles=tiles)
    check(y, reference(x, w, w_transposed=w_transposed) + reference(u, v))
    without = np.asarray(reference(x, w, w_transposed=w_transposed))
    assert np.abs(np.asarray(y, np.float32) - without).max() > 0.1 * np.abs(without).max()


@pytest.mark.parametrize("w_transposed", [False, True], ids=["w_kn", "w_nk"])
@pytest.mark.parametrize("tiles", LOWRANK_CONFIGS, ids=str)
def test_lowrank_lowers_for_cuda(tiles, w_transposed):
    """The default low-rank tiles (4 stages, one epilogue buffer) and the others of
    LOWRANK_CONFIGS, R = 16, at the widest Llama shape."""
    m, k, n, r = 2048, 4096, 11008 if 11008 % tiles.cta_n == 0 else 4096, 16
    assert LOWRANK_TILES in LOWRANK_CONFIGS
    f = lambda x, w, u, v: gemm_lowrank(x, w, u, v, w_transposed=w_transposed,  # noqa: E731
                                        tiles=tiles, tail=None)
    assert mosaic_calls(f, (m, k), (n, k) if w_transposed else (k, n), (m, r), (r, n)) == 1


def test_lowrank_bad_operands_raise():
    x, w = operands(256, 128, 256, seed=0)
    u, v = jnp.ones((256, 16), jnp.bfloat16), jnp.ones((16, 256), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"u must be \(M, R\)"):
        gemm_lowrank(x, w, u[:128], v)
    with pytest.raises(ValueError, match=r"\(R, N\)"):
        gemm_lowrank(x, w, u, v[:, :128])
    with pytest.raises(ValueError, match="dtype"):
        gemm_lowrank(x, w, u.astype(jnp.float32), v)
    with pytest.raises(ValueError, match="SMEM"):
        gemm_lowrank(x, w, u, v, tiles=Tiles())   # 4 stages, 2 epilogue buffers and u, v


# The ragged last wave in a second launch (`_split`): 688 CTA tiles of 128 x 256 at M = 2048,
# N = 11008 are 5.2 waves of 132 SMs; 4096 at M = 32768, N = 4096 are 31.03.
def test_split_cuts_only_ragged_last_waves():
    """Worked by hand: 2048 x 11008 keeps 41 of 43 tile columns (656 tiles, 5 waves) and
    gives the 2048 x 512 rest to 128 CTAs of 128 x 64; 32768 x 4096 keeps 255 of 256 tile
    rows (4,080 tiles) and gives 128 x 4096 to 64 CTAs. The other 7B shapes fill their last
    wave to 76-97%, or their rest would not fit one wave of tail tiles: one launch."""
    assert _split(2048, 11008, Tiles(), TAIL_TILES, 132) == ("n", 10496)
    assert _split(2048, 11008, Tiles(split="m"), TAIL_TILES, 132) == ("n", 10496)   # 8 x 86
    assert _split(32768, 4096, Tiles(), TAIL_TILES, 132) == ("m", 32640)
    for m, n in ((2048, 4096), (8192, 4096), (8192, 11008), (32768, 11008)):
        assert _split(m, n, Tiles(), TAIL_TILES, 132) is None, (m, n)
    assert _split(2048, 11008, Tiles(), None, 132) is None
    assert _split(256, 256, Tiles(), TAIL_TILES, 132) is None   # 2 tiles, fewer than SMs


@pytest.mark.parametrize("w_transposed", [False, True], ids=["w_kn", "w_nk"])
@pytest.mark.parametrize("m,n,sms,cut", [(256, 1280, 8, ("n", 1024)), (640, 256, 4, ("m", 512))],
                         ids=["cols", "rows"])
def test_tail_split_matches_reference(m, n, sms, cut, w_transposed):
    """The default 128 x 256 tiles and the 128 x 64 tail: 10 tiles on 8 SMs (the last tile
    column to the tail launch, 8 CTAs) and 5 on 4 (the last tile row, 4 CTAs); matmul and
    gemm_lowrank (R = 16), so the tail's u rows and v columns are offset too."""
    assert _split(m, n, Tiles(), TAIL_TILES, sms) == cut
    k, r = 64, 16   # one K step: the interpreter's time goes with the steps
    x, w = operands(m, k, n, seed=41 + m + w_transposed, w_transposed=w_transposed)
    ku, kv = jax.random.split(jax.random.key(9 + n))
    u = jax.random.normal(ku, (m, r)).astype(jnp.bfloat16)
    v = (jax.random.normal(kv, (r, n)) / np.sqrt(r)).astype(jnp.bfloat16)
    with _mgpu_mode():
        y = matmul(x, w, w_transposed=w_transposed, num_sms=sms)
        y2 = gemm_lowrank(x, w, u, v, w_transposed=w_transposed, num_sms=sms)
    check(y, reference(x, w, w_transposed=w_transposed))
    check(y2, reference(x, w, w_transposed=w_transposed) + reference(u, v))


def test_tail_split_lowers_for_cuda(monkeypatch):
    """At 2048 x 4096 -> 11008 the GEMM is two Mosaic GPU launches, the second's (2048, 512)
    block written into y by a dynamic_update_slice; in jora's LoRA op (its Hopper path forced)
    under jax.checkpoint, forward and backward: the forward's two launches and the dx GEMM
    (2048 x 11008 -> 4096, 256 tiles: one launch)."""
    import kernels.lora_matmul as lm
    lines = custom_calls(lambda x, w: matmul(x, w), (2048, 4096), (4096, 11008), all_lines=True)
    calls = [line for line in lines if "stablehlo.custom_call" in line]
    assert len(calls) == 2 and "2048x512xbf16" in calls[1], calls
    assert any("dynamic_update_slice" in line for line in lines)
    lines = custom_calls(lambda x, w: matmul(x, w, w_transposed=True), (32768, 4096),
                         (4096, 4096), all_lines=True)
    calls = [line for line in lines if "stablehlo.custom_call" in line]
    assert len(calls) == 2 and "128x4096xbf16" in calls[1], calls   # the last 128 rows
    assert sum("dynamic_update_slice" in line for line in lines) == 2   # in two halves
    monkeypatch.setattr(lm, "on_hopper", lambda: True)

    def loss(x, w, a, b):
        return jnp.sum(lm.lora_matmul(x, w, a, b, 2.0).astype(jnp.float32) ** 2)
    grad = jax.grad(jax.checkpoint(loss), argnums=(0, 2, 3))
    calls = custom_calls(grad, (2048, 4096), (4096, 11008), (4096, 16), (16, 11008))
    mosaic = [c for c in calls if "@mosaic_gpu" in c]
    assert len(mosaic) == 3 and sum("2048x512xbf16" in c for c in mosaic) == 1, mosaic


def test_bad_tail_raises():
    x, w = operands(256, 128, 256, seed=0)
    with pytest.raises(ValueError, match="must divide the CTA tile"):
        matmul(x, w, tail=Tiles(tile_m=128, split="m"))   # 256 x 128 in 128 x 256
    with pytest.raises(ValueError, match="tail must be"):
        matmul(x, w, tail="small")


# gemm_swiglu: g = x @ w_gate, u = x @ w_up and h = silu(g) * u from one kernel's accumulators.
def swiglu_operands(m, k, n, seed):
    kx, kg, ku = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (m, k)).astype(jnp.bfloat16)
    wg, wu = ((jax.random.normal(kw, (k, n)) / np.sqrt(k)).astype(jnp.bfloat16) for kw in (kg, ku))
    return x, wg, wu


@pytest.mark.parametrize("m,n,tiles,sms", [
    # 8 CTA tiles of 128 x 64 (two stacked 64 x 64 WGs) on 3 SMs, 2 slots over 3 K steps
    (256, 256, Tiles(**SMALL, split="m", stages=2, group=2), 3),
    # the default tiles (128 x 128 of g and of u) and the tail: 10 tiles on 8 SMs, the last
    # tile column to 8 CTAs of 128 x 64
    (256, 640, SWIGLU_TILES, 8),
], ids=["small", "default+tail"])
def test_swiglu_gemm_matches_reference(m, n, tiles, sms):
    k = 192 if tiles != SWIGLU_TILES else 64   # the interpreter's time goes with the K steps
    if tiles == SWIGLU_TILES:
        assert _split(m, n, tiles, TAIL_TILES, sms) == ("n", 512)
    x, wg, wu = swiglu_operands(m, k, n, seed=m + n)
    with _mgpu_mode():
        g, u, h = gemm_swiglu(x, wg, wu, tiles=tiles, num_sms=sms)
    want = swiglu_reference(x, wg, wu)
    for y, w in zip((g, u, h), want):
        assert y.dtype == x.dtype and y.shape == (m, n)
        check(y, w)
    # h is formed from the fp32 accumulators, not from the rounded g and u
    assert not np.array_equal(np.asarray(h), np.asarray(jax.nn.silu(g) * u))


def test_swiglu_gemm_lowers_for_cuda():
    """The default tiles at the 7B MLP shape, M = 2048: 86 tile columns of 128 are 10.4 waves
    of 16 tile rows, so the last 4 columns (512) go to a tail launch of 128 x 64 CTAs; three
    outputs, each patched by a dynamic_update_slice. M = 8192: one launch."""
    f = lambda x, wg, wu: gemm_swiglu(x, wg, wu)   # noqa: E731
    lines = custom_calls(f, (2048, 4096), (4096, 11008), (4096, 11008), all_lines=True)
    calls = [line for line in lines if "stablehlo.custom_call" in line]
    assert len(calls) == 2 and calls[1].count("2048x512xbf16") == 3, calls
    assert sum("dynamic_update_slice" in line for line in lines) == 3
    assert mosaic_calls(f, (8192, 4096), (4096, 11008), (4096, 11008)) == 1
    assert SWIGLU_TILES.smem_bytes(gated=True) <= 227 * 1024
    assert TAIL_TILES.smem_bytes(gated=True) <= 227 * 1024


def test_swiglu_gemm_bad_operands_raise():
    x, wg, wu = swiglu_operands(256, 128, 256, seed=0)
    with pytest.raises(ValueError, match="share shape"):
        gemm_swiglu(x, wg, wu[:, :128])
    with pytest.raises(ValueError, match="N % cta_n"):
        gemm_swiglu(x, wg[:, :192], wu[:, :192])
    with pytest.raises(ValueError, match=r"SMEM .* 2 \* cta_n"):
        gemm_swiglu(x, wg, wu, tiles=Tiles(split="m", tile_m=64, tile_n=256))


def test_gate_up_op_lowers_to_the_kernel_for_cuda(monkeypatch):
    """jora's gate + up op (kernels/swiglu.gate_up, its Hopper path forced) under
    jax.checkpoint at the 7B MLP, forward and backward: gemm_swiglu's two launches (the
    ragged last wave's columns in the second) and the swiglu_grads kernel."""
    import kernels.lora_matmul as lm
    from kernels import swiglu
    monkeypatch.setattr(lm, "on_hopper", lambda: True)

    def loss(x, wg, wu):
        return jnp.sum(swiglu.gate_up(x, wg, wu).astype(jnp.float32) ** 2)
    calls = custom_calls(jax.grad(jax.checkpoint(loss)), (1, 2048, 4096), (4096, 11008),
                         (4096, 11008))
    mosaic = [c for c in calls if "@mosaic_gpu" in c]
    assert len(mosaic) == 2 and all("hopper_gemm_swiglu" in c for c in mosaic), calls
    assert sum("swiglu_grads" in c or "triton" in c for c in calls) == 1, calls


def test_gate_up_op_clusters_where_m_allows(monkeypatch):
    """The op's kernel tiles: SWIGLU_TILES (clusters of two CTA tiles along M) where M is a
    multiple of a cluster's 256 rows, unclustered where it is only one of a CTA's 128, else
    no kernel (XLA)."""
    import kernels.lora_matmul as lm
    from kernels import swiglu
    monkeypatch.setattr(lm, "on_hopper", lambda: True)
    w = jax.ShapeDtypeStruct((4096, 11008), jnp.bfloat16)   # the choice reads shapes only
    tiles = lambda m: swiglu._kernel_tiles(  # noqa: E731
        jax.ShapeDtypeStruct((m, 4096), jnp.bfloat16), w)
    assert tiles(2048) == SWIGLU_TILES and SWIGLU_TILES.cluster == 2
    assert tiles(1152).cluster == 1 and tiles(1152).cta_m == SWIGLU_TILES.cta_m
    assert tiles(1000) is None
