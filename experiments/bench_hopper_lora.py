"""Time experiments/hopper_gemm.py's fused LoRA kernel on a GPU, every configuration in its own
subprocess with a hard timeout (a hanging kernel costs --timeout seconds, not the run).

    python -m experiments.bench_hopper_lora                # < 4 min on an H200 (--budget 200)
    python -m experiments.bench_hopper_lora --budget 120 --timeout 30

Table 1, `lora_matmul` (y = x @ w + scale * (x @ a) @ b; R = --rank 16, scale 2.0; x, w, a, b
bf16, the dtype the kernel requires; w stored (K, N)) for M in --ms (2048, 8192) and the three
Llama-2-7B projections (K, N) = (4096, 4096), (4096, 11008), (11008, 4096), against
  frozen    jnp.dot(x, w) (cuBLAS), the GEMM without the adapter, and
  XLA LoRA  x @ w + scale * (x @ a) @ b in jnp, unfused (bf16 x @ a), all jitted.
`err` is max|y - ref| / max|ref| against `hopper_gemm.lora_reference` (fp32); above 2e-2 (or
not finite) is FAIL. The fused time includes lora_matmul's small a.T/pad ops.
LORA_CONFIGS run smallest/safest first: 64 x 64 WG tiles with 2 stages (the configuration that
passes in the CPU interpreter), 128 x 64 with 2 stages (also passes there), then the default
LORA_TILES (128 x 128, 3 stages: hangs in the interpreter).
Table 2, the plain `matmul` at --gemm-ms (32768, the rows today's bench skipped), both
orientations of w, against jnp.dot: GEMM_CONFIGS (today's best at 32768 first).

Order of the subprocesses (the riskiest last, so a hang cannot starve the others): the
baselines (cuBLAS, XLA LoRA), LoRA configs 1 and 2, GEMM config 1, LoRA config 3, GEMM config 2.
A child runs one configuration over all its problems and reports each as it finishes; if it
reports nothing for --timeout s it is killed (process group) and its current problem is
"TIMEOUT (hang?)", the rest of that configuration "not run"; a crash gives one "crashed" row and
the rest is retried once in a fresh child. Past --budget s nothing new starts and what is
left is listed as skipped; a child still running at --budget + 20 s is killed. Times are the
median of 5 repetitions of ~10 ms batches (bench_hopper_gemm.seconds_per_call). Progress lines
(`[  12s] ...`) print as results come in, the two tables at the end. On a machine without a
(Hopper) GPU it prints "needs a GPU" and exits 0.
"""
import argparse
import json
import math
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time

MODULE = "experiments.bench_hopper_lora"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA_KN = ((4096, 4096), (4096, 11008), (11008, 4096))
# Tiles keyword arguments (the parent does not build Tiles objects before a child has shown
# that there is a GPU). Smallest/safest first.
LORA_CONFIGS = (dict(tile_m=64, tile_n=64, stages=2),    # passes in the interpreter (the test's)
                dict(tile_m=128, tile_n=64, stages=2),   # passes in the interpreter
                dict(stages=3))                          # LORA_TILES: hangs in the interpreter
# 128x128x64 s4 n-split f1: the best at M = 32768 in bench/results/gemm-h200-2026-12-02.md
# (and at 6 of its 13 measured problems); then the default.
GEMM_CONFIGS = (dict(in_flight=1), dict())
LORA_TOL = 2e-2    # scale * xa is rounded to bf16 once: 2^-8 of the rank term, plus the output
GEMM_TOL = 1e-2
HOPPER = ("H100", "H200", "H800", "H20", "GH200")
KILL_GRACE = 20.0  # seconds past --budget after which a running child is killed


def label(kw) -> str:
    from kernels.hopper_gemm import Tiles   # imports jax; initializes no backend
    return str(Tiles(**kw))


# ----------------------------------------------------------------------------- child side
def _emit(**event):
    print("@@" + json.dumps(event), flush=True)


def _short(e) -> str:
    msg = " ".join(str(e).split()).replace("|", "/")
    return f"{type(e).__name__}: {msg[:160]}"


def child(spec) -> int:
    """Runs spec["items"] for one configuration; one "@@{json}" line per event on stdout."""
    import jax
    import jax.numpy as jnp
    from experiments.bench_hopper_gemm import seconds_per_call
    from kernels.hopper_gemm import Tiles, lora_matmul, lora_reference, matmul, reference

    backend = jax.default_backend()
    _emit(event="ready", backend=backend, kind=jax.devices()[0].device_kind, jax=jax.__version__)
    if backend != "gpu":
        return 0
    tiles = Tiles(**spec["tiles"]) if spec.get("tiles") is not None else None
    r, scale = spec["rank"], spec["scale"]
    maxrel = jax.jit(lambda y, ref: jnp.max(jnp.abs(y.astype(jnp.float32) - ref))
                     / jnp.max(jnp.abs(ref)))
    lora_ref = jax.jit(lambda x, w, a, b: lora_reference(x, w, a, b, scale))

    def lora_operands(m, k, n):
        kx, kw, ka, kb = jax.random.split(jax.random.key(m + k + n), 4)
        x = jax.random.normal(kx, (m, k), jnp.bfloat16)
        w = (jax.random.normal(kw, (k, n), jnp.float32) / k ** 0.5).astype(jnp.bfloat16)
        a = (jax.random.normal(ka, (k, r), jnp.float32) / k ** 0.5).astype(jnp.bfloat16)
        # scale * (x @ a) @ b ~ 2, x @ w ~ 1: the rank term is neither lost nor dominant.
        b = (jax.random.normal(kb, (r, n), jnp.float32) / r ** 0.5).astype(jnp.bfloat16)
        return x, w, a, b

    def baseline(m, k, n):
        x, w, a, b = lora_operands(m, k, n)
        frozen = jax.jit(lambda x, w: jnp.dot(x, w))
        xla = jax.jit(lambda x, w, a, b: jnp.dot(x, w) + scale * jnp.dot(x, a) @ b)
        err = float(maxrel(xla(x, w, a, b), lora_ref(x, w, a, b)))
        return dict(frozen_us=seconds_per_call(frozen, x, w) * 1e6,
                    xla_us=seconds_per_call(xla, x, w, a, b) * 1e6, xla_err=err, status="ok")

    def fused(m, k, n):
        x, w, a, b = lora_operands(m, k, n)
        f = jax.jit(lambda x, w, a, b: lora_matmul(x, w, a, b, scale, tiles=tiles))
        err = float(maxrel(f(x, w, a, b), lora_ref(x, w, a, b)))
        t = seconds_per_call(f, x, w, a, b) * 1e6
        ok = math.isfinite(err) and err <= LORA_TOL
        return dict(fused_us=t, err=err, status="ok" if ok else "FAIL")

    def gemm(m, k, n, tr):
        kx, kw = jax.random.split(jax.random.key(m + k + n))
        x = jax.random.normal(kx, (m, k), jnp.bfloat16)
        w = (jax.random.normal(kw, (n, k) if tr else (k, n), jnp.float32)
             / k ** 0.5).astype(jnp.bfloat16)
        cublas = jax.jit(lambda x, w: jnp.dot(x, w.T if tr else w))
        f = jax.jit(lambda x, w: matmul(x, w, w_transposed=tr, tiles=tiles))
        err = float(maxrel(f(x, w), jax.jit(lambda x, w: reference(x, w, w_transposed=tr))(x, w)))
        t_ref = seconds_per_call(cublas, x, w) * 1e6
        t = seconds_per_call(f, x, w) * 1e6
        ok = math.isfinite(err) and err <= GEMM_TOL
        return dict(cublas_us=t_ref, kernel_us=t, err=err, status="ok" if ok else "FAIL")

    run = dict(baseline=baseline, lora=fused, gemm=gemm)[spec["kind"]]
    for i, item in enumerate(spec["items"]):
        if time.time() > spec["deadline"]:
            _emit(event="row", i=i, status="skipped (past --budget)")
            continue
        try:
            row = run(*item)
        except Exception as e:   # a measurement: report it, go on with the next problem
            row = dict(status="error: " + _short(e))
        _emit(event="row", i=i, **row)
    return 0


# ---------------------------------------------------------------------------- parent side
def _spawn(cmd):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # Children run one after another, but a killed one may hold its memory a little longer.
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    err = tempfile.TemporaryFile(mode="w+")
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True,
                         start_new_session=True)   # its own process group, killed as one
    lines = queue.Queue()

    def pump():
        for line in p.stdout:
            lines.put(line)
        lines.put(None)
    threading.Thread(target=pump, daemon=True).start()
    return p, lines, err


def _kill(p):
    try:
        os.killpg(p.pid, signal.SIGKILL)   # the child's own group (start_new_session)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _stderr_tail(err) -> str:
    err.seek(0)
    lines = [ln.strip() for ln in err.read().splitlines() if ln.strip()]
    return " ".join((lines[-1] if lines else "").split()).replace("|", "/")[:160]


def _child_cmd(spec):
    return [sys.executable, "-m", MODULE, "--child", json.dumps(spec)]


def run_items(spec, *, timeout, budget_end, hard_stop, report, on_ready=None, cmd=None,
              restarts=1):
    """Runs spec["items"] in child processes (`cmd(spec)`, default this module's --child) and
    calls report(i, row) once for every item: the child's row, or one the parent makes for a
    timeout, crash, or skip. on_ready(event) is called on the first child's "ready" event; if
    it returns False the child is killed and nothing is reported. Returns that event (None if
    none came)."""
    cmd = cmd or _child_cmd
    pending = list(range(len(spec["items"])))
    first_ready = None
    while pending:
        if time.time() > budget_end:
            for i in pending:
                report(i, dict(status="skipped (past --budget)"))
            return first_ready
        sub = dict(spec, items=[spec["items"][i] for i in pending], deadline=budget_end)
        p, lines, err = _spawn(cmd(sub))
        done, last, outcome, ready = set(), time.time(), None, None
        while True:
            limit = min(last + timeout, hard_stop)
            try:
                line = lines.get(timeout=max(0.0, limit - time.time()))
            except queue.Empty:
                outcome = "budget" if limit >= hard_stop else "timeout"
                break
            if line is None:
                outcome = "exit"
                break
            if not line.startswith("@@"):
                continue
            try:
                ev = json.loads(line[2:])
            except ValueError:
                continue
            last = time.time()
            if ev.get("event") == "ready":
                ready = ev
                if first_ready is None:
                    first_ready = ev
                    if on_ready is not None and on_ready(ev) is False:
                        _kill(p)
                        return first_ready
            elif ev.get("event") == "row":
                i = pending[ev.pop("i")]
                ev.pop("event")
                done.add(i)
                report(i, ev)
        left = [i for i in pending if i not in done]
        if outcome == "exit":
            rc = p.wait()
            if not left:
                return first_ready
            what = "crashed" if ready else "failed to start"
            report(left[0], dict(status=f"{what} (rc {rc}): {_stderr_tail(err)}"))
            pending = left[1:]
            if restarts > 0 and ready:
                restarts -= 1
                continue
            for i in pending:
                report(i, dict(status=f"not run ({what} above)"))
            return first_ready
        _kill(p)
        if outcome == "timeout":
            stage = "" if ready else " before the child was ready"
            report(left[0], dict(status=f"TIMEOUT: nothing for {timeout:g} s{stage} (hang?), "
                                        f"killed"))
            rest = "not run (hung above)"
        else:
            report(left[0], dict(status="killed at --budget + grace"))
            rest = "skipped (past --budget)"
        for i in left[1:]:
            report(i, dict(status=rest))
        return first_ready
    return first_ready


def _us(v):
    return f"{v:.1f}" if isinstance(v, (int, float)) else ""


def _ratio(a, b):
    return f"{a / b:.3f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) else ""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ms", default="2048,8192", help="tokens M of the LoRA table")
    ap.add_argument("--gemm-ms", default="32768", help="tokens M of the plain-GEMM table")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--scale", type=float, default=2.0)
    ap.add_argument("--budget", type=float, default=200.0,
                    help="seconds after which no configuration starts (the rest is listed)")
    ap.add_argument("--timeout", type=float, default=45.0,
                    help="seconds without a result after which a child is killed")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(json.loads(args.child))

    t0 = time.time()
    budget_end, hard_stop = t0 + args.budget, t0 + args.budget + KILL_GRACE
    lora_problems = [(int(m), k, n) for m in args.ms.split(",") if m for k, n in LLAMA_KN]
    gemm_problems = [(int(m), k, n, tr) for m in args.gemm_ms.split(",") if m
                     for k, n in LLAMA_KN for tr in (False, True)]
    common = dict(rank=args.rank, scale=args.scale)
    rows = {}   # (table, config index, item index) -> row

    def reporter(table, c, items):
        def report(i, row):
            rows[(table, c, i)] = row
            name = "baselines" if c is None else label((LORA_CONFIGS if table == "lora"
                                                        else GEMM_CONFIGS)[c])
            vals = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in row.items())
            print(f"[{time.time() - t0:5.0f}s] {table} {name} {items[i]}: {vals}", flush=True)
        return report

    state = {}

    def on_ready(ev):   # the first child says what the device is; the parent never touches it
        state["ready"] = ev
        if ev["backend"] != "gpu" or not any(h in ev["kind"] for h in HOPPER):
            return False
        print(f"jax {ev['jax']}, {ev['kind']}; R = {args.rank}, scale {args.scale:g}; bf16; "
              f"times in us; --budget {args.budget:g} s, --timeout {args.timeout:g} s",
              flush=True)
        return True

    # The riskiest configurations last: baselines, lora 1, lora 2, gemm 1, lora 3.., gemm 2..
    lora_jobs = [("lora", c) for c in range(len(LORA_CONFIGS))] if lora_problems else []
    gemm_jobs = [("gemm", c) for c in range(len(GEMM_CONFIGS))] if gemm_problems else []
    jobs = ([("baseline", None)] if lora_problems else []) + lora_jobs[:2] + gemm_jobs[:1] \
        + lora_jobs[2:] + gemm_jobs[1:]
    for table, c in jobs:
        items = gemm_problems if table == "gemm" else lora_problems
        kw = None if c is None else (GEMM_CONFIGS if table == "gemm" else LORA_CONFIGS)[c]
        spec = dict(common, kind=table, tiles=kw, items=items)
        run_items(spec, timeout=args.timeout, budget_end=budget_end, hard_stop=hard_stop,
                  report=reporter("gemm" if table == "gemm" else "lora", c, items),
                  on_ready=None if "ready" in state else on_ready)
        if "ready" not in state:
            print("the first child reported nothing (python -m experiments.bench_hopper_lora "
                  "--child ...): see the progress lines above")
            return 1
        ev = state["ready"]
        if ev["backend"] != "gpu":
            print("needs a GPU")
            return 0
        if not any(h in ev["kind"] for h in HOPPER):
            print(f"needs a Hopper GPU (sm_90, wgmma), this is {ev['kind']}")
            return 0

    # Table 1.
    if lora_problems:
        print("\nFused LoRA (lora_matmul) against cuBLAS x @ w (frozen) and XLA's unfused "
              "x @ w + scale * (x @ a) @ b; w (K, N)")
        print("| M | K -> N | config | frozen us | XLA LoRA us | fused us | fused/frozen | "
              "fused/XLA-LoRA | err | status |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for c, kw in enumerate(LORA_CONFIGS):
            for i, (m, k, n) in enumerate(lora_problems):
                base = rows.get(("lora", None, i), {})
                row = rows.get(("lora", c, i), {"status": "not run"})
                fz, xl, fu = base.get("frozen_us"), base.get("xla_us"), row.get("fused_us")
                err = f"{row['err']:.1e}" if "err" in row else ""
                print(f"| {m} | {k} -> {n} | {label(kw)} | {_us(fz)} | {_us(xl)} | {_us(fu)} | "
                      f"{_ratio(fu, fz)} | {_ratio(fu, xl)} | {err} | {row['status']} |")
        base_errs = [f"{m} {k}->{n} {rows[('lora', None, i)]['xla_err']:.1e}"
                     for i, (m, k, n) in enumerate(lora_problems)
                     if "xla_err" in rows.get(("lora", None, i), {})]
        if base_errs:
            print("XLA LoRA's own err against the same reference: " + ", ".join(base_errs))
        bad = [f"{m} {k}->{n}: {rows[('lora', None, i)]['status']}"
               for i, (m, k, n) in enumerate(lora_problems)
               if rows.get(("lora", None, i), {}).get("status", "ok") != "ok"]
        if bad:
            print("baselines not measured: " + "; ".join(bad))

    # Table 2.
    if gemm_problems:
        print("\nPlain GEMM (matmul) against cuBLAS (jnp.dot); w_kn: w (K, N), w_nk: "
              "x @ w.T with w (N, K)")
        print("| M | K -> N | w | config | cuBLAS us | kernel us | kernel/cuBLAS | TFLOP/s | "
              "err | status |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for c, kw in enumerate(GEMM_CONFIGS):
            for i, (m, k, n, tr) in enumerate(gemm_problems):
                row = rows.get(("gemm", c, i), {"status": "not run"})
                cb, ku = row.get("cublas_us"), row.get("kernel_us")
                tf = f"{2 * m * k * n / ku / 1e6:.0f}" if ku else ""
                err = f"{row['err']:.1e}" if "err" in row else ""
                print(f"| {m} | {k} -> {n} | {'w_nk' if tr else 'w_kn'} | {label(kw)} | "
                      f"{_us(cb)} | {_us(ku)} | {_ratio(ku, cb)} | {tf} | {err} | "
                      f"{row['status']} |")

    skipped = sorted({(t, c) for (t, c, _), row in rows.items()
                      if c is not None and row.get("status", "").startswith("skipped")})
    if skipped:
        print("\nSkipped past --budget (in part or whole): " + "; ".join(
            f"{t} {label((LORA_CONFIGS if t == 'lora' else GEMM_CONFIGS)[c])}"
            for t, c in skipped))
    print(f"\n{time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
