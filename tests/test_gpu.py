"""GPU-only checks (skipped on CPU): cuDNN flash attention against the XLA path, remat=attn,
and MLP chunks under it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import GQA, random_lora, random_params

import jora

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
CFG = jora.Config(**{**GQA.__dict__, "head_dim": 64, "n_heads": 4, "n_kv_heads": 2})  # cuDNN: H=64


def bf16_model(targets):
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), random_params(jax.random.key(0), CFG))
    lcfg = jora.LoraConfig(r=8, alpha=16.0, targets=targets)
    return params, lcfg, random_lora(jax.random.key(1), CFG, lcfg)


@pytest.mark.parametrize("packed", [False, True])
def test_cudnn_attention_matches_xla(packed):
    cfg = CFG
    params, lcfg, lora = bf16_model(jora.PROJ)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (2, 257))
    segs = np.where(np.arange(257) < 100, 1, 2)[None].repeat(2, 0) if packed else None
    batch = jora.make_batch(tokens, segment_ids=segs)
    out = {}
    for impl in ("xla", "cudnn"):
        opts = jora.Options(attention=impl)
        f = jax.value_and_grad(lambda l: jora.loss(params, l, batch, cfg, lcfg, opts=opts))
        out[impl] = jax.device_get(f(lora))
    (lx, gx), (lc, gc) = out["xla"], out["cudnn"]
    assert abs(lx - lc) < 2e-2 * abs(lx)
    for a, b in zip(jax.tree.leaves(gx), jax.tree.leaves(gc)):
        assert np.linalg.norm(a - b) < 5e-2 * np.linalg.norm(a)


def test_remat_attn_runs_the_attention_forward_once():
    """remat=attn keeps the cuDNN kernel's outputs: one attention forward per layer in the
    differentiated program (full remat runs it again in the backward; full_layers=1 for the
    first layer only), and the same gradients."""
    cfg = CFG
    params, lcfg, lora = bf16_model(("q", "v"))
    params = jora.unstack_layers(params)   # unrolled: each layer's attention is in the jaxpr
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 257))
    batch = jora.make_batch(tokens)   # 256 positions: cuDNN wants even lengths
    fwd, grads = {}, {}
    for remat, full_layers in (("full", 0), ("attn", 0), ("attn", 1)):
        opts = jora.Options(attention="cudnn", packed=False)
        plan = jora.Plan(remat=remat, full_layers=full_layers)
        g = jax.grad(lambda l: jora.loss(params, l, batch, cfg, lcfg, opts=opts, plan=plan))
        run = (remat, full_layers)
        fwd[run] = str(jax.make_jaxpr(g)(lora)).count("dot_product_attention_fwd_wrapper[")
        grads[run] = jax.device_get(jax.jit(g)(lora))
    # full_layers=1: the first layer's attention runs again in the backward, the others' do not
    assert fwd["attn", 0] == cfg.n_layers == fwd["attn", 1] - 1 < fwd["full", 0] - 1, fwd
    for run in (("attn", 0), ("attn", 1)):
        for a, b in zip(jax.tree.leaves(grads[run]), jax.tree.leaves(grads["full", 0])):
            assert np.linalg.norm(a - b) <= 1e-2 * np.linalg.norm(b)


def test_mlp_chunks_with_remat_attn_give_the_same_gradients():
    """--remat attn --mlp-chunk (the long-sequence setting) on the GPU path (cuDNN attention,
    bf16, all seven targets with nonzero B): the loss and LoRA gradients of no chunks."""
    params, lcfg, lora = bf16_model(jora.PROJ)
    params = jora.unstack_layers(params)
    tokens = np.random.default_rng(2).integers(0, CFG.vocab_size, (2, 257))
    batch = jora.make_batch(tokens)
    out = {}
    for chunk in (0, 64):
        opts = jora.Options(attention="cudnn", packed=False)
        plan = jora.Plan(remat="attn", mlp_chunk=chunk)
        f = jax.jit(jax.value_and_grad(lambda l: jora.loss(params, l, batch, CFG, lcfg,
                                                           opts=opts, plan=plan)))
        out[chunk] = jax.device_get(f(lora))
    np.testing.assert_allclose(out[64][0], out[0][0], rtol=1e-3)
    for a, b in zip(jax.tree.leaves(out[64][1]), jax.tree.leaves(out[0][1])):
        assert np.abs(b).max() > 0
        assert np.linalg.norm(a - b) <= 1e-2 * np.linalg.norm(b)


@pytest.mark.parametrize("max_segments", [0, 12])
def test_packed_cudnn_attention_matches_the_masked_reference(max_segments):
    """Packed rows on cuDNN, through its segment offsets (max_segments > 0) or the (T, T) mask
    (0): output and q/k/v gradients against the XLA path's explicit mask (fp32), on rows of
    random runs and a padding tail, grouped-query heads, a random output gradient."""
    rng = np.random.default_rng(5)
    B, T, N, K, H = 2, 512, 4, 2, 64
    seg = np.zeros((B, T), np.int32)
    for b in range(B):   # 3-10 examples of random lengths, then padding (id 0)
        cuts = np.sort(rng.choice(np.arange(1, T - 32), int(rng.integers(2, 10)), replace=False))
        for j, (a, e) in enumerate(zip(np.r_[0, cuts], np.r_[cuts, T - int(rng.integers(1, 32))])):
            seg[b, a:e] = j + 1
    ks = jax.random.split(jax.random.key(int(rng.integers(1 << 30))), 4)
    q = jax.random.normal(ks[0], (B, T, N, H), jnp.bfloat16)
    k, v = (jax.random.normal(x, (B, T, K, H), jnp.bfloat16) for x in ks[1:3])
    g = jax.random.normal(ks[3], (B, T, N, H), jnp.float32)
    seg = jnp.asarray(seg)

    def run(impl, dtype):
        f = lambda q, k, v: jora.attend(q, k, v, seg, jora.Options(
            attention=impl, max_segments=max_segments)).astype(jnp.float32)
        out, vjp = jax.vjp(jax.jit(f), *(x.astype(dtype) for x in (q, k, v)))
        return [np.asarray(x, np.float32) for x in (out, *vjp(g))]

    got, want = run("cudnn", jnp.bfloat16), run("xla", jnp.float32)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert np.linalg.norm(a - b) <= 2e-2 * np.linalg.norm(b), name


def test_packed_rows_with_too_many_runs_turn_to_nan():
    """Under jit a batch cannot be refused on the host: if a row has more runs than the offsets
    hold, the attention comes out NaN (cuDNN spoils the other rows then too), a non-finite
    loss that the train step records and stops on; with room for every run, all is finite."""
    q = jax.random.normal(jax.random.key(7), (2, 256, 4, 64), jnp.bfloat16)
    seg = jnp.stack([jnp.arange(256) // 32, jnp.arange(256) // 128])   # 8 runs and 2 runs
    attend = lambda m: lambda q: jora.attend(q, q, q, seg, jora.Options("cudnn", max_segments=m))
    f = lambda m: np.asarray(jax.jit(attend(m))(q))
    assert np.isnan(f(4).astype(np.float32)).all() and np.isfinite(f(8).astype(np.float32)).all()


@pytest.mark.parametrize("m,k,n,dropped", [(512, 256, 512, False),   # 128 x 256 CTA tiles
                                           (512, 256, 384, True),    # N % 256 != 0: 256 x 128
                                           (200, 256, 512, False),   # ragged M: Triton
                                           (2048, 256, 11008, False),   # y in two launches
                                           (2048, 11008, 256, False)])  # dx in two launches
def test_lora_matmul_on_hopper_matches_reference(m, k, n, dropped):
    """kernels.lora_matmul where jora calls it, bf16 with fp32 adapters: forward and the
    gradients of x, a, b (and x_lora) against the same op in fp32 XLA; on a Hopper GPU the
    tile-aligned shapes must run the Mosaic GPU kernel, the ragged one the Triton kernel.
    The (2048, 11008) outputs are 688 CTA tiles, 5.2 waves of an H200's 132 SMs: their last
    tile columns go to a second launch (hopper_gemm._split)."""
    from kernels.lora_matmul import HOPPER, lora_matmul
    ks = jax.random.split(jax.random.key(m + n), 6)
    x = jax.random.normal(ks[0], (m, k), jnp.bfloat16)
    w = (jax.random.normal(ks[1], (k, n)) / np.sqrt(k)).astype(jnp.bfloat16)
    a = jax.random.normal(ks[2], (k, 16)) / np.sqrt(k)
    b = jax.random.normal(ks[3], (16, n)) * 0.5   # nonzero B, the rank term ~ x @ w
    xl = jnp.where(jax.random.bernoulli(ks[4], 0.9, x.shape), x / 0.9, 0).astype(x.dtype)
    c = jax.random.normal(ks[5], (m, n))

    def loss(f):
        return jax.jit(jax.value_and_grad(lambda x, a, b, xl: jnp.sum(
            f(x, a, b, xl).astype(jnp.float32) * c), argnums=(0, 1, 2, 3)))

    kernel = loss(lambda x, a, b, xl: lora_matmul(x, w, a, b, 2.0,
                                                  x_lora=xl if dropped else None))
    ref = loss(lambda x, a, b, xl: jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32))
               + 2.0 * (xl if dropped else x).astype(jnp.float32) @ a @ b)
    args = (x, a, b, xl)
    with jax.default_matmul_precision("highest"):
        (got, g_got), (want, g_want) = kernel(*args), ref(*args)
    for name, p, q in zip(("loss", "x", "a", "b", "x_lora"), (got, *g_got), (want, *g_want)):
        if name == "x_lora" and not dropped:
            continue
        p, q = np.asarray(p, np.float32), np.asarray(q, np.float32)
        assert np.linalg.norm(p - q) <= 2e-2 * np.linalg.norm(q), name
    hlo = kernel.lower(*args).as_text()
    on_hopper = any(h in jax.devices()[0].device_kind for h in HOPPER)
    assert ("mosaic_gpu" in hlo) == (on_hopper and m % 128 == 0), hlo.count("mosaic_gpu")


@pytest.mark.parametrize("targets", [jora.PROJ, ("q", "v")], ids=["all", "qv"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_model_with_kernels_equals_xla(dropout, targets):
    """jora's loss and LoRA gradients, bf16, all seven projections or q,v adapted, with the
    kernels (Plan(kernels="pallas"): on a Hopper GPU the Mosaic GPU kernels, the shapes fit
    them; with q,v, gate and up as one kernel) against XLA's, with and without dropout."""
    cfg = jora.Config(**{**GQA.__dict__, "d_model": 256, "d_ff": 512, "head_dim": 64,
                         "n_heads": 4, "n_kv_heads": 2})
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), random_params(jax.random.key(0), cfg))
    lcfg = jora.LoraConfig(r=16, alpha=32.0, targets=targets, dropout=dropout)
    lora = random_lora(jax.random.key(1), cfg, lcfg)
    batch = jora.make_batch(np.random.default_rng(0).integers(0, 128, (2, 129)))
    key = jax.random.key(2) if dropout else None
    out = {k: jax.jit(jax.value_and_grad(lambda lo: jora.loss(
        params, lo, batch, cfg, lcfg, plan=jora.Plan(kernels=k), key=key)))(lora)
        for k in ("xla", "pallas")}
    (l_k, g_k), (l_x, g_x) = out["pallas"], out["xla"]
    assert abs(float(l_k) - float(l_x)) <= 1e-2 * abs(float(l_x))
    for gk, gx in zip(jax.tree.leaves(g_k), jax.tree.leaves(g_x)):
        gk, gx = np.asarray(gk, np.float32), np.asarray(gx, np.float32)
        assert np.linalg.norm(gk - gx) <= 3e-2 * np.linalg.norm(gx)


@pytest.mark.parametrize("dropout", [0.0, 0.05])
@pytest.mark.parametrize("dims", [dict(d_model=256, d_ff=512, head_dim=64, n_heads=4, n_kv_heads=2,
                                       n_layers=2, rows=2, seq=128),
                                  dict(d_model=1024, d_ff=2816, head_dim=128, n_heads=8,
                                       n_kv_heads=8, n_layers=4, rows=1, seq=2048)],
                         ids=["small", "wide"])
def test_training_with_kernels_follows_xla(dims, dropout):
    """Eight AdamW steps of a bf16 model with unrolled layers and all seven projections
    adapted: the losses with kernels (on a Hopper GPU the Mosaic GPU kernel) follow XLA's."""
    dims = dict(dims)   # (the parametrized dict is shared by the dropout cases)
    rows, seq = dims.pop("rows"), dims.pop("seq")
    cfg = jora.Config(**{**GQA.__dict__, **dims})
    mesh = jora.make_mesh(1, jax.devices()[:1])
    lcfg = jora.LoraConfig(r=16, alpha=32.0, targets=jora.PROJ, dropout=dropout)
    tcfg = jora.TrainConfig(batch_size=rows, seq_len=seq, lr=1e-3, warmup=2, steps=8)
    params = jora.unstack_layers(jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16),
                                              random_params(jax.random.key(0), cfg)))
    batch = jora.accum_batch(jora.make_batch(
        np.random.default_rng(0).integers(0, cfg.vocab_size, (rows, seq + 1))), 1, mesh)
    losses = {}
    for k in ("xla", "pallas"):
        lora = jora.init_lora(jax.random.key(1), cfg, lcfg)
        state = jora.TrainState(lora, jora.adamw_init(lora), np.int32(0))
        step = jora.make_train_step(cfg, lcfg, tcfg, mesh, plan=jora.Plan(kernels=k))
        losses[k] = []
        for _ in range(8):
            state, m = step(state, params, batch, jax.random.key(2))
            losses[k].append(float(m["loss"]))
    x, k = np.array(losses["xla"]), np.array(losses["pallas"])
    assert np.abs(k - x).max() <= 2e-3 * np.abs(x).max(), (x, k)


@pytest.mark.parametrize("shape", [(1, 2048, 11008), (3, 37, 50)])
def test_swiglu_backward_kernel_on_gpu_matches_fp32_autodiff(shape):
    from kernels import swiglu
    g, u, dh = (jax.random.normal(k, shape, jnp.bfloat16) * 3
                for k in jax.random.split(jax.random.key(7), 3))
    dg, du = swiglu.swiglu_grads(g, u, dh)
    f32 = lambda t: t.astype(jnp.float32)   # noqa: E731
    want = jax.vjp(lambda g, u: jax.nn.silu(g) * u, f32(g), f32(u))[1](f32(dh))
    for got, ref in zip((dg, du), want):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(f32(got)), np.asarray(ref), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("shape", [(1, 2048, 4096, 11008), (2, 192, 256, 640)])
def test_gate_up_kernel_on_gpu_matches_fp32(shape):
    """silu(x @ w_gate) * (x @ w_up) and its dx from kernels/swiglu.gate_up against the fp32
    formula: on a Hopper GPU one Mosaic GPU kernel (the 7B MLP at 2,048 positions: two
    launches, the last tile columns in the second) whose epilogue forms the product."""
    from kernels import swiglu
    from kernels.lora_matmul import HOPPER
    b, t, d, f = shape
    kx, kg, ku, kd = jax.random.split(jax.random.key(3), 4)
    x = jax.random.normal(kx, (b, t, d), jnp.bfloat16)
    wg, wu = ((jax.random.normal(k, (d, f)) / np.sqrt(d)).astype(jnp.bfloat16) for k in (kg, ku))
    dh = jax.random.normal(kd, (b, t, f), jnp.bfloat16)
    fwd = jax.jit(lambda x: swiglu.gate_up(x, wg, wu))
    on_hopper = any(h in jax.devices()[0].device_kind for h in HOPPER)
    assert ("hopper_gemm_swiglu" in fwd.lower(x).as_text()) == on_hopper
    h, vjp = jax.vjp(fwd, x)
    f32 = lambda t: t.astype(jnp.float32)   # noqa: E731
    plain = lambda x: jax.nn.silu(x @ f32(wg)) * (x @ f32(wu))   # noqa: E731
    h_want, vjp_want = jax.vjp(plain, f32(x))
    for got, want in ((h, h_want), (vjp(dh)[0], vjp_want(f32(dh))[0])):
        got, want = np.asarray(f32(got)), np.asarray(want)
        assert got.dtype == np.float32 and np.linalg.norm(got - want) <= 1e-2 * np.linalg.norm(want)
