"""Markdown table of jora beside HF + PEFT from results.jsonl files (later files win).

    python bench/table.py results1.jsonl results2.jsonl ...
"""
import json
import sys

rows = [json.loads(line) for path in sys.argv[1:] for line in open(path) if line[0] == "{"]
rows = [r for r in rows if "impl" in r and not r.get("xla_dump") and not r.get("profiled")]
# (notes, and rows timed under an HLO dump or the profiler: those run slow)
key = lambda r: ("all 7" if r["targets"].count(",") == 6 else "q,v", r["seq"])
# jora: one row per (targets, seq, remat + MLP chunk), XLA projections only; HF: one per (targets, seq)
label = lambda r: r["remat"] + (f", first {r['full_layers']} full" if r.get("full_layers") else
                                "") + (f", mlp {r['mlp_chunk']}" if r.get("mlp_chunk") else "") + (
    f" on the last {r['chunk_layers']}" if r.get("chunk_layers") else "") + (
    f", loss {r['loss_chunk']}" if r.get("loss_chunk", 2048) != 2048 else "") + (
    f" ({r['mlp_chunk_impl']})" if "mlp_chunk_impl" in r else "")
jora = {(*key(r), label(r)): r for r in rows
        if r["impl"] == "jora" and r.get("kernels", "xla") == "xla"}
hf = {key(r): r for r in rows if r["impl"] == "hf-peft"}
print("| targets | seq | remat HF / jora | HF+PEFT tok/s | HF GiB | jora tok/s | jora GiB "
      "| jora MFU | speed |")
print("|---|---|---|---|---|---|---|---|---|")
cell = lambda r, f: f"{r[f]:,}" if r.get(f) is not None else (
    f"{r['planned_gib']} (planned)" if f == "peak_gib" and "planned_gib" in r else r.get("error", "—"))
for k in sorted(set(jora) | {(*k, None) for k in hf if not any(j[:2] == k for j in jora)},
                key=lambda k: (k[0], k[1], str(k[2]))):
    j, h = jora.get(k, {}), hf.get(k[:2], {})
    speed = f"{j['tokens_per_s'] / h['tok_s']:.2f}x" if "tokens_per_s" in j and "tok_s" in h else ""
    remat = f"{'yes' if h.get('remat') else 'no' if h else '—'} / {label(j) if j else '—'}"
    mfu = f"{j['mfu']:.1%}" if j.get("mfu") else ""
    print(f"| {k[0]} | {k[1]:,} | {remat} | {cell(h, 'tok_s')} | {cell(h, 'peak_gib')} | "
          f"{cell(j, 'tokens_per_s')} | {cell(j, 'peak_gib')} | {mfu} | {speed} |")
