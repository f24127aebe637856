"""The fused LoRA kernel (Pallas, interpret mode on CPU) against its reference and jora."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import GQA, random_lora, random_params

import jora
from kernels.lora_matmul import Tiles, lora_matmul, reference

INTERPRET = jax.default_backend() != "gpu"
SMALL_TILES = Tiles(bm=64, bn=64, bk=32)


def operands(m, k, n, r, dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(ks[0], (m, k)).astype(dtype)
    w = (jax.random.normal(ks[1], (k, n)) / np.sqrt(k)).astype(dtype)
    a = jax.random.normal(ks[2], (k, r)) / np.sqrt(k)
    b = jax.random.normal(ks[3], (r, n))          # nonzero B: B = 0 would hide bugs
    c = jax.random.normal(ks[4], (m, n))          # a random cotangent
    return x, w, a, b, c


@pytest.mark.parametrize("m,k,n,r", [(200, 96, 160, 8), (64, 128, 64, 64), (70, 64, 130, 3)])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_forward_and_gradients_match_reference(m, k, n, r, dtype, tol):
    x, w, a, b, c = operands(m, k, n, r, dtype)
    got = lora_matmul(x, w, a, b, 2.0, SMALL_TILES, INTERPRET)
    want = reference(x, w, a, b, 2.0)
    assert got.dtype == dtype and got.shape == (m, n)
    rel = lambda p, q: float(jnp.linalg.norm((p - q).astype(jnp.float32))
                             / jnp.linalg.norm(q.astype(jnp.float32)))
    assert rel(got, want) < tol
    grad = lambda f: jax.grad(lambda x, a, b: jnp.sum(f(x, w, a, b).astype(jnp.float32) * c),
                              argnums=(0, 1, 2))(x, a, b)
    g_kernel = grad(lambda *o: lora_matmul(*o, 2.0, SMALL_TILES, INTERPRET))
    g_ref = grad(lambda *o: reference(*o, 2.0))
    for name, p, q in zip("xab", g_kernel, g_ref):
        assert p.dtype == q.dtype and rel(p, q) < tol, name


@pytest.mark.parametrize("layout", ["column", "row"])
def test_kernel_per_shard_inside_shard_map_equals_unsharded(layout):
    x, w, a, b, c = operands(64, 128, 128, 16, jnp.float32, seed=1)
    mesh = jora.make_mesh(2, jax.devices()[:2])
    P = jora.P
    if layout == "column":   # w, b split on N; a replicated; no communication
        specs, out = (P(), P(None, "model"), P(), P(None, "model")), P(None, "model")
        body = lambda x, w, a, b: lora_matmul(x, w, a, b, 2.0, SMALL_TILES, INTERPRET)
    else:                    # x, w, a split on K; b replicated; one psum
        specs, out = (P(None, "model"), P("model", None), P("model", None), P()), P()
        body = lambda x, w, a, b: jax.lax.psum(lora_matmul(x, w, a, b, 2.0, SMALL_TILES,
                                                           INTERPRET), "model")
    sharded = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=out, check_vma=False)
    loss = lambda f: lambda x, a, b: jnp.sum(f(x, w, a, b) * c)
    got = jax.value_and_grad(loss(sharded), argnums=(0, 1, 2))(x, a, b)
    want = jax.value_and_grad(loss(lambda *o: reference(*o, 2.0)), argnums=(0, 1, 2))(x, a, b)
    jax.tree.map(lambda p, q: np.testing.assert_allclose(p, q, rtol=2e-5, atol=2e-4), got, want)


@pytest.mark.parametrize("tp", [1, 2])
def test_jora_with_pallas_kernels_equals_jnp_path(tp):
    params = random_params(jax.random.key(0), GQA)
    lcfg = jora.LoraConfig(r=4, alpha=8.0, targets=jora.PROJ)
    lora = random_lora(jax.random.key(1), GQA, lcfg)
    batch = jora.make_batch(np.random.default_rng(0).integers(0, 128, (2, 17)))
    mesh = jora.make_mesh(tp, jax.devices()[:tp])
    p, l, b = (jora.shard(params, jora.param_specs(), mesh),
               jora.shard(lora, jora.lora_specs(lcfg), mesh),
               jora.shard(batch, jora.batch_specs(), mesh))
    out = {}
    for kernels in ("xla", "pallas"):
        opts = jora.Options(kernels=kernels)
        out[kernels] = jax.value_and_grad(
            lambda l: jora.loss(p, l, b, GQA, lcfg, opts, mesh=mesh))(l)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6),
                 out["pallas"], out["xla"])
