"""Fine-tune a Llama-2-family model with LoRA: a thin command line over jora.py.

  python train.py                                          # built-in demo, ~1 minute on a CPU
  python train.py --model llama-2-7b-hf --data alpaca.json --out run1 --tp 4 --steps 1000
  python train.py --model llama-2-7b-hf --data raft.jsonl --seq-len 4096 --pack --remat full
  python train.py --resume --out run1                      # continue after a crash or Ctrl-C
  python train.py --generate --model llama-2-7b-hf --adapter run1/adapter --prompt "..."
  python train.py --benchmark --size 7b --seq-len 2048     # speed and memory, random weights

Leaves OUT/adapter (PEFT), OUT/merged (HF), OUT/metrics.jsonl and OUT/checkpoints/.
"""
import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jora


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", help="HF Llama folder (config.json, safetensors, tokenizer.model); "
                      "omitted = the built-in demo")
    a("--data", help="Alpaca JSON/JSONL, RAFT JSONL or prompt/completion JSONL")
    a("--format", default="auto", choices=["auto", "alpaca", "raft", "completion"])
    a("--tokenizer", help="sentencepiece tokenizer.model (default: the model's)")
    a("--out", default="out", help="run folder: checkpoints, metrics, exports")
    a("--steps", type=int, help="optimizer steps (default: --epochs)")
    a("--epochs", type=float, default=1.0, help="passes over the training examples (packed: "
      "the packer's rows of them), when --steps is not given")
    a("--batch-size", type=int, default=8)
    a("--grad-accum", type=int, default=1)
    a("--seq-len", default="1024", help="tokens per row (--benchmark: a list, 2048,4096)")
    a("--pack", action="store_true", help="pack several examples into each row")
    a("--max-segments", type=int, default=jora.Options.max_segments, help="with --pack: at "
      "most N - 1 examples a row (with the padding, N runs: cuDNN attends within each, ~0.3 "
      "GiB a run at 16k on 7B; 0: a (T, T) mask instead)")
    a("--lora-r", type=int, default=16)
    a("--lora-alpha", type=float, default=16.0)
    a("--lora-dropout", type=float, default=0.05)
    a("--targets", default="q,v", help="any of q,k,v,o,gate,up,down, or 'all'")
    a("--lr", type=float, default=2e-4)
    a("--warmup", type=int, default=10)
    a("--weight-decay", type=float, default=0.0)
    a("--clip", type=float, default=1.0)
    a("--remat", default="auto", choices=["auto", *jora.REMAT], help="what the backward "
      "keeps (auto: the fastest plan whose memory fits the device, said at start)")
    a("--compile-cache", default=os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                              os.path.expanduser("~/.cache"), "jora", "xla"),
      help="folder of jax's persistent compilation cache: a second run with the same shapes "
           "skips the compile (default: %(default)s)")
    a("--no-compile-cache", action="store_true", help="compile every run afresh")
    a("--loss-chunk", type=int, default=2048, help="positions per cross-entropy chunk")
    a("--mlp-chunk", type=int, default=0, help="positions per MLP chunk (0: all); less memory "
                                               "at long sequences, free with --remat full/attn")
    a("--full-layers", type=int, default=0, help="the first N layers remat full whatever "
      "--remat says: saves one (T, D) activation a layer with --remat attn, for a second "
      "attention forward in each")
    a("--chunk-layers", type=int, default=0, help="with --mlp-chunk: only the last N layers "
      "chunk their MLP (0: all), where the memory peaks; the others run faster unchunked")
    a("--attention", default="auto", choices=["auto", "cudnn", "xla"])
    a("--kernels", default="auto", choices=["auto", "pallas", "xla"],
      help="LoRA projections: the fused Pallas kernel or XLA (auto: XLA, which was faster in "
           "the whole 7B model on an H200; see README)")
    a("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    a("--tp", type=int, default=1, help="devices per tensor-parallel group")
    a("--sequence-parallel", action="store_true", help="split positions over the tp group "
                                                         "between its parallel regions")
    a("--seed", type=int, default=0)
    a("--eval-split", type=float, default=0.0, help="fraction of examples held out")
    a("--save-every", type=int, default=0)
    a("--eval-every", type=int, default=0)
    a("--eval-generate", type=int, default=0, help="every N steps, generate and score answers")
    a("--log-every", type=int, default=10)
    a("--keep", type=int, default=3, help="checkpoints to keep")
    a("--resume", nargs="?", const="", help="continue the run in --out (or in RESUME)")
    a("--overwrite", action="store_true", help="start afresh in an --out that holds a run")
    a("--benchmark", action="store_true", help="time training of a random --size model")
    a("--size", default="7b", choices=list(jora.PRESETS))
    a("--bench-steps", type=int, default=5, help="timed steps (0: compile and report XLA's "
                                                   "planned memory only)")
    a("--bench-warmup", type=int, default=2)
    a("--bench-doc", type=int, default=0, help="--benchmark: rows packed from examples of N "
      "tokens each (0: one sequence a row)")
    a("--profile", help="--benchmark: write a profiler trace of the timed steps to this folder")
    a("--generate", action="store_true", help="complete --prompt / --prompts and exit")
    a("--adapter", help="PEFT adapter folder to apply when generating")
    a("--prompt", action="append", default=[])
    a("--prompts", help="file with one prompt per line")
    a("--max-new-tokens", type=int, default=256)
    a("--temperature", type=float, default=0.0)
    a("--top-k", type=int, default=0)
    a("--top-p", type=float, default=1.0)
    a("--coordinator", help="host:port of process 0, for several hosts "
                            "(or JAX_COORDINATOR_ADDRESS)")
    a("--num-processes", type=int)
    a("--process-id", type=int)
    args = p.parse_args(argv)
    if not args.benchmark:
        args.seq_len = int(args.seq_len)
    return args


def lora_config(args) -> jora.LoraConfig:
    targets = jora.PROJ if args.targets == "all" else tuple(args.targets.split(","))
    return jora.LoraConfig(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                           targets=targets)


def demo_setup(out: str) -> tuple[str, str]:
    """Build the demo: a small random Llama (saved in HF layout) and a task it must learn,
    spelling out digits ("4 0 7" -> "four zero seven"). Returns (model folder, data file)."""
    import io
    import random

    import sentencepiece
    words = "zero one two three four five six seven eight nine".split()
    rng = random.Random(0)
    records = []
    for _ in range(2000):
        digits = [rng.randrange(10) for _ in range(rng.randint(1, 3))]
        records.append(dict(prompt=f"Spell {' '.join(map(str, digits))}:",
                            completion=" " + " ".join(words[d] for d in digits)))
    base, data = os.path.join(out, "demo_base"), os.path.join(out, "demo_data.jsonl")
    os.makedirs(out, exist_ok=True)
    with open(data, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    texts = [r["prompt"] + r["completion"] for r in records]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, model_type="char", vocab_size=40,
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2, hard_vocab_limit=False)
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


def _time_steps(step, state, rest, steps, warmup, trace_dir, tokens, flops_per_token,
                mesh) -> dict:
    """Warmup and timed steps of a compiled train step(state, *rest) -> the row's timings."""
    for _ in range(warmup):
        state, m = step(state, *rest)
    jax.block_until_ready(state)
    with jax.profiler.trace(trace_dir) if trace_dir else contextlib.nullcontext():
        t = time.time()
        for _ in range(steps):
            state, m = step(state, *rest)
        jax.block_until_ready(m)
        dt = (time.time() - t) / steps
    peak = jora.PEAK_FLOPS.get(jax.default_backend())
    mem = max((d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in mesh.devices.flat)
    return dict(tokens_per_s=round(tokens / dt), step_s=round(dt, 4), loss=float(m["loss"]),
                peak_gib=round(mem / 2**30, 2),
                mfu=round(tokens / dt * flops_per_token / (peak * mesh.size), 4) if peak else None)


def benchmark(cfg, lcfg, tcfg, mesh, opts, seq_lens, steps=5, warmup=2, dtype=jnp.bfloat16,
              log=print, profile=None, doc=0) -> list[dict]:
    """Time training steps of a random-initialised model on random tokens at each length,
    reusing one model: tokens/s, step seconds, MFU, per-device peak memory (GiB; it only grows
    within a process, so give lengths in increasing order), compile seconds, or an error.
    `profile`: a folder for a jax.profiler trace of the timed steps (bench/profile.py reads it).
    doc > 0: each row packs examples of `doc` tokens (segment ids 1, 2, ...); else one a row.
    MFU counts every position attending to the whole row (flops_per_token) either way."""
    jora.check_tp(cfg, mesh.shape[jora.MODEL])
    opts = dataclasses.replace(opts, packed=doc > 0)   # else one sequence a row: no mask at all
    shardings = jax.tree.map(lambda s: jora.NamedSharding(mesh, s), jora.param_specs())
    params = jax.jit(lambda k: jora.init_params(k, cfg, dtype), out_shardings=shardings)(
        jax.random.key(0))   # created already split: no device ever holds the whole model
    params = jora.unstack_layers(params, free=True)   # GEMMs read weights in place: +15%
    lora = jax.device_get(jora.init_lora(jax.random.key(1), cfg, lcfg))   # host: steps donate
    results, rows = [], tcfg.batch_size * tcfg.grad_accum
    for seq in seq_lens:
        tc = dataclasses.replace(tcfg, seq_len=seq)
        row = dict(seq=seq, doc=doc, batch=tc.batch_size, tp=mesh.shape[jora.MODEL],
                   devices=mesh.size, targets=",".join(lcfg.targets), r=lcfg.r, layers="unrolled",
                   **dataclasses.asdict(opts))   # remat, chunks, kernels...: every option
        try:
            state = jora.shard(jora.TrainState(lora, jora.adamw_init(lora), np.int32(0)),
                               jora.state_specs(lcfg), mesh)
            segs = np.arange(seq + 1)[None].repeat(rows, 0) // doc + 1 if doc else None
            b = jora.make_batch(np.random.default_rng(0).integers(0, cfg.vocab_size,
                                                                  (rows, seq + 1)), None, segs)
            jora.check_runs(b.segment_ids, opts)   # the step is jitted: it cannot refuse them
            spec = jora.P(None, jora.DATA, None)   # (accumulation, rows, positions)
            b = jora.shard(jora.Batch(*(x.reshape(tc.grad_accum, tc.batch_size, -1) for x in b)),
                           jora.Batch(*[spec] * len(jora.Batch._fields)), mesh)
            if jax.process_index() == 0:   # progress on stderr; stdout keeps one JSON row a line
                print(f"seq {seq}: compiling ...", file=sys.stderr, flush=True)
            key, t = jax.random.key(2), time.time()
            if opts.remat == "auto":
                say = lambda s: print(s, file=sys.stderr, flush=True)
                o, step_fn, step, spent = jora.choose_remat(cfg, lcfg, tc, mesh, opts, state,
                                                            params, b, key, log=say)
                if step is None:   # no memory limit here: nothing was compiled yet
                    step, spent = jora.compile_step(step_fn, (state, params, b, key), say)
                row.update(remat=o.remat, mlp_chunk=o.mlp_chunk, chunk_layers=o.chunk_layers,
                           auto=True)
            else:
                step, spent = jora.compile_step(jora.make_train_step(cfg, lcfg, tc, mesh, opts),
                                                (state, params, b, key),
                                                log=lambda s: print(s, file=sys.stderr))
            row["compile_s"] = round(spent, 1)
            if (plan := step.memory_analysis()) is not None:   # XLA's plan, before running
                row["planned_gib"] = round((plan.argument_size_in_bytes + plan.temp_size_in_bytes
                                            + plan.output_size_in_bytes
                                            - plan.alias_size_in_bytes) / 2**30, 3)
            if steps > 0:   # (--bench-steps 0: compile and plan only: what would fit?)
                row.update(_time_steps(step, state, (params, b, key), steps, warmup,
                                       profile and f"{profile}/{seq}", rows * seq,
                                       jora.flops_per_token(cfg, seq), mesh))
        except Exception as e:   # report it and go on to the next length
            row["error"] = "out of memory" if _oom(e) else f"{type(e).__name__}: {str(e)[:300]}"
        state = b = step = None   # free this length's buffers before the next
        log(json.dumps(row))
        results.append(row)
    return results


def _packed_batches(examples, rows, seq_len, seed, max_segments) -> int:
    """Batches in the first epoch of packed rows (what --epochs counts), by running the packer."""
    n = 0
    for *_, (epoch, _) in jora.batches(examples, rows, seq_len, True, seed,
                                       max_segments=max_segments):
        if epoch > 0:   # this batch already belongs to the next epoch
            return n
        n += 1


def _oom(e: Exception) -> bool:   # XLA's out-of-device-memory error
    return "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()


def _count(n: float) -> str:   # 6.74G, 2.1M
    return next(f"{n / f:.3g}{u}" for f, u in ((1e9, "G"), (1e6, "M"), (1e3, "k"), (1, ""))
                if n >= f or f == 1)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not args.no_compile_cache:   # steps compiled once are read back in later runs
        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    if args.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    say = print if jax.process_index() == 0 else (lambda *_, **__: None)
    lcfg = lora_config(args)
    mesh = jora.make_mesh(args.tp)
    opts = jora.Options(remat=args.remat, attention=args.attention, loss_chunk=args.loss_chunk,
                        mlp_chunk=args.mlp_chunk, chunk_layers=args.chunk_layers,
                        full_layers=args.full_layers,
                        sequence_parallel=args.sequence_parallel, max_segments=args.max_segments,
                        kernels="pallas" if args.kernels == "pallas" else "xla")
    dtype = jnp.dtype(args.dtype)
    if args.benchmark:   # --seq-len may list several lengths: 2048,4096
        tcfg = jora.TrainConfig(batch_size=args.batch_size, grad_accum=args.grad_accum)
        seqs = [int(s) for s in str(args.seq_len).split(",")]
        tag = f'{{"impl": "jora", "size": "{args.size}", '   # one JSON object a line
        return benchmark(jora.PRESETS[args.size], lcfg, tcfg, mesh, opts, seqs,
                         args.bench_steps, args.bench_warmup, dtype,
                         log=lambda line: say(tag + line[1:], flush=True), profile=args.profile,
                         doc=args.bench_doc)
    demo = args.model is None and not args.generate
    if demo:
        if args.resume is None and os.path.exists(os.path.join(args.out, "metrics.jsonl")):
            args.overwrite = True   # the demo may always be re-run in place
        args.model, args.data = demo_setup(args.out)
        args.format, args.lr, args.warmup, args.lora_dropout = "completion", 5e-3, 20, 0.0
        args.targets, args.seq_len, args.batch_size, args.log_every = "all", 64, 16, 25
        args.steps, args.lora_r = args.steps or 600, 32
        lcfg = lora_config(args)
    t = time.time()
    say(f"loading {args.model} ...", flush=True)   # 7B: 13 GB read from the safetensors files
    cfg, params = jora.load_hf(args.model, dtype, mesh)
    params = jora.unstack_layers(params, free=True)   # faster steps, longer compile
    n_params = sum(x.size for x in jax.tree.leaves(params))
    say(f"loaded {_count(n_params)} parameters ({cfg.n_layers} layers, {dtype.name}) in "
        f"{time.time() - t:.1f} s")
    tok = jora.Tokenizer(args.tokenizer or args.model)
    if tok.vocab_size > cfg.vocab_size:
        sys.exit(f"error: tokenizer {tok.path} has {tok.vocab_size} pieces but the model's "
                 f"vocabulary is {cfg.vocab_size}: they do not belong together")
    if args.generate:
        lora, lc = jora.load_adapter(args.adapter, cfg) if args.adapter else (None, None)
        if lora is not None:
            lora = jora.shard(lora, jora.lora_specs(lc), mesh)
        prompts = args.prompt + (open(args.prompts).read().splitlines() if args.prompts else [])
        if not prompts:
            raise ValueError("--generate needs --prompt TEXT or --prompts FILE")
        t = time.time()
        outs = jora.generate(params, [tok.encode(p, bos=True) for p in prompts], cfg,
                             args.max_new_tokens, lora, lc, args.temperature, args.top_k,
                             args.top_p, args.seed)
        n = sum(len(o) for o in outs)
        for p, o in zip(prompts, outs):
            print(f"### {p}\n{tok.decode(o)}\n")
        print(f"{n} tokens in {time.time() - t:.1f}s (compile included)")
        return dict(outputs=outs)

    records, fmt = jora.read_records(args.data, args.format)
    examples, report = jora.tokenize_records(records, fmt, tok, args.seq_len, args.data,
                                             log=lambda line: say(line, flush=True))
    say(f"data: {args.data} ({fmt}) {len(records)} records -> {report}")
    n_eval = int(len(examples) * args.eval_split)
    split = jax.random.permutation(jax.random.key(args.seed + 7), len(examples)).tolist()
    eval_ex = [examples[i] for i in split[:n_eval]]
    train_ex = [examples[i] for i in split[n_eval:]]
    rows = args.batch_size * args.grad_accum
    per_epoch = (_packed_batches(train_ex, rows, args.seq_len, args.seed, args.max_segments)
                 if args.pack else len(train_ex) / rows)   # packed: several examples a row
    steps = args.steps or max(1, int(args.epochs * per_epoch))
    if args.pack:   # how full the rows are: --max-segments can leave them part empty
        used = sum(len(e.tokens) for e in train_ex) / (per_epoch * rows * (args.seq_len + 1))
        say(f"packed: {per_epoch:,} batches an epoch, {min(used, 1):.0%} of positions used")
    tcfg = jora.TrainConfig(steps=steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                            seq_len=args.seq_len, lr=args.lr, warmup=args.warmup,
                            weight_decay=args.weight_decay, clip=args.clip, seed=args.seed)
    out = args.out if not args.resume else args.resume
    sample = None
    if demo:
        sample = [tok.encode("Spell 3 1 4:", bos=True)]
        say("before:", tok.decode(jora.generate(params, sample, cfg, 40)[0]))
    lora, summary = jora.train(
        cfg, params, lcfg, tcfg, train_ex, out, mesh, eval_ex, opts, args.pack, args.log_every,
        args.eval_every, args.save_every, args.keep, args.resume is not None, args.overwrite,
        dict(vars(args)), args.eval_generate, tok)
    if "interrupted" in summary:
        return summary
    t, merged_dtype = time.time(), jnp.dtype(jnp.bfloat16 if not demo else jnp.float32)
    say(f"writing {out}/adapter (PEFT) and {out}/merged (HF, {merged_dtype.name}, "
        f"~{_count(n_params * merged_dtype.itemsize)}B) ...", flush=True)
    jora.export_adapter(os.path.join(out, "adapter"), cfg, lora, lcfg, base_model=args.model)
    jora.export_merged(os.path.join(out, "merged"), cfg, params, lora, lcfg, source=args.model,
                       dtype=merged_dtype)
    say(f"wrote {out}/adapter and {out}/merged in {time.time() - t:.1f} s")
    if demo:
        say("after: ", tok.decode(jora.generate(params, sample, cfg, 40, lora, lcfg)[0]))
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows_ = [json.loads(line) for line in f if '"loss"' in line]
    summary["first_loss"] = rows_[0]["loss"] if rows_ else None
    return summary


def cli(argv=None):
    """main, with the errors a user can act on said in a line instead of a traceback."""
    try:
        return main(argv)
    except (ValueError, OSError, FloatingPointError) as e:   # bad input
        sys.exit(f"error: {e}")
    except jax.errors.JaxRuntimeError as e:
        if not _oom(e):
            raise
        sys.exit(f"error: out of device memory ({str(e).splitlines()[0][:300]})\n"
                 "To use less: --remat full (or attn, with --full-layers N for the first N "
                 "layers full) with --mlp-chunk 2048 (in every layer: no --chunk-layers), a "
                 "smaller --batch-size with a larger --grad-accum, a shorter --seq-len, or more "
                 "devices (--tp). `--benchmark --size 7b --seq-len N --bench-steps 0 ...` prints "
                 "XLA's planned peak (planned_gib) without running.")


if __name__ == "__main__":
    cli()
