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

EPILOG = """exit status: 0 finished; 1 an error, said in one line; 2 a malformed command line;
130 (SIGINT, Ctrl-C) or 143 (SIGTERM): stopped after a checkpoint, continue with --resume; 130
also: stopped at once by a second signal, or by Ctrl-C outside the training steps. One run at a
time in an --out (OUT/.lock)."""


def model_flags(a):   # what train.py and bench/benchmark.py share: the model, LoRA, devices
    a("--batch-size", type=int, default=8)
    a("--grad-accum", type=int, default=1)
    a("--max-segments", type=int, default=jora.Options.max_segments, help="with --pack: at most "
      "N - 1 examples a row (N runs with the padding, ~0.3 GiB each at 16k on 7B; 0: a mask)")
    a("--lora-r", type=int, default=16)
    a("--lora-alpha", type=float, default=16.0)
    a("--lora-dropout", type=float, default=0.05)
    a("--targets", default="q,v", help="any of q,k,v,o,gate,up,down, or 'all'")
    a("--remat", default="auto", choices=["auto", *jora.REMAT], help="what the backward "
      "keeps (auto: the fastest plan whose memory fits the device, said at start)")
    a("--compile-cache", default=os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                              os.path.expanduser("~/.cache"), "jora", "xla"),
      help="jax's persistent compilation cache: later runs of the same shapes skip most of "
           "the compile (default: %(default)s)")
    a("--no-compile-cache", action="store_true", help="compile every run afresh")
    a("--loss-chunk", type=int, default=2048, help="positions per cross-entropy chunk")
    a("--mlp-chunk", type=int, default=0, help="positions per MLP chunk (0: all): less memory")
    a("--full-layers", type=int, default=0, help="the first N layers remat full whatever "
      "--remat says (with attn: one (T, D) less a layer, one more attention forward)")
    a("--chunk-layers", type=int, default=0, help="with --mlp-chunk: only the last N layers "
      "chunk their MLP (0: all): where memory peaks; the others run faster")
    a("--attention", default="auto", choices=["auto", "cudnn", "xla"])
    a("--kernels", default="auto", choices=["auto", "pallas", "xla"], help="LoRA projections: "
      "the fused Pallas kernel or XLA (auto: XLA, faster in the whole 7B model; see README)")
    a("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    a("--tp", type=int, default=1, help="devices per tensor-parallel group")
    a("--sequence-parallel", action="store_true", help="split positions over the tp group")
    a("--coordinator", help="host:port of process 0, for several hosts (or "
                            "JAX_COORDINATOR_ADDRESS)")
    a("--num-processes", type=int)
    a("--process-id", type=int)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", help="HF Llama folder (config.json, safetensors, tokenizer.model); none: demo")
    a("--data", help="Alpaca JSON/JSONL, RAFT JSONL or prompt/completion JSONL")
    a("--format", default="auto", choices=["auto", "alpaca", "raft", "completion"])
    a("--tokenizer", help="sentencepiece tokenizer.model (default: the model's)")
    a("--out", default="out", help="run folder: checkpoints, metrics, exports")
    a("--steps", type=int, help="optimizer steps (default: --epochs)")
    a("--epochs", type=float, default=1.0, help="passes over the training examples (packed: "
      "the packer's rows of them), when --steps is not given")
    a("--seq-len", type=int, default=1024, help="tokens per row")
    a("--pack", action="store_true", help="pack several examples into each row")
    model_flags(a)
    a("--lr", type=float, default=2e-4)
    a("--warmup", type=int, default=10)
    a("--weight-decay", type=float, default=0.0)
    a("--clip", type=float, default=1.0, help="gradient-norm clip (0: off)")
    a("--seed", type=int, default=0)
    a("--eval-split", type=float, default=0.0, help="fraction of examples held out")
    a("--save-every", type=int, default=0)
    a("--eval-every", type=int, default=0)
    a("--eval-generate", type=int, default=0, help="every N steps, generate and score answers")
    a("--log-every", type=int, default=10)
    a("--keep", type=int, default=3, help="checkpoints to keep")
    a("--resume", nargs="?", const="", help="continue the run in --out (or in RESUME); its "
      "model, data and settings come from the checkpoint unless given")
    a("--overwrite", action="store_true", help="start afresh in an --out that holds a run "
      "(removes only what a run wrote there)")
    a("--benchmark", action="store_true", help="python -m bench.benchmark (see its --help)")
    a("--generate", action="store_true", help="complete --prompt / --prompts and exit")
    a("--adapter", help="PEFT adapter folder to apply with --generate")
    a("--prompt", action="append", default=[])
    a("--prompts", help="file with one prompt per line")
    for flag, kind, default in (("max-new-tokens", int, 256), ("temperature", float, 0.0),
                                ("top-k", int, 0), ("top-p", float, 1.0)):
        a(f"--{flag}", type=kind, default=default)
    p.set_defaults(demo=False)
    return p


def given_flags(argv) -> set[str]:   # the flags on the command line (not their defaults)
    p = parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return set(vars(p.parse_args(argv))) - {"demo"}   # (not a flag)


LIMITS = dict(   # flag: the interval it must lie in (NaN lies in none)
    steps="[1", epochs="(0", batch_size="[1", grad_accum="[1", seq_len="[1", lora_r="[1",
    lora_alpha="(0", lora_dropout="[0,1)", lr="(0", warmup="[0", weight_decay="[0", clip="[0",
    eval_split="[0,1)", save_every="[0", eval_every="[0", eval_generate="[0", log_every="[1",
    keep="[1", max_new_tokens="[1", temperature="[0", top_k="[0", top_p="(0,1]", tp="[1")


def check_flags(args):
    """Every flag and combination, before anything is read or written: ValueError naming it."""
    for k, spec in LIMITS.items():
        v, (lo, _, hi) = getattr(args, k), spec[1:].rstrip(")]").partition(",")
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
    for bad, why in refuse:
        if bad:
            raise ValueError(why)


RESUMED = ("model data format tokenizer seq_len pack max_segments lora_r lora_alpha "
           "lora_dropout targets lr warmup weight_decay clip dtype seed eval_split batch_size "
           "grad_accum steps save_every eval_every eval_generate log_every keep demo").split()


def resume_flags(args, given, out, say):
    """--resume: the run's model, data and settings from its checkpoint, unless given (and
    then warned about where they differ)."""
    path, run = trainer.resume_info(out)
    for k in (k for k in RESUMED if k in run):
        if k not in given:
            setattr(args, k, run[k])
        elif run[k] != getattr(args, k):
            say(f"warning: --{k.replace('_', '-')} {getattr(args, k)} differs from the run's "
                f"{run[k]} ({path})")


def configs(args):
    """-> (LoraConfig, Options, Plan) from the flags (--kernels auto: XLA)."""
    targets = jora.PROJ if args.targets == "all" else tuple(args.targets.split(","))
    fields = lambda cls: {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
                          if hasattr(args, f.name)}
    return (jora.LoraConfig(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                            targets=targets), jora.Options(**fields(jora.Options)),
            jora.Plan(**dict(fields(jora.Plan), kernels="pallas" if args.kernels == "pallas"
                             else "xla")))


def use_compile_cache(args):   # steps compiled once are read back by later runs
    if not args.no_compile_cache:
        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


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
    use_compile_cache(args)
    if args.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    say = print if jax.process_index() == 0 else (lambda *_, **__: None)
    if args.resume is not None:
        resume_flags(args, given, out, say)
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
    n_params = sum(x.size for x in jax.tree.leaves(params))
    say(f"loaded {n_params / 1e6:,.1f}M parameters ({cfg.n_layers} layers, {dtype.name}) in "
        f"{time.time() - t:.1f} s")
    tok = jora.Tokenizer(args.tokenizer or args.model)
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer {tok.path} has {tok.vocab_size} pieces but the model's "
                         f"vocabulary is {cfg.vocab_size}: they do not belong together")
    if args.generate:
        return generate(args, params, cfg, tok, mesh)
    train_ex, eval_ex, per_epoch = trainer.prepare_examples(
        args.data, args.format, tok, args.seq_len, args.eval_split, args.seed,
        args.batch_size * args.grad_accum, args.pack, args.max_segments,
        log=lambda line: say(line, flush=True))
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
    if "interrupted" in summary:
        return summary
    trainer.export_run(out, cfg, params, lora, lcfg, args.model,
                       jnp.float32 if args.demo else jnp.bfloat16, log=say)
    if args.demo:
        summary["exact_match"] = demo.score(params, cfg, lora, lcfg, tok, say)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if '"loss"' in line]
    summary["first_loss"] = rows[0]["loss"] if rows else None
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
