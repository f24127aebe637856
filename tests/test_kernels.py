"""kernels/lora_matmul.py on CPU: Pallas' interpreter against `reference`, forward and the
gradients of x, a and b; per-shard inside shard_map; and the Triton lowering for CUDA (no GPU
needed: it lowers, it does not compile or run)."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from kernels.lora_matmul import Tiles, _tile_of, gemm_lowrank, lora_matmul, reference

INTERPRET = jax.default_backend() != "gpu"
# Several tiles per axis even at these tiny shapes; group_m=3 leaves a short last group.
SMALL = Tiles(bm=32, bn=32, bk=16, group_m=3)
SCALE = 2.0


@pytest.fixture(autouse=True)
def full_precision_references():
    """fp32 references in full precision: on a GPU, XLA's default for fp32 matmuls is TF32,
    whose 1e-3 error would be blamed on the kernel."""
    with jax.default_matmul_precision("highest"):
        yield


def operands(m, k, n, r, dtype, seed=0, ab_dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(ks[0], (m, k)).astype(dtype)
    w = (jax.random.normal(ks[1], (k, n)) / np.sqrt(k)).astype(dtype)
    a = (jax.random.normal(ks[2], (k, r)) / np.sqrt(k)).astype(ab_dtype)
    b = jax.random.normal(ks[3], (r, n)).astype(ab_dtype)   # nonzero B: B = 0 hides bugs
    c = jax.random.normal(ks[4], (m, n))                    # weights of the summed loss
    return x, w, a, b, c


def rel(p, q):
    p, q = np.asarray(p, np.float32), np.asarray(q, np.float32)
    return float(np.linalg.norm(p - q) / np.linalg.norm(q))


def value_and_grads(f, x, w, a, b, c):
    """f(x, w, a, b) and the gradients of sum(f * c) in x, a and b, compiled once."""
    def loss(x, a, b):
        y = f(x, w, a, b)
        return jnp.sum(y.astype(jnp.float32) * c), y
    (_, y), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(x, a, b)
    return y, g


# (M, K, N, R) with SMALL tiles: aligned; ragged M; everything ragged (K tail, R=3);
# R=64; a decoding-like M=1.
SHAPES = [(64, 64, 64, 8), (200, 96, 160, 8), (70, 72, 130, 3), (48, 128, 96, 64),
          (1, 40, 20, 16)]


@pytest.mark.parametrize("m,k,n,r", SHAPES)
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_forward_and_gradients_match_reference(m, k, n, r, dtype, tol):
    x, w, a, b, c = operands(m, k, n, r, dtype, seed=m + k + n + r)
    kernel = functools.partial(lora_matmul, scale=SCALE, tiles=SMALL, interpret=INTERPRET)
    y, grads = value_and_grads(kernel, x, w, a, b, c)
    y_ref, grads_ref = value_and_grads(functools.partial(reference, scale=SCALE), x, w, a, b, c)
    assert y.shape == (m, n) and y.dtype == dtype
    assert np.isfinite(np.asarray(y, np.float32)).all()
    assert rel(y, y_ref) < tol
    for name, g, g_ref in zip("xab", grads, grads_ref):
        assert g.shape == g_ref.shape and g.dtype == g_ref.dtype, name
        assert rel(g, g_ref) < tol, (name, rel(g, g_ref))


def test_default_tiles_bf16_adapters_and_a_python_int_scale():
    """tiles=None shrinks the default tiles to a small problem; a, b in bf16; scale an int."""
    x, w, a, b, c = operands(24, 48, 40, 8, jnp.bfloat16, seed=3, ab_dtype=jnp.bfloat16)
    y, grads = value_and_grads(lambda *o: lora_matmul(*o, 3, interpret=INTERPRET), x, w, a, b, c)
    y_ref, grads_ref = value_and_grads(lambda *o: reference(*o, 3), x, w, a, b, c)
    assert rel(y, y_ref) < 1e-2
    for g, g_ref in zip(grads, grads_ref):
        assert g.dtype == g_ref.dtype
        assert rel(g, g_ref) < 1e-2


def test_gemm_lowrank_reads_w_transposed():
    """The backward's GEMM: p @ q^T + u @ v with q stored (N, C), ragged everywhere."""
    ks = jax.random.split(jax.random.key(5), 4)
    p, q = jax.random.normal(ks[0], (40, 56)), jax.random.normal(ks[1], (72, 56))
    u, v = jax.random.normal(ks[2], (40, 16)), jax.random.normal(ks[3], (16, 72))
    got = gemm_lowrank(p, q, u, v, q_transposed=True, tiles=SMALL, interpret=INTERPRET)
    np.testing.assert_allclose(got, p @ q.T + u @ v, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_separate_lora_input_as_with_dropout(dtype, tol):
    """x_lora (the LoRA branch's input, e.g. after dropout) differs from x: y and the
    gradients of x, a, b and x_lora against the reference written with both inputs."""
    m, k, n, r = 72, 48, 80, 8
    x, w, a, b, c = operands(m, k, n, r, dtype, seed=17)
    keep = jax.random.bernoulli(jax.random.key(18), 0.8, x.shape)
    xl = jnp.where(keep, x / 0.8, 0).astype(dtype)   # an inverted-dropout input

    def run(f):
        def loss(x, a, b, xl):
            y = f(x, a, b, xl)
            return jnp.sum(y.astype(jnp.float32) * c), y
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(x, a, b, xl)

    def ref(x, a, b, xl):   # reference() with x_lora in x @ a
        u = (SCALE * jnp.dot(xl, a.astype(dtype), preferred_element_type=jnp.float32)
             ).astype(dtype)
        return (jnp.dot(x, w, preferred_element_type=jnp.float32)
                + jnp.dot(u, b.astype(dtype), preferred_element_type=jnp.float32)).astype(dtype)

    (_, y), grads = run(lambda x, a, b, xl: lora_matmul(x, w, a, b, SCALE, x_lora=xl,
                                                        tiles=SMALL, interpret=INTERPRET))
    (_, y_ref), grads_ref = run(ref)
    assert rel(y, y_ref) < tol
    for name, g, g_ref in zip(["x", "a", "b", "x_lora"], grads, grads_ref):
        assert g.dtype == g_ref.dtype and rel(g, g_ref) < tol, (name, rel(g, g_ref))
    assert rel(grads[3], grads[0]) > 0.5   # x and x_lora get different gradients
    with pytest.raises(ValueError, match="x_lora must be like x"):
        lora_matmul(x, w, a, b, SCALE, x_lora=xl[:8], interpret=INTERPRET)


@pytest.mark.parametrize("gm,gn,group", [(7, 5, 3), (1, 4, 1), (4, 1, 8), (6, 6, 6), (5, 3, 1)])
def test_grouped_program_order_visits_every_tile_once(gm, gn, group):
    tiles = [tuple(int(v) for v in _tile_of(t, gm, gn, min(group, gm))) for t in range(gm * gn)]
    assert sorted(tiles) == [(i, j) for i in range(gm) for j in range(gn)]


def test_bad_inputs_raise_clear_errors():
    x, w, a, b, _ = operands(8, 16, 16, 4, jnp.float32)
    with pytest.raises(ValueError, match="do not chain"):
        lora_matmul(x, w, a, b.T, 1.0, interpret=INTERPRET)
    with pytest.raises(ValueError, match="one floating dtype"):
        lora_matmul(x, w.astype(jnp.bfloat16), a, b, 1.0, interpret=INTERPRET)
    with pytest.raises(ValueError, match="2-D"):
        lora_matmul(x[None], w, a, b, 1.0, interpret=INTERPRET)
    with pytest.raises(ValueError, match="Python number"):
        lora_matmul(x, w, a, b, jnp.float32(1.0), interpret=INTERPRET)
    with pytest.raises(ValueError, match="power of two"):
        Tiles(bm=96)


@pytest.mark.parametrize("layout", ["column", "row"])
def test_per_shard_inside_shard_map_equals_unsharded(layout):
    """Column-parallel: w, b split on N, a replicated. Row-parallel: x, w, a split on K, b
    replicated, one psum of y. The local N = 48 and K = 40 leave ragged tiles. Gradients are
    taken outside the shard_map (the interpreter needs check_vma=False)."""
    if len(jax.devices()) < 2:
        pytest.skip("needs 2 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    mesh = jax.make_mesh((2,), ("tp",), axis_types=(AxisType.Auto,), devices=jax.devices()[:2])
    x, w, a, b, c = operands(64, 80, 96, 8, jnp.float32, seed=11)
    kernel = functools.partial(lora_matmul, scale=SCALE, tiles=SMALL, interpret=INTERPRET)
    if layout == "column":
        specs, out = (P(), P(None, "tp"), P(), P(None, "tp")), P(None, "tp")
        body = kernel
    else:
        specs, out = (P(None, "tp"), P("tp", None), P("tp", None), P()), P()
        body = lambda *o: jax.lax.psum(kernel(*o), "tp")   # noqa: E731
    sharded = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=out, check_vma=False)
    y, grads = value_and_grads(sharded, x, w, a, b, c)
    y_ref, grads_ref = value_and_grads(functools.partial(reference, scale=SCALE), x, w, a, b, c)
    assert rel(y, y_ref) < 1e-5
    for name, g, g_ref in zip("xab", grads, grads_ref):
        assert rel(g, g_ref) < 1e-5, (name, rel(g, g_ref))


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")
def test_triton_lowering_for_cuda_inside_shard_map():
    """Lower (not compile or run) for an H200: both kernels reach Triton, with masks (ragged
    M, N, K and R), the transposed read of w, and shard_map(check_vma=True)."""
    from jax.experimental.pallas import triton as plt
    from jax.sharding import AbstractDevice, AbstractMesh, NamedSharding
    dev = AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="gpu")
    mesh = AbstractMesh((2,), ("tp",), (AxisType.Explicit,), abstract_device=dev)
    specs = (P(), P(None, "tp"), P(), P(None, "tp"))   # column-parallel

    def body(x, w, a, b):   # x and a are the same on every slice: cast them varying, as
        #                     jora does before the custom_vjp (its rule sees operands alike)
        x, a = (jax.lax.pcast(t, ("tp",), to="varying") for t in (x, a))
        return lora_matmul(x, w, a, b, SCALE)

    sharded = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=P(None, "tp"),
                            check_vma=True)

    def step(x, w, a, b):
        return jax.value_and_grad(lambda x, a, b: jnp.sum(sharded(x, w, a, b)),
                                  argnums=(0, 1, 2))(x, a, b)

    shapes = [((200, 4104), jnp.bfloat16), ((4104, 2752), jnp.bfloat16),
              ((4104, 8), jnp.float32), ((8, 2752), jnp.float32)]
    args = [jax.ShapeDtypeStruct(s, d, sharding=NamedSharding(mesh, sp))
            for (s, d), sp in zip(shapes, specs)]
    try:
        with jax.sharding.use_abstract_mesh(mesh):
            exported = jax.export.export(
                jax.jit(step), platforms=["cuda"],
                disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(
                    plt.CUSTOM_CALL_TARGET_NAME)])(*args)
    except NotImplementedError as e:   # a jaxlib without the CUDA lowering rules
        pytest.skip(f"cannot lower for cuda here: {e}")
    assert exported.mlir_module().count("__gpu$xla.gpu.triton") == 2   # forward and dx


@pytest.mark.parametrize("dropout,targets", [(0.0, "all"), (0.1, "all"), (0.1, "q,v,gate"),
                                             (0.1, "q,v")])
def test_jora_with_pallas_kernels_equals_its_jnp_path(dropout, targets, tp=2):
    """The integration: jora's loss and LoRA gradients with Plan(kernels="pallas") equal
    its jnp path's, with tp=2 (column- and row-parallel projections), without and with dropout
    (the kernel then takes the dropped-out x as the LoRA input). The MLP gate's backward runs
    as its kernel except with dropout on down's adapter; gate and up run as one op (gate_up)
    where neither has an adapter."""
    import jora
    from conftest import GQA, random_lora, random_params
    if "kernels" not in {f.name for f in dataclasses.fields(jora.Plan)}:
        pytest.skip("jora.Plan has no `kernels` switch")
    if len(jax.devices()) < tp:
        pytest.skip(f"needs {tp} devices")
    params = random_params(jax.random.key(0), GQA)
    lcfg = jora.LoraConfig(r=4, alpha=8.0, dropout=dropout,
                           targets=jora.PROJ if targets == "all" else tuple(targets.split(",")))
    lora = random_lora(jax.random.key(1), GQA, lcfg)
    key = jax.random.key(2) if dropout else None
    batch = jora.make_batch(np.random.default_rng(0).integers(0, 128, (2, 17)))
    mesh = jora.make_mesh(tp, jax.devices()[:tp])
    p, lo, b = (jora.shard(params, jora.param_specs(), mesh),
                jora.shard(lora, jora.lora_specs(lcfg), mesh),
                jora.shard(batch, jora.batch_specs(), mesh))
    out = {}
    for kernels in ("xla", "pallas"):
        f = jax.value_and_grad(lambda lo: jora.loss(p, lo, b, GQA, lcfg, key=key, mesh=mesh,
                                                    plan=jora.Plan(kernels=kernels)))
        jaxpr = str(jax.make_jaxpr(f)(lo))
        assert ("swiglu_grads" in jaxpr) == (kernels == "pallas"
                                             and not (dropout and "down" in lcfg.targets))
        fused = not {"gate", "up", "down"} & set(lcfg.targets)
        forward = str(jax.make_jaxpr(lambda lo: jora.loss(p, lo, b, GQA, lcfg, key=key, mesh=mesh,
                                                         plan=jora.Plan(kernels=kernels)))(lo))
        assert ("gate_up" in forward) == (kernels == "pallas" and fused), forward.count("gate_up")
        out[kernels] = f(lo)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-6),
                 out["pallas"], out["xla"])


# The MLP gate's one-pass backward (kernels/swiglu.py): against jax's own autodiff of the fp32
# formula, which shares no code with the kernel.

@pytest.mark.parametrize("shape,block,dtype,tol", [
    ((2, 24, 40), 256, jnp.float32, 1e-6),     # 1,920 elements: seven whole blocks and a part
    ((3, 37, 50), 4096, jnp.bfloat16, 8e-3),   # 5,550: a whole block and a part
    ((1, 64, 128), 1024, jnp.bfloat16, 8e-3),  # whole blocks only
    ((5, 20), 4096, jnp.float32, 1e-6),        # 100: the block shrinks to 128, one part
])
def test_swiglu_backward_matches_fp32_autodiff(shape, block, dtype, tol):
    from kernels import swiglu
    g, u, dh = (3 * jax.random.normal(k, shape) for k in jax.random.split(jax.random.key(3), 3))
    want = jax.vjp(lambda g, u: jax.nn.silu(g) * u, g, u)[1](dh)
    g, u, dh = (t.astype(dtype) for t in (g, u, dh))
    got = swiglu.swiglu_grads(g, u, dh, block=block, interpret=INTERPRET)
    for x, ref in zip(got, want):
        assert x.dtype == dtype and x.shape == shape
        assert rel(x, ref) < tol
    # the custom_vjp: the same gradients through jax.grad, and silu(g) * u forward
    h, vjp = jax.vjp(lambda g, u: swiglu.swiglu(g, u, INTERPRET), g, u)
    assert rel(h, jax.nn.silu(g.astype(jnp.float32)) * u.astype(jnp.float32)) < tol
    for x, y in zip(vjp(dh), got):
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


def test_swiglu_backward_refuses_mismatched_operands():
    from kernels import swiglu
    g = jnp.ones((4, 8), jnp.bfloat16)
    with pytest.raises(ValueError, match="share shape and dtype"):
        swiglu.swiglu_grads(g, g, g[:, :4], interpret=INTERPRET)
    with pytest.raises(ValueError, match="share shape and dtype"):
        swiglu.swiglu_grads(g, g.astype(jnp.float32), g, interpret=INTERPRET)
    with pytest.raises(ValueError, match="power of two"):
        swiglu.swiglu_grads(g, g, g, block=100, interpret=INTERPRET)


def test_swiglu_benchmark_checks_the_kernel_and_prints_its_table(capsys):
    from kernels import bench
    assert bench.main(["--swiglu", "--ms", "8"]) == 0
    rows = [l for l in capsys.readouterr().out.splitlines() if l.startswith("|     8 |")]
    assert len(rows) == 4 and all("FAIL" not in r for r in rows), rows


def test_swiglu_past_int32_offsets_refuses_the_kernel_and_falls_back(monkeypatch):
    """Past 2**31 elements the kernel's flat offsets would overflow: swiglu_grads refuses, and
    the custom_vjp's backward takes XLA's formula instead (the limit lowered to test it)."""
    from kernels import swiglu
    g, u, dh = (jax.random.normal(k, (3, 40)) for k in jax.random.split(jax.random.key(5), 3))
    want = jax.vjp(lambda g, u: jax.nn.silu(g) * u, g, u)[1](dh)
    monkeypatch.setattr(swiglu, "MAX_ELEMENTS", 100)
    with pytest.raises(ValueError, match="int32 offsets"):
        swiglu.swiglu_grads(g, u, dh, interpret=INTERPRET)
    got = jax.vjp(lambda g, u: swiglu.swiglu(g, u, INTERPRET), g, u)[1](dh)
    for x, ref in zip(got, want):
        assert rel(x, ref) < 1e-6


def test_gate_up_op_matches_fp32_autodiff():
    """kernels/swiglu.gate_up (off Hopper: XLA's GEMMs, the kernel backward) on (B, T, D):
    h and the gradient of x against jax's autodiff of the fp32 formula; the frozen weights
    get zero cotangents."""
    from kernels import swiglu
    kx, kg, ku, kd = jax.random.split(jax.random.key(11), 4)
    x = jax.random.normal(kx, (2, 9, 48))
    wg, wu = (jax.random.normal(k, (48, 80)) / 7 for k in (kg, ku))
    dh = jax.random.normal(kd, (2, 9, 80))
    h, vjp = jax.vjp(lambda x, wg, wu: swiglu.gate_up(x, wg, wu, INTERPRET), x, wg, wu)
    h_want, vjp_want = jax.vjp(lambda x: jax.nn.silu(x @ wg) * (x @ wu), x)
    dx, dwg, dwu = vjp(dh)
    assert rel(h, h_want) < 1e-5 and rel(dx, vjp_want(dh)[0]) < 1e-5
    assert not np.asarray(dwg).any() and not np.asarray(dwu).any()


def test_gate_up_benchmark_checks_and_prints_its_table(capsys):
    from kernels import bench
    assert bench.main(["--gate-up", "--ms", "8"]) == 0
    rows = [l for l in capsys.readouterr().out.splitlines() if l.startswith("|     8 |")]
    assert len(rows) == 1 and "FAIL" not in rows[0], rows
