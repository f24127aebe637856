"""remat="auto" and the compile log: the plan chosen, and why."""
import os
import subprocess
import sys

import jax
import numpy as np
from conftest import DATA, GQA, STORIES, needs_data, random_params

import jora
import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    for plan in trainer.AUTO_PLANS[:2]:
        step = jora.make_train_step(GQA, lcfg, tcfg, mesh, plan=jora.Plan(**plan))
        need[plan["remat"]] = trainer.planned_bytes(step.lower(state, params, b,
                                                            jax.random.key(0)).compile())
    assert need["min"] < need["none"], need   # remat keeps less: the test needs them apart
    lines = []
    limit = int((need["min"] + need["none"]) / 2 / 0.9)   # min fits, none does not
    chosen, _, compiled, _ = trainer.choose_plan(
        GQA, lcfg, tcfg, mesh, opts=jora.Options(), plan=jora.Plan(remat="auto"), state=state,
        params=params, batch=b, key=jax.random.key(0), limit=limit, log=lines.append)
    assert chosen.remat == "min" and compiled is not None
    assert "remat auto: min (plans" in lines[-1] and "none" in lines[-1], lines
    chosen, *_ = trainer.choose_plan(
        GQA, lcfg, tcfg, mesh, opts=jora.Options(), plan=jora.Plan(remat="auto"), state=state,
        params=params, batch=b, key=jax.random.key(0), limit=10 * need["none"],
        log=lines.append)
    assert chosen.remat == "none" and "the fastest plan" in lines[-1]


def test_remat_auto_skips_plans_that_cannot_fit_without_compiling_them():
    """least_bytes is a floor under each plan's compiled peak; where the floor of none and min
    is over the limit, auto says so and compiles neither."""
    params, lcfg, tcfg, mesh, state, b = _setup(seq=1024)
    floors = {}
    for plan in trainer.AUTO_PLANS:
        p = jora.Plan(**plan)
        step = jora.make_train_step(GQA, lcfg, tcfg, mesh, plan=p)
        need = trainer.planned_bytes(step.lower(state, params, b, jax.random.key(0)).compile())
        floors[trainer.describe(p)] = floor = trainer.least_bytes(GQA, p, mesh, state=state,
                                                                 params=params, batch=b)
        assert 0 < floor <= need, (plan, floor, need)
    assert floors["none"] == floors["min"] > floors["attn + MLP chunks of 2048"]
    lines = []
    limit = int(floors["min"] / 0.9) - 1   # none and min cannot fit, the rest may
    trainer.choose_plan(
        GQA, lcfg, tcfg, mesh, opts=jora.Options(), plan=jora.Plan(remat="auto"), state=state,
        params=params, batch=b, key=jax.random.key(0), limit=limit, log=lines.append)
    assert "remat auto: none keeps at least" in lines[0] and "skipped" in lines[0], lines
    assert "remat auto: min keeps at least" in lines[1], lines
    assert not any("compiling the step with none" in l or "compiling the step with min ..." in l
                   for l in lines), lines


def test_remat_auto_on_cpu_trains_the_plain_plan(tmp_path):
    params, lcfg, tcfg, mesh, _, _ = _setup()
    rng = np.random.default_rng(1)
    examples = [trainer.Example(rng.integers(3, GQA.vocab_size, 40).astype(np.int32),
                             np.r_[np.zeros(20), np.ones(20)].astype(np.float32))
                for _ in range(8)]
    lines = []
    _, summary = trainer.train(GQA, params, lcfg, tcfg, examples, str(tmp_path / "run"), mesh,
                               plan=jora.Plan(remat="auto"), log=lines.append,
                               schedule=trainer.Schedule(log_every=1))
    assert any(l.startswith("remat auto: none (no device memory limit") for l in lines), lines
    assert any(l.startswith("compiled in") for l in lines)
    assert np.isfinite(summary["loss"])


@needs_data
def test_second_run_compiles_from_the_persistent_cache(tmp_path):
    """Two train.py runs with one --compile-cache: the second's step comes from the cache,
    says so, and XLA's part of the compile (the tracing before it is Python's) is several times
    faster."""
    def run(out):
        r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--model",
                            os.path.join(STORIES, "hf"), "--data",
                            os.path.join(DATA, "alpaca", "alpaca_data_1k.json"), "--out",
                            str(tmp_path / out), "--steps", "2", "--seq-len", "128",
                            "--batch-size", "2", "--targets", "all", "--lora-dropout", "0.05",
                            "--compile-cache", str(tmp_path / "cache"), "--dtype", "float32"],
                           capture_output=True, text=True, timeout=600,
                           env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
        assert r.returncode == 0, r.stderr[-2000:]
        lines = [l for l in r.stdout.splitlines() if l.startswith("compiled in")]
        assert lines, r.stdout
        # "compiled in 11.2 s (traced in 2.5 s)": XLA's part is the difference
        xla = sum(float(l.split()[2]) - float(l.split("traced in ")[1].split()[0])
                  for l in lines)
        return lines, xla
    cold, cold_xla = run("a")
    warm, warm_xla = run("b")
    assert not any("from the compilation cache" in l for l in cold), cold
    assert all("from the compilation cache" in l for l in warm), warm
    assert warm_xla * 3 < cold_xla, (cold, warm)
