"""Fused LoRA projection for a frozen weight: y = x @ w + scale * (x @ a) @ b.

Shapes: x (M, K), w (K, N), a (K, R), b (R, N) -> y (M, N); M = batch * positions.
x and w share a dtype (bf16 on GPU); a and b may be fp32 (they are cast to x's dtype for the
products, accumulating in fp32).

One kernel does all the heavy work, `matmul_lowrank`: a tiled GEMM whose epilogue adds the rank-R
product, out = x @ w + scale * u @ v, so the (M, N) output is written once instead of being
read and written again by a separate add. It serves both directions:
  forward    y  = matmul_lowrank(x,  w,   u = x @ a,    v = b)
  backward   dx = matmul_lowrank(dy, w^T, u = dy @ b^T, v = a^T)   (w read transposed in place)
The skinny products x @ a (M, R), dy @ b^T (M, R) and the LoRA gradients
da = scale * x^T (dy b^T) (K, R), db = scale * (x a)^T dy (R, N) stay XLA matmuls: they are
memory-bound and XLA reads x / dy once for them. w is frozen: its cotangent is zero.

Backend: `pl.pallas_call` (lowered to Triton on GPU in jax 0.11.2, run by the interpreter on
CPU with interpret=True). Grid (M / bm, N / bn); each program owns a (bm, bn) output tile and
loops over K in bk steps, accumulating in fp32. Any M, N, K and R are accepted: operands are
zero-padded to the tiles (and R to 16, Triton's smallest dot), which leaves results exact.
Not yet measured on a GPU: `python -m kernels.bench` does that; jora.py keeps the XLA path by
default until the measurements say otherwise. This file imports nothing from jora.py.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


def reference(x, w, a, b, scale):
    """The op's definition in plain jnp (fp32 accumulation, output in x's dtype)."""
    y = jnp.dot(x, w, preferred_element_type=jnp.float32)
    xa = jnp.dot(x, a.astype(x.dtype), preferred_element_type=jnp.float32)
    y += scale * jnp.dot(xa.astype(x.dtype), b.astype(x.dtype), preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class Tiles:
    bm: int = 128   # output rows per program
    bn: int = 128   # output columns per program
    bk: int = 64    # contraction step


def _kernel(x_ref, w_ref, u_ref, v_ref, o_ref, *, scale: float, bk: int, transpose_w: bool):
    # x_ref (bm, K)   w_ref (K, bn), or (bn, K) read transposed   u_ref (bm, R)   v_ref (R, bn)
    def step(i, acc):
        ks = pl.ds(i * bk, bk)
        w = w_ref[:, ks].T if transpose_w else w_ref[ks, :]                # (bk, bn)
        return acc + jnp.dot(x_ref[:, ks], w, preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, x_ref.shape[1] // bk, step,
                            jnp.zeros(o_ref.shape, jnp.float32))
    acc += scale * jnp.dot(u_ref[...], v_ref[...], preferred_element_type=jnp.float32)
    o_ref[...] = acc.astype(o_ref.dtype)


def _pad(x, multiples):
    return jnp.pad(x, [(0, -n % m) for n, m in zip(x.shape, multiples)])


@functools.partial(jax.jit, static_argnames=("scale", "transpose_w", "tiles", "interpret"))
def matmul_lowrank(x, w, u, v, scale: float, transpose_w: bool = False, tiles: Tiles = Tiles(),
                   interpret: bool = False):
    """x (M, K) @ w (K, N) [w (N, K) used transposed] + scale * u (M, R) @ v (R, N) -> (M, N)."""
    (M, K), R = x.shape, u.shape[1]
    N = w.shape[0] if transpose_w else w.shape[1]
    if w.shape[1 if transpose_w else 0] != K or v.shape != (R, N) or u.shape[0] != M:
        raise ValueError(f"shapes do not chain: x {x.shape} w {w.shape} (transpose_w="
                         f"{transpose_w}) u {u.shape} v {v.shape}")
    bm, bn, bk = tiles.bm, tiles.bn, tiles.bk
    xp, up = _pad(x, (bm, bk)), _pad(u.astype(x.dtype), (bm, 16))
    wp = _pad(w, (bn, bk) if transpose_w else (bk, bn))
    vp = _pad(v.astype(x.dtype), (16, bn))
    Mp, Kp, Rp, Np = xp.shape[0], xp.shape[1], up.shape[1], vp.shape[1]
    w_spec = (pl.BlockSpec((bn, Kp), lambda i, j: (j, 0)) if transpose_w else
              pl.BlockSpec((Kp, bn), lambda i, j: (0, j)))
    out = pl.pallas_call(
        functools.partial(_kernel, scale=scale, bk=bk, transpose_w=transpose_w),
        grid=(Mp // bm, Np // bn),
        in_specs=[pl.BlockSpec((bm, Kp), lambda i, j: (i, 0)),     # a row band of x
                  w_spec,                                            # a column band of w
                  pl.BlockSpec((bm, Rp), lambda i, j: (i, 0)),     # the matching rows of u
                  pl.BlockSpec((Rp, bn), lambda i, j: (0, j))],    # the matching columns of v
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((Mp, Np), x.dtype),
        interpret=interpret,
    )(xp, wp, up, vp)
    return out[:M, :N]


def _mm(a, b):   # an XLA matmul in a's dtype with fp32 accumulation, fp32 result
    return jnp.dot(a, b.astype(a.dtype), preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def lora_matmul(x, w, a, b, scale: float, tiles: Tiles = Tiles(), interpret: bool = False):
    """y = x @ w + scale * (x @ a) @ b, fused; differentiable in x, a and b (w is frozen)."""
    return _forward(x, w, a, b, scale, tiles, interpret)[0]


def _forward(x, w, a, b, scale, tiles, interpret):
    xa = _mm(x, a).astype(x.dtype)                                            # (M, R)
    return matmul_lowrank(x, w, xa, b, scale, False, tiles, interpret), (x, w, a, b, xa)


def _backward(scale, tiles, interpret, residuals, dy):
    x, w, a, b, xa = residuals
    dyb = _mm(dy, b.T)                                                        # (M, R) fp32
    dx = matmul_lowrank(dy, w, dyb.astype(dy.dtype), a.T, scale, True, tiles, interpret)
    da = scale * _mm(x.T, dyb.astype(x.dtype))                                # (K, R)
    db = scale * _mm(xa.T, dy)                                                # (R, N)
    return dx.astype(x.dtype), jnp.zeros_like(w), da.astype(a.dtype), db.astype(b.dtype)


lora_matmul.defvjp(_forward, _backward)
