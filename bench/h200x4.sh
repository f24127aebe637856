#!/usr/bin/env bash
# Tensor parallelism on 4 H200s (device tool, kind nvidia-h200-x4): per-GPU peak memory and
# tokens/s for tp = 1, 2, 4 at 4k and 32k, the longest sequence at tp = 4, and the 70B shape.
# Usage: bash bench/h200x4.sh PART...   PART in {tp, long, 70b, decode}
set -uo pipefail
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 NCCL_NVLS_ENABLE=0
jora() { python3 train.py --benchmark --batch-size 1 --lora-dropout 0 "$@" 2>&1 | tee -a "$OUT/jora.log" | grep '^{' >> "$OUT/results.jsonl"; }
for part in "$@"; do
case "$part" in
  tp)     for tp in ${TPS:-1 2 4}; do   # batch 1 on one model group: the other devices stay idle
            CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((tp - 1))) jora --size 7b --tp $tp --seq-len 4096 --remat min --bench-steps 3
            CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((tp - 1))) jora --size 7b --tp $tp --seq-len 32768 --remat full --sequence-parallel --bench-steps 2
          done ;;
  long)   jora --size 7b --tp 4 --seq-len 262144,524288,786432 --remat full --sequence-parallel --bench-steps 1 --bench-warmup 0 ;;
  70b)    jora --size 70b --tp 4 --seq-len 2048,8192 --remat full --sequence-parallel --bench-steps 2 ;;
  decode) python3 bench/decode.py --size 7b --batch 1 16 --new 256 | tee -a "$OUT/results.jsonl" ;;
esac
done
cat "$OUT/results.jsonl" 2>/dev/null
