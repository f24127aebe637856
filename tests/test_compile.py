"""remat="auto" and the compile log: the plan chosen, and why."""
import jax
import numpy as np
from conftest import GQA, random_params

import jora


def _setup(seq=64):
    params = jora.unstack_layers(random_params(jax.random.key(0), GQA))
    lcfg = jora.LoraConfig(r=4, targets=jora.PROJ, dropout=0.05)
    tcfg = jora.TrainConfig(steps=2, batch_size=2, seq_len=seq)
    mesh = jora.make_mesh(1, jax.devices()[:1])
    lora = jora.init_lora(jax.random.key(1), GQA, lcfg)
    state = jora.shard(jora.TrainState(lora, jora.adamw_init(lora), np.int32(0)),
                       jora.state_specs(lcfg), mesh)
    tokens = np.random.default_rng(0).integers(0, GQA.vocab_size, (2, seq + 1))
    b = jora.make_batch(tokens)
    b = jora.Batch(*(x.reshape(1, 2, -1) for x in b))
    return params, lcfg, tcfg, mesh, state, b


def test_remat_auto_takes_the_fastest_plan_that_fits():
    """With a memory limit between the plans' planned peaks, auto passes over the plans that
    do not fit, says so, and takes the next; with room for all, the first (none)."""
    params, lcfg, tcfg, mesh, state, b = _setup(seq=1024)
    need = {}
    for plan in jora.AUTO_PLANS[:2]:
        o = jora.Options(**{"mlp_chunk": 0, **plan})
        step = jora.make_train_step(GQA, lcfg, tcfg, mesh, o)
        need[plan["remat"]] = jora.planned_bytes(step.lower(state, params, b,
                                                            jax.random.key(0)).compile())
    assert need["min"] < need["none"], need   # remat keeps less: the test needs them apart
    lines = []
    limit = int((need["min"] + need["none"]) / 2 / 0.9)   # min fits, none does not
    opts, _, compiled, _ = jora.choose_remat(GQA, lcfg, tcfg, mesh, jora.Options(remat="auto"),
                                             state, params, b, jax.random.key(0), limit=limit,
                                             log=lines.append)
    assert opts.remat == "min" and compiled is not None
    assert "remat auto: min (plans" in lines[-1] and "none" in lines[-1], lines
    opts, *_ = jora.choose_remat(GQA, lcfg, tcfg, mesh, jora.Options(remat="auto"), state,
                                 params, b, jax.random.key(0), limit=10 * need["none"],
                                 log=lines.append)
    assert opts.remat == "none" and "the fastest plan" in lines[-1]


def test_remat_auto_on_cpu_trains_the_plain_plan(tmp_path):
    params, lcfg, tcfg, mesh, _, _ = _setup()
    rng = np.random.default_rng(1)
    examples = [jora.Example(rng.integers(3, GQA.vocab_size, 40).astype(np.int32),
                             np.r_[np.zeros(20), np.ones(20)].astype(np.float32))
                for _ in range(8)]
    lines = []
    _, summary = jora.train(GQA, params, lcfg, tcfg, examples, str(tmp_path / "run"), mesh,
                            opts=jora.Options(remat="auto"), log=lines.append, log_every=1)
    assert any(l.startswith("remat auto: none (no device memory limit") for l in lines), lines
    assert any(l.startswith("compiled in") for l in lines)
    assert np.isfinite(summary["loss"])
