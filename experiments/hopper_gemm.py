"""Warp-specialized persistent Hopper GEMM in Pallas Mosaic GPU: y = x @ w or y = x @ w.T.

An experiment (issue 20, stage 1): experiments/lora_matmul_mgpu.py, one warpgroup per output
tile, ran at 1.16-1.29x cuBLAS's time on Llama-2-7B projections. This kernel has the structure
of CUTLASS's and jax's own Hopper GEMMs, to see whether Mosaic GPU reaches cuBLAS (the target:
>= 0.95x its speed); experiments/bench_hopper_gemm.py measures it.

Shapes: x (M, K), w (K, N) -> y (M, N), or with w_transposed=True w (N, K) -> y = x @ w.T, w
read as stored (its (tile_n, tile_k) tiles are K-contiguous rows; wgmma takes a transposed
view of them, so nothing is transposed in HBM, SMEM or registers). bf16 (or f16) in, fp32
accumulation, one rounding to x's dtype.

Algorithm. A CTA is three warpgroups (WGs, 128 threads each): two compute WGs and one memory
WG. It owns a CTA tile of (cta_m, cta_n) outputs at a time; the compute WGs split it in two
halves of (tile_m, tile_n) each, side by side along N (split="n": cta = (tile_m, 2 tile_n))
or stacked along M (split="m": cta = (2 tile_m, tile_n)).
  1. Persistent grid: one CTA per SM (grid = min(#SMs, #tiles)); CTA c walks the output tiles
     c, c + grid, c + 2 grid, ... of the linear tile order (`plgpu.nd_loop`).
  2. Tile order: the linear index is mapped to an (m, n) tile by `plgpu.planar_snake`: bands
     `group` tiles wide along `group_dim`, walked along the other dimension, alternate bands
     in opposite directions. The ~132 tiles in flight then share few x row-blocks and w
     column-blocks, which stay in L2 (x is read ~N/cta_n times and w ~M/cta_m times in all).
  3. K loop, warp-specialized (`plgpu.emit_pipeline_warp_specialized`): the memory WG
     (register budget cut to 40 a thread, the compute WGs raised to 232) issues TMA copies
     of the (cta_m, tile_k) x tile and the (tile_k, cta_n) w tile (transposed: (cta_n,
     tile_k)) into a ring of `stages` SMEM slots, waiting only for a slot to be released;
     a "produced" barrier per slot tells the compute WGs that both tiles have landed.
  4. Each compute WG, per K step: waits for the slot, issues a wgmma of its half,
     x[rows] @ w[:, cols] into its (tile_m, tile_n) fp32 accumulator (128 registers a thread at
     128 x 128), waits until at most `in_flight` wgmmas are pending and releases the slot
     they no longer read (a "consumed" barrier counting both WGs). The two WGs' wgmmas
     interleave on the tensor cores while the memory WG keeps `stages` steps of loads ahead.
  5. Epilogue, per compute WG: the accumulator is rounded to bf16 and written, in
     (epi_m, epi_n) sub-tiles, into two alternating SMEM buffers, each stored to HBM by TMA
     while the next is filled. The memory WG is already loading the next tile's first
     `stages` K steps meanwhile (the pipeline releases the slots before the epilogue).
  6. After the last tile, every WG waits for its TMA stores.

Tiles (`Tiles`, defaults): tile_m = tile_n = 128 per WG, tile_k = 64 (64 bf16 = 128 bytes, the
128 B swizzle of both operand tiles), stages = 4, split="n" (CTA tile 128 x 256), epilogue
sub-tiles 64 x 64.
SMEM: stages * (cta_m * tile_k + tile_k * cta_n) * 2 B for the ring plus 2 WGs * 2 buffers *
epi_m * epi_n * 2 B for the epilogue: at the defaults 4 * 48 KiB + 32 KiB = 224 KiB of the 227
KiB an H100/H200 CTA may use (3 stages: 176 KiB); `Tiles.smem_bytes` computes it and larger
configurations are rejected before lowering.

Constraints (a ValueError names the one that fails): x and w 2-D, one 16-bit float dtype,
K matching; M % cta_m == 0, N % cta_n == 0, K % tile_k == 0 (no masking: Llama shapes divide);
tile_m a multiple of 64 (wgmma's M); tile_n a multiple of 64 and <= 256 (wgmma's N, and whole
128 B swizzle groups in the (tile_k, cta_n) w tile); tile_k a multiple of 64; epi_m divides
tile_m and is a multiple of 64 (so is a TMA store's row count of the swizzled buffer),
epi_n divides tile_n and is a multiple of 8; stages >= 1 and > in_flight; in_flight in {0, 1};
the SMEM total above <= 227 KiB.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
from jax import lax

SMEM_LIMIT = 227 * 1024   # bytes of shared memory a CTA may use on H100/H200 (sm_90)
MEMORY_REGISTERS = 40     # the memory WG only issues TMA: its registers go to the compute WGs


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Tile sizes and schedule of `matmul` (see the module docstring)."""
    tile_m: int = 128    # rows of one compute WG's accumulator
    tile_n: int = 128    # columns of one compute WG's accumulator
    tile_k: int = 64     # K depth of one pipeline step
    stages: int = 4      # SMEM slots in the TMA ring (pipeline depth)
    split: str = "n"     # the 2 compute WGs are side by side along "n" or stacked along "m"
    group: int = 8       # tile-order band width (in CTA tiles) along group_dim
    group_dim: str = "m"
    epi_m: int = 64      # epilogue sub-tile (one TMA store)
    epi_n: int = 64
    in_flight: int = 0   # wgmmas left pending when a step ends (1: its slot is released a step later)

    @property
    def cta_m(self) -> int:
        return self.tile_m * (2 if self.split == "m" else 1)

    @property
    def cta_n(self) -> int:
        return self.tile_n * (2 if self.split == "n" else 1)

    def smem_bytes(self, itemsize: int = 2) -> int:
        ring = self.stages * (self.cta_m + self.cta_n) * self.tile_k
        epilogue = 2 * 2 * self.epi_m * self.epi_n
        return (ring + epilogue) * itemsize

    def __str__(self):
        s = f"{self.tile_m}x{self.tile_n}x{self.tile_k} s{self.stages} {self.split}-split " \
            f"g{self.group}{self.group_dim}"
        return s + (f" f{self.in_flight}" if self.in_flight else "")


def reference(x, w, *, w_transposed: bool = False):
    """x @ w (x @ w.T with w_transposed) in plain jnp, fp32 result of the exact products
    (bf16 operands are exact in fp32); the kernel's result is this rounded to x.dtype."""
    w = w.T if w_transposed else w
    return jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32),
                   precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


def _num_sms() -> int:
    """SMs of the device the kernel is for: the abstract device under an abstract mesh (the
    tests' fake H200, cross-lowering), else the default device (132 on an H200)."""
    abstract = jax.sharding.get_abstract_mesh().abstract_device
    if abstract is not None:
        return abstract.num_cores
    return getattr(jax.devices()[0], "core_count", None) or 132


def _operand_transforms(tile_k: int, itemsize: int):
    # (8, 64) tiles and the 128 B swizzle: the layout TMA writes and wgmma reads conflict-free.
    swizzle = plgpu.find_swizzle(tile_k * itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def _check(x, w, tiles: Tiles, w_transposed: bool):
    """Validate shapes, dtypes and tiles; returns (M, K, N). Each failure names its rule."""
    layout = "w (N, K) with w_transposed=True" if w_transposed else "w (K, N)"
    if x.ndim != 2 or w.ndim != 2:
        raise ValueError(f"x and w must be 2-D: x{x.shape} w{w.shape}")
    m, k = x.shape
    n, k2 = w.shape if w_transposed else w.shape[::-1]
    if k2 != k:
        wk = "w.shape[1]" if w_transposed else "w.shape[0]"
        raise ValueError(f"incompatible shapes for {layout}: {wk} == x.shape[1] (K) fails; "
                         f"x{x.shape} w{w.shape}")
    dt = jnp.dtype(x.dtype)
    if dt not in (jnp.bfloat16, jnp.float16) or w.dtype != dt:
        raise ValueError(f"x and w must share a 16-bit float dtype, got {x.dtype}, {w.dtype}")
    t = tiles
    rules = [
        (t.split in ("m", "n"), f"split={t.split!r} must be 'm' or 'n'"),
        (t.group_dim in ("m", "n"), f"group_dim={t.group_dim!r} must be 'm' or 'n'"),
        (t.group >= 1, f"group={t.group} must be >= 1"),
        (t.tile_m % 64 == 0 and t.tile_m > 0,
         f"tile_m={t.tile_m} must be a multiple of 64 (wgmma's M)"),
        (t.tile_n % 64 == 0 and 0 < t.tile_n <= 256,
         f"tile_n={t.tile_n} must be a multiple of 64 and <= 256 (wgmma's N)"),
        (t.tile_k % 64 == 0 and t.tile_k > 0,
         f"tile_k={t.tile_k} must be a multiple of 64 (128 B swizzle rows)"),
        (t.epi_m % 64 == 0 and t.epi_m > 0 and t.tile_m % t.epi_m == 0,
         f"epi_m={t.epi_m} must be a multiple of 64 dividing tile_m={t.tile_m}"),
        (t.epi_n % 8 == 0 and t.epi_n > 0 and t.tile_n % t.epi_n == 0,
         f"epi_n={t.epi_n} must be a multiple of 8 dividing tile_n={t.tile_n}"),
        (t.in_flight in (0, 1), f"in_flight={t.in_flight} must be 0 or 1"),
        (t.stages >= 1 and t.stages > t.in_flight,
         f"stages={t.stages} must be >= 1 and > in_flight={t.in_flight}"),
        (t.smem_bytes(dt.itemsize) <= SMEM_LIMIT,
         f"SMEM {t.smem_bytes(dt.itemsize)} B (stages * (cta_m + cta_n) * tile_k + "
         f"4 * epi_m * epi_n elements) must be <= {SMEM_LIMIT} B: fewer stages or smaller tiles"),
        (m % t.cta_m == 0, f"M % cta_m == 0 is required: M={m}, cta_m={t.cta_m} ({t})"),
        (n % t.cta_n == 0, f"N % cta_n == 0 is required: N={n}, cta_n={t.cta_n} ({t})"),
        (k % t.tile_k == 0, f"K % tile_k == 0 is required: K={k}, tile_k={t.tile_k}"),
    ]
    for ok, message in rules:
        if not ok:
            raise ValueError(message)
    return m, k, n


def _kernel(x_gmem, w_gmem, y_gmem, *, tiles: Tiles, w_transposed: bool):
    t = tiles
    m, k = x_gmem.shape
    n = y_gmem.shape[1]
    m_tiles, n_tiles, k_steps = m // t.cta_m, n // t.cta_n, k // t.tile_k
    dt = y_gmem.dtype
    tr = _operand_transforms(t.tile_k, jnp.dtype(dt).itemsize)
    out_swizzle = plgpu.find_swizzle(t.epi_n * jnp.dtype(dt).itemsize * 8)
    out_tr = (plgpu.TilingTransform((8, out_swizzle // jnp.dtype(dt).itemsize)),
              plgpu.SwizzleTransform(out_swizzle))

    # The pipeline sees one CTA tile's x row-block (cta_m, K) and w column-block: (K, cta_n),
    # or (cta_n, K) as stored when transposed; its grid is the K steps.
    x_spec = plgpu.BlockSpec((t.cta_m, t.tile_k), lambda kk: (0, kk), transforms=tr,
                             delay_release=t.in_flight)
    if w_transposed:
        w_spec = plgpu.BlockSpec((t.cta_n, t.tile_k), lambda kk: (0, kk), transforms=tr,
                                 delay_release=t.in_flight)
    else:
        w_spec = plgpu.BlockSpec((t.tile_k, t.cta_n), lambda kk: (kk, 0), transforms=tr,
                                 delay_release=t.in_flight)

    def make_pipeline(step_fn, context):
        return plgpu.emit_pipeline_warp_specialized(
            step_fn, grid=(k_steps,), memory_registers=MEMORY_REGISTERS,
            in_specs=[x_spec, w_spec], max_concurrent_steps=t.stages,
            wg_axis="wg", num_compute_wgs=2, compute_context=context)

    # The SMEM ring and barriers are allocated once, outside the tile loop, and shared by the
    # three WGs; allocating them per tile would synchronize the WGs at every tile boundary.
    def unused(*args, **kwargs):
        return None
    ring = make_pipeline(unused, unused).get_allocations(
        x_gmem.at[pl.ds(0, t.cta_m), :],
        w_gmem.at[pl.ds(0, t.cta_n), :] if w_transposed else w_gmem.at[:, pl.ds(0, t.cta_n)])

    def scoped(ring, out_smem):
        wg = lax.axis_index("wg")   # 0, 1: compute; 2: memory
        # This WG's half of the CTA tile, as slices of the CTA tile (rows, cols).
        if t.split == "n":
            half_rows, half_cols = pl.ds(0, t.tile_m), pl.ds(wg * t.tile_n, t.tile_n)
        else:
            half_rows, half_cols = pl.ds(wg * t.tile_m, t.tile_m), pl.ds(0, t.tile_n)

        @plgpu.nd_loop((m_tiles * n_tiles,), collective_axes="sm")
        def _tile(info):
            (lin,) = info.index
            minor = 0 if t.group_dim == "m" else 1
            mi, ni = plgpu.planar_snake(lin, (m_tiles, n_tiles), minor, t.group)
            cta_rows, cta_cols = pl.ds(mi * t.cta_m, t.cta_m), pl.ds(ni * t.cta_n, t.cta_n)

            def step(_, x_smem, w_smem, acc_ref):
                # x_smem (cta_m, tile_k); w_smem (tile_k, cta_n), or (cta_n, tile_k) transposed.
                if w_transposed:
                    w_half = w_smem.at[half_cols, :].T if t.split == "n" else w_smem.T
                else:
                    w_half = w_smem.at[:, half_cols] if t.split == "n" else w_smem
                plgpu.wgmma(acc_ref, x_smem.at[half_rows, :], w_half)
                plgpu.wgmma_wait(t.in_flight)   # slots older than in_flight steps are free
                return acc_ref

            def context(run_k_loop):
                def with_acc(acc_ref):   # (tile_m, tile_n) fp32, in registers
                    run_k_loop(acc_ref)
                    y = acc_ref[...].astype(dt)   # waits for the last wgmmas
                    y_half = y_gmem.at[cta_rows, cta_cols].at[half_rows, half_cols]
                    # The previous tile's stores have long finished reading both buffers.
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    sub = 0
                    for i in range(t.tile_m // t.epi_m):
                        for j in range(t.tile_n // t.epi_n):
                            buf = out_smem.at[wg, sub % 2]
                            plgpu.wait_smem_to_gmem(1, wait_read_only=True)   # buf is free
                            buf[...] = y[i * t.epi_m:(i + 1) * t.epi_m,
                                         j * t.epi_n:(j + 1) * t.epi_n]
                            plgpu.commit_smem()   # SMEM writes visible to the TMA unit
                            plgpu.copy_smem_to_gmem(
                                buf, y_half.at[pl.ds(i * t.epi_m, t.epi_m),
                                               pl.ds(j * t.epi_n, t.epi_n)])
                            sub += 1
                pl.run_scoped(with_acc, plgpu.ACC((t.tile_m, t.tile_n), jnp.float32))

            x_rows = x_gmem.at[cta_rows, :]
            w_cols = w_gmem.at[cta_cols, :] if w_transposed else w_gmem.at[:, cta_cols]
            make_pipeline(step, context)(x_rows, w_cols, allocations=ring)

        plgpu.wait_smem_to_gmem(0)   # every store done before the CTA exits

    pl.run_scoped(
        scoped, ring=ring,
        out_smem=plgpu.SMEM((2, 2, t.epi_m, t.epi_n), dt, transforms=out_tr),
        collective_axes="wg")


def matmul(x, w, *, w_transposed: bool = False, tiles: Tiles = Tiles(), num_sms=None):
    """x @ w (x (M, K), w (K, N)) or, with w_transposed=True, x @ w.T (w (N, K), read in
    place) in x.dtype with fp32 accumulation: one warp-specialized persistent Mosaic GPU
    kernel (see the module docstring). num_sms: the persistent grid size (default: the
    device's SM count; fewer CTAs than tiles makes each CTA loop over several tiles)."""
    m, _, n = _check(x, w, tiles, w_transposed)
    num_tiles = (m // tiles.cta_m) * (n // tiles.cta_n)
    grid = min(num_sms or _num_sms(), num_tiles)
    return plgpu.kernel(
        functools.partial(_kernel, tiles=tiles, w_transposed=bool(w_transposed)),
        out_type=jax.ShapeDtypeStruct((m, n), x.dtype),
        grid=(grid,), grid_names=("sm",),
        num_threads=3, thread_name="wg",
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        kernel_name="hopper_gemm",
    )(x, w)
