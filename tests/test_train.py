"""Training end to end: data, AdamW, accumulation, checkpoints, resume, bad input."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import DATA, GQA, STORIES, needs_data, random_lora, random_params

import demo as demo_module
import jora
import trainer
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- optimizer ------------------------------------------------------------------------------

def test_adamw_matches_numpy_formula():
    tcfg = jora.TrainConfig(b1=0.8, b2=0.95, eps=1e-6, weight_decay=0.1)
    rng = np.random.default_rng(0)
    p = {"a": rng.normal(size=(3, 4)).astype(np.float32),
         "b": rng.normal(size=5).astype(np.float32)}
    lora = jora.Lora(q=jora.LoraAB(p["a"], p["b"]))
    opt = jora.adamw_init(lora)
    m = {k: np.zeros_like(v, np.float64) for k, v in p.items()}
    v = {k: np.zeros_like(x, np.float64) for k, x in p.items()}
    w = {k: x.astype(np.float64) for k, x in p.items()}
    for t in range(1, 5):
        g = {k: rng.normal(size=x.shape) for k, x in p.items()}
        lr = 0.01 * t
        lora, opt = jora.adamw_update(lora, jora.Lora(q=jora.LoraAB(g["a"], g["b"])), opt, lr, tcfg)
        for k in p:
            m[k] = 0.8 * m[k] + 0.2 * g[k]
            v[k] = 0.95 * v[k] + 0.05 * g[k] ** 2
            mhat, vhat = m[k] / (1 - 0.8 ** t), v[k] / (1 - 0.95 ** t)
            w[k] = w[k] - lr * (mhat / (np.sqrt(vhat) + 1e-6) + 0.1 * w[k])
    np.testing.assert_allclose(lora.q.a, w["a"], rtol=1e-5)
    np.testing.assert_allclose(lora.q.b, w["b"], rtol=1e-5)
    assert int(opt.step) == 4


def test_schedule_warmup_then_cosine():
    tcfg = jora.TrainConfig(steps=110, warmup=10, lr=1.0, min_lr_ratio=0.1)
    lr = lambda s: float(jora.learning_rate(s, tcfg))
    assert lr(0) == pytest.approx(0.1) and lr(4) == pytest.approx(0.5) and lr(9) == pytest.approx(1)
    assert lr(10) == pytest.approx(1.0)
    assert lr(60) == pytest.approx(0.55)            # half way: (1 + 0.1) / 2
    assert lr(110) == pytest.approx(0.1) and lr(500) == pytest.approx(0.1)
    assert all(lr(s) >= lr(s + 1) for s in range(10, 110))


def test_accumulation_equals_one_big_batch():
    params = random_params(jax.random.key(0), GQA)
    lcfg = jora.LoraConfig(r=4, alpha=8.0, targets=("q", "v", "down"))
    lora = random_lora(jax.random.key(1), GQA, lcfg)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, GQA.vocab_size, (4, 17))
    weights = np.zeros((4, 17), np.float32)
    for i, n in enumerate([3, 16, 7, 1]):          # rows with very different answer lengths
        weights[i, -n:] = 1
    b = jora.make_batch(tokens, weights)
    mesh = jora.make_mesh(1, jax.devices()[:1])
    results = []
    for accum, rows in [(4, 1), (1, 4)]:
        tcfg = jora.TrainConfig(steps=1, batch_size=rows, grad_accum=accum, lr=1e-2, warmup=1)
        step = jora.make_train_step(GQA, lcfg, tcfg, mesh)
        l = jax.device_get(lora)
        state = jora.TrainState(l, jora.adamw_init(l), np.int32(0))
        bb = jora.Batch(*(x.reshape(accum, rows, -1) for x in b))
        state, m = step(state, params, bb, jax.random.key(0))
        results.append((float(m["loss"]), float(m["grad_norm"]), jax.device_get(state.lora)))
    (l1, g1, s1), (l2, g2, s2) = results
    assert l1 == pytest.approx(l2, rel=1e-6) and g1 == pytest.approx(g2, rel=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), s1, s2)
    # and the loss is the token-weighted mean, not a mean of per-row means
    nll, n = jora.loss_sums(params, lora, b, GQA, lcfg)
    assert float(n) == 27 and l2 == pytest.approx(float(nll) / 27, rel=1e-6)


# ---- data -----------------------------------------------------------------------------------

def test_batches_are_deterministic_resumable_and_packed():
    rng = np.random.default_rng(0)
    ex = [trainer.Example(rng.integers(3, 50, n).astype(np.int32), np.ones(n, np.float32))
          for n in rng.integers(5, 30, 40)]
    a = trainer.batches(ex, rows=2, seq_len=63, pack=True, seed=3)
    first = [next(a) for _ in range(6)]
    again = trainer.batches(ex, rows=2, seq_len=63, pack=True, seed=3)
    for x, y in zip(first, [next(again) for _ in range(6)]):
        np.testing.assert_array_equal(x[0], y[0])
    resumed = trainer.batches(ex, rows=2, seq_len=63, pack=True, seed=3, position=first[2][3])
    np.testing.assert_array_equal(next(resumed)[0], first[3][0])
    tokens, weights, segs, _ = first[0]
    assert tokens.shape == (2, 64) and segs.max() >= 2            # several examples a row
    other = next(trainer.batches(ex, rows=2, seq_len=63, pack=True, seed=4))[0]
    assert not np.array_equal(other, tokens)
    t, _, s, _ = next(trainer.batches(ex, rows=3, seq_len=255, pack=False, seed=0, bucket=16))
    assert (t.shape[1] - 1) % 16 == 0 and t.shape[1] < 64 and s.max() == 1   # padded to the longest


def test_padded_lengths_are_few_and_pad_at_most_an_eighth():
    n = np.arange(1, 40_000)
    got = np.array([trainer.padded_length(int(k), 32_768) for k in n])
    assert (got % 64 == 0).all() and (got >= np.minimum(n, 32_768)).all() and got.max() == 32_768
    short = n <= 1024   # every multiple of 64 up to 1,024, as before
    np.testing.assert_array_equal(got[short], -(-n[short] // 64) * 64)
    fits = (n > 1024) & (n <= 32_768)
    assert (got[fits] <= n[fits] * 1.125).all()   # padding: at most 1/8 of the example
    assert len(np.unique(got[fits])) == 5 * 8     # 8 lengths in each doubling 1k..32k
    assert (got[n > 32_768] == 32_768).all()      # capped at --seq-len
    assert trainer.padded_length(70, 1000, bucket=48) == 96


def test_alpaca_template_and_answer_only_loss(tmp_path):
    base, _ = demo_module.demo_setup(str(tmp_path))
    tok = jora.Tokenizer(base)
    records = [{"instruction": "Say 1", "input": "", "output": "1 2"}]
    (ex,), report = trainer.tokenize_records(records, "alpaca", tok, 512)
    prompt = tok.encode(trainer.alpaca_prompt("Say 1"), bos=True)
    assert ex.tokens.tolist() == prompt + tok.encode("1 2") + [tok.eos_id]
    assert ex.weights.tolist() == [0] * len(prompt) + [1] * (len(ex.tokens) - len(prompt))
    assert "### Instruction:\nSay 1\n\n### Response:\n" in trainer.alpaca_prompt("Say 1")
    assert "### Input:\nx\n\n" in trainer.alpaca_prompt("Say 1", "x")


@needs_data
def test_raft_keeps_oracle_and_answer_at_2048_with_llama2_tokenizer():
    tok = jora.Tokenizer(os.path.join(DATA, "llama2", "tokenizer.model"))
    path = os.path.join(DATA, "raft", "raft_en_test.jsonl")
    records, fmt = trainer.read_records(path)
    assert fmt == "raft"
    examples, report = trainer.tokenize_records(records, fmt, tok, 2048, path)
    assert len(examples) == len(records) == 20 and report["skipped"] == 0
    docs_kept = 0
    for r, ex in zip(records, examples):
        answer = tok.encode(r["cot_answer"]) + [tok.eos_id]
        n = int(ex.weights.sum())
        assert ex.tokens[-n:].tolist() == answer and len(ex.tokens) <= 2049
        prompt = tok.decode(ex.tokens[:-n])
        assert r["oracle_context"].strip() in prompt
        assert prompt.rstrip().endswith(r["question"].strip())
        docs_kept += prompt.count("<DOCUMENT>")
    assert report["dropped_distractors"] == 80 - docs_kept > 0     # reported, and exact
    short, report = trainer.tokenize_records(records, fmt, tok, 8192, path)
    assert report["dropped_distractors"] == 0


@pytest.mark.parametrize("content, message", [
    ('[{"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}]',
     r"data.json: malformed JSON at line 2"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": }\n',
     r"data.json: record 2 \(line 2\) is malformed JSON"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n',
     r"data.json: record 2 has no 'output' \(format alpaca\)"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": 3}\n',
     r"data.json: record 2 field 'output' is int, not a string"),
    ('', r"data.json: no records"),
    ('{"text": "a"}\n', r"data.json: record 1 has keys \['text'\]; cannot tell the format"),
])
def test_bad_data_files_name_file_and_record(tmp_path, content, message):
    path = tmp_path / "data.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        trainer.read_records(str(path))


def test_every_record_too_long_is_an_error(tmp_path):
    base, _ = demo_module.demo_setup(str(tmp_path))
    records = [{"prompt": "Spell 1 2 3 4 5 6 7 8 9:", "completion": " one"}] * 3
    with pytest.raises(ValueError, match=r"d.jsonl: no usable examples: all 3 records are longer "
                                         r"than --seq-len 8"):
        trainer.tokenize_records(records, "completion", jora.Tokenizer(base), 8, "d.jsonl")


# ---- the loop: checkpoints, resume, signals, crashes ----------------------------------------

@pytest.fixture
def demo(tmp_path):
    base, data = demo_module.demo_setup(str(tmp_path / "demo"))
    return ["--model", base, "--data", data, "--seq-len", "48", "--batch-size", "8",
            "--lora-r", "4", "--targets", "q,v,o", "--lr", "3e-3", "--warmup", "2",
            "--log-every", "1", "--lora-dropout", "0.1", "--eval-split", "0"]


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


def test_resume_after_interrupt_is_bit_identical(demo, tmp_path):
    full = str(tmp_path / "full")
    train.main(demo + ["--out", full, "--steps", "8"])

    def interrupt_at_4(line):   # a SIGINT arriving while step 4 runs
        if line.startswith("step 4/"):
            os.kill(os.getpid(), signal.SIGINT)
    part = str(tmp_path / "part")
    args = train.parser().parse_args(demo + ["--out", part, "--steps", "8"])
    summary = _train_with_log(args, interrupt_at_4)
    assert summary["interrupted"] == 4
    assert os.path.isdir(os.path.join(part, "checkpoints", "step_00000004"))
    train.main(demo + ["--out", part, "--steps", "8", "--resume"])
    assert losses(part) == losses(full) and len(losses(full)) == 8
    from safetensors.numpy import load_file
    x = load_file(os.path.join(full, "adapter", "adapter_model.safetensors"))
    y = load_file(os.path.join(part, "adapter", "adapter_model.safetensors"))
    assert all(np.array_equal(x[k], y[k]) for k in x)


def test_a_crash_keeps_the_steps_done_and_resume_continues_exactly(demo, tmp_path, monkeypatch):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    train.main(demo + ["--out", full, "--steps", "7"])
    calls, make_batch = [], jora.make_batch

    def crash_on_batch_5(*a):   # batch 5 has been drawn, step 5 has not run: a crash there
        calls.append(1)         # (say, out of memory compiling a new length) must keep steps
        if len(calls) == 5:     # 1-4 and resume with batch 5, not skip it
            raise RuntimeError("simulated crash")
        return make_batch(*a)
    monkeypatch.setattr(jora, "make_batch", crash_on_batch_5)
    args = train.parser().parse_args(demo + ["--out", part, "--steps", "7"])
    lines = []
    with pytest.raises(RuntimeError, match="simulated crash"):
        _train_with_log(args, lines.append, log_every=3)
    assert lines[-1] == "stopped by an error after step 4: checkpoint saved; continue with --resume"
    assert lines[-2].startswith("step 4/7")   # step 4's metrics row, logged before the save
    assert sorted(os.listdir(os.path.join(part, "checkpoints"))) == ["step_00000004"]
    monkeypatch.setattr(jora, "make_batch", make_batch)
    train.main(demo + ["--out", part, "--steps", "7", "--resume"])
    with open(os.path.join(part, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [3, 4, 5, 6, 7]
    assert losses(part)[1:] == losses(full)[3:] and len(losses(full)) == 7


def _train_with_log(args, log, log_every=1):
    """train.main's data path, but with a log callback (to interrupt at a chosen step)."""
    mesh = jora.make_mesh(1)
    cfg, params = jora.load_hf(args.model, np.float32 if args.dtype == "float32" else
                               jax.numpy.bfloat16, mesh)
    params = jora.unstack_layers(params, free=True)   # as train.main: the same programs
    tok = jora.Tokenizer(args.model)
    data = trainer.prepare_examples(args.data, args.format, tok, seq_len=args.seq_len,
                                    eval_split=args.eval_split, seed=args.seed,
                                    batch_size=args.batch_size, pack=args.pack,
                                    max_segments=args.max_segments, log=lambda *_: None)
    args.max_segments = data.max_segments
    tcfg = jora.TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                            lr=args.lr, warmup=args.warmup, clip=args.clip, seed=args.seed)
    lcfg, opts, _ = trainer.configs(args)
    _, summary = trainer.train(cfg, params, lcfg, tcfg, data.train, args.out, mesh,
                               eval_examples=data.eval, opts=opts, pack=args.pack,
                               schedule=trainer.Schedule(log_every=log_every), log=log)
    return summary


def test_progress_says_compiling_and_throughput_leaves_compile_out(demo, tmp_path):
    lines = []   # rank 7: a step no other test compiles, so not in the compilation cache
    args = train.parser().parse_args(demo + ["--out", str(tmp_path / "run"), "--steps", "3",
                                    "--lora-r", "7"])
    _train_with_log(args, lines.append)
    assert lines[0].startswith("compiling the training step for 8 rows x 48 positions")
    assert lines[1].startswith("compiled in ")
    assert [line.split()[1] for line in lines[2:5]] == ["1/3", "2/3", "3/3"]
    assert all("tokens/s" in line and "ETA" in line for line in lines[2:5]), lines
    with open(os.path.join(str(tmp_path / "run"), "metrics.jsonl")) as f:
        rates = [json.loads(line)["tokens_per_s"] for line in f]
    assert len(rates) == 3 and min(rates) > 0
    # Step 1 held at most 8 rows of 49 tokens: had its rate counted the compile, those tokens
    # would have taken longer than the compile itself.
    compile_s = float(lines[1].split()[2])
    assert 8 * 49 / rates[0] < 0.5 * compile_s, (rates, compile_s)


def test_sigint_in_a_subprocess_then_resume(demo, tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    cmd = [sys.executable, os.path.join(ROOT, "train.py")] + demo + ["--steps", "40"]
    whole = subprocess.Popen(cmd + ["--out", full], stdout=subprocess.PIPE,   # meanwhile
                             stderr=subprocess.STDOUT)
    proc = subprocess.Popen(cmd + ["--out", part], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    metrics = os.path.join(part, "metrics.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(metrics) and len(losses(part)) >= 5):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 130 and "interrupted at step" in out, out   # 128 + SIGINT
    stopped = len(losses(part))
    assert 5 <= stopped < 40
    said = whole.communicate(timeout=300)[0].decode()
    assert whole.returncode == 0, said
    subprocess.run(cmd + ["--out", part, "--resume"], check=True, capture_output=True)
    assert losses(part) == losses(full)


def test_killed_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path):
    lcfg = jora.LoraConfig(r=2, targets=("q",))
    meta = dict(config={}, lora={}, step=1, data_position=[0, 0])
    lora = random_lora(jax.random.key(0), GQA, lcfg)
    state = jora.TrainState(lora, jora.adamw_init(lora), np.int32(0))
    good = tmp_path / "checkpoints" / "step_00000001"
    trainer.save_checkpoint(str(good), state, meta)
    script = f"""
import os, sys, safetensors.numpy
sys.path.insert(0, {ROOT!r}); sys.path.insert(0, {os.path.dirname(__file__)!r})
import jax, numpy as np, jora, trainer
from conftest import GQA, random_lora
def dying_save(tensors, path, **kw):   # half a file, then the process dies
    open(path, "wb").write(b"\\0" * 1000); os.kill(os.getpid(), 9)
safetensors.numpy.save_file = dying_save
lcfg = jora.LoraConfig(r=2, targets=("q",))
lora = random_lora(jax.random.key(5), GQA, lcfg)
trainer.save_checkpoint({str(tmp_path / "checkpoints" / "step_00000002")!r},
                     jora.TrainState(lora, jora.adamw_init(lora), np.int32(0)), dict(step=2))
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert r.returncode == -9, r.stderr.decode()
    latest = trainer.latest_checkpoint(str(tmp_path))
    assert latest == str(good)
    meta_cfg = dict(config=jora.dataclasses.asdict(GQA), lora=jora.dataclasses.asdict(lcfg))
    with open(good / "state.json", "w") as f:
        json.dump({**meta, **meta_cfg}, f)
    loaded, _ = trainer.load_checkpoint(latest, GQA, lcfg, jora.make_mesh(1, jax.devices()[:1]))
    np.testing.assert_array_equal(loaded.lora.q.b, lora.q.b)


def test_non_finite_loss_stops_and_keeps_last_checkpoint(demo, tmp_path):
    out = str(tmp_path / "nan")
    with pytest.raises(FloatingPointError, match=r"non-finite (loss|gradient|lora\.\w+\.[ab]) "
                                                 r"at step \d+; stopped. The last good"):
        train.main(demo + ["--out", out, "--steps", "10", "--lr", "1e38", "--clip", "0",
                           "--save-every", "1", "--lora-dropout", "0"])
    latest = trainer.latest_checkpoint(out)
    assert latest is not None
    cfg, _ = jora.load_hf(demo[1])
    args = train.parser().parse_args(demo + ["--lora-dropout", "0"])
    state, meta = trainer.load_checkpoint(latest, cfg, trainer.configs(args)[0], jora.make_mesh(1))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.lora))


def test_out_holding_a_run_is_refused_and_resume_checks_the_model(demo, tmp_path):
    out = str(tmp_path / "run")
    train.main(demo + ["--out", out, "--steps", "2"])
    before = open(os.path.join(out, "metrics.jsonl")).read()
    with pytest.raises(FileExistsError, match="holds another run; pass --resume"):
        train.main(demo + ["--out", out, "--steps", "2"])
    with pytest.raises(ValueError, match=r"checkpoint was made with lora.r=4, this run has 8"):
        train.main(demo + ["--out", out, "--steps", "4", "--resume", "--lora-r", "8"])
    assert open(os.path.join(out, "metrics.jsonl")).read() == before   # nothing overwritten
    train.main(demo + ["--out", out, "--steps", "2", "--overwrite"])


@needs_data
def test_tokenizer_that_does_not_fit_the_model_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="error: tokenizer .*32000 pieces but the model's "
                                         "vocabulary is 512"):
        train.cli(["--model", os.path.join(STORIES, "hf"), "--data",
                    os.path.join(DATA, "alpaca", "alpaca_data_1k.json"),
                    "--tokenizer", os.path.join(DATA, "llama2", "tokenizer.model"),
                    "--out", str(tmp_path / "x")])


@needs_data
def test_stories260k_on_alpaca_lowers_held_out_loss(tmp_path):
    out = str(tmp_path / "alpaca")
    summary = train.main(["--model", os.path.join(STORIES, "hf"), "--data",
                          os.path.join(DATA, "alpaca", "alpaca_data_1k.json"), "--out", out,
                          "--steps", "30", "--seq-len", "256", "--batch-size", "8",
                          "--lr", "3e-3", "--warmup", "5", "--eval-split", "0.05",
                          "--eval-every", "30", "--targets", "all", "--dtype", "float32"])
    with open(os.path.join(out, "metrics.jsonl")) as f:
        evals = [r["eval_loss"] for r in map(json.loads, f) if "eval_loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0] - 0.3, evals
    assert summary["eval_loss"] == evals[1]
    assert os.path.exists(os.path.join(out, "adapter", "adapter_model.safetensors"))
    assert os.path.exists(os.path.join(out, "merged", "model.safetensors"))


def test_demo_loss_falls_below_half(tmp_path):
    """`python train.py` as a user runs it: a process of its own, on its one CPU device (in
    this process the step would be split over the 8 fake devices, a fifth slower)."""
    out = str(tmp_path / "demo")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--out", out],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    first, last = losses(out)[0], losses(out)[-1]
    assert last < 0.5 * first, (first, last)
    hits = [line for line in r.stdout.splitlines() if line.startswith("held-out exact match: ")]
    assert len(hits) == 1 and hits[0].endswith("/60"), r.stdout[-2000:]
    assert int(hits[0].split()[-1].split("/")[0]) >= 0.6 * 60, hits   # greedy, held out


def test_benchmark_mode_reports_each_length(capsys):
    from bench import benchmark
    rows = benchmark.main(["--size", "tiny", "--seq-len", "64,128", "--batch-size",
                       "8", "--bench-steps", "1", "--bench-warmup", "1", "--remat", "min"])
    assert [r["seq"] for r in rows] == [64, 128]
    out, err = capsys.readouterr()   # rows as JSON lines on stdout, progress on stderr
    assert [json.loads(line)["seq"] for line in out.splitlines()] == [64, 128]
    assert "seq 64: compiling" in err and "seq 128: compiling" in err
    assert all(r["tokens_per_s"] > 0 and r["compile_s"] >= 0 and "error" not in r for r in rows)
    assert all(r["planned_gib"] > 0 for r in rows)   # XLA's memory plan, on any backend
    assert all(r["lora_dropout"] == 0.05 for r in rows)   # train.py's default, recorded
    plans = benchmark.main(["--size", "tiny", "--seq-len", "128", "--batch-size", "8",
                        "--bench-steps", "0", "--remat", "full", "--mlp-chunk", "32"])
    assert plans[0]["planned_gib"] > 0 and plans[0]["mlp_chunk"] == 32
    assert "tokens_per_s" not in plans[0] and "error" not in plans[0]
    packed = benchmark.main(["--size", "tiny", "--seq-len", "64,128", "--batch-size",
                         "8", "--bench-steps", "0", "--bench-doc", "16", "--max-segments", "5"])
    assert packed[0]["packed"] and packed[0]["doc"] == 16 and "error" not in packed[0]  # 4 runs
    assert "8 runs" in packed[1]["error"] and "max_segments=5" in packed[1]["error"]  # 8 > 5


def test_the_command_lines_take_most_of_a_gpu_unless_told_otherwise(monkeypatch, tmp_path):
    """jax's GPU client takes 75% of a GPU by default: too little for a 70B model's float8
    weights on 80 GB. train.py and the benchmark ask for 95% before jax touches a device, and
    a fraction the user set stays."""
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    trainer.use_device_memory()
    assert os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.95"
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")
    trainer.use_device_memory()
    assert os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.6"

    class Called(Exception):
        pass

    def called():
        raise Called
    from bench import benchmark
    monkeypatch.setattr(trainer, "use_device_memory", called)
    monkeypatch.setattr(trainer, "use_compile_cache", lambda folder: pytest.fail("too late"))
    with pytest.raises(Called):
        train.main(["--out", str(tmp_path / "run")])
    with pytest.raises(Called):
        benchmark.main(["--size", "tiny"])


def test_cli_says_out_of_memory_in_a_line_with_what_to_try(monkeypatch):
    def oom(argv):
        raise jax.errors.JaxRuntimeError(
            "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 216.00GiB.\ndetails")
    monkeypatch.setattr(train, "main", oom)
    with pytest.raises(SystemExit) as e:
        train.cli([])
    msg = str(e.value.code)
    assert msg.startswith("error: out of device memory (RESOURCE_EXHAUSTED: Out of memory while "
                          "trying to allocate 216.00GiB.)") and "details" not in msg
    assert "--remat full" in msg and "--mlp-chunk" in msg and "--grad-accum" in msg

    def other(argv):   # other runtime errors keep their traceback
        raise jax.errors.JaxRuntimeError("INTERNAL: something else")
    monkeypatch.setattr(train, "main", other)
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        train.cli([])
    monkeypatch.setattr(train, "main", lambda argv: trainer.read_records("/nonexistent.json"))
    with pytest.raises(SystemExit, match="error: .*nonexistent.json"):
        train.cli([])


def test_mfu_counts_attention_at_the_batch_length_not_seq_len(demo, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "PEAK_FLOPS", {jax.default_backend(): 1e12})
    args = train.parser().parse_args(demo + ["--out", str(tmp_path / "run"), "--steps", "2",
                                             "--no-pack"])
    args.seq_len = 400   # the demo's examples are < 64 tokens: rows are padded to 64, not 400
    _train_with_log(args, lambda line: None)
    with open(os.path.join(str(tmp_path / "run"), "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    cfg, devices = jora.load_hf(args.model, np.float32)[0], jora.make_mesh(1).size
    for r in rows:   # MFU is per device: the data-parallel mesh spans every (CPU) device
        assert r["mfu"] == pytest.approx(
            r["tokens_per_s"] * trainer.flops_per_token(cfg, 64) / (1e12 * devices), rel=1e-9)


def test_tokenizing_shows_progress_on_long_work(tmp_path, monkeypatch):
    base, _ = demo_module.demo_setup(str(tmp_path))
    records = [{"prompt": f"Spell {i % 10}:", "completion": " one"} for i in range(30)]
    clock = iter(range(0, 10_000, 4))   # each look at the clock: 4 s later
    monkeypatch.setattr("time.time", lambda: next(clock))
    lines = []
    ex, _ = trainer.tokenize_records(records, "completion", jora.Tokenizer(base), 64, "d.jsonl",
                                  log=lines.append)
    assert len(ex) == 30 and lines and len(lines) < 30
    assert lines[0] == "d.jsonl: tokenized 2 of 30 records"   # 2 done when the clock reads 12 s


def test_packing_keeps_to_max_segments():
    """Rows hold at most max_segments - 1 examples (the padding tail is one run more), so the
    static offsets cuDNN gets always cover every row; 0 packs as many as fit."""
    rng = np.random.default_rng(1)
    ex = [trainer.Example(rng.integers(3, 50, n).astype(np.int32), np.ones(n, np.float32))
          for n in rng.integers(2, 6, 200)]
    for most in (2, 3, 5):
        b = trainer.batches(ex, rows=2, seq_len=127, pack=True, seed=0, max_segments=most)
        for _ in range(10):
            _, _, segs, _ = next(b)
            assert segs.max() == most - 1                  # short examples: the cap binds
            assert jora.count_runs(segs[:, :-1]) <= most   # what the model sees: T positions
    _, _, segs, _ = next(trainer.batches(ex, rows=2, seq_len=127, pack=True, seed=0,
                                         max_segments=0))
    assert segs.max() > 16                                 # no cap: as many as fit


def test_an_epoch_of_packed_rows_counts_batches_not_examples():
    """--epochs with --pack: one pass over the examples is the packer's batches, not
    examples / rows (that trained several epochs when rows hold several examples)."""
    rng = np.random.default_rng(2)
    ex = [trainer.Example(rng.integers(3, 50, n).astype(np.int32), np.ones(n, np.float32))
          for n in rng.integers(5, 20, 60)]
    n = trainer.batches_per_epoch(ex, rows=2, seq_len=63, pack=True, seed=0,
                                  max_segments=8)
    b = trainer.batches(ex, rows=2, seq_len=63, pack=True, seed=0, max_segments=8)
    used = sum(len(np.unique(s[s > 0])) for _ in range(n) for s in next(b)[2])
    assert 60 - 2 * 7 < used <= 60 and n < 60 / 4   # the epoch, bar a short tail; ~4+ a row
    assert next(b)[3][0] == 1                         # the next batch is the next epoch's


ALPACA = os.path.join(DATA, "alpaca", "alpaca_data_1k.json")


@needs_data
def test_the_first_real_run_compiles_its_step_once(tmp_path, capsys):
    """train.py as a new user runs it, with only --model, --data and --steps: the examples pack
    into rows of one shape, so the step compiles once; 2% of the examples are held out and
    evaluated at the end, timed apart from the steps, and the run says its timeline."""
    summary = train.main(["--model", os.path.join(STORIES, "hf"), "--data", ALPACA,
                          "--steps", "3", "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert out.count("compiling the training step") == 1, out
    assert "remat auto: compiling" not in out   # (a CPU has no memory limit to fit)
    assert "packed" in out and "the step compiles for this one shape" in out
    assert "held out 20 examples" in out and "eval_loss" in out
    assert summary["evaluation_s"] > 0 and summary["first_step_s"] > 0
    assert "time: to the first step" in out and "evaluation" in out.splitlines()[-1]
    run = json.load(open(tmp_path / "run" / "run.json"))["run"]
    assert run["pack"] and run["seq_len"] == 512 and run["batch_size"] == 8   # 512: the model's
    assert run["max_segments"] in trainer.AUTO_SEGMENTS                        # max_positions


def test_tokens_per_s_counts_the_training_steps_alone(demo, tmp_path, monkeypatch):
    """An evaluation in the middle of a log interval, slowed by 3 s, leaves the interval's
    tokens/s alone: the seconds it reports for its tokens are the steps' (well under 3 s)."""
    evaluate = trainer.evaluate

    def slow_evaluate(*args, **kwargs):
        time.sleep(3)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(trainer, "evaluate", slow_evaluate)
    summary = train.main(demo + ["--steps", "4", "--log-every", "4", "--eval-every", "2",
                                 "--eval-split", "0.05", "--dtype", "float32",
                                 "--out", str(tmp_path / "r")])
    rows = [json.loads(x) for x in open(tmp_path / "r" / "metrics.jsonl")]
    steps = [r for r in rows if "tokens_per_s" in r]
    assert len(steps) == 1 and [r["step"] for r in rows if "eval_loss" in r] == [0, 2, 4]
    seconds = steps[0]["tokens"] / steps[0]["tokens_per_s"]   # what tokens/s divided by
    assert summary["evaluation_s"] >= 9 and seconds < 3, (seconds, summary)
    assert seconds == pytest.approx(summary["train_s"], abs=2e-3)
