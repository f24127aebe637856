"""Time kernels/hopper_gemm.py against cuBLAS (XLA's jnp.dot) on Llama-2-7B projections.

    python -m experiments.bench_hopper_gemm                 # all 18 problems, CONFIGS, minutes
    python -m experiments.bench_hopper_gemm --ms 8192 --sweep   # also SWEEP's configurations
    python -m experiments.bench_hopper_gemm --lowrank 16    # gemm_lowrank, LOWRANK_CONFIGS
    python -m experiments.bench_hopper_gemm --ms 2048 --kn 4096x11008 --wave   # 128 x 128 CTAs
    python -m experiments.bench_hopper_gemm --ms 2048,32768 --tail   # the ragged wave split off

For M in --ms and (K, N) in (4096, 4096), (4096, 11008), (11008, 4096), both orientations:
  w_kn  y = x @ w,   w stored (K, N)
  w_nk  y = x @ w.T, w stored (N, K), read in place (cuBLAS gets the same: XLA folds the
        transpose into the GEMM's operand layout)
bf16 in, fp32 accumulation, bf16 out. A time is the median of 5 repetitions, after warm-up,
of a batch of back-to-back calls (about 10 ms) ended by block_until_ready. `err` is
max|y - ref| / max|ref| against `hopper_gemm.reference` (fp32); above 1e-2 is marked FAIL.
A configuration that fails to compile or run prints one line and the run goes on; past
--budget seconds the remaining configurations are skipped (so it ends in time). --lowrank R
times gemm_lowrank (x @ w + u @ v, u (M, R), v (R, N)) instead, still against cuBLAS's plain
x @ w: kernel/cuBLAS is then what the fused rank-R term costs on top of the frozen GEMM. Every
configuration runs with tail="auto" (a ragged last wave in a second launch of TAIL_TILES where
`_split` cuts one off), except with --tail: the default tiles with no tail launch (tail None) and
with each of TAILS. Prints a markdown table, then the best configuration per problem. Exit
status 0 (also on a CPU: "needs a GPU").
"""
import argparse
import dataclasses
import sys
import time

import jax
import jax.numpy as jnp

from kernels.hopper_gemm import (LOWRANK_TILES, TAIL_TILES, Tiles, gemm_lowrank, matmul,
                                 reference)
from kernels.bench import seconds_per_call as _seconds_per_call

LLAMA_KN = ((4096, 4096), (4096, 11008), (11008, 4096))
# 128 x 256 CTA tile (the two WGs side by side), the same stacked (256 x 128), the first
# with a wgmma left in flight across steps, and in clusters of two CTAs sharing each w tile.
# All 224 KiB of SMEM (4 stages).
CONFIGS = (Tiles(), Tiles(split="m"), Tiles(in_flight=1), Tiles(cluster=2))
SWEEP = (Tiles(stages=3), Tiles(group=16), Tiles(group=4, group_dim="n"),
         Tiles(split="m", in_flight=1), Tiles(tile_k=128, stages=2))
# gemm_lowrank: the default (4 stages, one epilogue buffer), 3 stages with two, the WGs
# stacked, and a wgmma left in flight.
LOWRANK_CONFIGS = (LOWRANK_TILES, Tiles(stages=3), Tiles(split="m", epi_buffers=1),
                   Tiles(in_flight=1, epi_buffers=1), Tiles(epi_buffers=1, cluster=2))
# 128 x 128 CTA tiles (--wave): twice the tiles of 128 x 256, so a ragged last wave wastes less
# of the 132 SMs (4096 -> 11008 at M = 2048: 688 CTA tiles are 5.2 waves, 1,376 are 10.4).
WAVE = (Tiles(tile_m=64, split="m"), Tiles(tile_m=64, split="m", stages=6), Tiles(tile_n=64),
        Tiles(tile_n=64, stages=6), Tiles(tile_m=64))
# --tail: the second launch's tiles: 128 x 64 (the default), 64 x 128, 64 x 256, 128 x 128.
TAILS = (TAIL_TILES, Tiles(tile_m=64, tile_n=64, stages=6), Tiles(tile_m=64),
         Tiles(tile_n=64, stages=5))
TOL = 1e-2


def seconds_per_call(f, *args):   # kernels/bench.py's timer, with this script's shorter budget
    return _seconds_per_call(f, *args, reps=5, target=0.01)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ms", default="2048,8192,32768", help="tokens M, comma-separated")
    ap.add_argument("--sweep", action="store_true", help="also time SWEEP's configurations")
    ap.add_argument("--lowrank", type=int, default=0, help="R > 0: time gemm_lowrank")
    ap.add_argument("--wave", action="store_true", help="time WAVE's configurations only")
    ap.add_argument("--tail", action="store_true",
                    help="the default tiles without and with each of TAILS' tail launch")
    ap.add_argument("--kn", default="", help="only these K x N, e.g. 4096x11008 (default: all)")
    ap.add_argument("--budget", type=float, default=150.0,
                    help="seconds after which remaining configurations are skipped")
    args = ap.parse_args(argv)
    if jax.default_backend() != "gpu":
        print("needs a GPU")
        return 0
    kind = jax.devices()[0].device_kind
    r = args.lowrank
    configs = LOWRANK_CONFIGS if r else CONFIGS + (SWEEP if args.sweep else ())
    if args.wave:
        configs = (LOWRANK_TILES if r else Tiles(),) + tuple(
            dataclasses.replace(t, epi_buffers=1) if r else t for t in WAVE)
    # (tiles, tail) pairs; a tail's name is its CTA tile
    configs = [(t, "auto") for t in configs]
    if args.tail:
        default = LOWRANK_TILES if r else Tiles()
        configs = [(default, None)] + [(default, t) for t in TAILS]
    shapes = [tuple(int(d) for d in kn.split("x")) for kn in args.kn.split(",") if kn] or LLAMA_KN
    u = v = None   # (M, R), (R, N) with --lowrank

    def kernel(x, w, **kw):
        return gemm_lowrank(x, w, u, v, **kw) if r else matmul(x, w, **kw)
    start = time.perf_counter()
    print(f"jax {jax.__version__}, {kind}, bf16 -> bf16, fp32 accumulation; times in us"
          + (f"; kernel: gemm_lowrank, R = {r}" if r else ""))
    print("| M | K -> N | w | cuBLAS us | kernel us | kernel/cuBLAS | TFLOP/s | err | config |")
    print("|---|---|---|---|---|---|---|---|---|")
    best = []   # (m, k, n, orientation, cublas_us, best_us or None, config)
    ref_fn = jax.jit(reference)
    maxrel = jax.jit(lambda y, r: jnp.max(jnp.abs(y.astype(jnp.float32) - r)) / jnp.max(jnp.abs(r)))
    for m in (int(v) for v in args.ms.split(",")):
        for k, n in shapes:
            kx, kw = jax.random.split(jax.random.key(m + k + n))
            x = jax.random.normal(kx, (m, k), jnp.bfloat16)
            w_kn = (jax.random.normal(kw, (k, n), jnp.float32) / k ** 0.5).astype(jnp.bfloat16)
            w_nk = jax.jit(lambda w: w.T)(w_kn)   # its own (N, K) array in HBM
            want = ref_fn(x, w_kn)                # (M, N) fp32, the same for both layouts
            if r:
                ku, kv = jax.random.split(kw)
                u = jax.random.normal(ku, (m, r), jnp.bfloat16)
                v = (jax.random.normal(kv, (r, n)) / r ** 0.5).astype(jnp.bfloat16)
                want = want + ref_fn(u, v)
            flops = 2 * m * k * n
            for name, w, tr in (("w_kn", w_kn, False), ("w_nk", w_nk, True)):
                cublas = jax.jit(lambda x, w, tr=tr: jnp.dot(x, w.T if tr else w))
                t_ref = seconds_per_call(cublas, x, w) * 1e6
                row = f"| {m} | {k} -> {n} | {name} | {t_ref:.1f} |"
                top = (None, None)
                for tiles, tail in configs:
                    label = f"{tiles} tail " + (f"{tail.cta_m}x{tail.cta_n} s{tail.stages}"
                                                if isinstance(tail, Tiles) else str(tail))
                    if time.perf_counter() - start > args.budget:
                        print(f"{row} skipped | | | | {label} (past --budget {args.budget:g} s) |")
                        continue
                    try:
                        f = jax.jit(lambda x, w, tr=tr, tiles=tiles, tail=tail: kernel(
                            x, w, w_transposed=tr, tiles=tiles, tail=tail))
                        err = float(maxrel(f(x, w), want))
                        t = seconds_per_call(f, x, w) * 1e6
                    except Exception as e:   # a measurement: report, go on
                        msg = " ".join(str(e).split())[:160]
                        print(f"{row} failed | | | | {label}: {type(e).__name__}: {msg} |",
                              flush=True)
                        continue
                    flag = " FAIL" if err > TOL else ""
                    print(f"{row} {t:.1f} | {t / t_ref:.3f} | {flops / t / 1e6:.0f} | "
                          f"{err:.1e}{flag} | {label} |", flush=True)
                    if not flag and (top[0] is None or t < top[0]):
                        top = (t, label)
                best.append((m, k, n, name, t_ref, *top))
            del x, w_kn, w_nk, want
            u = v = None
    print("\nBest configuration per problem (kernel/cuBLAS < 1: faster than cuBLAS):")
    print("| M | K -> N | w | cuBLAS us | best kernel us | kernel/cuBLAS | config |")
    print("|---|---|---|---|---|---|---|")
    for m, k, n, name, t_ref, t, tiles in best:
        if t is None:
            print(f"| {m} | {k} -> {n} | {name} | {t_ref:.1f} | none | | |")
        else:
            print(f"| {m} | {k} -> {n} | {name} | {t_ref:.1f} | {t:.1f} | {t / t_ref:.3f} "
                  f"| {tiles} |")
    print(f"\n{time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
