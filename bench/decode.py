"""KV-cache decoding speed of a random-initialised model: new tokens per second.

    python bench/decode.py --size 7b --batch 1 16 --new 256 [--tp 1]
Prints one JSON line per batch size (compile time excluded; greedy; no EOS stops early).
"""
import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax  # noqa: E402
import numpy as np  # noqa: E402

import jora  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--size", default="7b", choices=list(jora.PRESETS))
ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
ap.add_argument("--prompt", type=int, default=128)
ap.add_argument("--new", type=int, default=256)
ap.add_argument("--tp", type=int, default=1)
ap.add_argument("--stacked", type=int, default=0, help="1: keep the layers stacked (lax.scan)")
a = ap.parse_args()
cfg = dataclasses.replace(jora.PRESETS[a.size], eos_id=-1)   # never stop early
mesh = jora.make_mesh(a.tp)
shardings = jax.tree.map(lambda s: jora.NamedSharding(mesh, s), jora.param_specs())
params = jax.jit(lambda k: jora.init_params(k, cfg), out_shardings=shardings)(jax.random.key(0))
if a.stacked == 0:
    params = jora.unstack_layers(params, free=True)
lcfg = jora.LoraConfig()
lora = jora.shard(jora.init_lora(jax.random.key(1), cfg, lcfg), jora.lora_specs(lcfg), mesh)
for b in a.batch:
    prompts = np.random.default_rng(0).integers(3, cfg.vocab_size, (b, a.prompt)).tolist()
    t = time.time()
    jora.generate(params, prompts, cfg, lora, lcfg, jora.Sampling(a.new))          # compile + first run
    first = time.time() - t
    t = time.time()
    out = jora.generate(params, prompts, cfg, lora, lcfg, jora.Sampling(a.new))
    dt = time.time() - t
    n = sum(len(o) for o in out)
    print(json.dumps(dict(impl="jora-decode", size=a.size, batch=b, prompt=a.prompt, new=a.new,
                          tp=a.tp, stacked=a.stacked, seconds=round(dt, 3), tokens_per_s=round(n / dt, 1),
                          first_call_s=round(first, 1))), flush=True)
