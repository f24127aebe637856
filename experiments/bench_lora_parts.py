"""Where the kernel's LoRA projection spends its time beyond the frozen GEMMs, part by part.

    python -m experiments.bench_lora_parts [--ms 2048,8192] [--r 16]

For tokens M and the three Llama-2-7B projections K -> N (bf16 x, w, dy; R = 16 padded as
kernels/lora_matmul.py pads it), each step of `lora_matmul`'s forward and backward is timed
alone, under its own jax.jit (kernels/bench.py's timer):
  x@w, dy@w^T      the frozen projection's two GEMMs (cuBLAS)
  u = s x@a        (M, R), reads x            g = s dy@b^T   (M, R), reads dy
  da = x^T g       (K, R) fp32, reads x       db = u^T dy    (R, N) fp32, reads dy
  da', db'         the same products with the big operand on the right (g^T x, dy^T u)
  fwd gemm         gemm_lowrank(x, w, u, b)   the Mosaic GPU kernel (Hopper) or Triton
  dx gemm          gemm_lowrank(dy, w^T, g, a^T)
  f+b              lora_matmul's jitted forward + backward, and the frozen projection's
Each skinny part is also given as GB/s of the bytes it must move, against the H200's ~4.8 TB/s:
a part far below that is worth a kernel, one near it only by being removed. Prints one table.
A part timed alone is launch-bound at these sizes; --profile DIR traces 10 calls each of the
frozen projection's f+b, the kernel's f+b and the skinny parts both ways (one jit) into
DIR/<M>_<K>_<N>/<what> and prints, per shape, the GPU time of each kernel a call (the sum of
kernel durations: no launch gaps) and the kernel's f+b over the frozen one by that measure.
"""
import argparse
import collections
import glob
import sys

import jax
import jax.numpy as jnp

from bench.profile import gpu_planes
from kernels.bench import seconds_per_call
from kernels.lora_matmul import gemm_lowrank, lora_matmul

LLAMA_KN = ((4096, 4096), (4096, 11008), (11008, 4096))
S = 2.0


def gpu_kernels(folder: str, calls: int):
    """{kernel name: GPU microseconds a call} from the traces under `folder`."""
    us = collections.Counter()
    for path in glob.glob(f"{folder}/**/*.xplane.pb", recursive=True):
        for _, events in gpu_planes(path):
            for e in events:
                us[e.name] += e.duration_ns / 1e3 / calls
    return us


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ms", default="2048,8192")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--profile", default="", help="trace the f+b and the parts under this folder")
    args = ap.parse_args(argv)
    if jax.default_backend() != "gpu":
        print("needs a GPU")
        return 0
    r, bf = args.r, jnp.bfloat16
    f32 = dict(preferred_element_type=jnp.float32)
    parts = {   # name: (function, operand names, bytes moved as a function of m, k, n)
        "x@w": (lambda x, w: x @ w, "xw", None),
        "dy@w^T": (lambda dy, w: dy @ w.T, "dw", None),
        "u": (lambda x, a: (S * jnp.dot(x, a, **f32)).astype(bf), "xa",
              lambda m, k, n: 2 * m * k + 2 * m * r),
        "g": (lambda dy, b: (S * jnp.dot(dy, b.T, **f32)).astype(bf), "db",
              lambda m, k, n: 2 * m * n + 2 * m * r),
        "da": (lambda x, g: jnp.dot(x.T, g, **f32), "xg", lambda m, k, n: 2 * m * k + 2 * m * r),
        "da'": (lambda x, g: jnp.dot(g.T, x, **f32), "xg", lambda m, k, n: 2 * m * k + 2 * m * r),
        "db": (lambda u, dy: jnp.dot(u.T, dy, **f32), "ud", lambda m, k, n: 2 * m * n + 2 * m * r),
        "db'": (lambda u, dy: jnp.dot(dy.T, u, **f32), "ud", lambda m, k, n: 2 * m * n + 2 * m * r),
        "fwd gemm": (lambda x, w, u, b: gemm_lowrank(x, w, u, b), "xwub", None),
        "dx gemm": (lambda dy, w, g, a: gemm_lowrank(dy, w, g, a.T, q_transposed=True), "dwga",
                    None),
    }
    gpu = {}   # (m, k, n) -> {what: {kernel: us a call}}
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, R = {r}; us (GB/s)")
    print("| M | K -> N | " + " | ".join(parts) + " | frozen f+b | kernel f+b | parts sum |")
    print("|---|---|" + "---|" * (len(parts) + 3))
    for m in (int(v) for v in args.ms.split(",")):
        for k, n in LLAMA_KN:
            ks = jax.random.split(jax.random.key(m + k + n), 4)
            ops = dict(x=jax.random.normal(ks[0], (m, k), bf),
                       w=(jax.random.normal(ks[1], (k, n)) / k ** 0.5).astype(bf),
                       d=jax.random.normal(ks[2], (m, n), bf),
                       a=(jax.random.normal(ks[3], (k, r)) / k ** 0.5).astype(bf),
                       b=jax.random.normal(ks[0], (r, n), bf) * 0.1)
            ops["u"] = jax.jit(parts["u"][0])(ops["x"], ops["a"])
            ops["g"] = jax.jit(parts["g"][0])(ops["d"], ops["b"])
            row, total = [], 0.0
            for name, (fn, names, nbytes) in parts.items():
                t = seconds_per_call(jax.jit(fn), *(ops[c] for c in names))
                if name not in ("x@w", "da'", "db'", "dy@w^T"):
                    total += t
                cell = f"{t * 1e6:.1f}"
                if nbytes:
                    cell += f" ({nbytes(m, k, n) / t / 1e9:.0f})"
                row.append(cell)

            def frozen(x, w):
                y, vjp = jax.vjp(lambda x: x @ w, x)
                return y, vjp(y)[0]

            def kernel(x, w, a, b):
                y, vjp = jax.vjp(lambda x, a, b: lora_matmul(x, w, a, b, S), x, a, b)
                return y, vjp(y)

            def skinny(x, d, a, b, u, g):   # the four rank-R products, da and db both ways
                return (parts["u"][0](x, a), parts["g"][0](d, b), parts["da"][0](x, g),
                        parts["db"][0](u, d), parts["da'"][0](x, g), parts["db'"][0](u, d))
            a32, b32 = ops["a"].astype(jnp.float32), ops["b"].astype(jnp.float32)   # as trained
            cases = {"frozen": (jax.jit(frozen), (ops["x"], ops["w"])),
                     "kernel": (jax.jit(kernel), (ops["x"], ops["w"], a32, b32)),
                     "skinny": (jax.jit(skinny), tuple(ops[c] for c in "xdabug"))}
            tf, tk = (seconds_per_call(f, *xs) for f, xs in (cases["frozen"], cases["kernel"]))
            for what, (f, xs) in cases.items() if args.profile else ():
                jax.block_until_ready(f(*xs))   # compiled before the trace starts
                folder = f"{args.profile}/{m}_{k}_{n}/{what}"
                with jax.profiler.trace(folder):
                    for _ in range(10):
                        out = f(*xs)
                    jax.block_until_ready(out)
                gpu.setdefault((m, k, n), {})[what] = gpu_kernels(folder, 10)
            print(f"| {m} | {k} -> {n} | " + " | ".join(row) +
                  f" | {tf * 1e6:.1f} | {tk * 1e6:.1f} ({tk / tf:.3f}x) | {total * 1e6:.1f} |",
                  flush=True)
    for (m, k, n), per in gpu.items():
        fz, kn = sum(per["frozen"].values()), sum(per["kernel"].values())
        print(f"\nM {m}, {k} -> {n}, GPU time a call: frozen f+b {fz:.1f} us, kernel f+b "
              f"{kn:.1f} us ({kn / fz:.3f}x)")
        for what in ("kernel", "skinny"):
            print(f"  {what}: " + ", ".join(f"{name[:48]} {t:.1f}"
                                            for name, t in per[what].most_common()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
