"""Row-wise float8 quantization in one kernel, alone or after the MLP's gate (SwiGLU):

  quantize_rows(x, c)                  x (M, C) [* c (C,)] -> q (M, C), s (M,)
  swiglu_rows(g, u, a, cg, cu)         h = silu(g a cg) * (u a cu)  -> q, s of h
  swiglu_grad_rows(g, u, a, cg, cu, dh, b)
                                       dG, dU of that h for the cotangent dh b
                                       -> q, s of dG * cg and of dU * cu

Every q is float8 (e4m3 by default) with one fp32 scale s per row, x ~ q * s, mapping the
row's largest |x| to the format's largest finite value (448). a, b (M,) are row scales and
cg, cu (C,) column scales, as an FP8 GEMM leaves them: g = its raw output, g a cg the true one.

Why kernels. XLA quantizes a row in two passes: a reduction for the row's amax, then an
elementwise pass that reads the row again from HBM to divide and round. Here a program owns
one row and reads it once: whole where its inputs and outputs fit in registers (WHOLE values),
else in blocks, keeping each block's fp32 results in registers until the row's amax is known.
Only a row with more results than that (KEEP) is read twice: for the amax, asking the cache to
keep it, then for the division. The SwiGLU kernels also do the gate's own arithmetic on the
way, so its (M, C) results never reach HBM in bf16: what the next FP8 GEMM needs is their
float8 rows.

Numerics: fp32 throughout, one rounding to the float8 format at the end; values are clipped to
the largest finite value first, since e4m3fn has no infinity. Each kernel has a `*_reference`
in plain jnp. On an NVIDIA GPU Pallas lowers the kernels to Triton; `interpret=True` runs them
in Pallas' interpreter (the CPU tests).
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from kernels.swiglu import grads32   # (dg, du) of silu(g) * u, fp32

E4M3 = jnp.float8_e4m3fn
WHOLE = 16384   # the most row-long values (inputs and outputs) a program reads at once
BLOCK = 2048    # else the columns it reads at a time, with 16 warps
KEEP = 24576    # and the most fp32 results (a row's outputs) it keeps while it reads them


def scale_of(amax, top: float):   # the scale mapping amax to the top; 1 for an all-zero row
    return jnp.where(amax > 0, amax / top, 1.0)


def _quantized(x, dtype):   # x (M, C) fp32 -> (q, s (M,)), each row its own scale
    top = float(jnp.finfo(dtype).max)
    s = scale_of(jnp.max(jnp.abs(x), axis=-1), top)
    return jnp.clip(x / s[:, None], -top, top).astype(dtype), s


def _gate(g, u):   # fp32 -> silu(g) * u
    return g * jax.nn.sigmoid(g) * u


def _true(g, u, a, cg, cu):   # the GEMM's raw outputs (M, C) with their scales -> fp32 g, u
    f32 = jnp.float32
    a = a.astype(f32)[:, None]
    return g.astype(f32) * a * cg.astype(f32), u.astype(f32) * a * cu.astype(f32)


def reference(x, c=None, dtype=E4M3):
    """quantize_rows in plain jnp: (q (M, C) dtype, s (M,) fp32)."""
    x = x.astype(jnp.float32)
    return _quantized(x if c is None else x * c.astype(jnp.float32), dtype)


def swiglu_reference(g, u, a, cg, cu, dtype=E4M3):
    """swiglu_rows in plain jnp: (q, s) of silu(g a cg) * (u a cu)."""
    return _quantized(_gate(*_true(g, u, a, cg, cu)), dtype)


def swiglu_grad_reference(g, u, a, cg, cu, dh, b, dtype=E4M3):
    """swiglu_grad_rows in plain jnp: (qg, sg, qu, su), the rows of dG * cg and dU * cu."""
    dh = dh.astype(jnp.float32) * b.astype(jnp.float32)[:, None]
    dg, du = grads32(*_true(g, u, a, cg, cu), dh)
    return (*_quantized(dg * cg, dtype), *_quantized(du * cu, dtype))


def _row_kernel(*refs, n_in: int, values, block: int, top: float, keep: int):
    """One row: refs = n_in inputs (a (C,) row, or a () row scale, or a (C,) column scale),
    then a (q (C,), s ()) pair per output. values(*inputs) -> the outputs' fp32 values, for
    the columns loaded. Masked columns past C load as 0, which every values() maps to 0.
    keep: where the outputs' values fit in `keep` (or the row is one block), read the row
    once, keeping every block's values (a Python loop, so that the loads of all blocks are in
    flight together); else twice, in a loop."""
    ins, outs = refs[:n_in], refs[n_in:]
    outs = list(zip(outs[::2], outs[1::2]))
    n = max(r.shape[0] for r in ins if r.shape)
    steps = pl.cdiv(n, block)
    once = steps == 1 or len(outs) * steps * block <= keep

    def computed(i, evict):   # columns [i * block, (i + 1) * block): (idx, mask, values)
        idx = i * block + jnp.arange(block)
        mask = idx < n
        loaded = [r[...] if not r.shape else
                  plt.load(r.at[idx], mask=mask, other=0.0, eviction_policy=evict)
                  for r in ins]
        return idx, mask, values(*(x.astype(jnp.float32) for x in loaded))

    def write(idx, mask, vals, scales):
        for (q_ref, _), v, s in zip(outs, vals, scales):
            plt.store(q_ref.at[idx], jnp.clip(v / s, -top, top).astype(q_ref.dtype), mask=mask)

    def set_scales(amaxes):
        scales = [scale_of(m, top) for m in amaxes]
        for (_, s_ref), s in zip(outs, scales):
            s_ref[...] = s
        return scales

    if once:
        blocks = [computed(i, "evict_first") for i in range(steps)]
        per_output = zip(*(vals for *_, vals in blocks))   # each output's values, block by block
        scales = set_scales([functools.reduce(jnp.maximum, [jnp.max(jnp.abs(v)) for v in vs])
                             for vs in per_output])
        for idx, mask, vals in blocks:
            write(idx, mask, vals, scales)
        return

    def amax_of(i, ms):
        return tuple(jnp.maximum(m, jnp.abs(v)) for m, v in zip(ms, computed(i, "evict_last")[2]))

    zeros = tuple(jnp.zeros(block, jnp.float32) for _ in outs)
    scales = set_scales([m.max() for m in jax.lax.fori_loop(0, steps, amax_of, zeros)])

    def write_block(i, carry):
        write(*computed(i, "evict_first"), scales)
        return carry

    jax.lax.fori_loop(0, steps, write_block, 0)


def _call(values, args, axes, n_out: int, *, dtype, block, keep, interpret, name):
    """Run _row_kernel over the rows: args, each (M, C) row-split (axis 0), (M,) row-split
    (axis 0) or (C,) shared (None) as `axes` says -> q (M, C), s (M,) for each of n_out
    outputs, in one flat tuple."""
    n = args[0].shape[1]
    whole = max(16, pl.next_power_of_2(n))
    held = (sum(axis == 0 for x, axis in zip(args, axes) if x.ndim == 2) + n_out) * whole
    if block is None:   # a row whole where its inputs and outputs fit in registers
        block = whole if held <= WHOLE else BLOCK
    if block < 16 or block & (block - 1):
        raise ValueError(f"block={block} must be a power of two >= 16 (a Triton block)")
    block = min(block, whole)
    warp_values = 1024 if block == whole else 128   # a warp's columns: 16 warps for a block
    row = pl.pallas_call(
        functools.partial(_row_kernel, n_in=len(args), values=values, block=block,
                          top=float(jnp.finfo(dtype).max), keep=KEEP if keep is None else keep),
        out_shape=[jax.ShapeDtypeStruct((n,), dtype), jax.ShapeDtypeStruct((), jnp.float32)]
        * n_out,
        compiler_params=plt.CompilerParams(num_warps=min(16, max(4, block // warp_values)),
                                           num_stages=1),
        interpret=interpret,
        name=name,
    )
    return tuple(jax.vmap(row, in_axes=axes)(*args))


def _check(x, name: str, shape):
    if x.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {x.shape}")


@functools.partial(jax.jit, static_argnames=("dtype", "block", "keep", "interpret"))
def quantize_rows(x, c=None, *, dtype=E4M3, block: int | None = None, keep: int | None = None,
                  interpret: bool = False):
    """(q (M, C) dtype, s (M,) fp32) for x (M, C) of any float dtype and c (C,) or None: as
    `reference`. block: columns a program reads at a time (default: the whole row up to WHOLE,
    else BLOCK). keep: the most fp32 results a program keeps to read its row once (default
    KEEP; 0: every row of more than one block is read twice)."""
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D (rows, columns), got {x.shape}")
    kw = dict(dtype=dtype, block=block, keep=keep, interpret=interpret, name="quantize_rows")
    if c is None:
        return _call(lambda x: (x,), (x,), (0,), 1, **kw)
    _check(c, "c", x.shape[1:])
    return _call(lambda x, c: (x * c,), (x, c), (0, None), 1, **kw)


@functools.partial(jax.jit, static_argnames=("dtype", "block", "keep", "interpret"))
def swiglu_rows(g, u, a, cg, cu, *, dtype=E4M3, block: int | None = None, keep: int | None = None,
                interpret: bool = False):
    """(q, s) of h = silu(g a cg) * (u a cu): g, u (M, C) any float dtype, a (M,), cg, cu (C,);
    as `swiglu_reference`. block, keep: as quantize_rows'."""
    m, n = g.shape
    for x, name, shape in ((u, "u", (m, n)), (a, "a", (m,)), (cg, "cg", (n,)), (cu, "cu", (n,))):
        _check(x, name, shape)

    def values(g, u, a, cg, cu):
        return (_gate(g * a * cg, u * a * cu),)

    return _call(values, (g, u, a, cg, cu), (0, 0, 0, None, None), 1, dtype=dtype, block=block,
                 keep=keep, interpret=interpret, name="swiglu_rows")


@functools.partial(jax.jit, static_argnames=("dtype", "block", "keep", "interpret"))
def swiglu_grad_rows(g, u, a, cg, cu, dh, b, *, dtype=E4M3, block: int | None = None,
                     keep: int | None = None, interpret: bool = False):
    """(qg, sg, qu, su): the rows of dG * cg and dU * cu, where dG, dU are the gradients of
    h = silu(G) * U, G = g a cg, U = u a cu, for the cotangent dh b (dh (M, C), b (M,)); as
    `swiglu_grad_reference`. What the gate and up projections' FP8 input gradients need.
    block, keep: as quantize_rows'."""
    m, n = g.shape
    for x, name, shape in ((u, "u", (m, n)), (a, "a", (m,)), (cg, "cg", (n,)),
                           (cu, "cu", (n,)), (dh, "dh", (m, n)), (b, "b", (m,))):
        _check(x, name, shape)

    def values(g, u, a, cg, cu, dh, b):
        dg, du = grads32(g * a * cg, u * a * cu, dh * b)
        return dg * cg, du * cu

    return _call(values, (g, u, a, cg, cu, dh, b), (0, 0, 0, None, None, 0, 0), 2, dtype=dtype,
                 block=block, keep=keep, interpret=interpret, name="swiglu_grad_rows")
