"""The model against independent references: a real trained Llama's logits, a NumPy
transcription of the forward pass, and the properties a causal LM must have."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import DATA, GQA, SMALL, STORIES, needs_data, random_lora, random_params

import jora


# ---- the real trained model -----------------------------------------------------------------

@needs_data
def test_stories260k_reproduces_reference_logits(stories):
    from safetensors.numpy import load_file
    cfg, params = stories
    ref = load_file(os.path.join(STORIES, "reference_logits.safetensors"))
    logits = jora.forward(params, ref["input_ids"][None], cfg)
    np.testing.assert_allclose(np.asarray(logits[0]), ref["logits"], atol=1e-4, rtol=0)


@needs_data
def test_stories260k_greedy_200_tokens(stories):
    from safetensors.numpy import load_file
    cfg, params = stories
    greedy = load_file(os.path.join(STORIES, "reference_logits.safetensors"))["greedy_ids"]
    out = jora.generate(params, [[cfg.bos_id]], cfg, sampling=jora.Sampling(200))[0]
    assert out == greedy[1:].tolist()


@needs_data
def test_stories260k_cross_entropy_on_tinystories(stories):
    cfg, params = stories
    tok = jora.Tokenizer(os.path.join(STORIES, "hf"))
    text = open(os.path.join(DATA, "text", "tinystories_sample.txt")).read()
    stories_ = [s.strip() for s in text.split("<|endoftext|>") if s.strip()]
    nll = n = 0.0
    for s in stories_:
        b = jora.make_batch([tok.encode(s, bos=True)])
        a, c = jora.loss_sums(params, None, b, cfg, None)
        nll, n = nll + float(a), n + float(c)
    assert len(stories_) == 5 and n == 1804
    assert abs(nll / n - 1.266) < 0.005, nll / n


@needs_data
def test_llama2_tokenizer():
    tok = jora.Tokenizer(os.path.join(DATA, "llama2", "tokenizer.model"))
    assert tok.vocab_size == 32000 and (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.encode("Hello world") == [15043, 3186]
    assert tok.encode("Hello world", bos=True, eos=True) == [1, 15043, 3186, 2]
    text = "Retrieval-augmented fine-tuning: 3 documents, 1 question.\nÜnïcödé ✓"
    assert tok.decode(tok.encode(text)) == text


# ---- an independent NumPy transcription ----------------------------------------------------

def numpy_forward(params, lora, lcfg, cfg, tokens):
    """Loop-heavy float64 Llama forward, written from the HF formulas, LoRA merged into W;
    with cfg.sliding_window = W > 0, position t attends to t - W + 1 ... t (Mistral v0.1)."""
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    T, H, G = len(tokens), cfg.head_dim, cfg.n_heads // cfg.n_kv_heads

    def w(name, t, i):
        W = getattr(p.layers, name)[i]
        ab = None if lora is None else getattr(lora, t)
        if ab is not None:
            W = W + lcfg.scale * np.asarray(ab.a[i], np.float64) @ np.asarray(ab.b[i], np.float64)
        return W

    def norm(x, g):
        return g * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps)

    def rot(x, pos):   # x (H,): rotate (x[j], x[j + H/2]) by pos * theta^(-2j/H)
        out = np.empty_like(x)
        for j in range(H // 2):
            a = pos * cfg.rope_theta ** (-2 * j / H)
            out[j] = x[j] * np.cos(a) - x[j + H // 2] * np.sin(a)
            out[j + H // 2] = x[j + H // 2] * np.cos(a) + x[j] * np.sin(a)
        return out

    x = p.embed[tokens]
    for i in range(cfg.n_layers):
        h = norm(x, p.layers.attn_norm[i])
        q = (h @ w("wq", "q", i)).reshape(T, cfg.n_heads, H)
        k = (h @ w("wk", "k", i)).reshape(T, cfg.n_kv_heads, H)
        v = (h @ w("wv", "v", i)).reshape(T, cfg.n_kv_heads, H)
        o = np.zeros((T, cfg.n_heads, H))
        for n in range(cfg.n_heads):
            for t in range(T):
                qt = rot(q[t, n], t)
                first = max(0, t - cfg.sliding_window + 1) if cfg.sliding_window else 0
                s = np.array([qt @ rot(k[u, n // G], u) for u in range(first, t + 1)]) / np.sqrt(H)
                e = np.exp(s - s.max())
                o[t, n] = (e / e.sum()) @ v[first:t + 1, n // G]
        x = x + o.reshape(T, -1) @ w("wo", "o", i)
        h = norm(x, p.layers.mlp_norm[i])
        g, u = h @ w("w_gate", "gate", i), h @ w("w_up", "up", i)
        x = x + (g / (1 + np.exp(-g)) * u) @ w("w_down", "down", i)
    return norm(x, p.final_norm) @ p.lm_head


def test_forward_matches_numpy_transcription_with_lora():
    key = jax.random.key(11)
    params = random_params(key, GQA)
    lcfg = jora.LoraConfig(r=4, alpha=8.0, targets=jora.PROJ)
    lora = random_lora(jax.random.fold_in(key, 1), GQA, lcfg)
    tokens = np.asarray(jax.random.randint(jax.random.fold_in(key, 2), (12,), 0, GQA.vocab_size))
    want = numpy_forward(params, lora, lcfg, GQA, tokens)
    got = jora.forward(params, tokens[None], GQA, lora, lcfg)[0]
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-4, rtol=1e-4)
    base = jora.forward(params, tokens[None], GQA)[0]
    assert np.abs(np.asarray(base) - want).max() > 1e-2   # the adapters really changed things


# ---- properties ----------------------------------------------------------------------------

def _setup(cfg=GQA, targets=("q", "v"), seed=0):
    key = jax.random.key(seed)
    params = random_params(key, cfg)
    lcfg = jora.LoraConfig(r=4, alpha=8.0, targets=targets)
    return params, lcfg, random_lora(jax.random.fold_in(key, 1), cfg, lcfg)


def test_causality():
    params, lcfg, lora = _setup(targets=jora.PROJ)
    t = np.asarray(jax.random.randint(jax.random.key(3), (2, 16), 0, GQA.vocab_size))
    t2 = t.copy()
    t2[:, 10] = (t2[:, 10] + 1) % GQA.vocab_size
    a = np.asarray(jora.forward(params, t, GQA, lora, lcfg))
    b = np.asarray(jora.forward(params, t2, GQA, lora, lcfg))
    np.testing.assert_array_equal(a[:, :10], b[:, :10])
    assert np.abs(a[:, 10:] - b[:, 10:]).max() > 1e-3


def test_packed_segments_equal_separate_examples():
    params, lcfg, lora = _setup(targets=jora.PROJ)
    rng = np.random.default_rng(4)
    x, y = rng.integers(0, GQA.vocab_size, 7), rng.integers(0, GQA.vocab_size, 9)
    seg = np.array([[1] * 7 + [2] * 9])
    pos = np.array([list(range(7)) + list(range(9))])
    packed = np.asarray(jora.forward(params, np.concatenate([x, y])[None], GQA, lora, lcfg,
                                     segment_ids=seg, positions=pos))[0]
    alone_x = np.asarray(jora.forward(params, x[None], GQA, lora, lcfg))[0]
    alone_y = np.asarray(jora.forward(params, y[None], GQA, lora, lcfg))[0]
    np.testing.assert_allclose(packed[:7], alone_x, atol=1e-5)
    np.testing.assert_allclose(packed[7:], alone_y, atol=1e-5)
    # make_batch derives the same positions and masks the cross-boundary target.
    b = jora.make_batch(np.concatenate([x, y, [0]])[None],
                        segment_ids=np.concatenate([seg, [[0]]], 1))
    np.testing.assert_array_equal(b.positions[0], pos[0])
    assert b.weights[0, 6] == 0 and b.weights[0, :6].all() and b.weights[0, 7:15].all()


def test_gqa_equals_mha_with_repeated_kv_heads():
    params, _, _ = _setup(GQA)
    G, H = GQA.n_heads // GQA.n_kv_heads, GQA.head_dim
    rep = lambda w: np.repeat(np.asarray(w).reshape(*w.shape[:-1], -1, H), G, -2).reshape(
        *w.shape[:-1], -1)
    mha_cfg = jora.Config(**{**GQA.__dict__, "n_kv_heads": GQA.n_heads})
    mha = params._replace(layers=params.layers._replace(wk=rep(params.layers.wk),
                                                        wv=rep(params.layers.wv)))
    t = np.asarray(jax.random.randint(jax.random.key(5), (2, 12), 0, GQA.vocab_size))
    np.testing.assert_allclose(np.asarray(jora.forward(params, t, GQA)),
                               np.asarray(jora.forward(mha, t, mha_cfg)), atol=1e-5)


def test_bf16_lora_projection_is_within_bf16_rounding_of_float64():
    """project() in bf16 (the training path: bf16 tensors, fp32 accumulation, under jit) against
    a float64 NumPy transcription of y = x W + s x A B and of its gradients through x, A and B:
    relative errors of about one bf16 rounding (2^-8 = 3.9e-3), not more. (Autodiff's own
    backward gave 1.6e-2 for dA and dB on XLA's CPU backend.)"""
    ks = jax.random.split(jax.random.key(11), 5)
    T, I, O, R = 96, 256, 192, 16
    x = jax.random.normal(ks[0], (2, T, I)).astype(jnp.bfloat16)
    w = (jax.random.normal(ks[1], (I, O)) / 16).astype(jnp.bfloat16)
    ab = jora.LoraAB(a=jax.random.normal(ks[2], (I, R)) / 16, b=jax.random.normal(ks[3], (R, O)))
    g = jax.random.normal(ks[4], (2, T, O)).astype(jnp.bfloat16)   # an upstream gradient
    lcfg = jora.LoraConfig(r=R, alpha=32.0)
    f = lambda x, a, b: jora.project(x, w, jora.LoraAB(a, b), lcfg)

    @jax.jit   # compiled, as in training (XLA's CPU backend then sums bf16 dots in bf16)
    def y_and_grads(x, a, b):
        y, vjp = jax.vjp(f, x, a, b)
        return y, *vjp(g)

    y, dx, da, db = y_and_grads(x, ab.a, ab.b)
    X, W, A, Bm, G = (np.asarray(v, np.float64) for v in (x, w, ab.a, ab.b, g))
    s = lcfg.scale
    want = {"y": X @ W + s * X @ A @ Bm, "dx": G @ W.T + s * G @ Bm.T @ A.T,
            "da": s * np.einsum("bti,btr->ir", X, G @ Bm.T),
            "db": s * np.einsum("btr,bto->ro", X @ A, G)}
    for k, got in dict(y=y, dx=dx, da=da, db=db).items():
        got = np.asarray(got, np.float64)
        assert y.dtype == jnp.bfloat16 and got.shape == want[k].shape, k
        rel = np.linalg.norm(got - want[k]) / np.linalg.norm(want[k])
        assert rel < 6e-3, (k, rel)


def test_zero_b_equals_base_and_merge_equals_factored():
    params, lcfg, lora = _setup(targets=jora.PROJ)
    t = np.asarray(jax.random.randint(jax.random.key(6), (2, 12), 0, GQA.vocab_size))
    fresh = jora.init_lora(jax.random.key(9), GQA, lcfg)               # B = 0
    np.testing.assert_array_equal(np.asarray(jora.forward(params, t, GQA, fresh, lcfg)),
                                  np.asarray(jora.forward(params, t, GQA)))
    merged = params._replace(layers=params.layers._replace(**{
        jora.WEIGHT[k]: jora.merge_lora(getattr(params.layers, jora.WEIGHT[k]), ab, lcfg)
        for k, ab in lora._asdict().items()}))
    np.testing.assert_allclose(np.asarray(jora.forward(merged, t, GQA)),
                               np.asarray(jora.forward(params, t, GQA, lora, lcfg)), atol=1e-5)


def test_lora_dropout_is_applied_only_with_a_key():
    params, _, _ = _setup()
    lcfg = jora.LoraConfig(r=4, alpha=8.0, dropout=0.5, targets=jora.PROJ)
    lora = random_lora(jax.random.key(1), GQA, lcfg, b_std=0.5)
    b = jora.make_batch(np.asarray(jax.random.randint(jax.random.key(2), (2, 13), 0, 128)))
    plain = float(jora.loss(params, lora, b, GQA, lcfg))
    assert plain == float(jora.loss(params, lora, b, GQA, lcfg))
    k1 = float(jora.loss(params, lora, b, GQA, lcfg, key=jax.random.key(0)))
    k2 = float(jora.loss(params, lora, b, GQA, lcfg, key=jax.random.key(1)))
    assert k1 != plain and k1 != k2


# ---- config ---------------------------------------------------------------------------------

def test_config_from_hf_transformers_4_and_5():
    v4 = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
              num_key_value_heads=2, vocab_size=100, rms_norm_eps=1e-6, rope_theta=500000.0,
              rope_scaling={"type": "linear", "factor": 4.0}, tie_word_embeddings=True,
              max_position_embeddings=8192)
    c = jora.Config.from_hf(v4)
    assert (c.n_kv_heads, c.head_dim, c.rope_theta, c.rope_scale, c.tie_embeddings) == (
        2, 8, 500000.0, 4.0, True)
    v5 = {k: v for k, v in v4.items() if k not in ("rope_theta", "rope_scaling")}
    v5.update(head_dim=16, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                            "rope_theta": 10000.0})
    c = jora.Config.from_hf(v5)
    assert (c.head_dim, c.rope_theta, c.rope_scale) == (16, 10000.0, 2.0)
    assert jora.Config.from_hf(c.to_hf()) == c


@pytest.mark.parametrize("change, message", [
    (dict(rope_scaling={"type": "yarn", "factor": 4.0}), "rope_scaling.rope_type='yarn'"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5}),   # with no factor
     "field 'rope_scaling.factor' is None"),
    (dict(hidden_size=None), "missing field 'hidden_size'"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(num_key_value_heads=3), "num_key_value_heads=3"),
    (dict(attention_bias=True), "attention_bias"),
])
def test_config_refuses_what_it_cannot_run(change, message):
    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=8, vocab_size=100)
    cfg.update(change)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        jora.Config.from_hf(cfg)


def test_presets_have_llama2_parameter_counts():
    count = lambda c: sum(np.prod(s) for s in jax.tree.leaves(
        jora.param_shapes(c), is_leaf=lambda s: isinstance(s, tuple) and
        all(isinstance(i, int) for i in s)))
    assert abs(count(jora.LLAMA2_7B) / 6.738e9 - 1) < 1e-3
    assert abs(count(jora.LLAMA2_13B) / 13.016e9 - 1) < 1e-3
    assert abs(count(jora.LLAMA2_70B) / 68.977e9 - 1) < 1e-3


@jax.jit(static_argnames=("lcfg", "plan"))
def _loss_and_grads(params, lora, batch, lcfg, plan, key=None):
    """jora.loss and its gradient in the LoRA factors, one jitted function for the module: the
    model, batch and key are arguments (not constants), so tests of one plan share a compile."""
    return jax.value_and_grad(lambda l: jora.loss(params, l, batch, GQA, lcfg, plan=plan,
                                                  key=key))(lora)


def test_remat_policies_change_memory_not_results():
    """Every remat policy gives the loss and gradients of none (on CPU attn acts as full: its
    cuDNN kernel is GPU-only; tests/test_gpu.py checks what it saves there)."""
    params, lcfg, lora = _setup(targets=jora.PROJ)
    tokens = np.asarray(jax.random.randint(jax.random.key(5), (2, 16), 0, GQA.vocab_size))
    batch = jora.make_batch(tokens)
    out = {r: jax.device_get(_loss_and_grads(params, lora, batch, lcfg, jora.Plan(remat=r)))
           for r in jora.REMAT}
    want_loss, want_g = out.pop("none")
    for r, (loss, g) in out.items():
        np.testing.assert_allclose(loss, want_loss, rtol=1e-6, err_msg=r)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(want_g)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7, err_msg=r)
    with pytest.raises(ValueError, match="remat must be one of"):
        jora.loss(params, lora, batch, GQA, lcfg, plan=jora.Plan(remat="some"))
    with pytest.raises(ValueError, match="loss_chunk must be >= 1"):
        jora.loss(params, lora, batch, GQA, lcfg, plan=jora.Plan(loss_chunk=0))


@pytest.mark.parametrize("remat", ["none", "min", "full"])
def test_mlp_chunks_change_memory_not_results(remat):
    """The MLP over chunks of positions (5 does not divide 16: the last chunk is shorter) gives
    the unchunked loss and gradients, with every LoRA factor live (nonzero B); with dropout on
    too (the masks do not depend on the chunks)."""
    params, lcfg, lora = _setup(targets=jora.PROJ)
    tokens = np.asarray(jax.random.randint(jax.random.key(6), (2, 16), 0, GQA.vocab_size))
    batch = jora.make_batch(tokens)
    run = lambda chunk, lc=lcfg, key=None: jax.device_get(_loss_and_grads(
        params, lora, batch, lc, jora.Plan(remat=remat, mlp_chunk=chunk), key))
    want_loss, want_g = run(0)
    for chunk in (5, 8):
        loss, g = run(chunk)
        np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(want_g)):
            assert np.abs(b).max() > 0
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
    dropped = dataclasses.replace(lcfg, dropout=0.5)
    loss, g = run(5, dropped, jax.random.key(7))
    assert np.isfinite(loss) and abs(loss - want_loss) > 1e-4
    unchunked_loss, unchunked_g = run(0, dropped, jax.random.key(7))   # the same masks
    np.testing.assert_allclose(loss, unchunked_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(unchunked_g)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="mlp_chunk must be >= 0"):
        jora.Plan(mlp_chunk=-1)


def _count(jaxpr, prim: str) -> int:
    """Uses of a primitive in a jaxpr, each use of a nested jaxpr counted."""
    n = 0
    for e in jaxpr.eqns:
        n += e.primitive.name == prim
        for v in e.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                sub = getattr(sub, "jaxpr", sub)
                n += _count(sub, prim) if hasattr(sub, "eqns") else 0
    return n


def _checkpoints(jaxpr) -> list:
    """The jaxprs of the outermost jax.checkpoint calls in a jaxpr, in program order."""
    out = []
    for e in jaxpr.eqns:
        subs = [getattr(s, "jaxpr", s) for v in e.params.values()
                for s in (v if isinstance(v, (tuple, list)) else (v,))]
        subs = [s for s in subs if hasattr(s, "eqns")]
        out += subs if e.primitive.name.startswith(("remat", "checkpoint")) else [
            c for s in subs for c in _checkpoints(s)]
    return out


def test_chunk_layers_chunk_only_the_last_layers():
    """Plan.chunk_layers=1: only the last of the 2 layers runs its MLP over chunks (its
    checkpointed body holds one more concatenation: the chunks'), with the loss and gradients of
    no chunks (every LoRA factor live). Stacked layers are refused by name."""
    params, lcfg, lora = _setup(targets=jora.PROJ)
    unrolled = jora.unstack_layers(params)
    tokens = np.asarray(jax.random.randint(jax.random.key(10), (2, 16), 0, GQA.vocab_size))
    batch = jora.make_batch(tokens)
    f = lambda p, **o: lambda l: jora.loss(p, l, batch, GQA, lcfg,
                                           plan=jora.Plan(remat="full", **o))
    joins = lambda **o: [_count(c, "concatenate") for c in _checkpoints(
        jax.make_jaxpr(f(unrolled, **o))(lora).jaxpr)][:GQA.n_layers]   # (then the loss's)
    base = joins()   # (RoPE concatenates too)
    extra = lambda **o: [a - b for a, b in zip(joins(**o), base)]
    assert len(base) == GQA.n_layers and extra(mlp_chunk=5) == [1, 1]
    assert extra(mlp_chunk=5, chunk_layers=1) == [0, 1]
    want_loss, want_g = jax.device_get(jax.value_and_grad(f(unrolled))(lora))
    loss, g = jax.device_get(jax.jit(jax.value_and_grad(
        f(unrolled, mlp_chunk=5, chunk_layers=1)))(lora))
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(want_g)):
        assert np.abs(b).max() > 0
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="chunk_layers needs unrolled layers"):
        f(params, mlp_chunk=5, chunk_layers=1)(lora)
    with pytest.raises(ValueError, match="chunk_layers must be >= 0"):
        jora.Plan(chunk_layers=-1)
    with pytest.raises(ValueError, match="chunk_layers=4 .* needs mlp_chunk > 0"):
        jora.Plan(chunk_layers=4)


def test_full_layers_save_less_and_change_nothing_else(capsys):
    """Plan.full_layers=1 under remat "min": the first layer keeps only its input (fewer saved
    residuals than "min" everywhere, more than "full" everywhere), and the loss and gradients
    (every LoRA factor live) are those of no remat. Stacked layers are refused by name."""
    params, lcfg, lora = _setup(targets=jora.PROJ)
    unrolled = jora.unstack_layers(params)
    tokens = np.asarray(jax.random.randint(jax.random.key(9), (2, 16), 0, GQA.vocab_size))
    batch = jora.make_batch(tokens)
    f = lambda opts: lambda l: jora.loss(unrolled, l, batch, GQA, lcfg, plan=opts)
    saved = {}
    for k, o in dict(min=jora.Plan(remat="min"), full=jora.Plan(remat="full"),
                     mixed=jora.Plan(remat="min", full_layers=1)).items():
        capsys.readouterr()
        jax.ad_checkpoint.print_saved_residuals(f(o), lora)   # one line a saved value
        saved[k] = len(capsys.readouterr().out.splitlines())
    assert saved["full"] < saved["mixed"] < saved["min"], saved
    want_loss, want_g = jax.device_get(jax.value_and_grad(f(jora.Plan()))(lora))
    loss, g = jax.device_get(jax.jit(jax.value_and_grad(
        f(jora.Plan(remat="min", full_layers=1))))(lora))
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(want_g)):
        assert np.abs(b).max() > 0
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="full_layers needs unrolled layers"):
        jora.loss(params, lora, batch, GQA, lcfg, plan=jora.Plan(remat="min", full_layers=1))
    with pytest.raises(ValueError, match="full_layers must be >= 0"):
        jora.Plan(full_layers=-1)


def test_logits_backward_in_bf16_matches_fp32_autodiff():
    """The loss head's custom backward (gradient rounded to bf16, no fp32 copy of lm_head) gives
    autodiff's fp32 gradient within bf16 rounding, and exactly autodiff's in fp32."""
    k1, k2, k3 = jax.random.split(jax.random.key(8), 3)
    h = jax.random.normal(k1, (3, 5, 64), jnp.float32)
    w = jax.random.normal(k2, (64, 96), jnp.float32) / 8
    g = jax.random.normal(k3, (3, 5, 96), jnp.float32)
    ref = lambda h, w: jnp.einsum("BTD,DV->BTV", h, w, precision="highest")
    want = jax.vjp(ref, h, w)[1](g)
    for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)):
        out, vjp = jax.vjp(jora.logits_matmul, h.astype(dtype), w.astype(dtype))
        assert out.dtype == jnp.float32
        for got, ref_g in zip(vjp(g), want):
            assert got.dtype == dtype
            err = np.abs(np.asarray(got, np.float32) - ref_g).max() / np.abs(ref_g).max()
            assert err < tol, (dtype, err)


def test_segment_runs_match_a_python_transcription():
    """cuDNN's packed layout: each row's runs of one segment id as starts (B, M + 1) and lengths
    (B, M), -1 past the last; checked against a loop over fresh random rows."""
    rng = np.random.default_rng(0)
    runs = jax.jit(jora.segment_runs, static_argnums=1)   # as in the model: one program a shape
    for _ in range(20):
        B, T, M = 3, int(rng.integers(1, 40)), int(rng.integers(2, 9))
        rows = []
        for _ in range(B):   # runs of random lengths and ids (adjacent ids differ), <= M runs
            ids, row = rng.permutation(50)[:M], []
            for i in range(int(rng.integers(1, M + 1))):
                row += [ids[i]] * int(rng.integers(1, 8))
            rows.append((row + [ids[len(set(row)) - 1]] * T)[:T])   # tail extends the last run
        seg = np.array(rows)
        starts, lengths = map(np.asarray, runs(jnp.asarray(seg), M))
        for b in range(B):
            s = [t for t in range(T) if t == 0 or seg[b, t] != seg[b, t - 1]]
            n = [e - a for a, e in zip(s, s[1:] + [T])]
            assert list(starts[b]) == s + [-1] * (M + 1 - len(s))
            assert list(lengths[b]) == n + [-1] * (M - len(n))
        assert jora.count_runs(seg) == max(len([t for t in range(T) if t == 0 or
                                                seg[b, t] != seg[b, t - 1]]) for b in range(B))


def test_too_many_segments_are_refused_by_name():
    params = random_params(jax.random.key(0), GQA)
    seg = np.repeat(np.arange(1, 7), 3)[None]            # 6 runs of 3 positions
    batch = jora.make_batch(np.ones((1, 19), np.int32), segment_ids=np.c_[seg, [[6]]])
    with pytest.raises(ValueError, match="6 runs.*max_segments=4"):
        jora.loss(params, None, batch, GQA, opts=jora.Options(max_segments=4))
    with pytest.raises(ValueError, match="max_segments=4"):
        jora.forward(params, seg, GQA, opts=jora.Options(max_segments=4), segment_ids=seg)
    assert np.isfinite(jora.loss(params, None, batch, GQA, opts=jora.Options(max_segments=6)))
    with pytest.raises(ValueError, match="max_segments must be 0"):
        jora.Options(max_segments=1)


def test_sliding_window_matches_numpy_in_training_packing_and_generation():
    """A tiny Mistral of our own with a window of 5 positions, shorter than the 14 inputs,
    against the float64 transcription: the training forward, the same example packed after
    another in one row, and greedy generation over the KV cache."""
    import dataclasses
    cfg = dataclasses.replace(GQA, family="mistral", sliding_window=5)
    key = jax.random.key(5)
    params = random_params(key, cfg)
    lcfg = jora.LoraConfig(r=4, alpha=8.0, targets=jora.PROJ)
    lora = random_lora(jax.random.fold_in(key, 1), cfg, lcfg)
    tokens = np.asarray(jax.random.randint(jax.random.fold_in(key, 2), (14,), 0, cfg.vocab_size))
    want = numpy_forward(params, lora, lcfg, cfg, tokens)
    got = jora.forward(params, tokens[None], cfg, lora, lcfg)[0]
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-4, rtol=1e-4)
    unwindowed = numpy_forward(params, lora, lcfg, dataclasses.replace(cfg, sliding_window=0),
                               tokens)
    assert np.abs(unwindowed - want).max() > 1e-2   # the window changes the logits
    other = np.asarray(jax.random.randint(jax.random.fold_in(key, 3), (6,), 0, cfg.vocab_size))
    row = np.concatenate([other, tokens])[None]
    segs = np.concatenate([np.ones(6, np.int32), np.full(14, 2, np.int32)])[None]
    pos = np.concatenate([np.arange(6), np.arange(14)])[None]
    packed = jora.forward(params, row, cfg, lora, lcfg, segment_ids=segs, positions=pos)[0, 6:]
    np.testing.assert_allclose(np.asarray(packed), want, atol=2e-4, rtol=1e-4)
    out = jora.generate(params, [tokens[:9].tolist()], cfg, lora, lcfg, jora.Sampling(5))[0]
    seq = list(tokens[:9])
    for _ in range(len(out)):   # greedy, each next token from the transcription
        seq.append(int(np.argmax(numpy_forward(params, lora, lcfg, cfg, np.asarray(seq))[-1])))
    assert out == seq[9:]
