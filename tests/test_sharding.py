"""Tensor and data parallelism on 8 fake CPU devices: every mesh gives the unsharded numbers."""
import os

import jax
import numpy as np
import pytest
from conftest import random_lora, random_params

import jora

# GQA (G = 2) with 8 KV heads, so that tp = 8 still holds whole KV heads.
CFG = jora.Config(vocab_size=128, d_model=64, d_ff=128, n_layers=2, n_heads=16, n_kv_heads=8,
                  head_dim=8, max_positions=256)
LCFG = jora.LoraConfig(r=4, alpha=8.0, targets=jora.PROJ)
MESHES = [(1, 1), (1, 2), (1, 4), (2, 2), (2, 4), (1, 8)]


def mesh_of(data, tp):
    return jora.make_mesh(tp, jax.devices()[:data * tp])


@pytest.fixture(scope="module")
def setup():
    key = jax.random.key(0)
    params = random_params(key, CFG)
    lora = random_lora(jax.random.fold_in(key, 1), CFG, LCFG)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CFG.vocab_size, (4, 33))
    weights = (rng.random((4, 33)) < 0.7).astype(np.float32)
    segs = np.where(np.arange(33) < 20, 1, 2)[None].repeat(4, 0)   # two packed examples a row
    return params, lora, jora.make_batch(tokens, weights, segs)


@pytest.fixture(scope="module")
def unsharded_grads(setup):   # tp = 1 (loss, LoRA gradients), once for every mesh compared
    return loss_and_grads(mesh_of(1, 1), *setup)


@pytest.fixture(scope="module")
def unsharded_steps(setup):   # tp = 1 (losses, LoRA factors) of five_steps, likewise
    return five_steps(mesh_of(1, 1), *setup)


def on(mesh, params, lora, batch):
    return (jora.shard(params, jora.param_specs(), mesh),
            jora.shard(lora, jora.lora_specs(LCFG), mesh),
            jora.shard(batch, jora.batch_specs(), mesh))


def loss_and_grads(mesh, params, lora, batch, plan=jora.Plan()):
    p, l, b = on(mesh, params, lora, batch)
    f = jax.jit(jax.value_and_grad(lambda l: jora.loss(p, l, b, CFG, LCFG, plan=plan, mesh=mesh)))
    return jax.device_get(f(l))


def five_steps(mesh, params, lora, batch):
    tcfg = jora.TrainConfig(steps=5, batch_size=2, grad_accum=2, lr=1e-2, warmup=2,
                            weight_decay=0.1)
    p, l, _ = on(mesh, params, jax.device_get(lora), batch)   # a copy: the step donates it
    state = jora.shard(jora.TrainState(l, jora.adamw_init(l), np.int32(0)),
                       jora.state_specs(LCFG), mesh)
    spec = jora.Batch(*([jora.P(None, jora.DATA, None)] * 5))
    b = jora.shard(jora.Batch(*(x.reshape(2, 2, -1) for x in batch)), spec, mesh)
    step = jora.make_train_step(CFG, LCFG, tcfg, mesh)
    losses = []
    for _ in range(5):
        state, m = step(state, p, b, jax.random.key(0))
        losses.append(float(m["loss"]))
    return losses, jax.device_get(state.lora)


@pytest.mark.parametrize("data,tp,sp,mlp_chunk", [m + (False, 0) for m in MESHES] +
                         [(1, 2, True, 0), (2, 2, True, 0), (1, 8, True, 0), (1, 4, False, 7),
                          (2, 2, True, 7)])
def test_loss_and_lora_grads_match_unsharded(setup, unsharded_grads, data, tp, sp, mlp_chunk):
    params, lora, batch = setup
    want_loss, want_g = unsharded_grads
    opts = jora.Plan(sequence_parallel=sp, mlp_chunk=mlp_chunk,
                        remat="full" if mlp_chunk else "none")
    loss, g = loss_and_grads(mesh_of(data, tp), params, lora, batch, opts)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    for t in LCFG.targets:
        for part in "ab":
            got, want = getattr(getattr(g, t), part), getattr(getattr(want_g, t), part)
            assert np.abs(want).max() > 0
            np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6, err_msg=f"{t}.{part}")


@pytest.mark.parametrize("data,tp", MESHES[1:])
def test_five_training_steps_match_unsharded(setup, unsharded_steps, data, tp):
    params, lora, batch = setup
    want_losses, want = unsharded_steps
    losses, got = five_steps(mesh_of(data, tp), params, lora, batch)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    assert want_losses[-1] < want_losses[0]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5), got, want)


def test_kv_heads_fewer_than_tp_are_refused():
    cfg = jora.Config(**{**CFG.__dict__, "n_kv_heads": 4})
    with pytest.raises(ValueError, match="num_key_value_heads=4 is not divisible by tp=8"):
        jora.check_tp(cfg, 8)
    with pytest.raises(ValueError, match="--tp 3 must divide the number of devices"):
        jora.make_mesh(3)


def test_export_from_sharded_run_equals_tp1(setup, tmp_path):
    from safetensors.numpy import load_file
    params, lora, _ = setup
    files = []
    for data, tp in [(1, 1), (2, 4)]:
        mesh = mesh_of(data, tp)
        p, l, _ = on(mesh, params, lora, _)
        out = tmp_path / f"tp{tp}"
        jora.export_merged(str(out / "merged"), CFG, p, l, LCFG, dtype=np.float32)
        jora.export_adapter(str(out / "adapter"), CFG, l, LCFG)
        files.append(out)
    for rel in ["merged/model.safetensors", "adapter/adapter_model.safetensors"]:
        a, b = load_file(files[0] / rel), load_file(files[1] / rel)
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    for rel in ["merged/config.json", "adapter/adapter_config.json"]:
        assert (files[0] / rel).read_text() == (files[1] / rel).read_text()


def test_sharded_loading_matches_and_splits(setup, tmp_path):
    params, _, _ = setup
    jora.export_merged(str(tmp_path / "m"), CFG, params, dtype=np.float32)
    mesh = mesh_of(2, 4)
    cfg, p = jora.load_hf(str(tmp_path / "m"), np.float32, mesh)
    assert cfg == CFG
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 p, params)
    wq = p.layers.wq   # each device holds a quarter of the heads, not the whole weight
    assert {s.data.shape for s in wq.addressable_shards} == {(2, 64, 16 * 8 // 4)}


def test_vocabulary_not_divisible_by_tp_is_padded_and_masked(tmp_path):
    cfg = jora.Config(**{**CFG.__dict__, "vocab_size": 100})   # lm_head padded to 128 columns
    params = random_params(jax.random.key(3), cfg)
    lora = random_lora(jax.random.key(4), cfg, LCFG)
    tokens = np.random.default_rng(1).integers(0, 100, (4, 17))
    batch = jora.make_batch(tokens)
    logits = np.asarray(jora.forward(params, tokens[:, :-1], cfg, lora, LCFG), np.float64)
    assert logits.shape == (4, 16, 100)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                              keepdims=True)) \
        - logits.max(-1, keepdims=True)
    want = -np.take_along_axis(logp, tokens[:, 1:, None], -1).mean()
    for data, tp in [(1, 1), (2, 4)]:
        mesh = mesh_of(data, tp)
        p, l, b = (jora.shard(params, jora.param_specs(), mesh),
                   jora.shard(lora, jora.lora_specs(LCFG), mesh),
                   jora.shard(batch, jora.batch_specs(), mesh))
        np.testing.assert_allclose(float(jora.loss(p, l, b, cfg, LCFG)), want, rtol=1e-5)
    jora.export_merged(str(tmp_path / "m"), cfg, params, dtype=np.float32)
    _, back = jora.load_hf(str(tmp_path / "m"), np.float32, mesh_of(1, 4))
    assert back.lm_head.shape == (64, 128)
    np.testing.assert_array_equal(np.asarray(back.lm_head)[:, :100],
                                  np.asarray(params.lm_head)[:, :100])
    assert not np.asarray(back.lm_head)[:, 100:].any()


def test_two_processes_train_like_one(tmp_path):
    """Two local processes with 2 CPU devices each (jax.distributed over gloo) end with the same
    LoRA parameters as one process with 4 devices."""
    import socket
    import subprocess
    import sys

    import demo
    import train
    from safetensors.numpy import load_file
    base, data = demo.demo_setup(str(tmp_path / "demo"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, os.path.join(root, "train.py"), "--model", base, "--data", data,
           "--steps", "3", "--tp", "2", "--batch-size", "4", "--seq-len", "48",
           "--targets", "q,v,o,down", "--log-every", "1"]
    one = subprocess.Popen(cmd + ["--out", str(tmp_path / "one")],   # at the same time
                           env=dict(os.environ, JAX_NUM_CPU_DEVICES="4"),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    with socket.socket() as s:   # a free port for the coordinator
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="2", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    procs = [subprocess.Popen(cmd + ["--out", str(tmp_path / "two"), "--coordinator",
                                     f"localhost:{port}", "--num-processes", "2",
                                     "--process-id", str(i)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for i in range(2)]
    outs = [p.communicate(timeout=300)[0].decode() for p in [one] + procs]
    assert all(p.returncode == 0 for p in [one] + procs), outs
    a = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) == 4 * 2 * 2
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-7, err_msg=k)
    assert any(np.abs(a[k]).max() > 0 for k in a if "lora_B" in k)   # it did train


def test_sequence_parallelism_shrinks_activation_memory_per_device():
    """Compiled per-device temporary memory of a remat=full step (XLA's own accounting): with
    sequence parallelism the layer inputs that remat keeps are split over tp too."""
    cfg = jora.Config(vocab_size=256, d_model=512, d_ff=1024, n_layers=16, n_heads=8,
                      n_kv_heads=8, head_dim=64)
    lcfg = jora.LoraConfig(r=4)

    def temp_mib(tp, sp):
        mesh = mesh_of(1, tp)
        shardings = jax.tree.map(lambda s: jora.NamedSharding(mesh, s), jora.param_specs())
        params = jax.jit(lambda k: jora.init_params(k, cfg), out_shardings=shardings)(
            jax.random.key(0))
        lora = jora.init_lora(jax.random.key(1), cfg, lcfg)
        state = jora.shard(jora.TrainState(lora, jora.adamw_init(lora), np.int32(0)),
                           jora.state_specs(lcfg), mesh)
        b = jora.make_batch(np.zeros((1, 1025), np.int32))
        b = jora.shard(jora.Batch(*(x[None] for x in b)),
                       jora.Batch(*([jora.P(None, jora.DATA, None)] * 5)), mesh)
        step = jora.make_train_step(cfg, lcfg, jora.TrainConfig(batch_size=1), mesh,
                                    opts=jora.Options(packed=False),
                                    plan=jora.Plan(remat="full", sequence_parallel=sp))
        compiled = step.lower(state, params, b, jax.random.key(2)).compile()
        return compiled.memory_analysis().temp_size_in_bytes / 2**20

    one, four, four_sp = temp_mib(1, False), temp_mib(4, False), temp_mib(4, True)
    assert four < one and four_sp < 0.75 * four, (one, four, four_sp)


def test_unstacked_layers_give_the_same_loss_grads_generation_and_export(setup, unsharded_grads,
                                                                         tmp_path):
    """unstack_layers (the layout train.py runs on: unrolled, no per-layer weight copies) gives
    the stacked scan's numbers, on a (2, 2) mesh, and consumes the stacked leaves."""
    from safetensors.numpy import load_file
    params, lora, batch = setup
    want_loss, want_g = unsharded_grads
    mesh = mesh_of(2, 2)
    p, l, b = on(mesh, params, lora, batch)
    u = jora.unstack_layers(p)
    assert not p.layers.wq.is_deleted()
    own = jax.tree.map(lambda x: x + 0, p)   # buffers of its own, shared with nothing
    u = jora.unstack_layers(own, free=True)
    assert own.layers.wq.is_deleted() and not p.layers.w_up.is_deleted()
    assert len(u.layers.wq) == CFG.n_layers and u.layers.wq[1].shape == (1, 64, 128)
    np.testing.assert_array_equal(u.layers.w_down[1][0], params.layers.w_down[1])
    opts = jora.Plan(remat="min")
    f = jax.jit(jax.value_and_grad(lambda l: jora.loss(u, l, b, CFG, LCFG, plan=opts, mesh=mesh)))
    loss, g = jax.device_get(f(l))
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-4, atol=1e-6), g, want_g)

    prompts = [[1, 5, 9], [3, 4, 5, 6, 7, 8, 2]]
    want = jora.generate(params, prompts, CFG, lora, LCFG, jora.Sampling(6))
    assert jora.generate(u, prompts, CFG, l, LCFG, jora.Sampling(6)) == want

    jora.export_merged(str(tmp_path / "stacked"), CFG, params, lora, LCFG, dtype=np.float32)
    jora.export_merged(str(tmp_path / "unstacked"), CFG, u, l, LCFG, dtype=np.float32)
    a = load_file(tmp_path / "stacked" / "model.safetensors")
    z = load_file(tmp_path / "unstacked" / "model.safetensors")
    assert a.keys() == z.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], z[k], err_msg=k)
