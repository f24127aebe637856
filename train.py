"""Fine-tune a Llama-family model (Llama-2 and 3.x, Mistral, Qwen2.5, Qwen3) with LoRA: a thin
command line over jora.py and trainer.py.

  python train.py                                          # built-in demo, ~1 minute on a CPU
  python train.py --model llama-2-7b-hf --data alpaca.json --out run1 --tp 4 --steps 1000
  python train.py --model llama-2-7b-hf --data raft.jsonl --seq-len 4096
  python train.py --resume --out run1                      # continue after a crash or Ctrl-C
  python train.py --generate --model llama-2-7b-hf --adapter run1/adapter --prompt "..."
  python -m bench.benchmark --size 7b --seq-len 2048,4096     # speed and memory of the step

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
from trainer import NUMBERS

EPILOG = """exit status: 0 finished; 1 an error, said in one line; 2 a bad command line; 130
(SIGINT) or 143 (SIGTERM): stopped after a checkpoint (--resume continues it), or at once by a
second signal or a Ctrl-C outside the steps. One run at a time in an --out (OUT/.lock)."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", help="HF model folder of a Llama, Mistral, Qwen2 or Qwen3 (config.json, "
                      "safetensors, tokenizer.json or tokenizer.model); none: the demo")
    a("--data", help="Alpaca JSON/JSONL, RAFT JSONL, prompt/completion JSONL, or chat JSON/JSONL "
                     "(messages or conversations)")
    a("--format", default="auto", choices=["auto", "alpaca", "raft", "completion", "chat"])
    a("--chat-template", help="a Jinja chat template file (default: the model's, from "
                              "tokenizer_config.json or chat_template.jinja)")
    a("--check-data", action="store_true", help="audit --data alone: print a summary and the "
                                                "first --show examples, trained spans in ⟦ ⟧, "
                                                "write nothing, and exit")
    a("--show", type=int, default=3, help="examples --check-data prints (%(default)s)")
    a("--raw", action="store_true", help="--generate: send --prompt as it is, not as a user "
                                         "message in the model's chat template")
    a("--tokenizer", help="a folder, tokenizer.json or sentencepiece tokenizer.model "
                          "(default: the model's)")
    a("--out", default="out", help="run folder: checkpoints, metrics, exports")
    a("--pack", action=argparse.BooleanOptionalAction, default=True,
      help="pack examples into rows of --seq-len positions, so that every step has one shape "
           "and compiles once (--no-pack: one example a row, padded to the batch's longest, "
           "a compile for each padded length)")
    trainer.model_flags(a)
    for name in NUMBERS:
        if "--" + name.replace("_", "-") not in p._option_string_actions:
            trainer.number_flag(a, name)
    a("--resume", nargs="?", const="", help="continue the run in --out (or in RESUME); its "
      "model, data and settings come from the checkpoint unless given")
    a("--overwrite", action="store_true", help="start afresh in an --out that holds a run "
      "(removes only what a run wrote there)")
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
    trainer.check_numbers(args)
    refuse = [
        (args.generate and not args.model, "--generate needs --model"),
        (args.generate and not (args.prompt or args.prompts),
         "--generate needs --prompt TEXT or --prompts FILE"),
        (args.adapter and not args.generate,
         "--adapter applies to --generate only (training starts new LoRA factors)"),
        (args.data and not args.model and args.resume is None,
         "--data needs --model (without --model, train.py runs the built-in demo on its own "
         "data)"),
        (args.resume is not None and args.overwrite, "--resume and --overwrite: pick one"),
        (args.check_data and not (args.model and args.data),
         "--check-data needs --model (its tokenizer and chat template) and --data"),
        ((args.eval_every or args.eval_generate) and args.eval_split == 0,
         "--eval-every/--eval-generate need --eval-split > 0 (a held-out share of the data)"),
        ((args.prompt or args.prompts) and not args.generate,
         "--prompt/--prompts apply to --generate only"),
    ]
    for bad, why in refuse:
        if bad:
            raise ValueError(why)


# The run's timeline, said at its end: (name, summary key). tokens/s counts the training steps
# alone; compiles, evaluations, checkpoints and exports are timed apart.
TIMELINE = (("to the first step", "first_step_s"), ("load", "load_s"), ("data", "data_s"),
            ("compile", "compile_s"), ("training steps", "train_s"),
            ("evaluation", "evaluation_s"), ("checkpoints", "checkpoint_s"),
            ("export", "export_s"))


def generate(args, params, cfg, tok, mesh, template):
    bad = jora.first_non_finite(params)   # such a model would print tokens all the same
    if bad:
        raise ValueError(f"{args.model}: {bad} holds NaN or infinite values: the model cannot "
                         f"generate")
    lora, lc = None, None
    if args.adapter:
        lora, lc = jora.load_adapter(args.adapter, cfg)
        lora = jora.shard(lora, jora.lora_specs(lc), mesh)
        bad = jora.first_non_finite(lora, "adapter")
        if bad:
            raise ValueError(f"{args.adapter}: {bad} holds NaN or infinite values")
    prompts = args.prompt + (jora.read_text(args.prompts).splitlines() if args.prompts else [])
    if not prompts:
        raise ValueError(f"{args.prompts}: no prompts (one a line)")
    t = time.time()
    s = jora.Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    if template is None or args.raw:
        ids = [tok.encode(p, bos=True) for p in prompts]
    else:   # a user message in the model's template (cfg stops at its turn's end ids)
        ids = [trainer.chat_prompt(p, tok, template) for p in prompts]
    outs = jora.generate(params, ids, cfg, lora, lc, s)
    for p, o in zip(prompts, outs):
        print(f"### {p}\n{tok.decode(o)}\n")
    print(f"{sum(map(len, outs))} tokens in {time.time() - t:.1f}s (compile included)")
    return dict(outputs=outs)


def check_data(args) -> dict:
    """--check-data: read, tokenize and audit --data with the model's tokenizer (and chat
    template), record by record, without loading the weights or writing anything; print a
    summary and the first --show examples with their trained spans in ⟦ ⟧."""
    folder = args.tokenizer or args.model
    tok = jora.Tokenizer(folder)
    template = trainer.chat_template(folder, args.chat_template)
    limit = args.seq_len or jora.Config.from_hf(args.model).max_positions
    records, fmt = trainer.read_records(args.data, args.format)
    trainer.check_answers(records, fmt, args.data, print)
    examples, refusals, warnings = [], [], {}
    if fmt != "chat":   # the same tokenization as training; what does not fit is counted
        examples, report = trainer.tokenize_records(records, fmt, tok, limit, args.data)
        refusals = [f"{report['skipped']} records longer than {limit} positions"] * bool(
            report["skipped"])
    else:
        trainer.require_chat_template(template, args.data)
    for i, r in enumerate(records if fmt == "chat" else [], 1):
        try:   # each conversation on its own: a refusal names its record, and the audit goes on
            example, kinds = trainer.chat_record(r, i, tok, template, args.data)
            for kind in kinds:
                warnings.setdefault(kind, i)
            examples.append(example)
        except ValueError as e:
            refusals.append(str(e))
    summary = dict(records=len(records), format=fmt, examples=len(examples),
                   tokens=sum(len(e.tokens) for e in examples),
                   trained_tokens=int(sum(e.weights.sum() for e in examples)),
                   refusals=len(refusals))
    print(f"{args.data}: " + ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}"
                                       for k, v in summary.items()))
    for line in refusals[:5]:
        print(f"refused: {line}")
    for kind, first in warnings.items():
        print(f"warning: {kind} (first in record {first})")
    for i, example in enumerate(examples[:args.show], 1):
        print(f"--- example {i}\n{trainer.mark_spans(example, tok)}")
    return summary


def run(args, given, out) -> dict:
    begin = time.time()
    check_flags(args)
    if args.check_data:
        return check_data(args)
    say = trainer.start_process(args)   # (before anything touches a device)
    if args.resume is not None:
        trainer.resume_settings(args, given, out, say)
    elif not args.generate and args.model is None:
        demo.configure(args, out, given)   # (refuses an --out holding another run)
    elif not args.generate:
        trainer.check_out(out, False, args.overwrite)   # before minutes of loading a model
    # (--resume: an old checkpoint may not name them either)
    missing = [f"--{f}" for f in ("model", "data") if not getattr(args, f)]
    if missing and not args.generate:
        raise ValueError(f"no {missing[0]}: training needs a model folder and a data file "
                         f"(Alpaca JSON/JSONL, RAFT JSONL or prompt/completion JSONL)")
    if not args.generate and os.path.isdir(out) and jax.process_index() == 0:
        trainer.lock_run(out)   # another run in OUT is refused now, not after loading the model
    mesh = jora.make_mesh(args.tp)
    dtype = jnp.dtype(args.dtype)
    t = time.time()
    say(f"loading {args.model} ...", flush=True)   # 7B: 13 GB read from the safetensors files
    fp8 = args.base_dtype == "float8"
    transposed = fp8 and trainer.fp8_transposed(jora.Config.from_hf(args.model), mesh)
    cfg, params = jora.load_hf(args.model, dtype, mesh, fp8=fp8, fp8_transposed=transposed)
    params = jora.unstack_layers(params, free=True)   # faster steps, longer compile
    load_s = time.time() - t
    base = ""
    if cfg.fp8:
        base = ", projections in float8" + (" (and transposed)" if transposed else "")
    say(f"loaded {trainer.hf_parameters(cfg) / 1e6:,.1f}M parameters "
        f"({cfg.n_layers} layers, {dtype.name}{base}) in {load_s:.1f} s")
    tok = jora.Tokenizer(args.tokenizer or args.model)
    if args.seq_len and args.seq_len > cfg.max_positions:
        say(f"warning: --seq-len {args.seq_len} is beyond the model's max_position_embeddings "
            f"{cfg.max_positions}: positions past it were never trained (RoPE extrapolates)")
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer {tok.path} has {tok.vocab_size} pieces but the model's "
                         f"vocabulary is {cfg.vocab_size}: they do not belong together")
    template = trainer.chat_template(args.tokenizer or args.model, args.chat_template)
    if template is not None:   # the assistant turn's end ids stop generation and its scoring
        ends = trainer.chat_end_ids(tok)
        cfg = dataclasses.replace(cfg, stop_ids=tuple(sorted(set(cfg.stop_ids) | set(ends))))
    if args.generate:
        return generate(args, params, cfg, tok, mesh, template)
    t = time.time()
    data = trainer.prepare_examples(
        args.data, args.format, tok, seq_len=args.seq_len, eval_split=args.eval_split,
        seed=args.seed, batch_size=args.batch_size, grad_accum=args.grad_accum, pack=args.pack,
        max_segments=args.max_segments, max_positions=cfg.max_positions,
        data_parallel=mesh.shape[jora.DATA], template=template,
        log=lambda line: say(line, flush=True))
    data_s = time.time() - t
    # What was chosen for the flags left unset: the run's record, which --resume reads back.
    args.seq_len, args.batch_size = data.seq_len, data.batch_size
    args.max_segments, args.eval_split = data.max_segments, data.eval_split
    lcfg, opts, plan = trainer.configs(args)
    tcfg = jora.TrainConfig(steps=args.steps or max(1, int(args.epochs * data.per_epoch)),
                            batch_size=args.batch_size, grad_accum=args.grad_accum,
                            seq_len=args.seq_len, lr=args.lr, warmup=args.warmup,
                            weight_decay=args.weight_decay, clip=args.clip, seed=args.seed)
    schedule = trainer.Schedule(args.log_every, args.eval_every, args.eval_generate,
                                args.save_every, args.keep)
    lora, summary = trainer.train(
        cfg, params, lcfg, tcfg, data.train, out, mesh, eval_examples=data.eval, opts=opts,
        plan=plan, pack=args.pack, schedule=schedule, resume=args.resume is not None,
        overwrite=args.overwrite, run_info=dict(vars(args)), tokenizer=tok)
    if "interrupted" in summary:   # (a checkpoint is saved: --resume continues)
        return summary
    t = time.time()
    trainer.export_run(out, cfg, params, lora, lcfg, source=args.model,
                       dtype=jnp.float32 if args.demo else jnp.bfloat16, log=say)
    summary.update(load_s=round(load_s, 3), data_s=round(data_s, 3),
                   export_s=round(time.time() - t, 3))
    if "first_step_done" in summary:
        summary["first_step_s"] = round(summary.pop("first_step_done") - begin, 3)
    say("time: " + ", ".join(f"{name} {summary[key]:.1f} s" for name, key in TIMELINE
                             if key in summary))
    if args.demo:
        summary["exact_match"] = demo.score(params, cfg, lora, lcfg, tok, say)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        summary["first_loss"] = next((json.loads(x)["loss"] for x in f if '"loss"' in x), None)
    return summary


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    given = given_flags(argv)
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
