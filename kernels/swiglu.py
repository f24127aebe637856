"""The MLP's gate, h = silu(g) * u, with its backward in one pass over (T, F); and the frozen
gate and up projections with the gate as one op (`gate_up`, one GEMM kernel on Hopper GPUs).

Shapes: g, u (..., F) -> h (..., F), one floating dtype (bf16 on GPU); the backward takes dh
(..., F) and returns dg, du like g.

Why a kernel. Autodiff's backward of silu(g) * u is two elementwise expressions that read the
same inputs: du = silu(g) * dh and dg = dh * u * s * (1 + g (1 - s)), s = sigmoid(g). XLA emits
them as two passes (reading g and dh, then g, u and dh, each recomputing the sigmoid): seven
(T, F) tensors of memory traffic, 3.8% of a Llama-2-7B q,v step at 2,048 positions, every pass
at HBM speed. Written out as a jnp custom_vjp they stay two passes (XLA does not merge them
into one multi-output fusion). `swiglu_grads` is that backward as one Pallas kernel: it reads g,
u and dh once and writes dg and du, five tensors. `swiglu`'s forward stays XLA's (one pass,
minimal unless fused into the gate/up GEMMs: `gate_up` does that where they have no LoRA).

Where it loses: with dropout on the down projection's adapter, dh is a sum (the frozen path's
gradient and the masked adapter's) that XLA fuses into its own two passes; the kernel needs dh
whole, so XLA first sums it in a pass of its own (three more tensors), which costs what the
kernel saves. jora.decoder_layer keeps XLA's backward there.

Numerics: the sigmoid and both products in fp32, each output rounded once to the input dtype
(`reference` is the same formula in plain jnp).

Layout: the kernel sees the tensors as flat vectors (a free reshape of contiguous arrays) cut
into blocks of `block` elements; a last partial block is masked. On an NVIDIA GPU Pallas
lowers it to Triton; `interpret=True` runs Pallas' interpreter (the CPU tests).
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

BLOCK = 1024   # elements a program (4 warps, 8 a thread): the fastest of 1,024-8,192 on an H200
MAX_ELEMENTS = 2**31 - 1   # the kernel's flat offsets are int32; `swiglu` falls back to XLA past it


def grads32(g, u, dh):
    """(dg, du) of h = silu(g) * u in fp32, from fp32 g, u, dh."""
    s = jax.nn.sigmoid(g)
    du = dh * g * s
    dg = dh * u * s * (1 + g * (1 - s))
    return dg, du


def reference(g, u, dh):
    """The kernel's result in plain jnp: fp32 arithmetic, outputs rounded to g's dtype."""
    f32 = jnp.float32
    dg, du = grads32(g.astype(f32), u.astype(f32), dh.astype(f32))
    return dg.astype(g.dtype), du.astype(g.dtype)


def _kernel(g_ref, u_ref, dh_ref, dg_ref, du_ref, *, n: int):
    # every ref (block,); n: the true length where the last block overhangs it, else 0
    block = g_ref.shape[0]
    mask = pl.program_id(0) * block + jnp.arange(block) < n if n else None

    def load(r):
        """The block of r; with a mask, what lies past n reads as 0."""
        if mask is None:
            return r[...]
        return plt.load(r, mask=mask, other=0)

    f32 = jnp.float32
    dg, du = grads32(load(g_ref).astype(f32), load(u_ref).astype(f32), load(dh_ref).astype(f32))
    for ref, val in ((dg_ref, dg), (du_ref, du)):
        if mask is None:
            ref[...] = val.astype(ref.dtype)
        else:
            plt.store(ref, val.astype(ref.dtype), mask=mask)


@functools.partial(jax.jit, static_argnames=("block", "interpret"))
def swiglu_grads(g, u, dh, *, block: int = BLOCK, interpret: bool = False):
    """(dg, du) of h = silu(g) * u for the cotangent dh, in one pass; all (..., F), one dtype."""
    if not (g.shape == u.shape == dh.shape) or not (g.dtype == u.dtype == dh.dtype):
        raise ValueError(f"g, u and dh must share shape and dtype: g {g.shape} {g.dtype}, "
                         f"u {u.shape} {u.dtype}, dh {dh.shape} {dh.dtype}")
    if block < 16 or block & (block - 1):
        raise ValueError(f"block={block} must be a power of two >= 16 (a Triton block)")
    n = g.size
    if n + block > MAX_ELEMENTS:
        raise ValueError(f"g {g.shape} has {n} elements: past {MAX_ELEMENTS - block}, the "
                         f"kernel's int32 offsets would overflow")
    block = min(block, max(16, pl.next_power_of_2(n)))
    spec = pl.BlockSpec((block,), lambda i: (i,))
    out = jax.ShapeDtypeStruct((n,), g.dtype)
    dg, du = pl.pallas_call(
        functools.partial(_kernel, n=n if n % block else 0),
        grid=(pl.cdiv(n, block),),
        in_specs=[spec, spec, spec],
        out_specs=[spec, spec],
        out_shape=[out, out],
        compiler_params=plt.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="swiglu_grads",
    )(g.reshape(n), u.reshape(n), dh.reshape(n))
    return dg.reshape(g.shape), du.reshape(g.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def swiglu(g, u, interpret: bool = False):
    """silu(g) * u (XLA's forward), differentiable through `swiglu_grads`."""
    return jax.nn.silu(g) * u


def _fwd(g, u, interpret):
    return swiglu(g, u, interpret), (g, u)


def _bwd(interpret, residuals, dh):
    g, u = residuals
    dh = dh.astype(g.dtype)
    if g.size + BLOCK > MAX_ELEMENTS:   # (B, T, F) past int32 offsets: XLA's passes instead
        return reference(g, u, dh)
    return swiglu_grads(g, u, dh, interpret=interpret)


swiglu.defvjp(_fwd, _bwd)


# The MLP's frozen gate and up projections and the gate in one op: silu(x @ w_gate) * (x @ w_up).
# On a Hopper GPU one GEMM kernel (kernels/hopper_gemm.gemm_swiglu) computes g and u for the
# same tile and writes silu(g) * u from its fp32 accumulators, so the forward's pass over g and u
# (reading two (T, F) tensors, writing one) is gone. Only for adapter-free gate and up (jora's
# default targets q,v): the LoRA terms would need two rank-R products in the same epilogue.
def _kernel_tiles(x2, w):
    """gemm_swiglu's tiles for x2 (M, D) @ w (D, F), or None where the kernel does not apply:
    SWIGLU_TILES, or its CTAs unclustered where M is not a multiple of a cluster's rows."""
    from kernels.lora_matmul import on_hopper
    if not on_hopper() or x2.dtype not in (jnp.bfloat16, jnp.float16) or w.dtype != x2.dtype:
        return None
    from kernels.hopper_gemm import SWIGLU_TILES
    (m, k), n = x2.shape, w.shape[1]
    for t in (SWIGLU_TILES, dataclasses.replace(SWIGLU_TILES, cluster=1)):
        if t.fits(m, n, k):
            return t
    return None


def _gate_up(x, w_gate, w_up, interpret):
    """(g, u, h), each (..., F) in x's dtype."""
    x2 = x.reshape(-1, x.shape[-1])
    tiles = None if interpret else _kernel_tiles(x2, w_gate)
    if tiles is not None:
        from kernels.hopper_gemm import gemm_swiglu
        return tuple(y.reshape(*x.shape[:-1], -1)
                     for y in gemm_swiglu(x2, w_gate, w_up, tiles=tiles))
    g = jnp.einsum("...D,DF->...F", x, w_gate)
    u = jnp.einsum("...D,DF->...F", x, w_up)
    return g, u, jax.nn.silu(g) * u


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def gate_up(x, w_gate, w_up, interpret: bool = False):
    """silu(x @ w_gate) * (x @ w_up): x (..., D), w_gate and w_up (D, F) frozen -> (..., F).
    The backward: dg, du from `swiglu_grads`, then dx = dg @ w_gate^T + du @ w_up^T; the
    weights get zero cotangents (frozen: XLA drops them). Off Hopper (and in the interpreter):
    XLA's two GEMMs and silu(g) * u, with this backward."""
    return _gate_up(x, w_gate, w_up, interpret)[2]


def _gate_up_fwd(x, w_gate, w_up, interpret):
    g, u, h = _gate_up(x, w_gate, w_up, interpret)
    return h, (g, u, w_gate, w_up)


def _gate_up_bwd(interpret, residuals, dh):
    g, u, w_gate, w_up = residuals
    dg, du = _bwd(interpret, (g, u), dh)
    dx = jnp.einsum("...F,DF->...D", dg, w_gate) + jnp.einsum("...F,DF->...D", du, w_up)
    return dx, jnp.zeros_like(w_gate), jnp.zeros_like(w_up)


gate_up.defvjp(_gate_up_fwd, _gate_up_bwd)
