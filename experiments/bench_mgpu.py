"""The backend question of kernels/lora_matmul.py, measured: the GEMM with the rank-R epilogue,
p @ q + scale * u @ v, lowered through Triton (`pl.pallas_call`, the kernel jora uses) and
through Mosaic GPU (`plgpu.kernel`, experiments/lora_matmul_mgpu.py), beside cuBLAS's frozen
x @ W and XLA's unfused x @ W + scale * (x @ A) @ B. Forward only; u = x @ A is given.
--w-transposed times the backward's dx GEMM instead: w stored (N, K), read transposed.

    python -m experiments.bench_mgpu [--ms 2048,8192] [--tiles 128,128,4] [--w-transposed]
"""
import argparse
import math
import sys

import jax
import jax.numpy as jnp

from experiments.lora_matmul_mgpu import gemm_lowrank_mgpu
from kernels.bench import LLAMA_KN, rel, seconds_per_call
from kernels.lora_matmul import Tiles, gemm_lowrank

SCALE, R = 2.0, 16


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ms", default="2048,8192", help="tokens M, comma-separated")
    ap.add_argument("--tiles", default="128,128,4",
                    help="Mosaic GPU tile_m,tile_n,max_concurrent_steps; several with ';'")
    ap.add_argument("--w-transposed", action="store_true",
                    help="w stored (N, K) and read transposed (the dx GEMM of the backward)")
    args = ap.parse_args(argv)
    if jax.default_backend() != "gpu":
        print("needs a GPU")
        return 0
    configs = [tuple(int(v) for v in t.split(",")) for t in args.tiles.split(";")]
    t_ = args.w_transposed
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, bf16, R {R}, "
          f"{'x @ w.T (w stored (N, K))' if t_ else 'forward'}, us")
    print("| M | K -> N | cuBLAS x@W | XLA LoRA | Triton kernel | MGPU kernel (tiles) | "
          "MGPU / cuBLAS | Triton / cuBLAS | MGPU err |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m in (int(v) for v in args.ms.split(",")):
        for k, n in LLAMA_KN:
            ks = jax.random.split(jax.random.key(0), 3)
            x = jax.random.normal(ks[0], (m, k), jnp.bfloat16)
            w = (jax.random.normal(ks[1], (n, k) if t_ else (k, n)) / math.sqrt(k)
                 ).astype(jnp.bfloat16)
            wk = w.T if t_ else w   # (K, N) view, for the references
            u = jax.random.normal(ks[2], (m, R), jnp.bfloat16)
            v = (jax.random.normal(ks[2], (R, n)) * 0.1).astype(jnp.bfloat16)
            f32 = lambda a: a.astype(jnp.float32)   # noqa: E731
            want = (f32(x) @ f32(wk) + SCALE * f32(u) @ f32(v))
            mat = (lambda w: w.T) if t_ else (lambda w: w)   # noqa: E731  (fused by XLA)
            frozen = jax.jit(lambda x, w, u, v: x @ mat(w))
            xla = jax.jit(lambda x, w, u, v: (jnp.dot(x, mat(w), preferred_element_type=jnp.float32)
                          + SCALE * jnp.dot(u, v, preferred_element_type=jnp.float32)
                          ).astype(x.dtype))
            triton = jax.jit(lambda x, w, u, v: gemm_lowrank(x, w, u, v, scale=SCALE,
                                                             q_transposed=t_, tiles=Tiles()))
            t = {name: seconds_per_call(f, x, w, u, v) * 1e6
                 for name, f in (("frozen", frozen), ("xla", xla), ("triton", triton))}
            for tm, tn, steps in configs:
                try:
                    mg = jax.jit(lambda x, w, u, v: gemm_lowrank_mgpu(
                        x, w, u, v, SCALE, tile_m=tm, tile_n=tn, max_concurrent_steps=steps,
                        w_transposed=t_))
                    err = rel(mg(x, w, u, v), want)
                    tg = seconds_per_call(mg, x, w, u, v) * 1e6
                    cell = f"{tg:.1f} ({tm}x{tn}, {steps})"
                    ratio, e = f"{tg / t['frozen']:.3f}", f"{err:.1e}"
                except Exception as ex:   # report and go on: this is a measurement
                    cell, ratio, e = f"failed: {type(ex).__name__}: {str(ex)[:80]}", "", ""
                print(f"| {m} | {k} -> {n} | {t['frozen']:.1f} | {t['xla']:.1f} | "
                      f"{t['triton']:.1f} | {cell} | {ratio} | {t['triton'] / t['frozen']:.3f} "
                      f"| {e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
