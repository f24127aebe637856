"""Join a profile's kernels with the compiled step: what each kernel moves or computes, how fast.

    python bench/hlo_join.py KERNELS.tsv STEP_HLO.txt[.gz] --steps N [--top 40]
KERNELS.tsv from `bench/profile.py DIR --tsv`, STEP_HLO from XLA's dump after optimisations (`bash
bench/h200.sh profhlo` writes both). Prints, per timed step: the cuBLAS GEMMs grouped by shape
(FLOP from the HLO's operand shapes, TFLOP/s from the kernels the profile ties to them), then the
other kernels with the bytes their HLO instruction reads and writes and the bandwidth that makes.
Bytes count every operand in full: an upper bound for fusions that read slices.
"""
import argparse
import collections
import gzip
import json
import math
import re

BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4, "s64": 8}
INSTRUCTION = re.compile(r"\s*(?:ROOT )?%(\S+) = (\(.*?\)|\S+) ([\w-]+)\((.*?)\)(.*)")


def shapes(text):   # "(bf16[2,3]{1,0}, s8[4]{0})" -> [("bf16", [2, 3]), ("s8", [4])]
    return [(t, [int(d) for d in dims.split(",") if d])
            for t, dims in re.findall(r"(\w+)\[([\d,]*)\]", text)]


def size(shs):
    return sum(BYTES.get(t, 4) * math.prod(d) for t, d in shs)


def parse(path):
    """-> {instruction name: (shape text, opcode, [(operand, tuple index)], rest of line)}."""
    opener = gzip.open if path.endswith(".gz") else open
    table = {}
    with opener(path, "rt") as f:
        for line in f:
            m = INSTRUCTION.match(line)
            if m:
                name, shape, op, args, rest = m.groups()
                table[name] = (shape, op, re.findall(r"%([\w.\-]+)(?:#(\d+))?", args), rest)
    return table


def operand_shapes(table, name, index):
    shs = shapes(table[name][0]) if name in table else []
    return [shs[int(index)]] if index and len(shs) > int(index) else shs


def gemm(table, name):   # a cuBLAS custom call -> (output shape, FLOP)
    shape, _, operands, rest = table[name]
    out = [s for s in shapes(shape) if s[0] != "s8"][0]          # s8: cuBLAS's workspace
    lhs = operand_shapes(table, *operands[0])[0]
    dims = json.loads(re.search(r"backend_config=(\{.*\})", rest).group(1))
    contracting = dims["gemm_backend_config"]["dot_dimension_numbers"]["lhs_contracting_dimensions"]
    return out, 2 * math.prod(out[1]) * math.prod(lhs[1][int(c)] for c in contracting)


def moved(table, name):   # bytes an instruction reads and writes
    shape, op, operands, _ = table[name]
    out = [s for s in shapes(shape) if not (op == "custom-call" and s[0] == "s8")]
    return size(out) + sum(size(operand_shapes(table, n, i)) for n, i in operands)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("tsv")
    ap.add_argument("hlo")
    ap.add_argument("--steps", type=int, required=True, help="timed steps in the profile")
    ap.add_argument("--top", type=int, default=40)
    a = ap.parse_args()
    table, n = parse(a.hlo), a.steps
    rows = [(k, op, int(c), float(ms)) for k, op, c, ms in
            (line.rstrip("\n").split("\t") for line in open(a.tsv))]
    print(f"{sum(r[3] for r in rows) / n:.1f} ms of kernels a step\n")

    groups = collections.defaultdict(lambda: [0, 0.0, 0.0])   # (shape, FLOP) -> launches, ms, FLOP
    other = {}   # kernel name -> [an HLO op that launched it, launches, ms]
    for k, op, c, ms in rows:
        if op in table and "__cublas" in table[op][3] and not k.lower().startswith("mem"):
            out, flop = gemm(table, op)
            g = groups[f"{out[0]}{out[1]}", flop]
            g[0] += c / n; g[1] += ms / n; g[2] += flop * c / n
        elif not any(s in k for s in ("nvjet", "cudnn", "cutlass", "xmma", "gemm")):
            o = other.setdefault(k, [op, 0, 0.0])   # one XLA kernel may serve many instructions
            o[1] += c; o[2] += ms
    if groups:
        ms, flop = sum(g[1] for g in groups.values()), sum(g[2] for g in groups.values())
        print(f"cuBLAS GEMMs: {ms:.1f} ms a step, {flop:.3e} FLOP, {flop / ms / 1e9:.0f} TFLOP/s")
        print("| output | FLOP each | launches a step | ms a step | TFLOP/s |")
        print("|---|---|---|---|---|")
        for (shape, f), (c, ms, fl) in sorted(groups.items(), key=lambda kv: -kv[1][1]):
            print(f"| {shape} | {f:.2e} | {c:.0f} | {ms:.2f} | {fl / ms / 1e9:.0f} |")
    else:
        print("no kernel carried its GEMM's HLO op: profile with "
              "XLA_FLAGS=--xla_gpu_enable_command_buffer= (command buffers hide the ops)")
    other = [(k, op, c, ms) for k, (op, c, ms) in other.items()]
    print(f"\nother kernels: {sum(r[3] for r in other) / n:.1f} ms a step")
    print("| kernel | launches a step | ms a step | MB a launch | GB/s | shape | jax op |")
    print("|---|---|---|---|---|---|---|")
    for k, op, c, ms in sorted(other, key=lambda r: -r[3])[:a.top]:
        name = op if op in table else re.sub(r"_(\d+)$", r".\1", k)   # XLA kernels: HLO name
        if name not in table or k.lower().startswith("mem"):   # memsets: bytes not the op's
            print(f"| {k[:40]} | {c / n:.0f} | {ms / n:.2f} | | | | |")
            continue
        b = moved(table, name)
        jax_op = re.search(r'op_name="([^"]*)"', table[name][3])
        jax_op = jax_op.group(1).split("/")[-1] if jax_op else ""
        print(f"| {k[:40]} | {c / n:.0f} | {ms / n:.2f} | {b / 1e6:.0f} | {b * c / ms / 1e6:.0f} "
              f"| {table[name][0][:32]} | {jax_op} |")


if __name__ == "__main__":
    main()
