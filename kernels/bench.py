"""Time the fused LoRA kernels against the frozen projection alone and XLA's unfused LoRA.

    python -m kernels.bench                      # Llama-2-7B shapes on a GPU (27 rows, ~5 min)
    python -m kernels.bench --quick              # a smoke run: one real shape on a GPU,
                                                 # tiny shapes in interpret mode on a CPU
    python -m kernels.bench --ms 8192 --ranks 16 --sweep    # also try other tilings
    python -m kernels.bench --swiglu --ms 2048,16384         # the MLP gate's backward kernel
    python -m kernels.bench --gate-up --ms 2048,8192         # gate and up in one GEMM kernel

For tokens M, projections K -> N (bf16 x and w, fp32 a and b as in training) and ranks R, it
times the forward, and the forward + backward (y and the gradients of x, a and b; w frozen):
  frozen   x @ w alone; its backward is dy @ w^T (no dw)
  xla      `reference` under jax.jit: XLA's unfused LoRA (x @ w + s * (x @ a) @ b)
  kernel   `lora_matmul`: the Pallas kernels
Each time is the median over 7 repetitions, after warm-up, of a batch of back-to-back calls
(enough for about 20 ms), ended by jax.block_until_ready, so launch latency is amortized.
Every kernel result (y, dx, da, db) is checked against `reference` first; `err` is the
largest relative (Frobenius) error, and rows above 2e-2 are marked FAIL (exit status 1).
--swiglu instead times kernels/swiglu.py's one-pass backward of silu(g) * u (dg and du from
g, u, dh (M, F), F = 11,008) at each block size against XLA's autodiff of the same expression;
GB/s counts the five (M, F) tensors the kernel must move.
--gate-up times kernels/swiglu.gate_up, silu(x @ w_gate) * (x @ w_up) with x (M, 4,096) and
w (4,096, 11,008), forward and forward + backward (dx), against XLA's two GEMMs and the
elementwise gate under jax.jit; err: h and dx against the fp32 formula.
"""
import argparse
import math
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from kernels import swiglu
from kernels.lora_matmul import Tiles, _hopper_tiles, lora_matmul, reference

SCALE = 2.0
TOL = 2e-2   # bf16 has 8 bits of mantissa: a few 1e-3 of rounding is the expected error
LLAMA_MS = (2048, 8192, 32768)
LLAMA_KN = ((4096, 4096), (4096, 11008), (11008, 4096))
LLAMA_RANKS = (8, 16, 64)
SWEEP = [Tiles(128, 128, 64, 4, 3), Tiles(64, 128, 64, 4, 4), Tiles(64, 128, 64, 4, 3),
         Tiles(64, 128, 64, 4, 5), Tiles(64, 64, 64, 4, 4), Tiles(64, 128, 32, 4, 5),
         Tiles(64, 128, 64, 8, 4), Tiles(32, 128, 64, 4, 4), Tiles(64, 256, 64, 8, 4),
         Tiles(128, 64, 64, 4, 4)]


def seconds_per_call(f, *args, reps=7, target=0.02):
    """Median over `reps` of (time of n back-to-back calls) / n, n sized to ~`target` s."""
    for _ in range(2):
        jax.block_until_ready(f(*args))
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    n = max(1, min(50, math.ceil(target / max(time.perf_counter() - t, 1e-6))))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(n):
            out = f(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t) / n)
    return statistics.median(times)


def rel(p, q):
    p, q = jnp.asarray(p, jnp.float32), jnp.asarray(q, jnp.float32)
    return float(jnp.linalg.norm(p - q) / jnp.linalg.norm(q))


def operands(m, k, n, r, dtype):
    ks = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(ks[0], (m, k), dtype)
    w = (jax.random.normal(ks[1], (k, n), jnp.float32) / math.sqrt(k)).astype(dtype)
    a = jax.random.normal(ks[2], (k, r), jnp.float32) / math.sqrt(k)
    b = jax.random.normal(ks[3], (r, n), jnp.float32) * 0.1     # nonzero, as after training
    dy = jax.random.normal(ks[4], (m, n), dtype)
    return x, w, a, b, dy


def functions(tiles, interpret):
    """name -> (forward, forward + backward), each jitted, each taking (x, w, a, b, dy)."""
    def kernel(x, w, a, b):
        return lora_matmul(x, w, a, b, SCALE, tiles=tiles, interpret=interpret)

    def xla(x, w, a, b):
        return reference(x, w, a, b, SCALE)

    def fwd(f):
        return jax.jit(lambda x, w, a, b, dy: f(x, w, a, b))

    def fwd_bwd(f):   # y and (dx, da, db): what a training step needs of the layer
        def run(x, w, a, b, dy):
            y, vjp = jax.vjp(lambda x, a, b: f(x, w, a, b), x, a, b)
            return y, vjp(dy)
        return jax.jit(run)

    frozen = (jax.jit(lambda x, w, a, b, dy: x @ w),
              jax.jit(lambda x, w, a, b, dy: (x @ w, dy @ w.T)))
    return {"frozen": frozen, "xla": (fwd(xla), fwd_bwd(xla)),
            "kernel": (fwd(kernel), fwd_bwd(kernel))}


def check(fns, args):
    """The largest relative error of the kernel's y, dx, da, db against the reference's."""
    y, grads = fns["kernel"][1](*args)
    y_ref, grads_ref = fns["xla"][1](*args)
    return max(rel(p, q) for p, q in zip((y, *grads), (y_ref, *grads_ref)))


def bench_swiglu(ms, f: int, interpret: bool) -> bool:
    """The --swiglu table; True if a kernel result is off."""
    print("|     M |     F | xla us | block | kernel us | kernel/xla | kernel GB/s |     err |")
    print("|-------|-------|--------|-------|-----------|------------|-------------|---------|")
    failed = False
    for m in ms:
        g, u, dh = (jax.random.normal(k, (m, f), jnp.bfloat16)
                    for k in jax.random.split(jax.random.key(0), 3))

        def xla_grads(g, u, dh):
            """XLA's autodiff of silu(g) * u: (dg, du) for the cotangent dh."""
            return jax.vjp(lambda g, u: jax.nn.silu(g) * u, g, u)[1](dh)

        xla = jax.jit(xla_grads)
        tx = seconds_per_call(xla, g, u, dh) * 1e6
        want = swiglu.reference(g, u, dh)
        for block in (1024, 2048, 4096, 8192):
            def kernel_grads(g, u, dh, b=block):
                """The kernel's (dg, du) at block size b."""
                return swiglu.swiglu_grads(g, u, dh, block=b, interpret=interpret)

            k = jax.jit(kernel_grads)
            err = max(rel(p, q) for p, q in zip(k(g, u, dh), want))
            failed |= not err < TOL
            tk = seconds_per_call(k, g, u, dh) * 1e6
            print(f"| {m:5d} | {f:5d} | {tx:6.1f} | {block:5d} | {tk:9.1f} | {tk / tx:10.3f} | "
                  f"{5 * m * f * 2 / tk / 1e3:11.0f} | {err:7.1e}{' FAIL' if err >= TOL else ''} |",
                  flush=True)
    return failed


def bench_gate_up(ms, d: int, f: int, interpret: bool) -> bool:
    """The --gate-up table; True if a result is off."""
    print("|     M |     D |     F | xla fwd us | kernel fwd | k/xla | xla f+b us | kernel f+b "
          "| k/xla |     err |")
    print("|-------|-------|-------|------------|------------|-------|------------|------------"
          "|-------|---------|")
    failed = False
    for m in ms:
        kx, kg, ku, kd = jax.random.split(jax.random.key(m), 4)
        x = jax.random.normal(kx, (m, d), jnp.bfloat16)
        wg, wu = ((jax.random.normal(k, (d, f)) / np.sqrt(d)).astype(jnp.bfloat16)
                  for k in (kg, ku))
        dh = jax.random.normal(kd, (m, f), jnp.bfloat16)

        def plain(x, wg, wu):
            """XLA's two GEMMs and the elementwise gate."""
            return jax.nn.silu(x @ wg) * (x @ wu)

        def fused(x, wg, wu):
            """kernels/swiglu.gate_up."""
            return swiglu.gate_up(x, wg, wu, interpret)

        pairs = []   # (forward, forward + backward) of plain, then of fused, each jitted
        for h in (plain, fused):
            def dx(x, wg, wu, dh, h=h):
                """x's gradient of h for the cotangent dh."""
                return jax.vjp(lambda x: h(x, wg, wu), x)[1](dh)[0]

            pairs.append((jax.jit(h), jax.jit(dx)))
        f32 = [a.astype(jnp.float32) for a in (x, wg, wu, dh)]
        want_h = plain(*f32[:3])
        want_dx = jax.vjp(lambda x: plain(x, *f32[1:3]), f32[0])[1](f32[3])[0]
        want = (want_h, want_dx)
        err = max(rel(pairs[1][0](x, wg, wu), want[0]), rel(pairs[1][1](x, wg, wu, dh), want[1]))
        failed |= not err < TOL
        times = []   # (forward us, forward + backward us) of plain, then of fused
        for fw, fb in pairs:
            t_fwd = seconds_per_call(fw, x, wg, wu) * 1e6
            t_fwd_bwd = seconds_per_call(fb, x, wg, wu, dh) * 1e6
            times.append((t_fwd, t_fwd_bwd))
        (xf, xb), (kf, kb) = times
        print(f"| {m:5d} | {d:5d} | {f:5d} | {xf:10.1f} | {kf:10.1f} | {kf / xf:5.3f} | "
              f"{xb:10.1f} | {kb:10.1f} | {kb / xb:5.3f} | {err:7.1e}"
              f"{' FAIL' if err >= TOL else ''} |", flush=True)
    return failed


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a tiny subset, as a smoke test")
    ap.add_argument("--ms", type=str, default=None, help="tokens M, comma-separated")
    ap.add_argument("--ranks", type=str, default=None, help="ranks R, comma-separated")
    ap.add_argument("--kn", type=str, default=None, help="projections, e.g. 4096x11008,...")
    ap.add_argument("--tiles", type=str, default=None, help="bm,bn,bk,num_warps,num_stages")
    ap.add_argument("--swiglu", action="store_true",
                    help="time the MLP gate's backward kernel instead (kernels/swiglu.py)")
    ap.add_argument("--gate-up", action="store_true",
                    help="time gate and up in one GEMM kernel instead (kernels/swiglu.gate_up)")
    ap.add_argument("--sweep", action="store_true",
                    help="also time the kernel with each tiling of SWEEP (fwd + bwd)")
    args = ap.parse_args(argv)

    gpu = jax.default_backend() == "gpu"
    dtype = jnp.bfloat16
    if args.swiglu:   # (M, 11008) on a GPU; tiny shapes in the interpreter elsewhere
        print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, bf16, interpret={not gpu}"
              + ("" if gpu else " (its times mean nothing)"), flush=True)
        if args.ms:
            ms = tuple(int(v) for v in args.ms.split(","))
        else:
            ms = LLAMA_MS if gpu else (40,)
        return 1 if bench_swiglu(ms, 11008 if gpu else 96, interpret=not gpu) else 0
    if args.gate_up:   # the 7B MLP on a GPU; tiny shapes (XLA's forward) elsewhere
        print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, bf16, interpret={not gpu}"
              + ("" if gpu else " (its times mean nothing)"), flush=True)
        if args.ms:
            ms = tuple(int(v) for v in args.ms.split(","))
        else:
            ms = LLAMA_MS if gpu else (40,)
        return 1 if bench_gate_up(ms, *((4096, 11008) if gpu else (64, 96)),
                                  interpret=not gpu) else 0
    if gpu and args.quick:
        ms = (2048,)
        kns = ((4096, 4096),)
        ranks = (16,)
    elif gpu:
        ms = LLAMA_MS
        kns = LLAMA_KN
        ranks = LLAMA_RANKS
    else:
        if not args.quick:
            print("No GPU: the Llama-2-7B shapes need one. Running the --quick subset at tiny "
                  "shapes in Pallas' interpreter instead (its times mean nothing).")
        ms = (200,)
        kns = ((64, 96), (96, 64))
        ranks = (8, 64)
    if args.ms:
        ms = tuple(int(v) for v in args.ms.split(","))
    if args.ranks:
        ranks = tuple(int(v) for v in args.ranks.split(","))
    if args.kn:
        kns = tuple(tuple(int(d) for d in kn.split("x")) for kn in args.kn.split(","))
    if args.tiles:
        tiles = Tiles(*(int(v) for v in args.tiles.split(",")))
    elif gpu:
        tiles = Tiles.default(dtype)
    else:
        tiles = Tiles(32, 32, 16)
    interpret = not gpu
    hopper = None if interpret else _hopper_tiles(128, 64, 256, 16, dtype)
    backend = f"Mosaic GPU (kernels/hopper_gemm.py) {hopper}" if hopper else f"Triton {tiles}"
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, {dtype.__name__} x/w, "
          f"fp32 a/b, scale {SCALE}, kernel: {backend} where the shapes fit, "
          f"interpret={interpret}", flush=True)

    head = ("|     M |     K |     N |  R | frozen fwd us | xla fwd | kernel fwd | "
            "k/frozen |  k/xla | frozen f+b us | xla f+b | kernel f+b | k/frozen |  k/xla "
            "|     err |")
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|", flush=True)
    failed, sweep_rows, ratios = False, [], []
    for m in ms:
        for k, n in kns:
            for r in ranks:
                xs = operands(m, k, n, r, dtype)
                fns = functions(tiles, interpret)
                err = check(fns, xs)
                bad = not err < TOL
                failed |= bad
                t = {name: [seconds_per_call(f, *xs) * 1e6 for f in pair]
                     for name, pair in fns.items()}
                (ff, fb), (xf, xb), (kf, kb) = t["frozen"], t["xla"], t["kernel"]
                print(f"| {m:5d} | {k:5d} | {n:5d} | {r:2d} | {ff:13.1f} | {xf:7.1f} | "
                      f"{kf:10.1f} | {kf / ff:8.3f} | {kf / xf:6.3f} | {fb:13.1f} | "
                      f"{xb:7.1f} | {kb:10.1f} | {kb / fb:8.3f} | {kb / xb:6.3f} | "
                      f"{err:7.1e}{' FAIL' if bad else ''} |", flush=True)
                ratios.append((kf / ff, kf / xf, kb / fb, kb / xb))
                if args.sweep:
                    for cfg in SWEEP:
                        f = functions(cfg, interpret)
                        e = check(f, xs)
                        sweep_fwd = seconds_per_call(f["kernel"][0], *xs) * 1e6
                        sweep_fwd_bwd = seconds_per_call(f["kernel"][1], *xs) * 1e6
                        sweep_rows.append((m, k, n, r, cfg, sweep_fwd, sweep_fwd_bwd, fb, xb, e))
                        failed |= not e < TOL
                del xs, fns
    if ratios:
        gm = np.exp(np.log(np.array(ratios)).mean(0))
        print(f"geometric means: kernel/frozen fwd {gm[0]:.3f}, kernel/xla fwd {gm[1]:.3f}, "
              f"kernel/frozen f+b {gm[2]:.3f}, kernel/xla f+b {gm[3]:.3f}", flush=True)
    if sweep_rows:
        print("\nTilings (kernel times in us; ratios are f+b against frozen and xla f+b):")
        for m, k, n, r, cfg, kf, kb, fb, xb, e in sweep_rows:
            print(f"M {m} {k}->{n} R {r} bm={cfg.bm} bn={cfg.bn} bk={cfg.bk} "
                  f"warps={cfg.num_warps} stages={cfg.num_stages}: fwd {kf:.1f} f+b {kb:.1f} "
                  f"k/frozen {kb / fb:.3f} k/xla {kb / xb:.3f} err {e:.1e}"
                  f"{' FAIL' if not e < TOL else ''}", flush=True)
    if failed:
        print(f"FAIL: a kernel result differs from the reference by more than {TOL}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
