#!/usr/bin/env bash
# The device check: GPU tests of trainers/ and the throughput benchmarks, in one call, most
# important first; each part gets at most its own limit and what is left of BUDGET seconds.
# On the GPU machine (PyTorch only; no Ray/MLflow): bash benchmarks/gpu_check.sh  (writes to $OUT)
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
BUDGET=${BUDGET:-540}
end=$((SECONDS + BUDGET))

part() {   # part LIMIT LOG COMMAND...: run COMMAND under min(LIMIT, time left), output appended to $OUT/LOG
           # (the device tool returns at most 8 files: parts share logs)
  local limit=$1 log=$2; shift 2
  local left=$((end - SECONDS))
  (( left < limit )) && limit=$left
  if (( limit < 20 )); then echo "skipped (budget spent): $*" | tee -a "$OUT/$log"; return; fi
  echo "== $* (limit ${limit}s)" | tee -a "$OUT/$log"
  local t0=$SECONDS
  timeout "$limit" "$@" >>"$OUT/$log" 2>&1
  echo "== exit $?, $((SECONDS - t0)) s" >>"$OUT/$log"
  tail -30 "$OUT/$log"
}

{ nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__)"; } 2>&1 | tee "$OUT/nvidia.txt"
# Order: what is still unmeasured first (RESULTS.md says what is). Measured on 2026-12-04: the
# fast step, every throughput row but DMP compiled; next: PCGrad with the interval groups as a view
# (interleaved against the old padded grouping, the <= 1.3x target) and its profile.
part 150 gpu_tests.log python3 -m pytest tests/gpu -q -p no:cacheprovider -o addopts=""
part 120 pcgrad.log python3 benchmarks/method_overhead.py --device cuda --model DiT-B/2 --batch 240 \
  --image-size 32 --precision bf16 --intervals 8 --rounds 4 --steps 8 --warmup 3 --threads 8 \
  --methods vanilla,ant-uw,ant-pcgrad,ant-pcgrad-padded,ant-pcgrad-recompute,ant-nash,dtr
part 90 pcgrad.log python3 benchmarks/profile_step.py --device cuda --model DiT-B/2 --batch 240 --image-size 32 \
  --precision bf16 --intervals 8 --steps 5 --warmup 3 --top 16 --methods vanilla,ant-pcgrad
part 120 throughput.log python3 benchmarks/throughput.py --device cuda --models DiT-B/2 --batch 240 \
  --precision bf16 --steps 10 --warmup 3
part 90 throughput.log python3 benchmarks/throughput.py --device cuda --models DiT-XL/2 \
  --methods vanilla,ant-pcgrad --batch 240 --precision bf16 --steps 8 --warmup 2
part 90 throughput.log python3 benchmarks/throughput.py --device cuda --models DiT-S/2 --batch 240 \
  --precision bf16 --steps 10 --warmup 3
part 120 throughput.log python3 benchmarks/throughput.py --device cuda --models DiT-B/2 \
  --methods vanilla,dtr --batch 240 --precision bf16 --steps 10 --warmup 3 --compile
part 60 step.log python3 benchmarks/dmp.py --device cuda --model DiT-B/2 --batch 64 --precision bf16 \
  --rounds 3 --steps 10 --threads 8
part 240 step.log python3 benchmarks/fast_step.py --device cuda --model DiT-B/2 --batch 240 --precision bf16 \
  --rounds 3 --steps 8
