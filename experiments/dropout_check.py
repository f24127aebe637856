"""Do jora's kernels and XLA compute the same training under LoRA dropout, at the 7B shape?

  python -m experiments.dropout_check [--layers 4] [--seq 2048] [--traj-layers 32]

Part 1, gradients: a Llama-2-7B-wide model cut to --layers layers, all seven projections
adapted (r = 16, B random and nonzero), one row of --seq random tokens. The loss and LoRA
gradients in bf16 with kernels="xla" and "pallas" are compared with an fp32 XLA reference, at
dropout 0 and 0.05: a kernel bug shows as an error far above XLA's own bf16 error.
Part 2, trajectories (--traj-layers > 0): the benchmark's run (B = 0, lr 2e-4, warmup 10, the
same batch every step), 12 AdamW steps at dropout 0.05, each path twice: the spread between
two runs of one path is the GPU's own nondeterminism, against which the paths' gap is read.
"""
import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

import jora
from kernels.bench import rel   # relative Frobenius error, in fp32


def _model(layers: int, seq: int):
    cfg = dataclasses.replace(jora.PRESETS["7b"], n_layers=layers)
    params = jora.unstack_layers(jora.init_params(jax.random.key(0), cfg, jnp.float32))
    k = jax.random.key(3)   # norms away from 1 and a larger embedding, as the tests do
    params = params._replace(embed=params.embed * 20, layers=params.layers._replace(
        attn_norm=[1 + 0.1 * jax.random.normal(jax.random.fold_in(k, i), w.shape)
                   for i, w in enumerate(params.layers.attn_norm)]))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, seq + 1))
    return cfg, params, jora.make_batch(tokens)


def gradients(layers: int, seq: int):
    cfg, p32, batch = _model(layers, seq)
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), p32)
    print(f"part 1: 7B width, {layers} layers, seq {seq}; relative L2 error of each "
          f"projection's (dA, dB) over all layers, against fp32 XLA")
    print(f"{'dropout':>7} {'path':>6} {'loss':>9} " + " ".join(f"{t:>13}" for t in jora.PROJ))
    for d in (0.0, 0.05):
        lcfg = jora.LoraConfig(r=16, alpha=32.0, targets=jora.PROJ, dropout=d)
        lora = jora.init_lora(jax.random.key(1), cfg, lcfg)
        lora = jora.Lora(**{t: ab._replace(b=0.02 * jax.random.normal(
            jax.random.fold_in(jax.random.key(2), i), ab.b.shape))
            for i, (t, ab) in enumerate(lora._asdict().items())})
        key = jax.random.key(4) if d else None
        out = {}
        for path, params, opts, k in (
                ("fp32", p32, jora.Options(attention="xla", packed=False), "xla"),
                ("xla", p16, jora.Options(packed=False), "xla"),
                ("pallas", p16, jora.Options(packed=False), "pallas")):
            f = jax.value_and_grad(lambda l: jora.loss(
                params, l, batch, cfg, lcfg, opts=opts, plan=jora.Plan(kernels=k), key=key))
            out[path] = jax.device_get(f(lora))
        ref = out["fp32"][1]
        for path in ("xla", "pallas"):
            loss, g = out[path]
            errs = [f"{rel(getattr(g, t).a, getattr(ref, t).a):.4f}/"
                    f"{rel(getattr(g, t).b, getattr(ref, t).b):.4f}" for t in jora.PROJ]
            print(f"{d:>7} {path:>6} {float(loss):9.5f} " + " ".join(f"{e:>13}" for e in errs))
        print(f"{d:>7} {'fp32':>6} {float(out['fp32'][0]):9.5f}")


def trajectories(layers: int, seq: int, steps: int = 12):
    cfg = dataclasses.replace(jora.PRESETS["7b"], n_layers=layers)
    mesh = jora.make_mesh(1, jax.devices()[:1])
    params = jora.unstack_layers(jora.init_params(jax.random.key(0), cfg), free=True)
    lcfg = jora.LoraConfig(r=16, alpha=32.0, targets=jora.PROJ, dropout=0.05)
    tcfg = jora.TrainConfig(batch_size=1, seq_len=seq, steps=steps)
    batch = jora.accum_batch(jora.make_batch(np.random.default_rng(0).integers(
        0, cfg.vocab_size, (1, seq + 1))), 1, mesh)
    print(f"part 2: 7B, {layers} layers, seq {seq}, dropout 0.05: loss after each step")
    for path in ("xla", "pallas", "xla", "pallas"):
        lora = jora.init_lora(jax.random.key(1), cfg, lcfg)
        state = jora.TrainState(lora, jora.adamw_init(lora), np.int32(0))
        step = jora.make_train_step(cfg, lcfg, tcfg, mesh, opts=jora.Options(packed=False),
                                    plan=jora.Plan(kernels=path))
        t, losses = time.time(), []
        for _ in range(steps):
            state, m = step(state, params, batch, jax.random.key(2))
            losses.append(float(m["loss"]))
        print(f"{path:>6} ({time.time() - t:5.1f} s) " + " ".join(f"{x:.4f}" for x in losses))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--traj-layers", type=int, default=32)
    a = p.parse_args()
    print(jax.devices()[0].device_kind, jax.__version__)
    gradients(a.layers, a.seq)
    if a.traj_layers:
        trajectories(a.traj_layers, a.seq)
