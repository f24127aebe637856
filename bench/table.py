"""Print a markdown table from bench/h200.sh's results.jsonl: jora beside HF + PEFT."""
import json
import sys

rows = [json.loads(line) for line in open(sys.argv[1]) if line.startswith("{")]
key = lambda r: (r["seq"], bool(r["remat"] not in (False, "none")),
                 "all7" if r["targets"].count(",") == 6 else "q,v")
jora = {key(r): r for r in rows if r["impl"] == "jora"}
hf = {key(r): r for r in rows if r["impl"] == "hf-peft"}
print("| targets | seq | remat | HF+PEFT tok/s | HF GiB | jora tok/s | jora GiB | jora MFU | ratio |")
print("|---|---|---|---|---|---|---|---|---|")
for k in sorted(set(jora) | set(hf), key=lambda k: (k[2], k[0])):
    j, h = jora.get(k, {}), hf.get(k, {})
    cell = lambda r, f: r.get("error", "—") if f not in r else f"{r[f]:,}"
    ratio = (f"{j['tokens_per_s'] / h['tok_s']:.2f}x" if "tokens_per_s" in j and "tok_s" in h
             else "")
    mfu = f"{j['mfu']:.1%}" if j.get("mfu") else ""
    print(f"| {k[2]} | {k[0]:,} | {'yes' if k[1] else 'no'} | {cell(h, 'tok_s')} | "
          f"{cell(h, 'peak_gib')} | {cell(j, 'tokens_per_s')} | {cell(j, 'peak_gib')} | {mfu} | "
          f"{ratio} |")
