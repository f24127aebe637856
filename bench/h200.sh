#!/usr/bin/env bash
# Side-by-side speed and memory on one H200: jora vs HF + PEFT, same shapes, one run.
# Usage: bash bench/h200.sh PART...
#   PART in {sustained, gateup, swiglu, tail, hopper, kmodel, kgoal, kdefault, lowrank, parts, wave, kmodel16k, redesign, redesign16k, liger7, long7, gemm, check, qv, remat, long, attn, chunk, hflong, hflong32, mlpchunk, plan, all7long, mgpu, gputests, fix, max, all7x32, all7x, chunklast, final, all7, profilelong, kernels, kernels32k, prof, profhlo, packed, segmem, packed32, profile, flags, hlo, decode}
# Results (JSON rows, kernel tables, profiles) go to $RESULTS (default bench/results/), named by
# machine and date; logs, traces and HLO dumps to $OUT (default bench_out/, git-ignored), which
# also gets a copy of the day's results at the end.
# The HF rows need the HF + PEFT baseline script (not in this repository) at
# .dev/hf_peft_baseline.py; bench/hf_on_gpu.py runs it unchanged with its model built on the GPU.
set -uo pipefail
OUT=${OUT:-bench_out}; RESULTS=${RESULTS:-bench/results}; mkdir -p "$OUT" "$RESULTS"
DAY=$(date -u +%F); ROWS=$RESULTS/h200-$DAY.jsonl   # one JSON row per measurement
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
jora() { python3 train.py --benchmark --size 7b --batch-size 1 --lora-dropout 0 "$@" 2>&1 | tee -a "$OUT/jora.log" | grep '^{' >> "$ROWS"; }
hf() { python3 -P bench/hf_on_gpu.py --size 7b --batch 1 "$@" 2>&1 | tee -a "$OUT/hf.log" | grep '^{' >> "$ROWS"; }
ALL7=q,k,v,o,gate,up,down
ALL7_HF=q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj
for part in "$@"; do
case "$part" in
  check) python3 -c "import jax; print(jax.__version__, jax.devices())"; nvidia-smi -L
         python3 -m pytest -q tests/test_gpu.py 2>&1 | tail -3
         python3 train.py --benchmark --size tiny --seq-len 256 --bench-steps 2 ;;
  qv)    jora --seq-len 2048,4096 --bench-steps 5
         hf --seq 2048 4096 --steps 5 ;;
  remat) jora --seq-len 2048,4096 --remat min --bench-steps 5
         jora --seq-len 2048 --remat dots --bench-steps 5 ;;
  long)  jora --seq-len 16384,32768 --remat full --bench-steps 3
         hf --seq 16384 32768 --remat --steps 3 ;;
  fix)   jora --seq-len 2048 --remat min --bench-steps 5
         jora --seq-len 16384,32768,262144 --remat full --bench-steps 1 --bench-warmup 1 ;;
  attn)  jora --seq-len 16384,32768 --remat attn --bench-steps 3 ;;
  chunk) for c in ${CHUNKS:-1024 512}; do jora --seq-len 16384 --remat attn --loss-chunk $c --bench-steps 3; done ;;
  hflong) hf --seq 16384 --remat --steps 3 ;;
  hflong32) hf --seq 32768 --remat --steps 3 ;;
  mlpchunk) for c in ${MLPCHUNKS:-4096 2048}; do jora --seq-len 16384,32768 --remat ${REMAT:-attn} --mlp-chunk $c --bench-steps 3; done ;;
  plan)  jora --seq-len ${PLANSEQ:-327680,393216} --remat full --mlp-chunk ${MLPCHUNK:-16384} --bench-steps 0 ;;
  all7long) jora --seq-len 16384 --remat attn --mlp-chunk 2048 --targets $ALL7 --bench-steps 3
         jora --seq-len 32768 --remat attn --mlp-chunk 2048 --targets $ALL7 --bench-steps 3
         hf --seq 16384 32768 --remat --targets $ALL7_HF --steps 3 ;;
  mgpu)  python3 -m pytest -q experiments 2>&1 | tail -5
         python3 -m experiments.bench_mgpu --ms 8192 --w-transposed | tee -a "$RESULTS/kernels-mgpu-h200-$DAY.md" ;;
  gputests) python3 -m pytest -q tests/test_gpu.py tests/test_kernels.py 2>&1 | tail -25 ;;
  liger) python3 -m pip install -q --no-deps --target /tmp/liger .dev/wheels/liger_kernel-*.whl ;;
  dropout) jora --seq-len 2048 --remat none --bench-steps 5                      # q,v, dropout 0 and 0.05
         jora --seq-len 2048 --remat none --lora-dropout 0.05 --bench-steps 5
         hf --seq 2048 --steps 5 --dropout 0.05
         PYTHONPATH=/tmp/liger hf --seq 2048 --steps 5 --liger
         jora --seq-len 2048 --remat min --targets $ALL7 --lora-dropout 0.05 --bench-steps 5 --compile-cache "/tmp/jora_cc"
         jora --seq-len 2048 --remat min --targets $ALL7 --lora-dropout 0.05 --bench-steps 5 --compile-cache "/tmp/jora_cc"
         jora --seq-len 2048 --remat none --targets $ALL7 --lora-dropout 0.05 --bench-steps 5
         hf --seq 2048 --targets $ALL7_HF --steps 5 --dropout 0.05 ;;
  auto)  jora --seq-len ${AUTOSEQ:-2048,16384,32768} --remat auto --lora-dropout 0.05 --bench-steps 3
         hf --seq 16384 --remat --steps 3 --dropout 0.05
         PYTHONPATH=/tmp/liger hf --seq 16384 --remat --steps 3 --liger ;;
  ranks) for r in ${RANKS:-8 64 256}; do jora --seq-len 2048 --remat none --lora-r $r --lora-alpha $r --bench-steps 3; done ;;
  e2e)   python3 bench/make_7b.py "$OUT/7b" .dev/tok | tee -a "$OUT/e2e.log" | grep '^{' >> "$ROWS"
         rm -rf "$OUT/7b_merged"
         for run in cold warm; do   # the same run twice: the second compiles from the cache
           python3 bench/peak_rss.py python3 train.py --model "$OUT/7b" --data .dev/data/raft_en_test.jsonl \
             --out "$OUT/run_$run" --seq-len 4096 --pack --targets all --batch-size 1 --steps 8 \
             --log-every 1 --compile-cache "$OUT/cc7" 2>&1 | tee -a "$OUT/e2e.log" | grep -E '^\{|loaded|compil|remat auto|wrote|step 8/' | sed "s/^/$run: /"
           rm -rf "$OUT/run_$run/merged"
         done ;;
  max)   for n in ${MAXSEQ:-327680 294912}; do   # longest first; stop at the first that trains
           jora --seq-len $n --remat full --mlp-chunk ${MLPCHUNK:-16384} --bench-steps 1 --bench-warmup 0
           grep -q "\"seq\": $n,.*tokens_per_s" "$ROWS" && break; done ;;
  all7x32) hf --seq 32768 --remat --targets $ALL7_HF --steps 3   # the first N layers remat full
         jora --seq-len 32768 --remat attn --mlp-chunk 2048 --full-layers ${FULL:-4} --targets $ALL7 --bench-steps 3 ;;
  all7x) hf --seq 16384 32768 --remat --targets $ALL7_HF --steps 3   # the README's all-7 long rows
         jora --seq-len 16384,32768 --remat attn --mlp-chunk 2048 --chunk-layers 4 --full-layers ${FULL:-4} --targets $ALL7 --bench-steps 3 ;;
  chunklast) for n in ${CHUNKLAYERS:-4 0}; do   # MLP chunks on the last N layers only (0: all)
           jora --seq-len ${CHUNKSEQ:-16384,32768} --remat attn --mlp-chunk 2048 --chunk-layers $n --bench-steps 3; done ;;
  final) jora --seq-len 2048,4096 --bench-steps 5      # the README table's rows, one call
         hf --seq 2048 4096 --steps 5
         jora --seq-len 16384,32768 --remat attn --mlp-chunk 2048 --chunk-layers 4 --bench-steps 3
         hf --seq 16384 32768 --remat --steps 3
         jora --seq-len 2048,4096 --remat min --targets $ALL7 --bench-steps 5
         hf --seq 2048 4096 --targets $ALL7_HF --steps 5 ;;
  all7)  jora --seq-len 2048,4096 --remat min --targets $ALL7 --bench-steps 5
         hf --seq 2048 4096 --targets $ALL7_HF --steps 5 ;;
  kernels) python3 -m pytest -q tests/test_kernels.py 2>&1 | tail -3
         python3 -m kernels.bench --ms 2048,8192 | tee -a "$RESULTS/kernels-h200-$DAY.md"
         jora --seq-len 2048 --remat min --kernels pallas --bench-steps 5 ;;
  hopper) # the Mosaic GPU LoRA kernel: GPU tests, then the per-projection table (R = 16)
         timeout 300 python3 -m pytest -q tests/test_gpu.py experiments/test_hopper_gemm.py \
           -k "lora_matmul or lowrank" 2>&1 | tail -4
         timeout 420 python3 -m kernels.bench --ms ${KMS:-2048,8192,32768} --ranks 16 \
           | tee -a "$RESULTS/kernels-h200-$DAY.md" ;;
  kmodel) # the whole model with and without the kernels, train.py's defaults (dropout 0.05)
         for t in q,v $ALL7; do for k in xla pallas; do
           jora --lora-dropout 0.05 --seq-len 2048 --targets $t --kernels $k --bench-steps 10
         done; done ;;
  sustained) # the Hopper GEMMs against cuBLAS at the power limit (clustered and not)
         timeout 300 python3 -m experiments.bench_sustained | tee -a "$RESULTS/sustained-h200-$DAY.md" ;;
  gateup) # gate and up in one kernel (gemm_swiglu): GPU tests, per op, the q,v row under the profiler
         python3 -m pytest -q tests/test_gpu.py experiments/test_hopper_gemm.py -k "gate_up or swiglu_gemm or qv" 2>&1 | tail -3
         python3 -m kernels.bench --gate-up --ms 2048,8192 | tee -a "$RESULTS/gateup-h200-$DAY.md"
         jora --seq-len 2048 --remat none --bench-steps 3 --profile "$OUT/prof_gu"
         sed -i '$ s/^{/{"profiled": true, /' "$ROWS"
         python3 bench/profile.py "$OUT/prof_gu" | tee -a "$RESULTS/profile-h200-$DAY.md"; rm -rf "$OUT/prof_gu" ;;
  swiglu) # the MLP gate's one-pass backward kernel against XLA's autodiff, per op
         timeout 300 python3 -m kernels.bench --swiglu --ms ${SWMS:-2048,16384} | tee -a "$RESULTS/swiglu-h200-$DAY.md" ;;
  kgoal) # all seven at 2,048 without dropout (the issue's goal)
         for k in xla pallas; do jora --seq-len 2048 --targets $ALL7 --kernels $k --bench-steps 10; done ;;
  kdefault) # train.py's defaults alone (--kernels auto, --remat auto, dropout 0.05), HF beside
         for t in ${KTARGETS:-q,v $ALL7}; do
           python3 train.py --benchmark --size 7b --batch-size 1 --seq-len 2048 --targets $t \
             --bench-steps 10 2>&1 | tee -a "$OUT/jora.log" | grep '^{' >> "$ROWS"; done
         for t in ${HFTARGETS:-q_proj,v_proj $ALL7_HF}; do hf --seq 2048 --targets $t --steps 5 --dropout 0.05; done ;;
  lowrank) # gemm_lowrank's tilings against cuBLAS's plain x @ w
         timeout 300 python3 -m experiments.bench_hopper_gemm --lowrank 16 --ms ${KMS:-2048,8192} \
           --budget 240 | tee -a "$RESULTS/gemm-h200-$DAY.md" ;;
  parts) # the LoRA projection's f+b part by part, with GPU kernel time from traces
         timeout 200 python3 -m experiments.bench_lora_parts --ms ${KMS:-2048,8192} --profile "$OUT/parts" \
           2>&1 | grep -v Warning | tee -a "$RESULTS/lora-parts-h200-$DAY.md" ;;
  tail)  # the ragged last wave in a second launch of smaller tiles: tests, then the GEMM
         timeout 150 python3 -m pytest -q experiments/test_hopper_gemm.py -k "split or tail or matches" 2>&1 | tail -3
         timeout 150 python3 -m experiments.bench_hopper_gemm --ms 2048 --kn 4096x11008 --tail --budget 120 \
           | tee -a "$RESULTS/gemm-h200-$DAY.md"
         timeout 200 python3 -m experiments.bench_hopper_gemm --ms 32768 --kn 4096x4096,11008x4096 --tail \
           --budget 170 | tee -a "$RESULTS/gemm-h200-$DAY.md" ;;
  wave)  # 128 x 128 CTA tiles against the default 128 x 256 where the last wave is ragged
         timeout 150 python3 -m experiments.bench_hopper_gemm --ms ${KMS:-2048,8192} \
           --kn 4096x11008,11008x4096 --wave --budget 120 | tee -a "$RESULTS/gemm-h200-$DAY.md" ;;
  kmodel16k) for k in xla pallas; do jora --lora-dropout 0.05 --seq-len 16384 --remat attn \
           --mlp-chunk 2048 --chunk-layers 4 --targets $ALL7 --kernels $k --bench-steps 3; done ;;
  kernels32k) python3 -m kernels.bench --ms 32768 | tee -a "$RESULTS/kernels-h200-$DAY.md" ;;
  profilelong) for n in ${PROFSEQ:-16384}; do   # what limits the long rows (attn + MLP chunks)
           jora --seq-len $n --remat attn --mlp-chunk 2048 --bench-steps 2 --profile "$OUT/prof_$n"
           python3 bench/profile.py "$OUT/prof_$n" | tee -a "$RESULTS/profile-h200-$DAY.md"; rm -rf "$OUT/prof_$n"; done ;;
  prof)  jora ${PROFARGS:---seq-len 4096 --remat none} --bench-steps 3 --profile "$OUT/prof"
         sed -i '$ s/^{/{"profiled": true, /' "$ROWS"   # timed under the profiler
         python3 bench/profile.py "$OUT/prof" | tee -a "$RESULTS/profile-h200-$DAY.md"; rm -rf "$OUT/prof" ;;
  profile) jora --seq-len 2048 --remat min --bench-steps 3 --profile "$OUT/prof_qv"
         python3 bench/profile.py "$OUT/prof_qv" | tee -a "$RESULTS/profile-h200-$DAY.md"
         jora --seq-len 2048 --remat min --targets $ALL7 --bench-steps 3 --profile "$OUT/prof_all7"
         python3 bench/profile.py "$OUT/prof_all7" | tee -a "$RESULTS/profile-h200-$DAY.md"
         rm -rf "$OUT"/prof_* ;;
  flags) IFS=';' read -ra sets <<< "${FLAGSETS:---xla_gpu_enable_dynamic_slice_fusion=true}"
         for f in "${sets[@]}"; do   # FLAGSETS="flags A;flags B" (" " = none): a run per set
           echo "{\"xla_flags\": \"$f\"}" >> "$ROWS"
           XLA_FLAGS="$f" jora ${FLAGARGS:---seq-len 2048 --remat min} --bench-steps 5
         done ;;
  hlo)   XLA_FLAGS="--xla_dump_to=$OUT/hlo --xla_dump_hlo_as_text --xla_dump_hlo_module_re=jit_step" jora --seq-len ${HLOSEQ:-2048} ${HLOARGS:---remat min} --bench-steps 1 --bench-warmup 0
         sed -i '$ s/^{/{"xla_dump": true, /' "$ROWS"   # dumping slows the step: not a figure
         f=$(ls -S "$OUT"/hlo/*after_optimizations.txt | head -1); gzip -c "$f" > "$OUT/step_hlo.txt.gz"
         rm -rf "$OUT/hlo" ;;
  profhlo) XLA_FLAGS="--xla_dump_to=$OUT/hlo --xla_dump_hlo_as_text --xla_dump_hlo_module_re=jit_step --xla_gpu_enable_command_buffer=" \
           jora ${PROFARGS:---seq-len 16384 --remat attn --mlp-chunk 2048 --chunk-layers 4} --bench-steps 2 --profile "$OUT/prof"
         sed -i '$ s/^{/{"profiled": true, "xla_dump": true, /' "$ROWS"
         python3 bench/profile.py "$OUT/prof" --tsv "$OUT/kernels.tsv" | tee -a "$RESULTS/profile-h200-$DAY.md"; rm -rf "$OUT/prof"
         f=$(ls -S "$OUT"/hlo/*after_optimizations.txt | head -1); gzip -c "$f" > "$OUT/step_hlo.txt.gz"
         rm -rf "$OUT/hlo"   # the kernels' HLO op names are the compiled step's instruction names
         python3 bench/hlo_join.py "$OUT/kernels.tsv" "$OUT/step_hlo.txt.gz" --steps 2 | tee -a "$RESULTS/profile-h200-$DAY.md" ;;
  packed) for ms in 0 16; do   # packed rows: a (T, T) mask (0) against cuDNN's segment offsets
           jora --seq-len 8192 --remat full --bench-doc ${DOC:-2048} --max-segments $ms --bench-steps 3; done
         jora --seq-len 8192 --remat full --bench-steps 3   # one sequence a row, for reference
         for ms in 0 16; do
           jora --seq-len 16384 --remat attn --mlp-chunk 2048 --chunk-layers 4 --bench-doc ${DOC:-2048} --max-segments $ms --bench-steps 3; done ;;
  segmem) for ms in ${SEGS:-4 8 32}; do   # memory against max_segments, compile only (planned)
           jora --seq-len 16384 --remat attn --mlp-chunk 2048 --chunk-layers 4 --bench-doc 2048 --max-segments $ms --bench-steps 0; done
         jora --seq-len 16384 --remat attn --mlp-chunk 2048 --chunk-layers 4 --bench-doc 2048 --max-segments 8 --bench-steps 3
         for ms in 0 16; do   # RAFT-like: 8 examples of 1,024 a row
           jora --seq-len 8192 --remat full --bench-doc 1024 --max-segments $ms --bench-steps 3; done ;;
  packed32) for ms in 0 8; do   # packed rows at 32,768: examples of 4,096, mask (0) or offsets
           jora --seq-len 32768 --remat attn --mlp-chunk 2048 --chunk-layers 4 --bench-doc 4096 --max-segments $ms --bench-steps 3; done ;;
  redesign) # the code before the redesign (.dev/old: 8da0969) and after it, each row in turn
         for args in "--seq-len 2048 --remat none" "--seq-len 2048 --remat min --targets $ALL7"; do
           for code in old new; do
             d=.; c="--compile-cache /tmp/jora_cc"; [ $code = old ] && d=.dev/old && c=--no-compile-cache
             (cd $d && python3 train.py --benchmark --size 7b --batch-size 1 --lora-dropout 0.05 $c $args --bench-steps 10) 2>&1 \
               | tee -a "$OUT/redesign.log" | grep '^{' | sed "s/^{/{\"code\": \"$code\", /" >> "$ROWS"
           done; done
         # the same step again from the compilation cache: the warm compile
         python3 train.py --benchmark --size 7b --batch-size 1 --lora-dropout 0.05 --compile-cache "/tmp/jora_cc" \
           --seq-len 2048 --remat min --targets $ALL7 --bench-steps 3 2>&1 | tee -a "$OUT/redesign.log" \
           | grep '^{' | sed 's/^{/{"code": "new", "warm": true, /' >> "$ROWS" ;;
  redesign16k) for code in old new; do   # q,v at 16,384 with the README's memory flags
           d=.; [ $code = old ] && d=.dev/old
           (cd $d && python3 train.py --benchmark --size 7b --batch-size 1 --lora-dropout 0.05 --no-compile-cache \
             --seq-len 16384 --remat attn --mlp-chunk 2048 --chunk-layers 4 --bench-steps 4) 2>&1 \
             | tee -a "$OUT/redesign.log" | grep '^{' | sed "s/^{/{\"code\": \"$code\", /" >> "$ROWS"
         done ;;
  liger7) PYTHONPATH=/tmp/liger hf --seq 2048 --targets $ALL7_HF --steps 5 --dropout 0.05 --liger
         PYTHONPATH=/tmp/liger hf --seq 2048 --steps 5 --dropout 0.05 --liger
         PYTHONPATH=/tmp/liger hf --seq 16384 --remat --targets $ALL7_HF --steps 3 --dropout 0.05 --liger ;;
  long7) jora --seq-len 16384 --remat auto --targets $ALL7 --lora-dropout 0.05 --bench-steps 3
         jora --seq-len 16384 --remat attn --mlp-chunk 2048 --chunk-layers 4 --targets $ALL7 --lora-dropout 0.05 --bench-steps 3
         hf --seq 16384 --remat --targets $ALL7_HF --steps 3 --dropout 0.05
         PYTHONPATH=/tmp/liger hf --seq 16384 --remat --steps 3 --dropout 0.05 --liger ;;
  gemm)  python3 -m experiments.bench_hopper_gemm 2>&1 | tee -a "$RESULTS/gemm-h200-$DAY.md" ;;
  decode) python3 bench/decode.py --size 7b --batch 1 16 --new 256 | tee -a "$ROWS" ;;
esac
done
cat "$ROWS" 2>/dev/null
[ "$RESULTS" -ef "$OUT" ] || cp "$RESULTS"/*"$DAY"* "$OUT"/ 2>/dev/null || true   # results beside the logs
