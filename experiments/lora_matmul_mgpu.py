"""Fused LoRA GEMM for Hopper in Mosaic GPU: y = x @ w + scale * xa @ b (or x @ w.T + ...).

An experiment: the same op as kernels/lora_matmul.py's `gemm_lowrank` (there lowered through
Triton by the generic `pl.pallas_call`), written against `jax.experimental.pallas.mosaic_gpu`
(`plgpu.kernel`, explicit TMA copies and `wgmma`), to measure on an H200 whether Mosaic GPU
closes the Triton kernel's gap to cuBLAS (experiments/bench_mgpu.py does the timing).

Shapes: x (M, K), w (K, N), xa (M, R), b (R, N), all bf16 (or all f16) -> y (M, N) in x's dtype.
With w_transposed=True, w is given as (N, K) and y = x @ w.T + scale * xa @ b (w read transposed
in SMEM, never transposed or copied in HBM): the LoRA backward dx = dy @ w^T + scale * u @ v
with w stored (K_in, N_out), x = dy, xa = u = dy @ b^T, b = v = a^T (kernels/lora_matmul.py's
`q_transposed=True`).
xa = x @ a is computed outside (XLA). Both products accumulate in fp32 and the sum
x @ w + scale * xa @ b is formed in fp32 before the single rounding to x's dtype; scale (a
Python number) multiplies the fp32 rank-R product, never a bf16 operand, so it is exact for
any value, not only powers of two.

Structure: one CTA of one warpgroup per (tile_m, tile_n) output tile, grid (M/tile_m, N/tile_n),
row-major tile order (no persistent loop, no warp specialization, no L2 tile swizzle, no masks:
the plain kernel first, to see where it stands).
  1. TMA starts copying the tile's rank operands, xa[tile_m, Rp] and b[Rp, tile_n], into SMEM;
     they arrive while the K loop runs.
  2. K loop: `plgpu.emit_pipeline` streams (tile_m, 64) x-tiles and (64, tile_n) w-tiles
     through SMEM by TMA, max_concurrent_steps slots deep (w_transposed: (tile_n, 64) tiles
     of the (N, K) w, block (pn, k), see below); each step issues one `plgpu.wgmma`
     into a (tile_m, tile_n) fp32 `plgpu.ACC` and waits for the previous one
     (wgmma_wait(1) with delay_release=1: one wgmma in flight while the next tiles land).
  3. Epilogue, per 64 x 64 sub-tile: a wgmma of depth Rp computes xa_sub @ b_sub into a small
     second ACC, the fp32 sum acc_sub + scale * lr_sub is rounded once to x's dtype and
     written into the swizzled SMEM output tile. The sub-tiles keep the second accumulator at
     32 registers a thread beside the main one's 128 (a full-size second ACC would need 256
     and spill). Pre-initialising the ACC with scale * xa @ b (`acc_ref[...] = v`, or
     `pl.run_state(..)(plgpu.ACC.init(v))`) lowers for CUDA but does not run in 0.11.2's
     Mosaic GPU interpreter, which the tests use, so the product comes in the epilogue.
  4. One TMA store of the output tile (SMEM -> GMEM).
  Transposed w (w_transposed=True): the (tile_n, 64) tile is TMA-copied as stored, K
  contiguous, with the same (8, 64) tiling and 128 B swizzle as the x tile (64 bf16 along K);
  the wgmma gets its `.T` view, a (64, tile_n) ref whose transforms end in a transpose. Mosaic
  GPU folds that transpose into the wgmma's B descriptor (the operand is K-major; the plain
  (64, tile_n) w tile is the N-major, "transposed" one for the instruction), so nothing is
  moved in SMEM or registers either. Everything else (epilogue, rank operands, output tile,
  SMEM use) is identical: the w slot holds tile_n x 64 elements in both layouts.
  Swizzles: x/w tiles 128 B (64 bf16 along K for x, along N for w, along K for a transposed
  w); xa/b tiles min(128, 2 * Rp) B (one swizzle for both operands of a wgmma: 32 B at
  Rp = 16); the output tile the largest swizzle that fits tile_n (128 B for tile_n >= 64).
  SMEM at the defaults (128 x 128, 4 slots): 4 * 32 KiB pipeline + 32 KiB output + 8 KiB rank
  operands (Rp = 16), of the 227 KiB an H200 CTA may use; 128 x 256 with 4 slots (256 KiB)
  does not fit, and the CUDA lowering raises "Mosaic GPU kernel exceeds available shared
  memory" (use 2-3 slots).

Constraints (a ValueError names the one that fails), the same for both layouts of w (shape
checks name the mismatched dimension in the layout asked for): M % tile_m == 0,
N % tile_n == 0, K % tile_k == 0 (tile_k = 64); tile_m a multiple of 64 (wgmma's M), tile_n a
multiple of 64 and <= 256 (wgmma's N; a whole number of 64-column epilogue sub-tiles and, for
the plain w, of 128 B swizzle groups; the transposed w tile only needs tile_n % 8 == 0 for its
(8, 64) tiling, so it adds no constraint). R is zero-padded in the wrapper to
Rp = 16, 32 or a multiple of 64 (wgmma's K step for the rank operands' swizzle); zero rows of b
and columns of xa add exact zeros. Nothing of size M x K or K x N is padded or copied.
scale is a Python number (compiled into the kernel).
"""
import functools

import jax
import jax.numpy as jnp
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

TILE_K = 64   # 64 bf16 = 128 bytes: the x and w tiles use the 128 B swizzle
EPI = 64      # epilogue sub-tile (EPI x EPI): wgmma's M, and a 32-register fp32 accumulator


def _transforms(swizzle: int, itemsize: int):
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def _padded_rank(r: int) -> int:
    """R rounded up to 16, 32 or a multiple of 64: a whole number of wgmma K groups."""
    if r <= 32:
        return 16 if r <= 16 else 32
    return -(-r // 64) * 64


def _kernel(x_gmem, w_gmem, xa_gmem, b_gmem, o_gmem, xa_smem, b_smem, o_smem, bars, *,
            scale: float, tile_m: int, tile_n: int, k_steps: int, max_concurrent_steps: int,
            tr: tuple, w_transposed: bool):
    # One wgmma stays in flight (its SMEM slots held one step longer) when the pipeline has
    # at least two slots; with one slot (K = tile_k, or max_concurrent_steps=1) none does.
    delay = 1 if max_concurrent_steps > 1 else 0
    pm, pn = jax.lax.axis_index("m"), jax.lax.axis_index("n")   # pl.program_id is wrong here
    m_sl, n_sl = pl.ds(pm * tile_m, tile_m), pl.ds(pn * tile_n, tile_n)

    # 1. The rank operands of this tile; the copies overlap the whole K loop.
    plgpu.copy_gmem_to_smem(xa_gmem.at[m_sl, :], xa_smem, bars.at[0])
    plgpu.copy_gmem_to_smem(b_gmem.at[:, n_sl], b_smem, bars.at[1])

    # 2. The K loop: acc = x_tile @ w_tile in fp32. With w_transposed the w tile arrives as
    #    (tile_n, TILE_K), K-contiguous rows, and wgmma reads it through a transposed view
    #    ((TILE_K, tile_n) logically): the transpose is in the descriptor, not in a copy.
    if w_transposed:
        w_block, w_index = (tile_n, TILE_K), (lambda k: (pn, k))
    else:
        w_block, w_index = (TILE_K, tile_n), (lambda k: (k, pn))

    def main_loop(acc_ref):
        def step(_, x_smem, w_smem):
            plgpu.wgmma(acc_ref, x_smem, w_smem.T if w_transposed else w_smem)
            plgpu.wgmma_wait(delay)   # the previous step's wgmma is done: its slots are free

        plgpu.emit_pipeline(
            step, grid=(k_steps,), max_concurrent_steps=max_concurrent_steps,
            in_specs=[
                plgpu.BlockSpec((tile_m, TILE_K), lambda k: (pm, k), transforms=tr,
                                delay_release=delay),
                plgpu.BlockSpec(w_block, w_index, transforms=tr, delay_release=delay),
            ])(x_gmem, w_gmem)
        return acc_ref[...]   # reading an ACC waits for its wgmmas
    acc = pl.run_scoped(main_loop, plgpu.ACC((tile_m, tile_n), jnp.float32))

    # 3. Epilogue, in EPI x EPI sub-tiles: + scale * xa_sub @ b_sub (a second, small fp32
    #    accumulator), one rounding, into the SMEM output tile.
    plgpu.barrier_wait(bars.at[0])
    plgpu.barrier_wait(bars.at[1])
    for i in range(tile_m // EPI):
        for j in range(tile_n // EPI):
            rows, cols = pl.ds(i * EPI, EPI), pl.ds(j * EPI, EPI)

            def lowrank(lr_ref):
                plgpu.wgmma(lr_ref, xa_smem.at[rows, :], b_smem.at[:, cols])
                return lr_ref[...]
            lr = pl.run_scoped(lowrank, plgpu.ACC((EPI, EPI), jnp.float32))
            y = acc[i * EPI:(i + 1) * EPI, j * EPI:(j + 1) * EPI] + scale * lr
            o_smem[rows, cols] = y.astype(o_smem.dtype)

    # 4. SMEM -> GMEM by TMA.
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[m_sl, n_sl])
    plgpu.wait_smem_to_gmem(0)


def gemm_lowrank_mgpu(x, w, xa, b, scale, *, tile_m=128, tile_n=128, max_concurrent_steps=4,
                      w_transposed: bool = False):
    """x @ w + scale * xa @ b in x.dtype, fp32 accumulation, one Mosaic GPU kernel (see module
    docstring). x (M, K), w (K, N), xa (M, R), b (R, N), one 16-bit float dtype.

    w_transposed=True: w is given as (N, K) and the kernel computes x @ w.T + scale * xa @ b,
    reading w's tiles transposed in SMEM (no transpose or copy of w in HBM); e.g. the LoRA
    backward dx = dy @ w^T + scale * (dy @ b^T) @ a^T with w stored (K_in, N_out)."""
    shapes = f"x{x.shape} w{w.shape} xa{xa.shape} b{b.shape}"
    layout = "w (N, K) with w_transposed=True" if w_transposed else "w (K, N)"
    if x.ndim != 2 or w.ndim != 2 or xa.ndim != 2 or b.ndim != 2:
        raise ValueError(f"incompatible shapes (all operands must be 2-D): {shapes}")
    (m, k), (m2, r), (r2, n2) = x.shape, xa.shape, b.shape
    n, k2 = w.shape if w_transposed else w.shape[::-1]
    w_k, w_n = ("w.shape[1]", "w.shape[0]") if w_transposed else ("w.shape[0]", "w.shape[1]")
    for ok, what in ((k2 == k, f"{w_k} == x.shape[1] (K)"),
                     (m2 == m, "xa.shape[0] == x.shape[0] (M)"),
                     (r2 == r, "b.shape[0] == xa.shape[1] (R)"),
                     (n2 == n, f"b.shape[1] == {w_n} (N)")):
        if not ok:
            raise ValueError(f"incompatible shapes for {layout}: {what} fails; {shapes}")
    dt = jnp.dtype(x.dtype)
    if dt not in (jnp.bfloat16, jnp.float16) or {w.dtype, xa.dtype, b.dtype} != {dt}:
        raise ValueError(f"x, w, xa, b must share a 16-bit float dtype, got "
                         f"{x.dtype}, {w.dtype}, {xa.dtype}, {b.dtype}")
    if tile_m % 64:
        raise ValueError(f"tile_m={tile_m} must be a multiple of 64 (wgmma's M)")
    if tile_n % 64 or tile_n > 256:
        raise ValueError(f"tile_n={tile_n} must be a multiple of 64 and <= 256")
    if m % tile_m:
        raise ValueError(f"M % tile_m == 0 is required: M={m}, tile_m={tile_m}")
    if n % tile_n:
        raise ValueError(f"N % tile_n == 0 is required: N={n}, tile_n={tile_n}")
    if k % TILE_K:
        raise ValueError(f"K % tile_k == 0 is required: K={k}, tile_k={TILE_K}")
    if max_concurrent_steps < 1:
        raise ValueError(f"max_concurrent_steps={max_concurrent_steps} must be >= 1")

    rp = _padded_rank(r)
    if rp != r:   # zero columns of xa meet zero rows of b: exact
        xa = jnp.pad(xa, ((0, 0), (0, rp - r)))
        b = jnp.pad(b, ((0, rp - r), (0, 0)))
    isz = dt.itemsize
    tr = _transforms(128, isz)                                     # x, w tiles
    tr_r = _transforms(min(128, rp * isz), isz)                    # xa, b tiles
    tr_o = _transforms(plgpu.find_swizzle(tile_n * isz * 8), isz)  # output tile
    kernel = functools.partial(
        _kernel, scale=float(scale), tile_m=tile_m, tile_n=tile_n, k_steps=k // TILE_K,
        max_concurrent_steps=min(max_concurrent_steps, k // TILE_K), tr=tr,
        w_transposed=bool(w_transposed))
    return plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((m, n), dt),
        scratch_types=[
            plgpu.SMEM((tile_m, rp), dt, transforms=tr_r),
            plgpu.SMEM((rp, tile_n), dt, transforms=tr_r),
            plgpu.SMEM((tile_m, tile_n), dt, transforms=tr_o),
            plgpu.Barrier(num_barriers=2),
        ],
        grid=(m // tile_m, n // tile_n),
        grid_names=("m", "n"),
        kernel_name="gemm_lowrank_mgpu",
    )(x, w, xa, b)
