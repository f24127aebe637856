"""The float8 base's quality: one fine-tune on a bf16 base and on an FP8 base, side by side.

  python -m bench.fp8_quality MODEL_DIR OUT [--steps 300]     # from the repo root

The task: reverse the order of 3 to 6 words (Alpaca records made from a fixed seed: 2,000 to
train on, 100 held out). Both runs are train.py with the same seed, data and flags, one with
--base-dtype float8. Then each base with its own adapter answers the 100 held-out prompts
greedily. One JSON object on stdout: each run's loss over its last 50 steps and held-out loss,
the exact match of the answers, and the share of answer tokens on which the two bases agree.
"""
import argparse
import json
import os
import random
import subprocess
import sys

import jax.numpy as jnp
import numpy as np

import jora
import trainer

WORDS = ("anchor apple basket blanket bottle bridge button candle castle circle cloud coffee "
         "desert dinner doctor dragon engine feather flower forest garden hammer island jacket "
         "ladder lemon marble meadow mirror needle ocean orange parrot pencil pepper piano "
         "pillow planet rabbit river rocket saddle shadow silver spider stone summer ticket "
         "tiger tunnel turtle valley violin wagon window winter yellow zebra").split()


def task(n: int, seed: int = 0) -> list[dict]:
    r = random.Random(seed)
    out = []
    for _ in range(n):
        words = r.sample(WORDS, r.randint(3, 6))
        out.append(dict(instruction="Reverse the order of the words.", input=" ".join(words),
                        output=" ".join(reversed(words))))
    return out


def metrics(out: str) -> tuple[list[float], float]:
    """(training losses by step, the last held-out loss) from a run's metrics.jsonl."""
    losses, held_out = [], None
    with open(os.path.join(out, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "loss" in row:
                losses.append(row["loss"])
            held_out = row.get("eval_loss", held_out)
    return losses, held_out


def answers(model: str, out: str, records: list[dict], fp8: bool) -> list[list[int]]:
    """Greedy answer ids of the base (fp8 or not) with the run's adapter to each record."""
    cfg, params = jora.load_hf(model, jnp.bfloat16, fp8=fp8)
    lora, lcfg = jora.load_adapter(os.path.join(out, "adapter"), cfg)
    tok = jora.Tokenizer(model)
    prompts = [tok.encode(trainer.alpaca_prompt(r["instruction"], r["input"]), bos=True)
               for r in records]
    outs = jora.generate(params, prompts, cfg, lora, lcfg, jora.Sampling(max_new_tokens=24))
    return [[int(t) for t in o] for o in outs]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0, help="train.py's: data order, LoRA init, "
                                                       "dropout (the task's records stay)")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    records = task(2100)
    train, held_out = records[:2000], records[2000:]
    data = os.path.join(args.out, "task.json")
    with open(data, "w") as f:
        json.dump(train, f)
    report = {}
    tok = jora.Tokenizer(args.model)
    for base in ("bf16", "fp8"):
        out = os.path.join(args.out, base)
        cmd = [sys.executable, "train.py", "--model", args.model, "--data", data, "--out", out,
               "--overwrite", "--steps", str(args.steps), "--seq-len", "256",
               "--batch-size", "4", "--seed", str(args.seed), "--log-every", "1",
               "--eval-split", "0.05"]
        if base == "fp8":
            cmd += ["--base-dtype", "float8"]
        print(" ".join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, stdout=sys.stderr)
        losses, eval_loss = metrics(out)
        ids = answers(args.model, out, held_out, base == "fp8")
        texts = [tok.decode(i).strip() for i in ids]
        exact = np.mean([t == r["output"] for t, r in zip(texts, held_out)])
        report[base] = dict(loss_last50=float(np.mean(losses[-50:])), eval_loss=eval_loss,
                            exact_match=float(exact), ids=ids, sample=texts[:3])
    a, b = report["bf16"].pop("ids"), report["fp8"].pop("ids")
    same = sum(x == y for i, j in zip(a, b) for x, y in zip(i, j))
    report["answer_tokens_agreeing"] = same / sum(min(len(i), len(j)) for i, j in zip(a, b))
    report["loss_gap"] = report["fp8"]["loss_last50"] / report["bf16"]["loss_last50"] - 1
    print(json.dumps(report))


if __name__ == "__main__":
    main()
