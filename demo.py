"""train.py's built-in demo: a small random Llama (in HF layout) learns to spell out digits,
"Spell 4 0 7:" -> " four zero seven", in about a minute on a CPU; then it is scored on prompts
it never saw."""
import io
import json
import os
import random

import jax
import jax.numpy as jnp

import jora
import trainer

WORDS = "zero one two three four five six seven eight nine".split()
FILES = ("demo_base", "demo_data.jsonl")   # what demo_setup writes in OUT


def example(digits) -> dict:
    return dict(prompt=f"Spell {' '.join(map(str, digits))}:",
                completion=" " + " ".join(WORDS[d] for d in digits))


def records(n: int = 2000) -> list[dict]:   # 1 to 3 digits each
    rng = random.Random(0)
    return [example([rng.randrange(10) for _ in range(rng.randint(1, 3))]) for _ in range(n)]


def held_out(n: int = 60) -> list[dict]:
    """n three-digit examples whose prompts are not among the training records."""
    seen = {r["prompt"] for r in records()}
    unseen = []
    for i in range(1000):
        r = example([int(c) for c in f"{i:03d}"])
        if r["prompt"] not in seen:
            unseen.append(r)
    return random.Random(1).sample(unseen, n)


def demo_setup(out: str) -> tuple[str, str]:
    """Write the demo's model (random weights, a character tokenizer) and data in `out`.
    Returns (model folder, data file)."""
    import sentencepiece
    base, data = (os.path.join(out, f) for f in FILES)
    os.makedirs(out, exist_ok=True)
    recs = records()
    with open(data, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([r["prompt"] + r["completion"] for r in recs]), model_writer=model,
        model_type="char", vocab_size=40, bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2,
        hard_vocab_limit=False)
    vocab = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue()).vocab_size()
    cfg = jora.Config(vocab_size=vocab, d_model=128, d_ff=256, n_layers=2, n_heads=4,
                      n_kv_heads=2, head_dim=32, max_positions=256)
    params = jora.init_params(jax.random.key(0), cfg, jnp.float32)
    # std 0.5 embeddings and 0.2 lm_head: tokens start distinguishable, and the (frozen) lm_head
    # can express confident predictions once LoRA has shaped the hidden states.
    params = params._replace(embed=params.embed * 25, lm_head=params.lm_head * 10)
    jora.export_merged(base, cfg, params, dtype=jnp.float32)
    with open(os.path.join(base, "tokenizer.model"), "wb") as f:
        f.write(model.getvalue())
    return base, data


def score(params, cfg, lora, lcfg, tok, say=print, n: int = 60) -> float:
    """Greedy completions of n held-out prompts: says and returns the exact-match fraction."""
    tests = held_out(n)
    outs = jora.generate(params, [tok.encode(t["prompt"], bos=True) for t in tests], cfg, lora,
                         lcfg, jora.Sampling(24))
    got = [tok.decode(o) for o in outs]
    hits = sum(g.strip() == t["completion"].strip() for g, t in zip(got, tests))
    say(f"after training: {tests[0]['prompt']} {got[0].strip()}\n"
        f"held-out exact match: {hits}/{n}")
    return hits / n


SETTINGS = dict(format="completion", lr=5e-3, warmup=20, lora_dropout=0.0, targets="all",
                seq_len=64, batch_size=16, log_every=25, steps=800, lora_r=32)


def configure(args, out: str, given=()):
    """train.py without --model: write the demo in `out` and set the flags it trains with,
    SETTINGS unless `given`. It reruns in place over a demo run, never over another run (unless
    args.overwrite)."""
    info = trainer.run_info(out)
    if info is not None and not (info.get("demo") or args.overwrite):
        raise FileExistsError(f"--out {out} holds a run of {info.get('model', 'a model')}, not "
                              f"the demo: train.py without --model would replace it; pass "
                              f"--model and --data, --overwrite or another --out")
    args.overwrite = info is not None
    trainer.lock_run(out)
    args.model, args.data = demo_setup(out)
    for k, v in SETTINGS.items():
        if k not in given:
            setattr(args, k, v)
    args.demo = True
