"""Float8 frozen projections (Config.fp8, train.py --base-dtype float8), emulated on the CPU.

The bound the tests hold the arithmetic to. e4m3 keeps 3 mantissa bits: a value v quantized
with scale s (the slice's largest |v| / 448) is off by at most max(2^-4 |v|, 2^-10 s): half a
unit in the last place for normal numbers, half the subnormal step 2^-9 s below them. A GEMM of
quantized a and b then misses sum(a b) by at most sum(ea |b| + |a| eb + ea eb) per output, where
ea and eb are those per-element bounds (the fp32 accumulation adds nothing visible). Forward:
a = x with a scale per position, b = W with a scale per output channel. Input gradient: a = the
output gradient times W's channel scales, with a scale per position, b = W's quantized values.
"""
import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import DATA, GQA, STORIES, needs_data, random_lora, random_params

import jora

E4M3_MAX = 448.0


def quantize_np(x):
    """The NumPy transcription: (q as float32, scale) with a scale per last-axis slice."""
    x = np.asarray(x, np.float32)
    amax = np.abs(x).max(-1, keepdims=True)
    scale = np.where(amax > 0, amax / np.float32(E4M3_MAX), np.float32(1)).astype(np.float32)
    q = np.clip(x / scale, -E4M3_MAX, E4M3_MAX).astype(ml_dtypes.float8_e4m3fn)
    return q.astype(np.float32), scale


def e4m3_error(v, scale):   # the most quantizing v with `scale` can move it
    return np.maximum(2.0**-4 * np.abs(v), 2.0**-10 * scale)


def rel(got, want) -> float:
    return float(np.linalg.norm(np.asarray(got) - want) / np.linalg.norm(want))


def assert_e4m3_close(got, want):
    """float8 values equal, but where a scale an fp32 ulp apart moves a value on a rounding tie
    by one e4m3 step (2^-3 of it, or 2^-9 among subnormals), which is rare."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert (np.abs(got - want) <= 2.0**-3 * np.abs(want) + 2.0**-9).all()
    assert (got == want).mean() > 0.99


def test_quantize_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 96)).astype(np.float32) * np.logspace(-4, 4, 6)[:, None]
    x[1, :50] *= 1e-6   # subnormals beside normals in one slice
    x[2] = 0.0          # an empty slice keeps scale 1
    q, scale = jora.to_fp8(jnp.asarray(x))
    want_q, want_scale = quantize_np(x)
    assert q.dtype == jnp.float8_e4m3fn
    # XLA may divide by 448 as a multiply by its reciprocal: the scales agree to an fp32 ulp,
    # and a value on a rounding tie may then land one e4m3 step away
    np.testing.assert_allclose(np.asarray(scale), want_scale, rtol=2.5e-7)
    assert_e4m3_close(q, want_q)
    back = np.asarray(q, np.float32) * np.asarray(scale)
    assert (np.abs(back - x) <= e4m3_error(x, want_scale) * (1 + 1e-6)).all()
    assert np.abs(back - x).max() > 0   # it did round


def test_a_weight_round_trips_per_output_channel():
    w = np.random.default_rng(1).standard_normal((48, 40)).astype(np.float32)
    w *= np.logspace(-2, 2, 40)[None]   # channels of very different sizes
    f = jora.fp8_weight(jnp.asarray(w))
    assert f.q.shape == (40, 48) and f.scale.shape == (40,)   # HF's (O, I)
    want_q, want_scale = quantize_np(w.T)
    np.testing.assert_allclose(np.asarray(f.scale), want_scale[:, 0], rtol=2.5e-7)
    assert (np.asarray(f.q, np.float32) == want_q).mean() > 0.99
    back = np.asarray(jora.dequantize(f))
    assert (np.abs(back - w) <= e4m3_error(w, want_scale.T) * (1 + 1e-6)).all()


def gemm_bound(a, a_scale, b, b_scale):
    """The most a quantized a (M, K) @ b (K, N) can miss a @ b by (the module's docstring)."""
    ea, eb = e4m3_error(a, a_scale), e4m3_error(b, b_scale)
    return ea @ np.abs(b) + np.abs(a) @ eb + ea @ eb


@pytest.mark.parametrize("transposed", [False, True])
def test_projection_forward_and_input_gradient_within_the_e4m3_bound(transposed):
    rng = np.random.default_rng(2)
    B, T, I, O = 2, 8, 64, 48
    x = rng.standard_normal((B, T, I)).astype(np.float32) * np.logspace(-2, 2, T)[:, None]
    w = (rng.standard_normal((I, O)) * np.logspace(-1, 1, O)).astype(np.float32)
    g = rng.standard_normal((B, T, O)).astype(np.float32)
    f = jora.fp8_weight(jnp.asarray(w), transposed)
    assert (f.qt is not None) == transposed
    y, vjp = jax.vjp(lambda x: jora.project(x, f, None, None), jnp.asarray(x))
    (dx,) = vjp(jnp.asarray(g))

    x2, g2 = x.reshape(-1, I), g.reshape(-1, O)
    sx = np.abs(x2).max(-1, keepdims=True) / E4M3_MAX
    sw = np.abs(w).max(0, keepdims=True) / E4M3_MAX                      # (1, O)
    err_y = np.abs(np.asarray(y).reshape(-1, O) - x2 @ w)
    assert (err_y <= gemm_bound(x2, sx, w, sw) * (1 + 1e-5) + 1e-6).all()

    # Backward: a = g * W's scales (a scale per position), b = W / its scales (its q values)
    a = g2 * sw
    sa = np.abs(a).max(-1, keepdims=True) / E4M3_MAX
    err_dx = np.abs(np.asarray(dx).reshape(-1, I) - g2 @ w.T)
    assert (err_dx <= gemm_bound(a, sa, (w / sw).T, 1.0) * (1 + 1e-5) + 1e-6).all()

    # What that means in practice: a few percent, and not zero (float8 did run)
    for got, want in ((y, x @ w), (dx, g @ w.T)):
        assert 1e-3 < rel(got, want) < 0.05, rel(got, want)


@pytest.mark.parametrize("shape, with_c, block, keep", [
    ((6, 96), False, None, None), ((5, 1500), True, None, None), ((3, 40), True, None, None),
    ((4, 1500), True, 256, None), ((4, 1500), True, 256, 0)])
def test_the_row_kernel_matches_numpy(shape, with_c, block, keep):
    """kernels/fp8_rows.py in Pallas' interpreter: rows spanning 8 orders of magnitude, one
    with subnormals beside normals, one all zero; widths off a power of two; the whole row
    at once, and in blocks (block=256) as wider rows are read: kept (read once) or, with
    keep=0, read twice."""
    from kernels.fp8_rows import quantize_rows
    rng = np.random.default_rng(4)
    x = rng.standard_normal(shape).astype(np.float32) * np.logspace(-4, 4, shape[0])[:, None]
    x[1, : shape[1] // 2] *= 1e-6
    x[2] = 0.0
    c = np.exp(rng.standard_normal(shape[1])).astype(np.float32) if with_c else None
    q, s = quantize_rows(jnp.asarray(x, jnp.bfloat16), None if c is None else jnp.asarray(c),
                         block=block, keep=keep, interpret=True)
    assert q.dtype == jnp.float8_e4m3fn and q.shape == shape and s.shape == shape[:1]
    xc = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32) * (1 if c is None else c)
    want_q, want_s = quantize_np(xc)
    np.testing.assert_allclose(np.asarray(s), want_s[:, 0], rtol=2.5e-7)
    assert_e4m3_close(q, want_q)


@pytest.mark.parametrize("C, block, keep", [(600, None, None), (600, 128, None),
                                           (2500, None, None), (2500, None, 0)])
def test_the_gate_kernels_match_autodiff_and_numpy(C, block, keep):
    """kernels/fp8_rows.py's SwiGLU kernels in Pallas' interpreter, from raw GEMM outputs and
    their row and column scales: the forward's float8 rows of silu(G) * U, and the backward's
    of dG * cg and dU * cu, against jax.vjp of silu(G) * U and the NumPy quantization. Rows
    whole (600 columns), in blocks of 128, and at 2,500 columns, where the backward reads in
    its default blocks (its five row-long values, g, u, dh and two outputs, are too many to
    read at once): kept, and read twice (keep=0)."""
    from kernels.fp8_rows import swiglu_grad_rows, swiglu_rows
    rng = np.random.default_rng(8)
    M = 4
    g, u, dh = (rng.standard_normal((M, C)).astype(np.float32) * 50 for _ in range(3))
    g, u, dh = (np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32) for x in (g, u, dh))
    a, b = (np.exp(rng.standard_normal(M)).astype(np.float32) / 50 for _ in range(2))
    cg, cu = (np.exp(rng.standard_normal(C)).astype(np.float32) / 20 for _ in range(2))
    G, U, DH = g * a[:, None] * cg, u * a[:, None] * cu, dh * b[:, None]
    h, vjp = jax.vjp(lambda G, U: jax.nn.silu(G) * U, jnp.asarray(G), jnp.asarray(U))
    dG, dU = vjp(jnp.asarray(DH))
    bf = functools.partial(jnp.asarray, dtype=jnp.bfloat16)
    kw = dict(block=block, keep=keep, interpret=True)
    got = [*swiglu_rows(bf(g), bf(u), a, cg, cu, **kw),
           *swiglu_grad_rows(bf(g), bf(u), a, cg, cu, bf(dh), b, **kw)]
    want = [quantize_np(x) for x in (h, np.asarray(dG) * cg, np.asarray(dU) * cu)]
    for (q, s), (want_q, want_s) in zip(zip(got[::2], got[1::2]), want):
        np.testing.assert_allclose(np.asarray(s), want_s[:, 0], rtol=1e-5)
        assert_e4m3_close(q, want_q)


@pytest.mark.parametrize("tp, targets", [(1, jora.PROJ), (2, jora.PROJ), (1, ("q", "v")),
                                         (2, ("q", "v"))])
def test_the_row_kernels_in_the_model_equal_xla(tp, targets):
    """Loss and LoRA gradients of a float8 model with its rows quantized by kernels/fp8_rows.py
    (Plan kernels="pallas") equal XLA's quantization (kernels="xla"). At tp = 2 the rows split
    over "model" keep XLA's, with its pmax. With q,v alone, the MLP runs as kernel_fp8_mlp at
    tp = 1, which skips rounding g, u and their gradients to bf16: equal to within that."""
    if len(jax.devices()) < tp:
        pytest.skip(f"needs {tp} devices")
    mlp_kernels = tp == 1 and "gate" not in targets
    cfg, p8, _ = fp8_model(GQA, jax.random.key(5), transposed=True)
    lcfg = jora.LoraConfig(r=4, targets=targets, dropout=0.0)
    lora = random_lora(jax.random.key(6), cfg, lcfg)
    batch = jora.make_batch(np.random.default_rng(7).integers(0, cfg.vocab_size, (2, 33)))
    mesh = jora.make_mesh(tp, jax.devices()[:tp])
    params = jora.shard(p8, jora.param_specs(cfg), mesh)

    def run(kernels):
        f = jax.value_and_grad(lambda lo: jora.loss(
            params, lo, batch, cfg, lcfg, plan=jora.Plan(kernels=kernels),
            opts=jora.Options(attention="xla")))   # (cuDNN's takes no float32)
        jaxpr = str(jax.make_jaxpr(f)(lora))
        assert ("quantize_rows" in jaxpr) == (kernels == "pallas")
        # the MLP's own kernels where gate, up and down have no adapter and their rows are whole
        assert ("swiglu_grad_rows" in jaxpr) == (kernels == "pallas" and mlp_kernels)
        loss, grads = f(lora)
        return float(loss), np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])

    with jax.default_matmul_precision("highest"):   # (on GPUs: no TF32 in the fp32 GEMMs)
        (lk, gk), (lx, gx) = run("pallas"), run("xla")
    # a scale an fp32 ulp apart may move a value on a rounding tie by one e4m3 step
    tol = 1e-2 if mlp_kernels else 1e-3
    assert abs(lk - lx) < tol / 10 * abs(lx) and rel(gk, gx) < tol, (lk, lx, rel(gk, gx))


def fp8_model(cfg, key, transposed: bool):
    """(the float8 config, its params, the same model with the dequantized projections)"""
    cfg8 = dataclasses.replace(cfg, fp8=True, fp8_transposed=transposed)
    p = random_params(key, cfg)
    layers = {f: jora.fp8_weight(getattr(p.layers, f), transposed) for f in jora.TARGET}
    p8 = p._replace(layers=p.layers._replace(**layers))
    same = p._replace(layers=p.layers._replace(
        **{f: jora.dequantize(w) for f, w in layers.items()}))
    return cfg8, p8, same


@pytest.mark.parametrize("tp, transposed", [(2, False), (4, True)])
def test_tp_equals_tp1(tp, transposed):
    """Loss and LoRA gradients with float8 projections: tp = N equals tp = 1 (the scales are
    taken over whole rows on every layout), and both differ from the unquantized model's."""
    if len(jax.devices()) < tp:
        pytest.skip(f"needs {tp} devices")
    cfg, p8, same = fp8_model(GQA, jax.random.key(0), transposed)
    lcfg = jora.LoraConfig(r=4, targets=jora.PROJ, dropout=0.0)
    lora = random_lora(jax.random.key(1), cfg, lcfg)
    tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 33))
    batch = jora.make_batch(tokens)

    def run(c, params, n):
        mesh = jora.make_mesh(n, jax.devices()[:n])
        params = jora.shard(params, jora.param_specs(c), mesh)
        loss, grads = jax.value_and_grad(lambda lo: jora.loss(params, lo, batch, c, lcfg))(lora)
        return float(loss), np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])

    l1, g1 = run(cfg, p8, 1)
    ln, gn = run(cfg, p8, tp)
    assert abs(ln - l1) < 1e-5 * abs(l1) and rel(gn, g1) < 1e-5, (ln, l1, rel(gn, g1))
    # the same model with W exactly as quantized, in float32 GEMMs
    l0, g0 = run(dataclasses.replace(cfg, fp8=False, fp8_transposed=False), same, 1)
    assert abs(l1 - l0) > 1e-5 and 1e-4 < rel(g1, g0) < 0.05, (l1, l0, rel(g1, g0))


@needs_data
@pytest.mark.parametrize("tp", [1, 2])
def test_load_quantizes_as_it_loads_and_export_merges_into_the_originals(tp, tmp_path):
    """A Qwen2 folder (biases, grouped KV heads) loaded with fp8=True: each projection is
    fp8_weight of the weight as stored, unstacked; the logits stay near the float32 model's;
    the merged export with an adapter equals the float32 model's merged export byte for byte
    (merged into the original weights, read again from the folder), and needs that folder."""
    if len(jax.devices()) < tp:
        pytest.skip(f"needs {tp} devices")
    folder = os.path.join(DATA, "families", "qwen2")
    mesh = jora.make_mesh(tp, jax.devices()[:tp])
    cfg, params = jora.load_hf(folder, jnp.float32, mesh)
    cfg8, p8 = jora.load_hf(folder, jnp.float32, mesh, fp8=True, fp8_transposed=tp == 2)
    assert cfg8.fp8 and not cfg.fp8 and cfg8.fp8_transposed == (tp == 2)
    for f in jora.TARGET:
        w8, w = getattr(p8.layers, f), getattr(params.layers, f)
        assert isinstance(w8.q, tuple) and len(w8.q) == cfg.n_layers
        for i in range(cfg.n_layers):
            want = jora.fp8_weight(w[i])
            got = jora.layer_at(w8, i)
            # (compiled apart, the two may divide by 448 differently: an fp32 ulp in a scale,
            # which can move a value on a rounding tie by one e4m3 step)
            np.testing.assert_allclose(np.asarray(got.scale), np.asarray(want.scale),
                                       rtol=2.5e-7)
            assert_e4m3_close(got.q, want.q)
            if cfg8.fp8_transposed:
                np.testing.assert_array_equal(np.asarray(got.qt, np.float32),
                                              np.asarray(got.q, np.float32).T)
    lcfg = jora.LoraConfig(r=4, targets=jora.PROJ)
    lora = jora.shard(random_lora(jax.random.key(4), cfg, lcfg), jora.lora_specs(lcfg), mesh)
    ids = np.random.default_rng(5).integers(0, cfg.vocab_size, (1, 24))
    opts = jora.Options(attention="xla", packed=False)
    want = np.asarray(jora.forward(params, ids, cfg, lora, lcfg, opts=opts, mesh=mesh))
    got = np.asarray(jora.forward(p8, ids, cfg8, lora, lcfg, opts=opts, mesh=mesh))
    assert 1e-4 < rel(got, want) < 0.05, rel(got, want)

    jora.export_merged(str(tmp_path / "f32"), cfg, params, lora, lcfg, source=folder,
                       dtype=jnp.float32)
    jora.export_merged(str(tmp_path / "fp8"), cfg8, p8, lora, lcfg, source=folder,
                       dtype=jnp.float32)
    a = jora.load_tensors(str(tmp_path / "f32" / "model.safetensors"))
    b = jora.load_tensors(str(tmp_path / "fp8" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert json.load(open(tmp_path / "fp8" / "config.json"))["model_type"] == "qwen2"
    with pytest.raises(ValueError, match="source=the folder"):
        jora.export_merged(str(tmp_path / "none"), cfg8, p8, lora, lcfg)


@needs_data
def test_greedy_generation_on_the_fp8_base(stories):
    """The real stories260K model's greedy continuations on its float8 base: most tokens are
    the float32 base's (the first that differs changes the rest)."""
    cfg, params = stories
    folder = os.path.join(STORIES, "hf")
    cfg8, p8 = jora.load_hf(folder, jnp.float32, fp8=True)
    tok = jora.Tokenizer(folder)
    prompts = [tok.encode(t, bos=True) for t in ("Once upon a time", "Lily and Ben went",
                                                 "The little dog", "One day, a girl")]
    s = jora.Sampling(max_new_tokens=24)
    want = jora.generate(params, prompts, cfg, sampling=s)
    got = jora.generate(p8, prompts, cfg8, sampling=s)
    same = sum(a == b for w, g in zip(want, got) for a, b in zip(w, g))
    share = same / sum(min(len(w), len(g)) for w, g in zip(want, got))
    assert share > 0.5, (share, want, got)


@needs_data
def test_train_py_on_an_fp8_base(tmp_path):
    """train.py --base-dtype float8 on stories260K: it trains, exports a merged model whose
    untrained projections are the original weights bit for bit, and --generate runs on the
    float8 base with the adapter."""
    import train
    data = tmp_path / "alpaca.json"
    records = json.load(open(os.path.join(DATA, "alpaca", "alpaca_data_1k.json")))[:40]
    data.write_text(json.dumps(records))
    model, out = os.path.join(STORIES, "hf"), str(tmp_path / "run")
    summary = train.main(["--model", model, "--data", str(data), "--steps", "3", "--out", out,
                          "--targets", "q,v", "--dtype", "float32", "--seq-len", "256",
                          "--lr", "0.01", "--base-dtype", "float8"])
    assert np.isfinite(summary["loss"])
    merged = jora.load_tensors(os.path.join(out, "merged", "model.safetensors"))
    source = jora.load_tensors(os.path.join(model, "model.safetensors"))
    k, q = "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.q_proj.weight"
    np.testing.assert_array_equal(merged[k], source[k].astype(merged[k].dtype))
    assert not np.array_equal(merged[q], source[q].astype(merged[q].dtype))   # the adapter
    result = train.main(["--generate", "--model", model, "--adapter", os.path.join(out, "adapter"),
                         "--base-dtype", "float8", "--prompt", "Once upon a time",
                         "--max-new-tokens", "6"])
    assert len(result["outputs"][0]) >= 1
