#!/usr/bin/env bash
# Reproduce README.md's Benchmark: each row of its table, the end-to-end run, the kernel table.
# Usage: bash bench/reproduce.sh PART...   (from the repo root, on one GPU)
#   qv-2k       q,v at 2,048: jora, HF + PEFT, HF + PEFT + Liger, Unsloth (without and with
#               its gradient checkpointing)
#   all7-2k     all seven projections at 2,048: the same four
#   qv-16k      q,v at 16,384: jora (--remat auto), HF + PEFT and + Liger (checkpointing)
#   all7-16k    all seven at 16,384: the same three
#   l3-qv-2k    q,v at 2,048 on Llama-3.1-8B's shape (--size llama3-8b): the same four
#   l3-all7-2k  all seven at 2,048 on Llama-3.1-8B's shape: the same four
#   fp8         the float8 base (--base-dtype float8): q,v and all seven on Llama-2-7B and
#               Llama-3.1-8B beside the bf16 base, Liger (and HF + PEFT on q,v); q,v on
#               Llama-2-70B at 4,096 (--remat full) beside HF + PEFT on a 4-bit base (QLoRA:
#               bitsandbytes NF4, gradient checkpointing)
#   longest     jora alone, q,v at 327,680 (--remat full --mlp-chunk 16384), one step: needs
#               an H200's memory
#   e2e         DATA=FILE (Alpaca JSON) TOKENIZER=DIR (a folder with Llama-2's tokenizer.model):
#               a random Llama-2-7B HF folder (bench/make_7b.py, ~27 GB of disk with its merged
#               copy), then train.py on it twice (cold, then from the compilation cache), each
#               under bench/peak_rss.py
#   kernels     python -m kernels.bench --ms 2048,8192,32768 --ranks 16: the LoRA kernel per
#               projection against the frozen GEMM and XLA's unfused LoRA
#   table       the seven rows
# The HF columns run bench/hf_peft.py (pip install torch transformers peft; liger-kernel for
# the Liger column and bitsandbytes for the 4-bit one, each skipped where it is not installed)
# with $TORCH_PYTHON (default python3).
# The Unsloth column runs $UNSLOTH_BASELINE with $TORCH_PYTHON (skipped where unset): an Unsloth
# baseline script taking --size 7b --seq N [--no-gc] [--targets q_proj,...] (batch 1 and LoRA
# dropout 0 by default), printing JSON rows. jora and HF run batch 1, LoRA dropout 0.
# JSON rows go to $OUT/rows.jsonl, logs and the kernel table to $OUT (default bench_out/,
# git-ignored).
set -uo pipefail
OUT=${OUT:-bench_out}; PY=${TORCH_PYTHON:-python3}; mkdir -p "$OUT"
SIZE=7b   # the model's shape; the l3- parts set llama3-8b
ROWS=$OUT/rows.jsonl
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
ALL7=q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj
rows() {   # a command's output into $OUT/$1.log; its JSON rows (and errors) shown, the rows kept
  tee -a "$OUT/$1.log" | while IFS= read -r line; do case $line in
    "{"*) echo "$line" | tee -a "$ROWS" ;; *Error*) echo "$1: $line" ;; esac; done; }
jora() { python3 -m bench.benchmark --size "$SIZE" --batch-size 1 --lora-dropout 0 "$@" 2>&1 | rows jora; }
hf() { "$PY" bench/hf_peft.py --size "$SIZE" --batch 1 --dropout 0 "$@" 2>&1 | rows hf; }
liger() {
  if "$PY" -c "import liger_kernel" 2>/dev/null; then hf --liger "$@"
  else echo "liger: liger_kernel is not installed for $PY, skipped"; fi; }
qlora() {
  if "$PY" -c "import bitsandbytes" 2>/dev/null; then hf --4bit --remat "$@"
  else echo "qlora: bitsandbytes is not installed for $PY, skipped"; fi; }
unsloth() {
  if [ -n "${UNSLOTH_BASELINE:-}" ]; then
    "$PY" "$UNSLOTH_BASELINE" --size "$SIZE" "$@" 2>&1 | rows unsloth
  else echo "unsloth: UNSLOTH_BASELINE is not set, skipped"; fi; }
row2k() {   # $1: jora's targets, $2: HF's
  jora --seq-len 2048 --targets "$1" --bench-steps 10
  hf --seq 2048 --targets "$2" --steps 10
  liger --seq 2048 --targets "$2" --steps 10
  unsloth --seq 2048 --targets "$2" --no-gc
  unsloth --seq 2048 --targets "$2"; }
row16k() {
  jora --seq-len 16384 --targets "$1" --bench-steps 3
  hf --seq 16384 --targets "$2" --remat --steps 3
  liger --seq 16384 --targets "$2" --remat --steps 3; }
[ $# -gt 0 ] || { sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 2; }
parts=()
for part in "$@"; do
  if [ "$part" = table ]; then parts+=(qv-2k all7-2k qv-16k all7-16k longest l3-qv-2k l3-all7-2k); else parts+=("$part"); fi
done
for part in "${parts[@]}"; do
echo "== $part"
case "$part" in
  qv-2k)    row2k q,v q_proj,v_proj ;;
  all7-2k)  row2k all $ALL7 ;;
  qv-16k)   row16k q,v q_proj,v_proj ;;
  all7-16k) row16k all $ALL7 ;;
  l3-qv-2k)   SIZE=llama3-8b; row2k q,v q_proj,v_proj; SIZE=7b ;;
  l3-all7-2k) SIZE=llama3-8b; row2k all $ALL7; SIZE=7b ;;
  fp8)      for SIZE in 7b llama3-8b; do
              for t in "q,v q_proj,v_proj" "all $ALL7"; do
                set -- $t
                jora --seq-len 2048 --targets "$1" --bench-steps 10 --base-dtype float8
                jora --seq-len 2048 --targets "$1" --bench-steps 10
                liger --seq 2048 --targets "$2" --steps 10
              done
              hf --seq 2048 --targets q_proj,v_proj --steps 10
            done
            SIZE=70b; jora --seq-len 4096 --targets q,v --bench-steps 3 --base-dtype float8 \
              --remat full; qlora --seq 4096 --targets q_proj,v_proj --steps 3; SIZE=7b ;;
  longest)  jora --seq-len 327680 --targets q,v --remat full --mlp-chunk 16384 --bench-steps 1 \
              --bench-warmup 0 ;;
  e2e)      : "${DATA:?e2e needs DATA=an Alpaca JSON file}" "${TOKENIZER:?e2e needs TOKENIZER=a folder with tokenizer.model}"
            python3 -m bench.make_7b "$OUT/7b" "$TOKENIZER" 2>&1 | rows e2e
            rm -rf "$OUT/7b_merged"
            for run in cold warm; do   # the same run twice: the second compiles from the cache
              python3 bench/peak_rss.py python3 train.py --model "$OUT/7b" --data "$DATA" \
                --out "$OUT/e2e_$run" --overwrite --seq-len 4096 --targets all --batch-size 1 \
                --steps 8 --log-every 1 --compile-cache "$OUT/e2e_cache" 2>&1 | sed "s/^/$run: /" \
                | tee -a "$OUT/e2e.log"
              rm -rf "$OUT/e2e_$run/merged"
            done ;;
  kernels)  python3 -m kernels.bench --ms 2048,8192,32768 --ranks 16 | tee -a "$OUT/kernels.md" ;;
  *)        echo "unknown part: $part (bash bench/reproduce.sh lists them)"; exit 2 ;;
esac
done
