"""Warp-specialized persistent Hopper GEMM in Pallas Mosaic GPU: y = x @ w or y = x @ w.T,
optionally plus a rank-R product u @ v added before the one rounding (`gemm_lowrank`, the
fused LoRA projection of kernels/lora_matmul.py on Hopper GPUs), or the Llama MLP's gate and
up projections with silu(g) * u formed in the epilogue (`gemm_swiglu`).

It has the structure of CUTLASS's and jax's own Hopper GEMMs, which is what it takes to run at
cuBLAS's pace on sm_90 (a one-warpgroup TMA + wgmma kernel stays ~1.2x behind: bench/NOTES.md);
experiments/bench_hopper_gemm.py and kernels/bench.py measure it.

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
  7. Ragged last wave (`_split`): 688 CTA tiles (M = 2048, 4096 -> 11008) on 132 SMs are five
     full waves and a sixth of 28 tiles that takes as long as a full one. Where the rest fits
     in one wave of smaller tiles, the launch computes only the leading whole tile columns
     (or rows) in about whole waves, and a second launch the rest in `TAIL_TILES` (128 x 64,
     a quarter of the work a CTA), whose (M, 512) (or (128, N)) result XLA writes into y's
     unwritten part by an in-place dynamic_update_slice.
  8. Clusters (cluster=2, gemm_swiglu's default): two CTAs on neighbouring SMs take the two
     CTA tiles stacked along M of a cluster tile, which need the same w tiles. Each w tile of
     the ring is then TMA-loaded in halves, one by each CTA, and multicast into both CTAs'
     slots, so L2 serves it once per cluster, and a slot is free again when both CTAs have
     consumed it (cluster-wide barriers). The grid counts clusters, the tile loop cluster
     tiles. Fewer L2 reads draw less power, which is what sets the clock in a training step:
     there the GPU runs at its power limit (bench/NOTES.md).

Tiles (`Tiles`, defaults): tile_m = tile_n = 128 per WG, tile_k = 64 (64 bf16 = 128 bytes, the
128 B swizzle of both operand tiles), stages = 4, split="n" (CTA tile 128 x 256), epilogue
sub-tiles 64 x 64.
SMEM: stages * (cta_m * tile_k + tile_k * cta_n) * 2 B for the ring plus 2 WGs * 2 buffers *
epi_m * epi_n * 2 B for the epilogue: at the defaults 4 * 48 KiB + 32 KiB = 224 KiB of the 227
KiB an H100/H200 CTA may use (3 stages: 176 KiB); `Tiles.smem_bytes` computes it and larger
configurations are rejected before lowering.

Constraints (a ValueError names the one that fails): x and w 2-D, one 16-bit float dtype,
K matching; M % (cta_m * cluster) == 0, N % cta_n == 0, K % tile_k == 0 (no masking: Llama
shapes divide); tile_m a multiple of 64 (wgmma's M); tile_n a multiple of 64 and <= 256
(wgmma's N, and whole 128 B swizzle groups in the (tile_k, cta_n) w tile); tile_k a multiple
of 64; epi_m divides tile_m and is a multiple of 64 (so is a TMA store's row count of the
swizzled buffer), epi_n divides tile_n and is a multiple of 8; stages >= 1 and > in_flight;
in_flight in {0, 1}; cluster in {1, 2}; the SMEM total above <= 227 KiB.

The rank-R term (`gemm_lowrank`, R <= 64 padded to 16, 32 or 64): each compute WG TMA-loads its
(tile_m, R) rows of u and (R, tile_n) columns of v into SMEM while its K loop runs, and after
the loop one more wgmma adds u @ v into the fp32 accumulator, so the epilogue writes the
(M, N) result once. LoRA's forward is gemm_lowrank(x, w, scale * x @ a, b) and its input
gradient gemm_lowrank(dy, w, scale * dy @ b.T, a.T, w_transposed=True). The SMEM of u and v
(16 KiB at R = 16) and 4 stages leave room for one epilogue buffer per WG (LOWRANK_TILES).

`gemm_swiglu` (the MLP's frozen gate and up, jora's default targets q,v): each step's ring slot
holds one x tile and a tile of each weight, and each compute WG two (64, 128) accumulators, g
and u of the same outputs (WGs stacked along M: a 128 x 128 CTA tile of each, the work of the
default 128 x 256). The epilogue writes g and u (the backward of silu(g) * u reads them) and
then, sub-tile by sub-tile, h = silu(g) * u from the fp32 values, so the pass that reads g and
u again to form h is gone.

`lora_matmul` is the variant that reads x once: xa = x @ a accumulated by a second small wgmma
per K step from the x tiles already in SMEM (a^T's tiles ride in the TMA ring), then scaled,
rounded into SMEM and added the same way. It is correct but slower (bench/NOTES.md): x @ a is
recomputed for every N tile, R / tile_n more tensor-core work, in wgmmas of N = R.
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
    epi_buffers: int = 2  # epilogue SMEM buffers per WG: 2 fill one while TMA stores the other
    in_flight: int = 0   # wgmmas pending when a step ends (1: its slot is released a step later)
    cluster: int = 1     # CTAs of a cluster, stacked along M: each w tile is multicast to all

    @property
    def cta_m(self) -> int:
        return self.tile_m * (2 if self.split == "m" else 1)

    @property
    def cluster_m(self) -> int:   # rows of a cluster's tile: M must be a multiple
        return self.cta_m * self.cluster

    def fits(self, m: int, n: int, k: int) -> bool:
        """Whether an (M, K) @ (K, N) product lies on this tiling's grid (no masking)."""
        return m % self.cluster_m == 0 and n % self.cta_n == 0 and k % self.tile_k == 0

    @property
    def cta_n(self) -> int:
        return self.tile_n * (2 if self.split == "n" else 1)

    def smem_bytes(self, itemsize: int = 2, rank: int = 0, inloop: bool = False,
                   gated: bool = False) -> int:
        """SMEM the buffers take; rank: R of the low-rank term (0: none); inloop: a^T's
        (R, tile_k) tiles ride in the ring (lora_matmul); gated: two w tiles a step
        (gemm_swiglu)."""
        w_cols = self.cta_n * (2 if gated else 1)
        ring = self.stages * (self.cta_m + w_cols + (rank if inloop else 0)) * self.tile_k
        epilogue = 2 * self.epi_buffers * self.epi_m * self.epi_n
        lowrank = 2 * rank * (self.tile_m + self.tile_n)   # per WG: u (tile_m, R), v (R, tile_n)
        return (ring + epilogue + lowrank) * itemsize

    def __str__(self):
        s = (f"{self.tile_m}x{self.tile_n}x{self.tile_k} s{self.stages} {self.split}-split "
             f"g{self.group}{self.group_dim}")
        s += f" f{self.in_flight}" if self.in_flight else ""
        s += f" c{self.cluster}" if self.cluster != 1 else ""
        return s + (f" e{self.epi_buffers}" if self.epi_buffers != 2 else "")


# The ragged last wave's tiles (`_split`): 128 x 64 CTA tiles (two 64 x 64 WGs stacked), a
# quarter of the default 128 x 256; 6 stages (176 KiB of SMEM, 184 with R = 16).
TAIL_TILES = Tiles(tile_m=64, tile_n=64, split="m", stages=6)


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


def _smem_transforms(minor: int, itemsize: int):
    """(8, swizzle) tiling and the largest swizzle a `minor`-element row allows."""
    swizzle = plgpu.find_swizzle(minor * itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def _check(x, w, tiles: Tiles, w_transposed: bool, rank: int = 0, inloop: bool = False,
           gated: bool = False):
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
        (t.epi_buffers in (1, 2), f"epi_buffers={t.epi_buffers} must be 1 or 2"),
        (t.cluster in (1, 2), f"cluster={t.cluster} must be 1 or 2"),
        (t.smem_bytes(dt.itemsize, rank, inloop, gated) <= SMEM_LIMIT,
         f"SMEM {t.smem_bytes(dt.itemsize, rank, inloop, gated)} B (stages * (cta_m + "
         f"{'2 * ' if gated else ''}cta_n{' + R' if inloop else ''}) * tile_k + "
         f"2 * epi_buffers * epi_m * epi_n + "
         f"2 * R * (tile_m + tile_n) elements, R = {rank}) must be <= {SMEM_LIMIT} B: "
         f"fewer stages, epilogue buffers or smaller tiles"),
        (m % t.cluster_m == 0,
         f"M % cta_m{' * cluster' if t.cluster > 1 else ''} == 0 is required: M={m}, "
         f"cta_m={t.cta_m} ({t})"),
        (n % t.cta_n == 0, f"N % cta_n == 0 is required: N={n}, cta_n={t.cta_n} ({t})"),
        (k % t.tile_k == 0, f"K % tile_k == 0 is required: K={k}, tile_k={t.tile_k}"),
    ]
    for ok, message in rules:
        if not ok:
            raise ValueError(message)
    return m, k, n


def _kernel(x_gmem, w_gmem, *refs, tiles: Tiles, w_transposed: bool, block, mode=None,
            scale=1.0):
    """refs: y_gmem alone (mode None: y = x @ w), or
    mode "given":  u_gmem (M, R), v_gmem (R, N), y_gmem:  y = x @ w + u @ v;
    mode "inloop": a_gmem (R, K) (a^T), v_gmem (R, N), y_gmem:  y = x @ w + scale * (x @ a) @ v,
                   x @ a accumulated from the x tiles of the K loop;
    mode "swiglu": w2_gmem (K, N), g_gmem, u_gmem, h_gmem:  g = x @ w, u = x @ w2 and
                   h = silu(g) * u, from the two fp32 accumulators (w not transposed).
    block (row0, col0, rows, cols, own): the block of the (M, N) product this launch computes;
    each output is the whole (M, N) (own False) or the block alone (own True)."""
    inloop, gated = mode == "inloop", mode == "swiglu"
    if gated:
        w2_gmem, *outs = refs
        lr_gmem = v_gmem = None
    else:
        lr_gmem, v_gmem, *outs = refs if mode else (None, None, *refs)
    y_gmem = outs[0]
    t = tiles
    k = x_gmem.shape[1]
    row0, col0, rows, cols, own = block
    m_tiles, n_tiles, k_steps = rows // t.cta_m, cols // t.cta_n, k // t.tile_k
    c = t.cluster   # the tile loop walks cluster tiles: c CTA tiles stacked along M
    dt = y_gmem.dtype
    isz = jnp.dtype(dt).itemsize
    tr = _smem_transforms(t.tile_k, isz)    # x, w and a tiles: tile_k-element rows
    out_tr = _smem_transforms(t.epi_n, isz)

    # The pipeline sees one CTA tile's x row-block (cta_m, K) and w column-block: (K, cta_n),
    # or (cta_n, K) as stored when transposed (and a^T (R, K) whole); its grid is the K steps.
    # In a cluster the CTAs read the same w tiles: each TMA-loads its share of a tile and
    # multicasts it into every CTA's slot, so L2 serves each w tile once per cluster.
    def spec(block, index_map, shared=False):
        return plgpu.BlockSpec(block, index_map, transforms=tr, delay_release=t.in_flight,
                               collective_axes=("cluster",) if shared and c > 1 else ())
    in_specs = [spec((t.cta_m, t.tile_k), lambda kk: (0, kk)),
                spec((t.cta_n, t.tile_k), lambda kk: (0, kk), True) if w_transposed else
                spec((t.tile_k, t.cta_n), lambda kk: (kk, 0), True)]
    if inloop:
        in_specs.append(spec((lr_gmem.shape[0], t.tile_k), lambda kk: (0, kk)))
    if gated:
        in_specs.append(spec((t.tile_k, t.cta_n), lambda kk: (kk, 0), True))

    def make_pipeline(step_fn, context):
        return plgpu.emit_pipeline_warp_specialized(
            step_fn, grid=(k_steps,), memory_registers=MEMORY_REGISTERS,
            in_specs=in_specs, max_concurrent_steps=t.stages,
            wg_axis="wg", num_compute_wgs=2, compute_context=context)

    # The SMEM ring and barriers are allocated once, outside the tile loop, and shared by the
    # three WGs; allocating them per tile would synchronize the WGs at every tile boundary.
    def unused(*args, **kwargs):
        return None
    ring = make_pipeline(unused, unused).get_allocations(
        x_gmem.at[pl.ds(0, t.cta_m), :],
        w_gmem.at[pl.ds(0, t.cta_n), :] if w_transposed else w_gmem.at[:, pl.ds(0, t.cta_n)],
        *([lr_gmem] if inloop else []), *([w2_gmem.at[:, pl.ds(0, t.cta_n)]] if gated else []))

    def scoped(ring, out_smem, lora_smem):
        wg = lax.axis_index("wg")   # 0, 1: compute; 2: memory
        # This WG's half of the CTA tile, as slices of the CTA tile (rows, cols).
        if t.split == "n":
            half_rows, half_cols = pl.ds(0, t.tile_m), pl.ds(wg * t.tile_n, t.tile_n)
        else:
            half_rows, half_cols = pl.ds(wg * t.tile_m, t.tile_m), pl.ds(0, t.tile_n)
        # Two wgmma groups a step with x @ a in the loop or two w's: in_flight steps are twice
        # as many.
        pending = t.in_flight * (2 if inloop or gated else 1)

        @plgpu.nd_loop((m_tiles // c * n_tiles,), collective_axes="sm")
        def _tile(info):
            (lin,) = info.index
            minor = 0 if t.group_dim == "m" else 1
            mi, ni = plgpu.planar_snake(lin, (m_tiles // c, n_tiles), minor, t.group)
            if c > 1:
                mi = mi * c + lax.axis_index("cluster")
            # The CTA tile's rows of x (and u), columns of w (and v), and its place in y.
            cta_rows = pl.ds(row0 + mi * t.cta_m, t.cta_m)
            cta_cols = pl.ds(col0 + ni * t.cta_n, t.cta_n)
            y_rows, y_cols = ((pl.ds(mi * t.cta_m, t.cta_m), pl.ds(ni * t.cta_n, t.cta_n))
                              if own else (cta_rows, cta_cols))

            def step(_, x_smem, w_smem, *rest):
                # x_smem (cta_m, tile_k); w_smem (tile_k, cta_n), or (cta_n, tile_k)
                # transposed; in the loop a_smem (R, tile_k), gated w2_smem (tile_k, cta_n),
                # and the carry is both accumulators.
                *more, accs = rest
                acc_ref = accs[0] if inloop or gated else accs
                if w_transposed:
                    w_half = w_smem.at[half_cols, :].T if t.split == "n" else w_smem.T
                else:
                    w_half = w_smem.at[:, half_cols] if t.split == "n" else w_smem
                x_half = x_smem.at[half_rows, :]
                plgpu.wgmma(acc_ref, x_half, w_half)
                if inloop:   # xa += x_half @ a_tile: the x tile is already in SMEM
                    plgpu.wgmma(accs[1], x_half, more[0].T)
                if gated:    # u += x_half @ w2_tile, on the same x tile
                    w2 = more[0]
                    plgpu.wgmma(accs[1], x_half, w2.at[:, half_cols] if t.split == "n" else w2)
                plgpu.wgmma_wait(pending)   # slots older than in_flight steps are free
                return accs

            def epilogue(*pairs):   # (tile(rows, cols) -> that sub-tile in dt, its (M, N) output)
                sub = 0
                for tile, out in pairs:
                    sub = store(tile, out.at[y_rows, y_cols].at[half_rows, half_cols], sub)

            def result(acc_ref):   # reading the accumulator waits for the last wgmmas
                y = acc_ref[...].astype(dt)
                return (lambda r, c: y[r, c]), y_gmem

            def store(tile, y_half, sub):   # this WG's (tile_m, tile_n) -> y_half, by sub-tiles
                nbuf = t.epi_buffers
                for i in range(t.tile_m // t.epi_m):
                    for j in range(t.tile_n // t.epi_n):
                        buf = out_smem.at[wg, sub % nbuf]
                        # buf is free once at most nbuf - 1 stores are still reading SMEM
                        # (the first time: the previous tile's stores).
                        plgpu.wait_smem_to_gmem(nbuf - 1, wait_read_only=True)
                        buf[...] = tile(slice(i * t.epi_m, (i + 1) * t.epi_m),
                                        slice(j * t.epi_n, (j + 1) * t.epi_n))
                        plgpu.commit_smem()   # SMEM writes visible to the TMA unit
                        plgpu.copy_smem_to_gmem(
                            buf, y_half.at[pl.ds(i * t.epi_m, t.epi_m),
                                           pl.ds(j * t.epi_n, t.epi_n)])
                        sub += 1
                return sub

            def context(run_k_loop):
                if gated:
                    def with_gu(g_ref, u_ref):   # two (tile_m, tile_n) fp32 accumulators
                        run_k_loop((g_ref, u_ref))
                        g, u = g_ref[...], u_ref[...]

                        def h(r, c):   # silu(g) * u in fp32, rounded once, a sub-tile at a time
                            gs, us = g[r, c], u[r, c]
                            return (gs / (1.0 + jnp.exp(-gs)) * us).astype(dt)
                        # g and u first: their stores start while h is computed
                        epilogue((lambda r, c: g[r, c].astype(dt), outs[0]),
                                 (lambda r, c: u[r, c].astype(dt), outs[1]), (h, outs[2]))
                    pl.run_scoped(with_gu, *[plgpu.ACC((t.tile_m, t.tile_n), jnp.float32)] * 2)
                    return
                if not mode:
                    def with_acc(acc_ref):   # (tile_m, tile_n) fp32, in registers
                        run_k_loop(acc_ref)
                        epilogue(result(acc_ref))
                    pl.run_scoped(with_acc, plgpu.ACC((t.tile_m, t.tile_n), jnp.float32))
                    return
                u_smem, v_smem, bars = lora_smem
                # This WG's (R, tile_n) slice of v, and (given) its (tile_m, R) rows of u, land
                # while the K loop runs.
                plgpu.copy_gmem_to_smem(v_gmem.at[:, cta_cols].at[:, half_cols],
                                        v_smem.at[wg], bars.at[wg])
                if not inloop:
                    plgpu.copy_gmem_to_smem(lr_gmem.at[cta_rows, :].at[half_rows, :],
                                            u_smem.at[wg], bars.at[2 + wg])

                def with_accs(acc_ref, xa_ref):   # (tile_m, tile_n), (tile_m, R) fp32 or None
                    run_k_loop((acc_ref, xa_ref) if inloop else acc_ref)
                    if inloop:
                        # scale in fp32, one rounding of the rank-R activations to x's dtype
                        # (as XLA's unfused x @ a would round them).
                        u_smem.at[wg][...] = (scale * xa_ref[...]).astype(dt)
                        plgpu.commit_smem()   # generic-proxy writes visible to wgmma
                    else:
                        plgpu.barrier_wait(bars.at[2 + wg])
                    plgpu.barrier_wait(bars.at[wg])
                    plgpu.wgmma(acc_ref, u_smem.at[wg], v_smem.at[wg])   # acc += u @ v
                    epilogue(result(acc_ref))
                accs = [plgpu.ACC((t.tile_m, t.tile_n), jnp.float32)]
                accs.append(plgpu.ACC((t.tile_m, v_gmem.shape[0]), jnp.float32) if inloop
                            else None)
                pl.run_scoped(with_accs, *accs)

            x_rows = x_gmem.at[cta_rows, :]
            w_cols = w_gmem.at[cta_cols, :] if w_transposed else w_gmem.at[:, cta_cols]
            if inloop:
                extra = [lr_gmem]
            elif gated:
                extra = [w2_gmem.at[:, cta_cols]]
            else:
                extra = []
            make_pipeline(step, context)(x_rows, w_cols, *extra, allocations=ring)

        plgpu.wait_smem_to_gmem(0)   # every store done before the CTA exits

    lora_smem = None
    if mode in ("given", "inloop"):
        r = v_gmem.shape[0]
        # Both operands of one wgmma share a swizzle: R elements (32 B at R = 16) for u and v.
        lora_tr = _smem_transforms(r, isz)
        lora_smem = (plgpu.SMEM((2, t.tile_m, r), dt, transforms=lora_tr),
                     plgpu.SMEM((2, r, t.tile_n), dt, transforms=lora_tr),
                     plgpu.Barrier(num_barriers=4))   # v per WG, then u per WG
    pl.run_scoped(
        scoped, ring=ring,
        out_smem=plgpu.SMEM((2, t.epi_buffers, t.epi_m, t.epi_n), dt, transforms=out_tr),
        lora_smem=lora_smem, collective_axes="wg")


def _split(m: int, n: int, tiles: Tiles, tail: Tiles | None, sms: int):
    """Where to cut off a ragged last wave of `tiles`: None (one launch), or ("n", cols) /
    ("m", rows), the leading columns (rows) of y to compute in whole waves, leaving the rest
    of N (M) to a second launch in the smaller `tail` tiles.

    688 CTA tiles of 128 x 256 (M = 2048, N = 11008) on 132 SMs are 5 full waves and one of
    28 tiles, which takes as long as a full one. Cut at 41 of the 43 tile columns: 656 tiles
    (5 waves, 128 CTAs in the last), and the 2048 x 512 rest in 128 x 64 tiles, 128 CTAs that
    take about a quarter of a wave. 4,096 tiles (M = 32768, N = 4096) are 31 waves and 4
    tiles: cut at 255 of 256 tile rows (4,080 tiles), the last 128 rows in 64 CTAs. Only where
    the rest fits in one wave of tail tiles; the cut keeping more tiles in the first launch."""
    m_tiles, n_tiles = m // tiles.cta_m, n // tiles.cta_n
    total = m_tiles * n_tiles
    if tail is None or total <= sms or total % sms == 0:
        return None
    full = total // sms * sms   # the tiles of the whole waves
    best = None
    for dim, other, size, cta, tail_cta, tail_other in (
            ("n", m_tiles, n, tiles.cta_n, tail.cta_n, m // tail.cta_m),
            ("m", n_tiles, m, tiles.cta_m, tail.cta_m, n // tail.cta_n)):
        whole = full // other          # tile columns (rows) that fit in the whole waves
        if dim == "m":                 # whole clusters of rows
            whole -= whole % tiles.cluster
        lead = whole * cta
        rest_ctas = (size - lead) // tail_cta * tail_other
        if 0 < lead < size and rest_ctas <= sms and (best is None or whole * other > best[0]):
            best = (whole * other, dim, lead)
    return None if best is None else best[1:]


def _launch(operands, out_shape, dtype, *, tiles: Tiles, tail: Tiles | None, w_transposed: bool,
            num_sms, name, **mode):
    """`_kernel` in one persistent launch (a CTA per SM, at most one per output tile), or, where
    `_split` cuts off a ragged last wave, two: the leading columns (or rows) into the (M, N)
    output, the rest into its own array, which XLA's dynamic_update_slice writes into y in
    place. gemm_swiglu's mode: a tuple of its three (M, N) outputs, each cut alike."""
    m, n = out_shape
    sms = num_sms or _num_sms()
    outputs = 3 if mode.get("mode") == "swiglu" else 1

    def launch(t, block, suffix=""):   # -> a list of `outputs` arrays
        rows, cols, own = block[2:]
        out = jax.ShapeDtypeStruct((rows, cols) if own else (m, n), dtype)
        clusters = (rows // t.cta_m) * (cols // t.cta_n) // t.cluster   # cluster tiles
        cluster = dict(cluster=(t.cluster,), cluster_names=("cluster",)) if t.cluster > 1 else {}
        ys = plgpu.kernel(
            functools.partial(_kernel, tiles=t, w_transposed=bool(w_transposed),
                              block=block, **mode),
            out_type=out if outputs == 1 else (out,) * outputs,
            grid=(min(sms // t.cluster, clusters),), grid_names=("sm",), **cluster,
            num_threads=3, thread_name="wg",
            compiler_params=plgpu.CompilerParams(
                lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
            kernel_name=name + suffix,
        )(*operands)
        return [ys] if outputs == 1 else list(ys)

    cut = _split(m, n, tiles, tail, sms)
    if cut is None:
        ys = launch(tiles, (0, 0, m, n, False))
        return ys[0] if outputs == 1 else tuple(ys)
    dim, lead = cut
    # blocks (row0, col0, rows, cols, own): the first launch's and the rest's; the rest is
    # written into y by the updates (piece of y_rest -> its (row, col) in y), `pieces`.
    if dim == "n":
        first, rest = (0, 0, m, lead, False), (0, lead, m, n - lead, True)
        pieces = [(lambda r: r, (0, lead))]
    else:
        # Whole rows are one contiguous block of y, and XLA (jax 0.11.2, H200) turns a
        # dynamic_update_slice of a custom call's whole result there into a
        # DynamicSliceFusion that fails to compile ("DUS target must be a fusion
        # parameter"); two half-width updates are not contiguous.
        first, rest = (0, 0, lead, n, False), (lead, 0, m - lead, n, True)
        half = n // 2
        pieces = [(lambda r: r[:, :half], (lead, 0)), (lambda r: r[:, half:], (lead, half))]
    ys = launch(tiles, first)                # the rest of each y is left unwritten here
    rests = launch(tail, rest, "_tail")      # (rows, cols) of the rest
    for i, y_rest in enumerate(rests):
        for piece, at in pieces:
            ys[i] = lax.dynamic_update_slice(ys[i], piece(y_rest), at)
    return ys[0] if outputs == 1 else tuple(ys)


def matmul(x, w, *, w_transposed: bool = False, tiles: Tiles = Tiles(), tail="auto",
           num_sms=None):
    """x @ w (x (M, K), w (K, N)) or, with w_transposed=True, x @ w.T (w (N, K), read in
    place) in x.dtype with fp32 accumulation: one warp-specialized persistent Mosaic GPU
    kernel (see the module docstring), or two where the last wave of tiles is ragged
    (`_split`). tail: the smaller Tiles of that second launch: "auto" (TAIL_TILES where they
    divide tiles' CTA tile) or None (always one launch). num_sms: the persistent grid size
    (default: the device's SM count; fewer CTAs than tiles makes each CTA loop over several
    tiles)."""
    m, _, n = _check(x, w, tiles, w_transposed)
    tail = _check_tail(x, w, tiles, tail, w_transposed)
    return _launch((x, w), (m, n), x.dtype, tiles=tiles, tail=tail, w_transposed=w_transposed,
                   num_sms=num_sms, name="hopper_gemm")


def _check_tail(x, w, tiles: Tiles, tail, w_transposed: bool, rank: int = 0,
                gated: bool = False):
    """The tail Tiles to use, or None: "auto" takes TAIL_TILES where they divide tiles' CTA
    tile; explicit tail tiles must divide it, and pass `_check`."""
    if tail is None:
        return None

    def divides(t):
        """Whether t's CTA tile divides tiles' CTA tile."""
        return tiles.cta_m % t.cta_m == 0 and tiles.cta_n % t.cta_n == 0

    if isinstance(tail, str):
        if tail != "auto":
            raise ValueError(f"tail must be Tiles, 'auto' or None, got {tail!r}")
        return TAIL_TILES if divides(TAIL_TILES) else None
    if not divides(tail):
        raise ValueError(f"the tail CTA tile {tail.cta_m} x {tail.cta_n} must divide the CTA "
                         f"tile {tiles.cta_m} x {tiles.cta_n} ({tail})")
    _check(x, w, tail, w_transposed, rank=rank, gated=gated)
    return tail


def _padded_rank(r: int) -> int:
    """R rounded up to 16, 32 or 64: whole wgmma K steps (16) of the rank-R operand, whose
    row of R bf16 (32, 64 or 128 B) is one swizzle group."""
    return next(p for p in (16, 32, 64) if r <= p)


def _check_rank(x, u_or_a, v, n, what):
    if u_or_a.ndim != 2 or v.ndim != 2:
        raise ValueError(f"{what} must be 2-D: {u_or_a.shape} {v.shape}")
    r = v.shape[0]
    if r > 64:
        raise ValueError(f"R <= 64 is required (one swizzle group of the rank-R operand), "
                         f"got R={r}")
    if v.shape[1] != n:
        raise ValueError(f"the rank-R factor must be (R, N) = (R, {n}), got {v.shape}")
    if u_or_a.dtype != x.dtype or v.dtype != x.dtype:
        raise ValueError(f"the rank-R factors must have x's dtype {x.dtype}, got "
                         f"{u_or_a.dtype}, {v.dtype}")
    return r, _padded_rank(r)


# The rank-R SMEM (16 KiB at R = 16) and 4 stages leave room for one epilogue buffer per WG.
LOWRANK_TILES = Tiles(epi_buffers=1)


def gemm_lowrank(x, w, u, v, *, w_transposed: bool = False, tiles: Tiles = LOWRANK_TILES,
                 tail="auto", num_sms=None):
    """x @ w + u @ v (x @ w.T + u @ v with w_transposed, w (N, K) read in place) in x.dtype:
    `matmul`'s kernel, whose epilogue adds the rank-R product into the fp32 accumulator
    before the single rounding, so the (M, N) output is written once. x (M, K), u (M, R),
    v (R, N), R <= 64, all one 16-bit dtype. The (tile_m, R) rows of u and the (R, tile_n)
    columns of v are TMA-loaded while the K loop runs; one wgmma adds them at its end.
    LoRA: u = scale * x @ a (from any XLA GEMM, with dropout if any), v = b; its backward
    dx = dy @ w.T + (scale * dy @ b.T) @ a.T is the same call with w_transposed. tail and
    num_sms as in `matmul`."""
    if u.ndim != 2 or u.shape[0] != x.shape[0] or (v.ndim == 2 and u.shape[1] != v.shape[0]):
        raise ValueError(f"u must be (M, R) = ({x.shape[0]}, R) and v (R, N); got u{u.shape} "
                         f"v{v.shape}")
    n = w.shape[0] if w_transposed else w.shape[-1]
    r, rp = _check_rank(x, u, v, n, "u and v")
    m, _, n = _check(x, w, tiles, w_transposed, rank=rp)
    tail = _check_tail(x, w, tiles, tail, w_transposed, rank=rp)
    u = jnp.pad(u, ((0, 0), (0, rp - r)))   # zero columns of u and rows of v add exact zeros
    v = jnp.pad(v, ((0, rp - r), (0, 0)))
    return _launch((x, w, u, v), (m, n), x.dtype, tiles=tiles, tail=tail,
                   w_transposed=w_transposed, num_sms=num_sms, name="hopper_gemm_lowrank",
                   mode="given")


LORA_TILES = Tiles(stages=3)   # 4 stages of 128 x 256 CTA tiles leave no room for a and b


def lora_matmul(x, w, a, b, scale, *, w_transposed: bool = False, tiles: Tiles = LORA_TILES,
                num_sms=None):
    """x @ w + scale * (x @ a) @ b (x @ w.T + ... with w_transposed, w (N, K)) in x.dtype:
    `matmul`'s kernel with x @ a accumulated in the K loop (issue 20's variant that reads x
    once). x (M, K), a (K, R), b (R, N), R <= 64, all one 16-bit dtype; scale a Python number.

    Per K step each compute WG issues a second, small wgmma, xa += x_tile @ a_tile, on the x
    tile already in SMEM (a^T's (R, tile_k) tile rides in the same TMA ring); at the end of
    the K loop xa (tile_m, R) fp32 is scaled, rounded to x.dtype into SMEM and one wgmma
    adds (scale * xa) @ b_tile (R, tile_n), TMA-loaded during the K loop, into the fp32
    accumulator before the usual epilogue. The extra tensor-core work is R / tile_n of the
    main product (12.5% at R = 16, tile_n = 128): x @ a is recomputed for every N tile."""
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"a and b must be 2-D: a{a.shape} b{b.shape}")
    if a.shape[0] != x.shape[1] or a.shape[1] != b.shape[0]:
        raise ValueError(f"incompatible shapes: a must be (K, R) = ({x.shape[1]}, R) and b "
                         f"(R, N); got a{a.shape} b{b.shape}")
    n = w.shape[0] if w_transposed else w.shape[-1]
    r, rp = _check_rank(x, a, b, n, "a and b")
    m, _, n = _check(x, w, tiles, w_transposed, rank=rp, inloop=True)
    # a^T (R, K): its (R, tile_k) tiles are K-contiguous like w's, and wgmma reads them
    # transposed. Zero rows of a^T and of b add exact zeros.
    a_t = jnp.pad(a.T, ((0, rp - r), (0, 0)))
    b = jnp.pad(b, ((0, rp - r), (0, 0)))
    return _launch((x, w, a_t, b), (m, n), x.dtype, tiles=tiles, tail=None,
                   w_transposed=w_transposed,
                   num_sms=num_sms, name="hopper_lora_gemm", mode="inloop", scale=float(scale))


def lora_reference(x, w, a, b, scale, *, w_transposed: bool = False):
    """fp32 x @ w + scale * (x @ a) @ b in plain jnp (x @ a kept in fp32)."""
    xa = reference(x, a)
    return reference(x, w, w_transposed=w_transposed) + scale * jnp.dot(
        xa, b.astype(jnp.float32), precision=lax.Precision.HIGHEST)


# Gate and up in one kernel: each compute WG holds a (64, 128) accumulator of g and one of u
# for the same outputs (128 registers a thread); the WGs stack along M, so a CTA tile is
# 128 x 128 of g and of u (the work of the default 128 x 256) and each step loads one x tile
# and two w tiles, 48 KiB: 4 stages and the epilogue buffers fill 224 KiB. In clusters of two
# (module docstring, 8): both weights' tiles are multicast, a third less read from L2 a step.
SWIGLU_TILES = Tiles(tile_m=64, tile_n=128, split="m", cluster=2)


def gemm_swiglu(x, w_gate, w_up, *, tiles: Tiles = SWIGLU_TILES, tail="auto", num_sms=None):
    """(g, u, h) = (x @ w_gate, x @ w_up, silu(g) * u), each (M, N) in x.dtype: the Llama MLP's
    gate and up projections in one kernel, whose epilogue forms silu(g) * u from the fp32
    accumulators, so h costs no pass over g and u (g and u are written too: the backward of
    silu(g) * u reads them). x (M, K), w_gate and w_up (K, N), one 16-bit dtype; `matmul`'s
    kernel with a second w tile and accumulator a step (module docstring). tail and num_sms as
    in `matmul`; the tail tiles' CTA holds g and u of 128 x 64 outputs."""
    if w_up.shape != w_gate.shape or w_up.dtype != w_gate.dtype:
        raise ValueError(f"w_gate and w_up must share shape and dtype: {w_gate.shape} "
                         f"{w_gate.dtype}, {w_up.shape} {w_up.dtype}")
    m, _, n = _check(x, w_gate, tiles, False, gated=True)
    tail = _check_tail(x, w_gate, tiles, tail, False, gated=True)
    return _launch((x, w_gate, w_up), (m, n), x.dtype, tiles=tiles, tail=tail,
                   w_transposed=False, num_sms=num_sms, name="hopper_gemm_swiglu", mode="swiglu")


def swiglu_reference(x, w_gate, w_up):
    """fp32 (g, u, silu(g) * u) in plain jnp; the kernel's outputs are these rounded once."""
    g, u = reference(x, w_gate), reference(x, w_up)
    return g, u, jax.nn.silu(g) * u
