"""Time the fused LoRA kernel against the frozen projection alone and XLA's unfused LoRA.

    python -m kernels.bench            # Llama-2-7B shapes on a GPU; prints a table
    python -m kernels.bench --quick    # a tiny smoke run (interpret mode on CPU)

Forward, and forward+backward (gradients of x, a, b; w frozen), for tokens M, projections
(K, N) and ranks R; each timing is the median of 10 runs after 3 warm-ups. Every kernel result
is checked against `reference` first.
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from kernels.lora_matmul import Tiles, lora_matmul, reference


def median_time(f, *args, n=10):
    for _ in range(3):
        jax.block_until_ready(f(*args))
    times = []
    for _ in range(n):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    gpu = jax.default_backend() == "gpu"
    if args.quick or not gpu:
        Ms, shapes, ranks, tiles = [128], [(128, 256)], [16], Tiles(64, 64, 32)
    else:
        Ms, shapes, ranks, tiles = ([2048, 8192, 32768], [(4096, 4096), (4096, 11008),
                                    (11008, 4096)], [8, 16, 64], Tiles())
    interpret = not gpu
    dt = jnp.bfloat16
    print("| M | K->N | R | frozen fwd ms | xla fwd | kernel fwd | frozen f+b | xla f+b "
          "| kernel f+b | kernel/frozen f+b | kernel/xla f+b |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for m in Ms:
        for k, n in shapes:
            for r in ranks:
                ks = jax.random.split(jax.random.key(0), 5)
                x = jax.random.normal(ks[0], (m, k), dt)
                w = (jax.random.normal(ks[1], (k, n)) / k ** 0.5).astype(dt)
                a = jax.random.normal(ks[2], (k, r)) / k ** 0.5
                b = jax.random.normal(ks[3], (r, n)) * 0.1
                dy = jax.random.normal(ks[4], (m, n), dt)
                fused = lambda x, w, a, b: lora_matmul(x, w, a, b, 2.0, tiles, interpret)
                unfused = lambda x, w, a, b: reference(x, w, a, b, 2.0)
                got, want = fused(x, w, a, b), unfused(x, w, a, b)
                err = float(jnp.linalg.norm((got - want).astype(jnp.float32))
                            / jnp.linalg.norm(want.astype(jnp.float32)))
                assert err < 2e-2, f"kernel differs from reference: {err} at {m, k, n, r}"
                frozen_f = jax.jit(lambda x, w: x @ w)
                frozen_fb = jax.jit(lambda x, w, dy: (x @ w, dy @ w.T))   # fwd + dx only
                fb = lambda f: jax.jit(lambda x, w, a, b, dy: jax.vjp(
                    lambda x, a, b: f(x, w, a, b), x, a, b)[1](dy))
                t = [median_time(frozen_f, x, w),
                     median_time(jax.jit(unfused), x, w, a, b),
                     median_time(jax.jit(fused), x, w, a, b),
                     median_time(frozen_fb, x, w, dy),
                     median_time(fb(unfused), x, w, a, b, dy),
                     median_time(fb(fused), x, w, a, b, dy)]
                ms = " | ".join(f"{v * 1e3:.3f}" for v in t)
                print(f"| {m} | {k}->{n} | {r} | {ms} | {t[5] / t[3]:.3f} | "
                      f"{t[5] / t[4]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
