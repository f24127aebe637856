"""KV-cache generation against full recomputation and the real model; RAFT answer scoring."""
import os

import jax
import numpy as np
import pytest
from conftest import GQA, STORIES, needs_data, random_lora, random_params

import jora
import trainer


def full_recompute_greedy(params, prompt, n, cfg, lora=None, lcfg=None):
    """The obvious decoder: run the whole sequence again for every new token (in a buffer of
    fixed length, one compilation: causality makes the positions after the last irrelevant)."""
    seq = np.zeros((1, len(prompt) + n), np.int32)
    seq[0, :len(prompt)] = prompt
    for t in range(len(prompt), len(prompt) + n):
        logits = jora.forward(params, seq, cfg, lora, lcfg)
        seq[0, t] = int(np.argmax(np.asarray(logits[0, t - 1])))
        if seq[0, t] == cfg.eos_id:
            return seq[0, len(prompt):t + 1].tolist()
    return seq[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def model():
    params = random_params(jax.random.key(0), GQA)
    lcfg = jora.LoraConfig(r=4, alpha=8.0, targets=jora.PROJ)
    return params, lcfg, random_lora(jax.random.key(1), GQA, lcfg, b_std=0.2)


def test_kv_cache_equals_full_recompute_batched(model):
    params, lcfg, lora = model
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 128, n).tolist() for n in (1, 7, 20)]   # three lengths at once
    got = jora.generate(params, prompts, GQA, lora, lcfg, jora.Sampling(12))
    for p, g in zip(prompts, got):
        assert g == full_recompute_greedy(params, p, 12, GQA, lora, lcfg)
    base = jora.generate(params, prompts, GQA, sampling=jora.Sampling(12))
    assert base != got                                   # the adapters changed the answers


def test_unmerged_adapters_equal_merged_weights(model):
    params, lcfg, lora = model
    merged = params._replace(layers=params.layers._replace(**{
        jora.WEIGHT[t]: jora.merge_lora(getattr(params.layers, jora.WEIGHT[t]), ab, lcfg)
        for t, ab in lora._asdict().items()}))
    prompts = [[5, 9, 33], [7] * 11]
    assert jora.generate(params, prompts, GQA, lora, lcfg, jora.Sampling(16)) == \
        jora.generate(merged, prompts, GQA, sampling=jora.Sampling(16))


def test_sampling_is_seeded_and_stops_at_eos(model):
    params, lcfg, lora = model
    sample = lambda **s: jora.generate(params, [[5, 6]], GQA, lora, lcfg,
                                       jora.Sampling(20, temperature=1.0, **s))
    a, b, c = sample(top_p=0.9, seed=1), sample(top_p=0.9, seed=1), sample(top_k=5, seed=2)
    assert a == b and a != c and all(0 <= t < GQA.vocab_size for t in a[0] + c[0])
    second = jora.generate(params, [[5, 6]], GQA, sampling=jora.Sampling(3))[0][1]
    eos_cfg = jora.Config(**{**GQA.__dict__, "eos_id": second})
    out = jora.generate(params, [[5, 6]], eos_cfg, sampling=jora.Sampling(20))[0]
    assert out[-1] == eos_cfg.eos_id and len(out) == 2


@needs_data
def test_stories260k_greedy_batched_and_under_tp2(stories):
    from safetensors.numpy import load_file
    cfg, params = stories
    g = load_file(os.path.join(STORIES, "reference_logits.safetensors"))["greedy_ids"].tolist()
    prompts = [[1], g[:4], g[:30]]
    out = jora.generate(params, prompts, cfg, sampling=jora.Sampling(200))
    assert out[0] == g[1:] and out[1][:197] == g[4:] and out[2][:171] == g[30:]
    mesh = jora.make_mesh(2, jax.devices()[:2])
    _, sharded = jora.load_hf(os.path.join(STORIES, "hf"), np.float32, mesh)
    assert jora.generate(sharded, prompts[:1], cfg, sampling=jora.Sampling(200))[0] == g[1:]


@pytest.mark.parametrize("pred, ref, em, f1", [
    ("Reasoning...\n<ANSWER>: The joint probability function.", "x <ANSWER>: joint probability "
     "function", 1.0, 1.0),                                            # case, article, period
    ("<ANSWER>:   Paris!  ", "<ANSWER>: paris", 1.0, 1.0),
    ("<ANSWER>: the neural network", "<ANSWER>: a neural probabilistic model", 0.0, 0.4),
    ("I do not know.", "<ANSWER>: 42", 0.0, 0.0),                    # absent
    ("<ANSWER>: 348 <ANSWER>: 265", "<ANSWER>: 265", 1.0, 1.0),        # the last one counts
])
def test_raft_answer_scores(pred, ref, em, f1):
    s = trainer.answer_scores(pred, ref)
    assert s["exact_match"] == em and s["token_f1"] == pytest.approx(f1)


def test_eval_generate_during_training_writes_scores(tmp_path):
    import json

    import demo
    import train
    base, data = demo.demo_setup(str(tmp_path / "demo"))
    out = str(tmp_path / "run")
    train.main(["--model", base, "--data", data, "--out", out, "--steps", "2", "--seq-len", "48",
                "--batch-size", "8", "--eval-split", "0.01", "--eval-every", "2",
                "--eval-generate", "2", "--max-new-tokens", "8"])
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    scored = [r for r in rows if "token_f1" in r]
    assert len(scored) == 1 and scored[0]["step"] == 2 and 0 <= scored[0]["exact_match"] <= 1
    assert [r["step"] for r in rows if "eval_perplexity" in r] == [0, 2]
