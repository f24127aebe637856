"""Speed and memory of training steps on a random-initialised model: one JSON row a length.

  python -m bench.benchmark --size 7b --seq-len 2048,4096 --batch-size 1   # from the repo root
Rows (stdout): tokens/s, step seconds, MFU, per-device peak memory, XLA's planned memory,
compile seconds, or an error; progress on stderr. Takes train.py's model flags (--remat, --tp,
--targets, ...; an unset --batch-size is 1). bench/reproduce.sh drives it; --profile DIR writes
a jax.profiler trace of the timed steps (TensorBoard or Perfetto open it).
"""
import argparse
import contextlib
import dataclasses
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jora
import trainer


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
    mem = max((d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in mesh.devices.flat)
    mfu = trainer.mfu(tokens / dt * flops_per_token, mesh.size)
    return dict(tokens_per_s=round(tokens / dt), step_s=round(dt, 4), loss=float(m["loss"]),
                peak_gib=round(mem / 2**30, 2), mfu=None if mfu is None else round(mfu, 4))


def random_params(cfg, mesh, dtype) -> jora.Params:
    """Random weights, created one layer at a time already split over the mesh and unstacked,
    as train.py runs them: no device holds more than the model and one layer's transients (a
    70B model's float8 projections fit one GPU; its bf16 ones never exist)."""
    one = dataclasses.replace(cfg, n_layers=1)
    shardings = jax.tree.map(lambda s: jora.NamedSharding(mesh, s), jora.param_specs(one))

    def init(key):
        return jora.init_params(key, one, dtype)

    def init_layer(key):
        return init(key).layers

    top = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
    layer = jax.jit(init_layer, out_shardings=shardings.layers)
    layers = [layer(jax.random.key(1 + i)) for i in range(cfg.n_layers)]
    return top._replace(layers=jax.tree.map(lambda *slices: slices, *layers))


def benchmark(cfg, lcfg, tcfg, mesh, opts, plan, seq_lens, steps=5, warmup=2,
              dtype=jnp.bfloat16, log=print, profile=None, doc=0) -> list[dict]:
    """Time training steps of a random-initialised model on random tokens at each length,
    reusing one model: tokens/s, step seconds, MFU, per-device peak memory (GiB; it only grows
    within a process, so give lengths in increasing order), compile seconds, or an error.
    `profile`: a folder for a jax.profiler trace of the timed steps.
    doc > 0: each row packs examples of `doc` tokens (segment ids 1, 2, ...); else one a row.
    MFU counts every position attending to the whole row (flops_per_token) either way."""
    jora.check_tp(cfg, mesh.shape[jora.MODEL])
    opts = dataclasses.replace(opts, packed=doc > 0)   # else one sequence a row: no mask at all
    params = random_params(cfg, mesh, dtype)
    lora = jax.device_get(jora.init_lora(jax.random.key(1), cfg, lcfg))   # host: steps donate
    results = []
    rows = tcfg.batch_size * tcfg.grad_accum

    def say(s):   # a progress line on stderr (stdout holds the JSON rows alone)
        print(s, file=sys.stderr, flush=True)

    for seq in seq_lens:
        tc = dataclasses.replace(tcfg, seq_len=seq)
        row = dict(seq=seq, doc=doc, batch=tc.batch_size, tp=mesh.shape[jora.MODEL],
                   devices=mesh.size, targets=",".join(lcfg.targets), r=lcfg.r,
                   lora_dropout=lcfg.dropout, layers="unrolled", fp8=cfg.fp8,
                   fp8_transposed=cfg.fp8_transposed,
                   **dataclasses.asdict(opts), **dataclasses.asdict(plan),   # every option
                   kernels_used=jora.kernel_ops(plan) is not None)
        try:
            state = jora.shard(jora.TrainState(lora, jora.adamw_init(lora), np.int32(0)),
                               jora.state_specs(lcfg), mesh)
            segs = np.arange(seq + 1)[None].repeat(rows, 0) // doc + 1 if doc else None
            tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (rows, seq + 1))
            b = jora.make_batch(tokens, None, segs)
            jora.check_runs(b.segment_ids, opts)   # the step is jitted: it cannot refuse them
            b = jora.accum_batch(b, tc.grad_accum, mesh)
            if jax.process_index() == 0:   # progress on stderr; stdout keeps one JSON row a line
                print(f"seq {seq}: compiling ...", file=sys.stderr, flush=True)
            key = jax.random.key(2)
            if plan.remat == "auto":   # what train.py would pick for this shape
                o, step_fn, step, spent = trainer.choose_plan(
                    cfg, lcfg, tc, mesh, opts=opts, plan=plan, state=state, params=params,
                    batch=b, key=key, log=say)
                row.update(remat=o.remat, mlp_chunk=o.mlp_chunk, chunk_layers=o.chunk_layers,
                           auto=True)
            if plan.remat != "auto" or step is None:   # (auto compiles nothing off the GPU)
                if plan.remat != "auto":
                    step_fn = jora.make_train_step(cfg, lcfg, tc, mesh, opts=opts, plan=plan)
                step, spent = trainer.compile_step(step_fn, (state, params, b, key), say)
            row["compile_s"] = round(spent, 1)
            planned = trainer.planned_bytes(step)   # XLA plans, before running
            if planned is not None:
                row["planned_gib"] = round(planned / 2**30, 3)
            if steps > 0:   # (--bench-steps 0: compile and plan only: what would fit?)
                row.update(_time_steps(step, state, (params, b, key), steps, warmup,
                                       profile and f"{profile}/{seq}", rows * seq,
                                       trainer.flops_per_token(cfg, seq), mesh))
        except Exception as e:   # report it and go on to the next length
            row["error"] = ("out of memory" if trainer.is_oom(e) else
                            f"{type(e).__name__}: {str(e)[:300]}")
        state = b = step = None   # free this length's buffers before the next
        log(json.dumps(row))
        results.append(row)
    return results


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--size", default="7b", choices=list(jora.PRESETS))
    a("--seq-len", default="1024", help="lengths to time, in increasing order: 2048,4096")
    a("--bench-steps", type=int, default=5, help="timed steps (0: compile and report XLA's "
                                                   "planned memory only)")
    a("--bench-warmup", type=int, default=2)
    a("--bench-doc", type=int, default=0, help="rows packed from examples of N tokens each "
                                               "(0: one sequence a row)")
    a("--profile", help="write a profiler trace of the timed steps to this folder")
    trainer.model_flags(a)
    args = p.parse_args(argv)
    if args.batch_size is None:   # train.py's default is chosen from the data; here: one row
        args.batch_size = 1
    say = trainer.start_process(args)   # (before anything touches a device)
    tcfg = jora.TrainConfig(batch_size=args.batch_size, grad_accum=args.grad_accum)
    tag = f'{{"impl": "jora", "size": "{args.size}", '   # one JSON object a line
    lcfg, opts, plan = trainer.configs(args)
    mesh = jora.make_mesh(args.tp)
    cfg = dataclasses.replace(jora.PRESETS[args.size], fp8=args.base_dtype == "float8")
    cfg = dataclasses.replace(cfg, fp8_transposed=cfg.fp8 and trainer.fp8_transposed(cfg, mesh))
    return benchmark(cfg, lcfg, tcfg, mesh, opts, plan,
                     [int(s) for s in args.seq_len.split(",")], args.bench_steps,
                     args.bench_warmup, jnp.dtype(args.dtype),
                     log=lambda line: say(tag + line[1:], flush=True), profile=args.profile,
                     doc=args.bench_doc)


if __name__ == "__main__":
    main()
