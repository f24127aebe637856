"""LoRA dropout: one mask for every layout, with the statistics and independence of dropout."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_lora, random_params

import jora

CFG = jora.Config(vocab_size=128, d_model=64, d_ff=128, n_layers=2, n_heads=8, n_kv_heads=4,
                  head_dim=8, max_positions=256)
LCFG = jora.LoraConfig(r=4, alpha=8.0, dropout=0.05, targets=jora.PROJ)


def rel(a, b):   # relative error of a against b, over the whole tensor
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.fixture(scope="module")
def setup():
    key = jax.random.key(3)
    params = random_params(key, CFG)
    lora = random_lora(jax.random.fold_in(key, 1), CFG, LCFG, b_std=0.2)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CFG.vocab_size, (4, 33))
    weights = (rng.random((4, 33)) < 0.8).astype(np.float32)
    return params, jax.device_get(lora), jora.make_batch(tokens, weights)


def steps(setup, data, tp, plan=jora.Plan(), unrolled=False, n=3, lcfg=LCFG):
    """n training steps (2 micro-batches of 2 rows each) -> (losses, gradient of step 1, LoRA)."""
    params, lora, batch = setup
    mesh = jora.make_mesh(tp, jax.devices()[:data * tp])
    p = jora.shard(params, jora.param_specs(), mesh)
    p = jora.unstack_layers(p) if unrolled else p
    state = jora.shard(jora.TrainState(lora, jora.adamw_init(lora), np.int32(0)),
                       jora.state_specs(lcfg), mesh)
    spec = jora.Batch(*([jora.P(None, jora.DATA, None)] * 5))
    b = jora.shard(jora.Batch(*(x.reshape(2, 2, -1) for x in batch)), spec, mesh)
    one = jora.Batch(*(x[0] for x in b))
    grad = jax.jit(jax.grad(lambda l: jora.loss(p, l, one, CFG, lcfg, plan=plan, mesh=mesh,
                                                key=jax.random.key(9))))(state.lora)
    tcfg = jora.TrainConfig(steps=n, batch_size=2, grad_accum=2, lr=1e-2, warmup=1)
    step = jora.make_train_step(CFG, lcfg, tcfg, mesh, plan=plan)
    losses = []
    for _ in range(n):
        state, m = step(state, p, b, jax.random.key(5))
        losses.append(float(m["loss"]))
    return np.asarray(losses), jax.device_get(grad), jax.device_get(state.lora)


LAYOUTS = {   # data, tp, options, unrolled layers
    "tp2": (1, 2, jora.Plan(), False),
    "tp4": (1, 4, jora.Plan(), False),
    "data2 x tp2": (2, 2, jora.Plan(), False),
    "sequence parallel": (1, 4, jora.Plan(sequence_parallel=True), False),
    "mlp chunks, remat full": (1, 2, jora.Plan(mlp_chunk=5, remat="full"), False),
    "unrolled layers, min": (1, 1, jora.Plan(remat="min"), True),
    "all at once": (2, 2, jora.Plan(sequence_parallel=True, mlp_chunk=8, remat="min",
                                       chunk_layers=1, full_layers=1), True),
}


@pytest.fixture(scope="module")
def reference(setup):
    return steps(setup, 1, 1)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_dropout_is_the_same_at_every_layout(setup, reference, layout):
    """fp32, dropout 0.05, nonzero B: the losses of three steps, the LoRA gradient and the
    trained factors of tp = 1 are reproduced by every split, chunking and layer form."""
    want_losses, want_g, want_lora = reference
    data, tp, opts, unrolled = LAYOUTS[layout]
    losses, g, lora = steps(setup, data, tp, opts, unrolled)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-6)
    for path, a, b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(g),
                          jax.tree.leaves(want_g)):
        assert rel(a, b) < 1e-6, (jax.tree_util.keystr(path[0]), rel(a, b))
    for a, b in zip(jax.tree.leaves(lora), jax.tree.leaves(want_lora)):
        assert rel(a, b) < 1e-5   # AdamW divides by sqrt(nu): rounding of tiny gradients grows


def test_dropout_changes_training_and_dropout_zero_does_not(setup, reference):
    want_losses, want_g, _ = reference
    off = dataclasses.replace(LCFG, dropout=0.0)
    losses, g, _ = steps(setup, 1, 1, lcfg=off)
    assert abs(losses[0] - want_losses[0]) > 1e-5     # the masks act
    params, lora, batch = setup
    # dropout 0 with a key is exactly the model without one
    keyed = jora.loss(params, lora, batch, CFG, off, key=jax.random.key(1))
    assert float(keyed) == float(jora.loss(params, lora, batch, CFG, off))
    # a fixed seed reproduces itself bit for bit
    again = steps(setup, 1, 1)
    np.testing.assert_array_equal(again[0], want_losses)
    jax.tree.map(np.testing.assert_array_equal, again[1], want_g)


def masks(drop, shape, p):
    return np.asarray(drop.apply(jnp.ones(shape, jnp.float32), p))


def test_mask_statistics_on_a_large_tensor():
    """Keep fraction within 3 sigma of 1 - p; survivors scaled by 1 / (1 - p); no visible
    structure along rows, positions or features."""
    p, shape = 0.05, (4, 512, 1024)
    m = masks(jora.Dropout(seed=jnp.uint32(12345)), shape, p)
    n = m.size
    kept = (m != 0).mean()
    assert abs(kept - (1 - p)) < 3 * np.sqrt(p * (1 - p) / n), kept
    np.testing.assert_allclose(m[m != 0], 1 / (1 - p), rtol=1e-6)
    for axis in range(3):   # every slice along an axis keeps about 1 - p
        frac = (m != 0).mean(axis=tuple(a for a in range(3) if a != axis))
        sigma = np.sqrt(p * (1 - p) / (n / shape[axis]))
        assert np.abs(frac - (1 - p)).max() < 5 * sigma, axis
    # neighbours are independent: P(both dropped) ~ p^2 along each axis
    d = m == 0
    for axis in range(3):
        both = np.logical_and(np.take(d, range(1, shape[axis]), axis),
                              np.take(d, range(shape[axis] - 1), axis)).mean()
        assert abs(both - p * p) < 5 * np.sqrt(p * p / (n / 2)), (axis, both)


def test_offsets_select_the_same_global_mask():
    """A slice of the global tensor, given its offsets, draws exactly the global mask there."""
    seed = jnp.uint32(7)
    whole = masks(jora.Dropout(seed=seed), (4, 96, 80), 0.3)
    part = masks(jora.Dropout(seed=seed, row=2, pos=32, feat=40), (2, 48, 40), 0.3)
    np.testing.assert_array_equal(part, whole[2:, 32:80, 40:])


def test_projections_layers_steps_and_micro_batches_draw_different_masks(setup, monkeypatch):
    """Every mask the model draws in two training steps of two micro-batches, recorded from
    inside the jitted step: 7 projections x 2 layers x 2 micro-batches x 2 steps, all with
    different seeds, and the masks of equal shape independent (agreement near
    p^2 + (1 - p)^2 = 0.5 at p = 0.5, not 1)."""
    seen = {}
    apply = jora.Dropout.apply

    def record(seed, row, pos, feat, shape):
        d = jora.Dropout(*(jnp.asarray(v) for v in (seed, row, pos, feat)))
        seen[int(seed)] = np.asarray(apply(d, jnp.ones(shape), 0.5)) != 0

    def spy(self, x, p):
        jax.debug.callback(lambda *a, shape=x.shape: record(*a, shape), self.seed,
                           *(jnp.asarray(v) for v in (self.row, self.pos, self.feat)))
        return apply(self, x, p)

    jax.clear_caches()   # trace the model again, through the spy
    monkeypatch.setattr(jora.Dropout, "apply", spy)
    steps(setup, 1, 1, n=2, lcfg=dataclasses.replace(LCFG, dropout=0.5))
    jax.clear_caches()
    # one loss-gradient pass, then 2 steps of 2 micro-batches: 5 sets of 7 x 2 masks
    assert len(seen) == 7 * CFG.n_layers * 5, len(seen)
    by_shape = {}
    for m in seen.values():
        by_shape.setdefault(m.shape, []).append(m)
    for group in by_shape.values():
        for j, a in enumerate(group):
            for b in group[j + 1:]:
                assert abs((a == b).mean() - 0.5) < 0.05
