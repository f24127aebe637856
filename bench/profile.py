"""Where the GPU time of a step goes: summarise a trace written by `train.py --benchmark --profile DIR`.

    python bench/profile.py DIR [--top 25] [--tsv FILE]
Reads every *.xplane.pb under DIR with jax's own profile reader (no TensorBoard needed) and prints,
per device, GPU busy time by kernel kind (matmul, attention, fusion, ...) and the top kernels.
--tsv: every kernel with the HLO instruction that launched it, its launches and total time, one
per line; `python bench/hlo_join.py TSV HLO` joins them with the compiled step (bytes, FLOPs).
"""
import argparse
import collections
import glob
import os
import re
import sys

from jax.profiler import ProfileData


def kind(name: str) -> str:
    n = name.lower()
    if any(s in n for s in ("cudnn", "flash", "fmha", "sdpa", "attention")):
        return "attention (cuDNN)"
    if any(s in n for s in ("gemm", "nvjet", "xmma", "cutlass", "matmul", "dot", "wgmma", "cublas")):
        return "matmul"
    if "triton" in n:
        return "triton (Pallas or XLA)"
    if any(s in n for s in ("nccl", "all_reduce", "allreduce", "all-gather", "reduce_scatter")):
        return "communication"
    if "memcpy" in n or "memset" in n or "copy" in n:
        return "copies"
    if "reduce" in n:
        return "reductions (norms, softmax, CE)"
    return "other fusions (elementwise)"


def hlo_op(event) -> str:
    try:
        return next((str(v) for k, v in event.stats if k == "hlo_op"), "")
    except Exception:   # stats are reader-version dependent; the name alone still counts
        return ""


def gpu_planes(path: str):
    """-> (plane name, its kernel events) for each GPU in the trace file `path`."""
    for plane in ProfileData.from_file(path).planes:
        if plane.name.startswith("/device:GPU"):
            # the "Stream" lines hold the kernels; "XLA Ops"/"XLA Modules" lines repeat their
            # time as annotations
            yield plane.name, [e for line in plane.lines if line.name.startswith("Stream")
                               for e in line.events]


def summarise(path: str, top: int, tsv=None):
    for plane_name, events in gpu_planes(path):
        kernels, busy = collections.Counter(), 0.0
        per_op, counts = collections.Counter(), collections.Counter()
        for e in events:
            kernels[e.name] += e.duration_ns
            busy += e.duration_ns
            op = hlo_op(e)   # which HLO instruction launched it (cuBLAS kernels: the GEMM)
            per_op[e.name, op] += e.duration_ns
            counts[e.name, op] += 1
        if tsv:   # kernel, HLO op, launches, ms
            for (k, op), t in per_op.most_common():
                tsv.write(f"{k}\t{op}\t{counts[k, op]}\t{t / 1e6:.3f}\n")
        if not busy:
            print(f"{plane_name}: no kernel events")
            continue
        kinds = collections.Counter()
        for k, t in kernels.items():
            kinds[kind(k)] += t
        print(f"\n## {os.path.relpath(path)} {plane_name}: {busy / 1e6:.1f} ms of kernels")
        print("| kind | ms | share |\n|---|---|---|")
        for k, t in kinds.most_common():
            print(f"| {k} | {t / 1e6:.1f} | {t / busy:.1%} |")
        print("\n| top kernels | ms | share |\n|---|---|---|")
        for k, t in kernels.most_common(top):
            print(f"| {re.sub(r'[|]', '/', k)[:90]} | {t / 1e6:.2f} | {t / busy:.1%} |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--tsv", help="write every (kernel, HLO op, launches, ms) to this file")
    a = ap.parse_args()
    files = sorted(glob.glob(os.path.join(a.folder, "**", "*.xplane.pb"), recursive=True))
    if not files:
        sys.exit(f"error: no *.xplane.pb under {a.folder}")
    tsv = open(a.tsv, "w") if a.tsv else None
    for f in files:
        summarise(f, a.top, tsv)
