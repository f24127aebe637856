"""Fine-tune a Llama-2-family model with LoRA: a thin command line over jora.py and trainer.py.

  python train.py                                          # built-in demo, ~1 minute on a CPU
  python train.py --model llama-2-7b-hf --data alpaca.json --out run1 --tp 4 --steps 1000
  python train.py --model llama-2-7b-hf --data raft.jsonl --seq-len 4096 --pack
  python train.py --resume --out run1                      # continue after a crash or Ctrl-C
  python train.py --generate --model llama-2-7b-hf --adapter run1/adapter --prompt "..."
  python train.py --benchmark --size 7b --seq-len 2048,4096   # bench/benchmark.py: speed, memory

Leaves OUT/adapter (PEFT), OUT/merged (HF), OUT/metrics.jsonl and OUT/checkpoints/.
"""
import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

import demo
import jora
import trainer

EPILOG = """exit status: 0 finished; 1 an error, said in one line; 2 a bad command line; 130
(SIGINT) or 143 (SIGTERM): stopped after a checkpoint (--resume continues it), or at once by a
second signal or a Ctrl-C outside the steps. One run at a time in an --out (OUT/.lock)."""


# Numeric flags: default and the interval a value must lie in (NaN lies in none); None: no
# default. --help lists them with their defaults.
NUMBERS = dict(
    batch_size=(8, "[1"), grad_accum=(1, "[1"), lora_r=(16, "[1"), lora_alpha=(16.0, "(0"),
    lora_dropout=(0.05, "[0,1)"), tp=(1, "[1"), loss_chunk=(2048, "[1"), mlp_chunk=(0, "[0"),
    full_layers=(0, "[0"), chunk_layers=(0, "[0"), steps=(None, "[1"), epochs=(1.0, "(0"),
    seq_len=(1024, "[1"), lr=(2e-4, "(0"), warmup=(10, "[0"), weight_decay=(0.0, "[0"),
    clip=(1.0, "[0"), seed=(0, "[0"), eval_split=(0.0, "[0,1)"), save_every=(0, "[0"),
    eval_every=(0, "[0"), eval_generate=(0, "[0"), log_every=(10, "[1"), keep=(3, "[1"),
    max_new_tokens=(256, "[1"), temperature=(0.0, "[0"), top_k=(0, "[0"), top_p=(1.0, "(0,1]"))
HELP = dict(   # README's table says what every flag is for
    mlp_chunk="positions per MLP chunk (0: all)", tp="devices per tensor-parallel group",
    chunk_layers="with --mlp-chunk: only the last N layers chunk their MLP (0: all)",
    full_layers="the first N layers remat full whatever --remat says",
    steps="optimizer steps (default: --epochs)", eval_generate="every N steps, score answers "
    "to 8 held-out prompts", epochs="passes over the training examples")


def model_flags(a):   # what train.py and bench/benchmark.py share: the model, LoRA, devices
    for name in ("batch_size", "grad_accum", "lora_r", "lora_alpha", "lora_dropout", "tp",
                 "loss_chunk", "mlp_chunk", "full_layers", "chunk_layers"):
        number(a, name)
    a("--max-segments", type=int, default=jora.Options.max_segments, help="with --pack: at "
      "most N - 1 examples a row (0: a (T, T) mask)")
    a("--targets", default="q,v", help="any of q,k,v,o,gate,up,down, or 'all'")
    a("--remat", default="auto", choices=["auto", *jora.REMAT], help="what the backward "
      "keeps (auto: the fastest plan whose memory fits the device, said at start)")
    a("--compile-cache", default=os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                              os.path.expanduser("~/.cache"), "jora", "xla"),
      help="jax's persistent compilation cache (default: %(default)s)")
    a("--no-compile-cache", action="store_true", help="compile every run afresh")
    a("--attention", default="auto", choices=["auto", "cudnn", "xla"])
    a("--kernels", default="auto", choices=["auto", "pallas", "xla"], help="LoRA projections: "
      "the fused Pallas kernels of kernels/ or XLA (auto: the Mosaic GPU kernel on Hopper GPUs "
      "where the shapes fit, else XLA)")
    a("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    a("--sequence-parallel", action="store_true", help="split positions over the tp group")
    a("--coordinator", help="host:port of process 0, for several hosts")
    for flag in ("--num-processes", "--process-id"):
        a(flag, type=int)


def number(a, name):
    default = NUMBERS[name][0]
    a("--" + name.replace("_", "-"), type=type(default) if default is not None else int,
      default=default, help=HELP.get(name, "") + " (%(default)s)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", help="HF Llama folder (config.json, safetensors, tokenizer.model); none: demo")
    a("--data", help="Alpaca JSON/JSONL, RAFT JSONL or prompt/completion JSONL")
    a("--format", default="auto", choices=["auto", "alpaca", "raft", "completion"])
    a("--tokenizer", help="sentencepiece tokenizer.model (default: the model's)")
    a("--out", default="out", help="run folder: checkpoints, metrics, exports")
    a("--pack", action="store_true", help="pack several examples into each row")
    model_flags(a)
    for name in NUMBERS:
        if "--" + name.replace("_", "-") not in p._option_string_actions:
            number(a, name)
    a("--resume", nargs="?", const="", help="continue the run in --out (or in RESUME); its "
      "model, data and settings come from the checkpoint unless given")
    a("--overwrite", action="store_true", help="start afresh in an --out that holds a run "
      "(removes only what a run wrote there)")
    a("--benchmark", action="store_true", help="python -m bench.benchmark (see its --help)")
    a("--generate", action="store_true", help="complete --prompt / --prompts and exit")
    a("--adapter", help="PEFT adapter folder to apply with --generate")
    a("--prompt", action="append", default=[])
    a("--prompts", help="file with one prompt per line")
    p.set_defaults(demo=False)
    return p


def given_flags(argv) -> set[str]:   # the flags on the command line (not their defaults)
    p = parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return set(vars(p.parse_args(argv))) - {"demo"}   # (not a flag)


def check_flags(args):
    """Every flag and combination, before anything is read or written: ValueError naming it."""
    for k, (_, spec) in NUMBERS.items():
        v, (lo, _, hi) = getattr(args, k, None), spec[1:].rstrip(")]").partition(",")
        if v is not None and not ((float(lo) < v if spec[0] == "(" else float(lo) <= v) and (
                v <= float(hi or "inf") if spec[-1] == "]" else v < float(hi or "inf"))):
            want = f"in {spec}" if hi else f"{'>' if spec[0] == '(' else '>='} {lo}"
            raise ValueError(f"--{k.replace('_', '-')} must be {want}, got {v}")
    refuse = [(args.generate and not args.model, "--generate needs --model"),
              (args.generate and not (args.prompt or args.prompts),
               "--generate needs --prompt TEXT or --prompts FILE"),
              (args.adapter and not args.generate, "--adapter applies to --generate only "
               "(training starts new LoRA factors)"),
              (args.data and not args.model and args.resume is None, "--data needs --model "
               "(without --model, train.py runs the built-in demo on its own data)"),
              (args.resume is not None and args.overwrite, "--resume and --overwrite: pick one"),
              ((args.eval_every or args.eval_generate) and args.resume is None and
               not args.eval_split, "--eval-every/--eval-generate need --eval-split > 0"),
              ((args.prompt or args.prompts) and not args.generate,
               "--prompt/--prompts apply to --generate only")]
    if why := next((why for bad, why in refuse if bad), None):
        raise ValueError(why)


def configs(args):
    """-> (LoraConfig, Options, Plan) from the flags."""
    targets = jora.PROJ if args.targets == "all" else tuple(args.targets.split(","))
    fields = lambda cls: {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
                          if hasattr(args, f.name)}
    return (jora.LoraConfig(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                            targets=targets), jora.Options(**fields(jora.Options)),
            jora.Plan(**fields(jora.Plan)))


def generate(args, params, cfg, tok, mesh):
    lora, lc = jora.load_adapter(args.adapter, cfg) if args.adapter else (None, None)
    lora = lora and jora.shard(lora, jora.lora_specs(lc), mesh)
    prompts = args.prompt + (jora.read_text(args.prompts).splitlines() if args.prompts else [])
    if not prompts:
        raise ValueError(f"{args.prompts}: no prompts (one a line)")
    t, s = time.time(), jora.Sampling(args.max_new_tokens, args.temperature, args.top_k,
                                      args.top_p, args.seed)
    outs = jora.generate(params, [tok.encode(p, bos=True) for p in prompts], cfg, lora, lc, s)
    for p, o in zip(prompts, outs):
        print(f"### {p}\n{tok.decode(o)}\n")
    print(f"{sum(map(len, outs))} tokens in {time.time() - t:.1f}s (compile included)")
    return dict(outputs=outs)


def run(args, given, out) -> dict:
    check_flags(args)
    trainer.use_compile_cache(None if args.no_compile_cache else args.compile_cache)
    if args.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    say = print if jax.process_index() == 0 else (lambda *_, **__: None)
    if args.resume is not None:
        trainer.resume_settings(args, given, out, say)
    elif not args.generate and args.model is None:
        demo.configure(args, out, given)   # (refuses an --out holding another run)
    elif not args.generate:
        trainer.check_out(out, False, args.overwrite)   # before minutes of loading a model
    if (missing := [f"--{f}" for f in ("model", "data") if not getattr(args, f)]) and \
            not args.generate:   # (--resume: not in an old checkpoint either)
        raise ValueError(f"no {missing[0]}: training needs a model folder and a data file "
                         f"(Alpaca JSON/JSONL, RAFT JSONL or prompt/completion JSONL)")
    if not args.generate and os.path.isdir(out) and jax.process_index() == 0:
        trainer.lock_run(out)   # another run in OUT is refused now, not after loading the model
    (lcfg, opts, plan), mesh, dtype = configs(args), jora.make_mesh(args.tp), jnp.dtype(args.dtype)
    t = time.time()
    say(f"loading {args.model} ...", flush=True)   # 7B: 13 GB read from the safetensors files
    cfg, params = jora.load_hf(args.model, dtype, mesh)
    params = jora.unstack_layers(params, free=True)   # faster steps, longer compile
    say(f"loaded {sum(x.size for x in jax.tree.leaves(params)) / 1e6:,.1f}M parameters "
        f"({cfg.n_layers} layers, {dtype.name}) in {time.time() - t:.1f} s")
    tok = jora.Tokenizer(args.tokenizer or args.model)
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer {tok.path} has {tok.vocab_size} pieces but the model's "
                         f"vocabulary is {cfg.vocab_size}: they do not belong together")
    if args.generate:
        return generate(args, params, cfg, tok, mesh)
    train_ex, eval_ex, per_epoch = trainer.prepare_examples(
        args.data, args.format, tok, seq_len=args.seq_len, eval_split=args.eval_split,
        seed=args.seed, rows=args.batch_size * args.grad_accum, pack=args.pack,
        max_segments=args.max_segments, log=lambda line: say(line, flush=True))
    tcfg = jora.TrainConfig(steps=args.steps or max(1, int(args.epochs * per_epoch)),
                            batch_size=args.batch_size, grad_accum=args.grad_accum,
                            seq_len=args.seq_len, lr=args.lr, warmup=args.warmup,
                            weight_decay=args.weight_decay, clip=args.clip, seed=args.seed)
    schedule = trainer.Schedule(args.log_every, args.eval_every, args.eval_generate,
                                args.save_every, args.keep)
    lora, summary = trainer.train(
        cfg, params, lcfg, tcfg, train_ex, out, mesh, eval_examples=eval_ex, opts=opts,
        plan=plan, pack=args.pack, schedule=schedule, resume=args.resume is not None,
        overwrite=args.overwrite, run_info=dict(vars(args)), tokenizer=tok)
    if "interrupted" in summary:   # (a checkpoint is saved: --resume continues)
        return summary
    trainer.export_run(out, cfg, params, lora, lcfg, source=args.model,
                       dtype=jnp.float32 if args.demo else jnp.bfloat16, log=say)
    if args.demo:
        summary["exact_match"] = demo.score(params, cfg, lora, lcfg, tok, say)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        summary["first_loss"] = next((json.loads(x)["loss"] for x in f if '"loss"' in x), None)
    return summary


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--benchmark" in argv:
        from bench import benchmark
        return benchmark.main([x for x in argv if x != "--benchmark"])
    args, given = parser().parse_args(argv), given_flags(argv)
    out = args.resume or args.out
    try:
        return run(args, given, out)
    finally:
        trainer.unlock_run(out)


def cli(argv=None):
    """main, with the errors a user can act on said in a line instead of a traceback."""
    try:
        result = main(argv)
    except (ValueError, OSError, FloatingPointError) as e:   # bad input
        sys.exit("error: " + " ".join(str(e).split("\n")))
    except KeyboardInterrupt:   # Ctrl-C outside the step loop, or a second signal in it
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except jax.errors.JaxRuntimeError as e:
        if not trainer.is_oom(e):
            raise
        sys.exit(f"error: out of device memory ({str(e).splitlines()[0][:300]})\n"
                 + trainer.LESS_MEMORY)
    if isinstance(result, dict) and "interrupted" in result:
        sys.exit(128 + result["signal"])   # 130 (SIGINT) or 143 (SIGTERM): a script can tell


if __name__ == "__main__":
    cli()
