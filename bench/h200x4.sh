#!/usr/bin/env bash
# Tensor parallelism on 4 H200s of one host (TPS="1 2" for 2): per-GPU peak memory and
# tokens/s for tp = 1, 2, 4 at 4k and 32k, the longest sequence at tp = 4, and the 70B shape.
# Usage: bash bench/h200x4.sh PART...   PART in {tp, long, 70b, decode}
# JSON rows go to $RESULTS/h200x4-DATE.jsonl (default bench/results/), logs to $OUT (bench_out/).
set -uo pipefail
OUT=${OUT:-bench_out}; RESULTS=${RESULTS:-bench/results}; mkdir -p "$OUT" "$RESULTS"
DAY=$(date -u +%F); ROWS=$RESULTS/h200x4-$DAY.jsonl   # one JSON row per measurement
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 NCCL_NVLS_ENABLE=0
jora() { python3 train.py --benchmark --batch-size 1 --lora-dropout 0 "$@" 2>&1 | tee -a "$OUT/jora.log" | grep '^{' >> "$ROWS"; }
for part in "$@"; do
case "$part" in
  tp)     for tp in ${TPS:-1 2 4}; do   # batch 1 on one model group: the other devices stay idle
            CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((tp - 1))) jora --size 7b --tp $tp --seq-len 4096 --remat min --bench-steps 3
            CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((tp - 1))) jora --size 7b --tp $tp --seq-len 32768 --remat full --sequence-parallel --bench-steps 2
          done ;;
  long)   jora --size 7b --tp 4 --seq-len 262144,524288,786432 --remat full --sequence-parallel --bench-steps 1 --bench-warmup 0 ;;
  70b)    jora --size 70b --tp 4 --seq-len 2048,8192 --remat full --sequence-parallel --bench-steps 2 ;;
  decode) python3 bench/decode.py --size 7b --batch 1 16 --new 256 | tee -a "$ROWS" ;;
esac
done
cat "$ROWS" 2>/dev/null
[ "$RESULTS" -ef "$OUT" ] || cp "$ROWS" "$OUT"/ 2>/dev/null || true   # results beside the logs
