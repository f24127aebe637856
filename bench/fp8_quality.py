"""The float8 base's quality: one fine-tune on a bf16 base and on an FP8 base, side by side.

  python -m bench.fp8_quality MODEL_DIR OUT [--steps 300]     # from the repo root
  python -m bench.fp8_quality MODEL_DIR OUT --alpaca alpaca_data_1k.json

The task: reverse the order of 3 to 6 words (Alpaca records made from a fixed seed: 2,000 to
train on, 100 held out), or with --alpaca, real Alpaca records (the last 50 held out). Both
runs are train.py with the same seed, data and flags, one with --base-dtype float8. Then each
base with its own adapter answers the held-out prompts greedily. One JSON object on stdout:
each run's loss over its last 50 steps and held-out loss, the exact match of the answers, and
the share of answer tokens on which the two bases agree.

The reversal's answers are short and exact, so its exact match is telling; its loss ends near
zero, where a relative gap says little. Alpaca's loss stays near 1.5, where it says more.
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


def tuned(model: str, out: str, fp8: bool):   # the base (fp8 or not) with the run's adapter
    cfg, params = jora.load_hf(model, jnp.bfloat16, fp8=fp8)
    lora, lcfg = jora.load_adapter(os.path.join(out, "adapter"), cfg)
    return cfg, params, lora, lcfg


def answers(model, prompts: list[list[int]], new: int) -> list[list[int]]:
    """Greedy answer ids of a tuned model (cfg, params, lora, lcfg) to each prompt."""
    cfg, params, lora, lcfg = model
    outs = jora.generate(params, prompts, cfg, lora, lcfg, jora.Sampling(max_new_tokens=new))
    return [[int(t) for t in o] for o in outs]


def next_tokens(model, prompts: list[list[int]], given: list[list[int]]) -> list[np.ndarray]:
    """A tuned model's greedy choice at each position of the `given` answers, read with the
    answer so far as its context (teacher forcing): unlike free generation, one early
    difference does not change every later position."""
    cfg, params, lora, lcfg = model
    rows = [p + a[:-1] for p, a in zip(prompts, given)]
    width = max(map(len, rows))
    out_ids = []
    for row, answer in zip(rows, given):   # padded at the end, which causal attention ignores
        logits = jora.forward(params, np.array([row + [0] * (width - len(row))]), cfg, lora,
                              lcfg)                                             # (1, T, V)
        start = len(row) - len(answer) + 1
        out_ids.append(np.asarray(jnp.argmax(logits[0, start - 1:len(row)], -1)))
    return out_ids


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0, help="train.py's: data order, LoRA init, "
                                                       "dropout (the task's records stay)")
    p.add_argument("--alpaca", help="an Alpaca JSON file to fine-tune on instead of the reversal")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.alpaca:
        with open(args.alpaca) as f:
            records = json.load(f)
        train, held_out = records[:-50], records[-50:]
    else:
        records = task(2100)
        train, held_out = records[:2000], records[2000:]
    data = os.path.join(args.out, "task.json")
    with open(data, "w") as f:
        json.dump(train, f)
    report, picks = {}, []
    tok = jora.Tokenizer(args.model)
    prompts = [tok.encode(trainer.alpaca_prompt(r["instruction"], r["input"]), bos=True)
               for r in held_out]
    for base in ("bf16", "fp8"):   # bf16 first: its answers are what both bases then read
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
        model = tuned(args.model, out, base == "fp8")
        ids = answers(model, prompts, 48 if args.alpaca else 24)
        # each base's choice along the bf16 base's answers: where the two would pick alike
        picks.append(next_tokens(model, prompts, report["bf16"]["ids"] if picks else ids))
        texts = [tok.decode(i).strip() for i in ids]
        exact = np.mean([t == r["output"] for t, r in zip(texts, held_out)])
        report[base] = dict(loss_last50=float(np.mean(losses[-50:])), eval_loss=eval_loss,
                            exact_match=float(exact), ids=ids, sample=texts[:3])
    a, b = report["bf16"].pop("ids"), report["fp8"].pop("ids")
    same = sum(x == y for i, j in zip(a, b) for x, y in zip(i, j))
    report["answer_tokens_agreeing"] = same / sum(min(len(i), len(j)) for i, j in zip(a, b))
    same = sum(int((x == y).sum()) for x, y in zip(*picks))
    report["teacher_forced_agreeing"] = same / sum(len(x) for x in picks[0])
    report["loss_gap"] = report["fp8"]["loss_last50"] / report["bf16"]["loss_last50"] - 1
    print(json.dumps(report))


if __name__ == "__main__":
    main()
