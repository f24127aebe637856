"""Fused LoRA projection for a frozen weight: y = x @ w + scale * (x @ a) @ b.

Shapes: x (M, K), w (K, N), a (K, R), b (R, N) -> y (M, N), in x's dtype; M = batch * positions.
x and w share a floating dtype (bf16 on GPU, fp32 for checks); a and b may be fp32 or bf16 and
are cast to x's dtype for the products. Every product accumulates in fp32; the rank-R
activations scale * x @ a are rounded to x's dtype once (as jora.lora_delta rounds them), and
x @ w + u @ b is formed in fp32 before the single rounding to x's dtype.

Fusion (the rank-R intermediate splits the op; LoRAFusion, arXiv 2510.00206, does the same):
  forward   u  = scale * x_lora @ a                           (M, R)  XLA, memory-bound, skinny
            y  = gemm_lowrank(x, w, u, b)                     (M, N)  the fused kernel
  backward  g  = scale * dy @ b^T                             (M, R)  XLA, skinny
            dx = gemm_lowrank(dy, w^T, g, a^T)                (M, K)  the same kernel, w read
                                                                      transposed in place
            da = x_lora^T @ g,  db = u^T @ dy                         XLA, skinny
  gemm_lowrank(p, q, u, v) = p @ q + u @ v is a GEMM whose epilogue adds the rank-R product
  to the fp32 accumulator, so the (M, N) output is written once and never re-read for the
  LoRA add. u is saved from the forward as a residual (M x R, tiny), so x is not read again
  for db. w is frozen: its cotangent is a zero array that XLA removes when nobody uses it.
  x_lora: the LoRA branch's input when it differs from x (dropout). Then the backward cannot
  fuse dx (the dropout's mask sits between g @ a^T and dx): dx = dy @ w^T, and
  g @ a^T is x_lora's own cotangent, which jax passes through the dropout.
  The alternative, x @ a inside the GEMM's K-loop, reads x once but repeats x @ a in every
  N-tile (R/bn more MMA work, 12.5% at R=16, bn=128): kernels/hopper_gemm.lora_matmul, measured
  slower (bench/NOTES.md).

Backends of gemm_lowrank:
  * Hopper (sm_90) GPUs, bf16/f16, M % 128 == 0, N % 128 == 0 and K % 64 == 0 (every Llama
    projection at any M a multiple of 128): kernels/hopper_gemm.py, a warp-specialized
    persistent Mosaic GPU GEMM (TMA, wgmma, 4-stage ring; a ragged last wave of tiles in a
    second launch) at 0.94-1.04x cuBLAS's time on the Llama shapes, u and v TMA-loaded during
    the K loop and added by one wgmma before the epilogue.
  * Anything else, and Pallas' interpreter (interpret=True, the CPU tests): the generic
    `pl.pallas_call` kernel below, which jax 0.11.2 lowers to Triton on NVIDIA GPUs. One
    program per (bm, bn) output tile, in grouped order (group_m row bands, then the next
    column band; see _tile_of) for L2 reuse; each program loops over the contraction in bk
    steps, then adds u_tile @ v_tile and stores the tile. Any M, K, N, R: partial edge tiles
    are masked (loads read zeros, stores skip what lies outside), only where needed. It runs
    at 1.4-1.7x cuBLAS's time on Hopper, which is why the Mosaic kernel exists.

Constraints and what the wrapper does about them:
  * R is zero-padded to a multiple of 16 (the smallest dot of both backends) on a and b,
    which are tiny; the zero rows and columns leave every result exact.
  * Triton tiles are powers of two >= 16. They shrink to the problem when a dimension is
    smaller than the tile (e.g. decoding, M = batch).
  * scale is a Python number.
  * Under `jax.shard_map` the kernel works on the local blocks: column-parallel (w, b split
    on N, a replicated) and row-parallel (x, w, a split on K, b replicated, psum of y outside).
    Pallas' interpreter needs shard_map(check_vma=False); for GPU it also lowers with
    check_vma=True, once the caller has cast the operands to one set of varying axes (a
    custom_vjp's rule sees them alike). Take jax.grad outside the shard_map (exact in both).
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

_MIN_DOT = 16   # Triton's smallest dot dimension; also the padding unit of R


def reference(x, w, a, b, scale):
    """The op's definition in plain jnp, with the kernel's numerics: fp32 accumulation, a and
    b cast to x's dtype, u = scale * x @ a rounded to x's dtype, output in x's dtype."""
    y = jnp.dot(x, w, preferred_element_type=jnp.float32)
    u = (scale * jnp.dot(x, a.astype(x.dtype), preferred_element_type=jnp.float32)).astype(x.dtype)
    y += jnp.dot(u, b.astype(x.dtype), preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def _mask(row_ok, col_ok, shape):
    """A `shape` mask from optional row and column validity vectors; None if both are None."""
    if row_ok is None and col_ok is None:
        return None
    ok = jnp.ones(shape, jnp.bool_)
    if row_ok is not None:
        ok &= row_ok[:, None]
    if col_ok is not None:
        ok &= col_ok[None, :]
    return ok


def _load(ref, mask):
    """ref[...]; with a mask, what lies outside reads as 0 (so it adds nothing to a dot)."""
    return ref[...] if mask is None else plt.load(ref, mask=mask, other=0)


def _tile_of(t, gm: int, gn: int, group: int):
    """Program t of the 1-D grid -> its output tile (i, j), in grouped order: programs run
    down `group` row bands before moving one column band right, so the x (or dy) rows and
    the w columns that neighbouring programs read stay in L2 (the (gm, gn) row-major order
    would stream all of x once per column band)."""
    div, rem = jax.lax.div, jax.lax.rem   # C semantics: all operands are >= 0
    per_group = group * gn
    first = div(t, per_group) * group
    rows = jnp.minimum(gm - first, group)   # the last group may be shorter
    return first + rem(rem(t, per_group), rows), div(rem(t, per_group), rows)


def _kernel(p_ref, q_ref, u_ref, v_ref, o_ref, *, bk: int, q_transposed: bool,
            m: int, n: int, c: int, grid: tuple):
    # p_ref (bm, C)    q_ref (C, bn), or (bn, C) when q_transposed    u_ref (bm, Rp)
    # v_ref (Rp, bn)   o_ref (bm, bn);   out = p @ q + u @ v over the full C.
    # m, n, c: the true sizes where a tile overhangs the array, else 0 (no mask compiled in).
    bm, bn = o_ref.shape
    rp = u_ref.shape[1]
    # fp32 operands: full-precision products (Triton's default for fp32 would be TF32).
    prec = jax.lax.Precision.HIGHEST if p_ref.dtype == jnp.float32 else None
    i, j = _tile_of(pl.program_id(0), *grid)
    row_ok = i * bm + jnp.arange(bm) < m if m else None                      # (bm,)
    col_ok = j * bn + jnp.arange(bn) < n if n else None                      # (bn,)

    def step(start, acc, k_ok):   # acc += p[:, start:start+bk] @ q[start:start+bk, :]
        ks = pl.ds(start, bk)
        p = _load(p_ref.at[:, ks], _mask(row_ok, k_ok, (bm, bk)))                 # (bm, bk)
        if q_transposed:
            q = _load(q_ref.at[:, ks], _mask(col_ok, k_ok, (bn, bk)))             # (bn, bk)
            dims = (((1,), (1,)), ((), ()))
        else:
            q = _load(q_ref.at[ks, :], _mask(k_ok, col_ok, (bk, bn)))             # (bk, bn)
            dims = (((1,), (0,)), ((), ()))
        return acc + jax.lax.dot_general(p, q, dims, precision=prec,
                                         preferred_element_type=jnp.float32)

    whole = (c or p_ref.shape[1]) // bk
    acc = jax.lax.fori_loop(0, whole, lambda i, acc: step(i * bk, acc, None),
                            jnp.zeros((bm, bn), jnp.float32))
    # The ragged last step, peeled out of the loop; a loop of one keeps its start traced (a
    # static start past C fails Pallas' static bounds check).
    if c % bk:
        acc = jax.lax.fori_loop(
            whole, whole + 1,
            lambda i, acc: step(i * bk, acc, i * bk + jnp.arange(bk) < c), acc)

    u = _load(u_ref, _mask(row_ok, None, (bm, rp)))                                 # (bm, Rp)
    v = _load(v_ref, _mask(None, col_ok, (rp, bn)))                                 # (Rp, bn)
    acc += jnp.dot(u, v, precision=prec, preferred_element_type=jnp.float32)
    out_mask = _mask(row_ok, col_ok, (bm, bn))
    if out_mask is None:
        o_ref[...] = acc.astype(o_ref.dtype)
    else:
        plt.store(o_ref, acc.astype(o_ref.dtype), mask=out_mask)


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Output tile (bm, bn), contraction step bk, and Triton's launch parameters.

    The defaults are the fastest of the tilings `python -m kernels.bench --sweep` tries, at all
    three Llama-2-7B projections in bf16 on Hopper: a 64 x 256 tile
    over 8 warps holds 64 fp32 accumulators a thread (128 x 128 over 4 warps: 128), each loaded
    x tile serves 256 columns, and 4 stages keep the loads ahead of the MMAs.
    """
    bm: int = 64
    bn: int = 256
    bk: int = 64
    num_warps: int = 8
    num_stages: int = 4
    group_m: int = 8   # row bands per group of the grouped program order (L2 reuse)

    def __post_init__(self):
        for name in ("bm", "bn", "bk"):
            v = getattr(self, name)
            if v < _MIN_DOT or v & (v - 1):
                raise ValueError(f"Tiles.{name}={v} must be a power of two >= {_MIN_DOT}")
        if self.group_m < 1:
            raise ValueError(f"Tiles.group_m={self.group_m} must be >= 1")

    @staticmethod
    def default(dtype) -> "Tiles":
        """bf16/fp16: the defaults; fp32 (twice the bytes per element): a halved bk."""
        return Tiles() if jnp.dtype(dtype).itemsize <= 2 else Tiles(bk=32)


def _fit(tile: int, size: int) -> int:
    """The tile, shrunk to the smallest power of two >= size (and >= 16) if size is smaller."""
    return min(tile, max(_MIN_DOT, pl.next_power_of_2(size)))


def _out_type(shape, dtype, like):
    """Output type; under shard_map(check_vma=True) it must carry the operands' varying axes."""
    mat = getattr(jax.typeof(like), "manual_axis_type", None)
    if mat is not None and getattr(mat, "varying", None):
        return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)
    return jax.ShapeDtypeStruct(shape, dtype)


HOPPER = ("H100", "H200", "H800", "H20", "GH200")


def on_hopper() -> bool:
    """Whether the default device is a Hopper GPU (sm_90), where kernels/hopper_gemm.py runs."""
    return jax.default_backend() == "gpu" and any(h in jax.devices()[0].device_kind
                                                  for h in HOPPER)


def _hopper_tiles(m: int, c: int, n: int, rp: int, dtype):
    """The Mosaic GPU kernel's tiles for p (M, C) @ q -> (M, N) with rank Rp, or None where it
    does not apply (not a Hopper GPU, not 16-bit, Rp > 64, or M, N, C off its tile grid)."""
    if not on_hopper() or jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16) or rp > 64:
        return None
    from kernels import hopper_gemm   # Mosaic GPU: imported only where it can run
    for tiles in (hopper_gemm.LOWRANK_TILES,   # 128 x 256 CTA tiles, then 256 x 128
                  dataclasses.replace(hopper_gemm.LOWRANK_TILES, split="m")):
        if tiles.fits(m, n, c):
            return tiles
    return None


def fits_hopper(x, w, a) -> bool:
    """Whether lora_matmul(x, w, a, ...) runs both its GEMMs (y, and dx in the backward) as the
    Mosaic GPU kernel, not the Triton one: every Llama projection on a Hopper GPU at M a
    multiple of 128."""
    m, k = x.shape
    n = w.shape[1]
    rp = a.shape[1] + -a.shape[1] % _MIN_DOT   # R padded to a multiple of 16
    return (_hopper_tiles(m, k, n, rp, x.dtype) is not None
            and _hopper_tiles(m, n, k, rp, x.dtype) is not None)


def gemm_lowrank(p, q, u, v, *, q_transposed: bool = False, tiles: Tiles | None = None,
                 interpret: bool = False):
    """p (M, C) @ q (C, N) + u (M, Rp) @ v (Rp, N) -> (M, N) in p's dtype, fp32 accumulation.

    q_transposed: q is stored (N, C) and read transposed in place. u, v must already be in
    p's dtype with Rp a multiple of 16 (lora_matmul pads them). On a Hopper GPU, where the
    shapes fit, the Mosaic GPU kernel (kernels/hopper_gemm.py); else the Triton kernel with
    `tiles` (None: Tiles.default), or Pallas' interpreter with interpret=True."""
    n = q.shape[0] if q_transposed else q.shape[1]
    hopper = None if interpret else _hopper_tiles(*p.shape, n, u.shape[1], p.dtype)
    if hopper is not None:
        from kernels import hopper_gemm
        return hopper_gemm.gemm_lowrank(p, q, u, v, w_transposed=q_transposed, tiles=hopper)
    return _triton_gemm_lowrank(p, q, u, v, q_transposed=q_transposed,
                                tiles=Tiles.default(p.dtype) if tiles is None else tiles,
                                interpret=interpret)


@functools.partial(jax.jit, static_argnames=("q_transposed", "tiles", "interpret"))
def _triton_gemm_lowrank(p, q, u, v, *, q_transposed: bool, tiles: Tiles, interpret: bool):
    """gemm_lowrank as one generic `pl.pallas_call` (Triton on a GPU)."""
    M, C = p.shape
    Rp = u.shape[1]
    N = q.shape[0] if q_transposed else q.shape[1]
    q_c = q.shape[1] if q_transposed else q.shape[0]   # q's contraction dimension
    if q_c != C or u.shape[0] != M or v.shape != (Rp, N):
        raise ValueError(f"shapes do not chain: p {p.shape} q {q.shape} (q_transposed="
                         f"{q_transposed}) u {u.shape} v {v.shape}")
    if Rp % _MIN_DOT or not (p.dtype == q.dtype == u.dtype == v.dtype):
        raise ValueError(f"u, v need R a multiple of {_MIN_DOT} and one dtype with p, q; got "
                         f"p {p.dtype} q {q.dtype} u {u.shape} {u.dtype} v {v.dtype}")
    bm, bn, bk = _fit(tiles.bm, M), _fit(tiles.bn, N), _fit(tiles.bk, C)
    gm, gn = pl.cdiv(M, bm), pl.cdiv(N, bn)
    grid = (gm, gn, min(tiles.group_m, gm))

    def i_of(t):
        """The row block index of program t."""
        return _tile_of(t, *grid)[0]

    def j_of(t):
        """The column block index of program t."""
        return _tile_of(t, *grid)[1]

    q_spec = (pl.BlockSpec((bn, C), lambda t: (j_of(t), 0)) if q_transposed else
              pl.BlockSpec((C, bn), lambda t: (0, j_of(t))))
    kernel = functools.partial(
        _kernel, bk=bk, q_transposed=q_transposed,
        m=M if M % bm else 0, n=N if N % bn else 0, c=C if C % bk else 0, grid=grid)
    return pl.pallas_call(
        kernel,
        grid=(gm * gn,),
        in_specs=[pl.BlockSpec((bm, C), lambda t: (i_of(t), 0)),   # a row band of p
                  q_spec,                                            # a column band of q
                  pl.BlockSpec((bm, Rp), lambda t: (i_of(t), 0)),  # the same rows of u
                  pl.BlockSpec((Rp, bn), lambda t: (0, j_of(t)))],  # the same columns of v
        out_specs=pl.BlockSpec((bm, bn), lambda t: (i_of(t), j_of(t))),
        out_shape=_out_type((M, N), p.dtype, p),
        compiler_params=plt.CompilerParams(num_warps=tiles.num_warps,
                                           num_stages=tiles.num_stages),
        interpret=interpret,
        name="lora_gemm_lowrank",
    )(p, q, u, v)


def _pad_rank(a, b, dtype):
    """a (K, R), b (R, N) -> (K, Rp), (Rp, N) in `dtype`, Rp = R rounded up to 16 with zeros."""
    extra = -a.shape[1] % _MIN_DOT
    return (jnp.pad(a.astype(dtype), ((0, 0), (0, extra))),
            jnp.pad(b.astype(dtype), ((0, extra), (0, 0))))


def _mm(p, q):
    """An XLA matmul with fp32 accumulation and an fp32 result."""
    return jnp.dot(p, q, preferred_element_type=jnp.float32)


def _check(x, w, a, b, scale):
    if x.ndim != 2 or w.ndim != 2 or a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"lora_matmul takes 2-D operands (reshape (B, T, K) to (B*T, K)); "
                         f"got x {x.shape} w {w.shape} a {a.shape} b {b.shape}")
    K, N, R = x.shape[1], w.shape[1], a.shape[1]
    if w.shape[0] != K or a.shape[0] != K or b.shape != (R, N):
        raise ValueError(f"shapes do not chain: x {x.shape} (M, K), w {w.shape} (K, N), "
                         f"a {a.shape} (K, R), b {b.shape} (R, N)")
    if x.dtype != w.dtype or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x and w must share one floating dtype; got {x.dtype} and {w.dtype}")
    if isinstance(scale, jax.Array) or not isinstance(scale, (int, float, np.number)):
        raise ValueError(f"scale must be a Python number (it is compiled in); got {type(scale)}")


def lora_matmul(x, w, a, b, scale: float, *, x_lora=None, tiles: Tiles | None = None,
                interpret: bool = False):
    """y = x @ w + scale * (x_lora @ a) @ b as Pallas kernels; differentiable in x, a, b and
    x_lora. x_lora: the LoRA branch's input (x with dropout applied), None: x itself.

    x (M, K) and w (K, N) of one floating dtype, a (K, R), b (R, N) of any floating dtype;
    returns (M, N) in x's dtype. w is treated as frozen (its gradient is zero).
    tiles: the Triton kernel's (None: Tiles.default(x.dtype)); the Hopper kernel picks its own.
    interpret: run Pallas' interpreter (CPU).
    """
    _check(x, w, a, b, scale)
    if x_lora is not None and (x_lora.shape != x.shape or x_lora.dtype != x.dtype):
        raise ValueError(f"x_lora must be like x {x.shape} {x.dtype}, got {x_lora.shape} "
                         f"{x_lora.dtype}")
    tiles = Tiles.default(x.dtype) if tiles is None else tiles
    xl = x if x_lora is None else x_lora
    return _lora_matmul(x, w, a, b, xl, float(scale), x_lora is not None, tiles, bool(interpret))


def _lora_forward(x, w, a, b, xl, scale, tiles, interpret):
    """y and u = scale * xl @ a (M, Rp), from which the backward starts."""
    ap, bp = _pad_rank(a, b, x.dtype)
    u = (scale * _mm(xl, ap)).astype(x.dtype)                             # (M, Rp)
    return gemm_lowrank(x, w, u, bp, tiles=tiles, interpret=interpret), u


def _lora_grads(a, b, xl, u, dy, scale):
    """g = scale * dy @ b^T (M, Rp), and the fp32 sums over positions da, db."""
    ap, bp = _pad_rank(a, b, dy.dtype)
    g = (scale * _mm(dy, bp.T)).astype(dy.dtype)                            # (M, Rp)
    R = a.shape[1]
    da = _mm(xl.T, g[:, :R])                                                # (K, R)
    db = _mm(u[:, :R].T, dy)                                                # (R, N)
    return g, ap, da.astype(a.dtype), db.astype(b.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _lora_matmul(x, w, a, b, xl, scale, apart, tiles, interpret):
    """apart=False: xl is x itself (no dropout), so dx is one fused GEMM."""
    return _lora_forward(x, w, a, b, xl, scale, tiles, interpret)[0]


def _fwd(x, w, a, b, xl, scale, apart, tiles, interpret):
    y, u = _lora_forward(x, w, a, b, xl, scale, tiles, interpret)
    return y, (w, a, b, xl, u)


def _bwd(scale, apart, tiles, interpret, residuals, dy):
    w, a, b, xl, u = residuals
    dy = dy.astype(xl.dtype)
    g, ap, da, db = _lora_grads(a, b, xl, u, dy, scale)
    if not apart:   # dx = dy @ w^T + g @ a^T in one kernel; xl's cotangent is in it
        dx = gemm_lowrank(dy, w, g, ap.T, q_transposed=True, tiles=tiles,
                          interpret=interpret)                              # (M, K)
        return dx, jnp.zeros_like(w), da, db, None
    # The dropout mask lies between g @ a^T and x: xl's cotangent goes back through it.
    return jnp.dot(dy, w.T), jnp.zeros_like(w), da, db, jnp.dot(g, ap.T)   # (M, K) both


_lora_matmul.defvjp(_fwd, _bwd)
