"""Write a random Llama-2-7B-shaped HF folder (bf16, ~13.5 GB in 3 files) and time the export:
python -m bench.make_7b OUT_FOLDER [TOKENIZER_FOLDER [SIZE]] (from the repo root). The
tokenizer files are copied from TOKENIZER_FOLDER. Prints one JSON row."""
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

import jora


def main():
    given = sys.argv[1:]   # OUT_FOLDER [TOKENIZER_FOLDER [SIZE]]
    defaults = [None, "7b"]   # TOKENIZER_FOLDER, SIZE where not given
    out, tok, size = (given + defaults[len(given) - 1:])[:3]
    cfg = jora.PRESETS[size]
    mesh = jora.make_mesh(1, jax.devices()[:1])
    shardings = jax.tree.map(lambda s: jora.NamedSharding(mesh, s), jora.param_specs())
    params = jax.jit(lambda k: jora.init_params(k, cfg, jnp.bfloat16),
                     out_shardings=shardings)(jax.random.key(0))
    lcfg = jora.LoraConfig(targets=jora.PROJ)
    lora = jora.init_lora(jax.random.key(1), cfg, lcfg)
    rows = []
    for name, lo in (("base", None), ("merged", lora)):   # the second merges all seven
        folder = out if name == "base" else out + "_merged"
        t = time.time()
        jora.export_merged(folder, cfg, params, lo, lcfg, source=tok,
                           shard_bytes=5 * 10**9)
        dt = time.time() - t
        size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
        rows.append(dict(export=name, seconds=round(dt, 1), gb=round(size / 1e9, 2),
                         gb_per_s=round(size / 1e9 / dt, 2)))
    print(json.dumps(dict(impl="jora-export", rows=rows)))


if __name__ == "__main__":
    main()
