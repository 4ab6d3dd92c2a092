#!/usr/bin/env bash
# The device check: GPU tests of trainers/ and the throughput benchmarks, in one call.
# On the GPU machine (PyTorch only; no Ray/MLflow): bash benchmarks/gpu_check.sh  (writes to $OUT)
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
nvidia-smi -L | tee "$OUT/nvidia.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/nvidia.txt"
timeout 240 python3 -m pytest tests/gpu -q -p no:cacheprovider -o addopts="" 2>&1 | tail -25 | tee "$OUT/gpu_tests.log"
timeout 240 python3 benchmarks/throughput.py --device cuda --models DiT-S/2,DiT-B/2 --batch 240 --precision bf16 \
  --steps 20 --warmup 5 2>&1 | tail -20 | tee "$OUT/throughput.log"
timeout 200 python3 benchmarks/throughput.py --device cuda --models DiT-B/2 --methods vanilla,ant-pcgrad --batch 240 \
  --precision bf16 --steps 20 --warmup 5 --adamw foreach 2>&1 | tail -8 | tee "$OUT/throughput_foreach.log"
timeout 300 python3 benchmarks/throughput.py --device cuda --models DiT-B/2 --methods vanilla,dtr --batch 240 \
  --precision bf16 --steps 20 --warmup 10 --compile 2>&1 | tail -8 | tee "$OUT/throughput_compile.log"
timeout 150 python3 benchmarks/method_overhead.py --device cuda --model DiT-S/2 --image-size 32 --batch 60 \
  --precision bf16 --rounds 5 --steps 20 --threads 8 2>&1 | tail -12 | tee "$OUT/method_overhead_cuda.log"
timeout 150 python3 benchmarks/dmp.py --device cuda --model DiT-B/2 --batch 64 --precision bf16 --rounds 3 \
  --steps 10 --threads 8 2>&1 | tail -8 | tee "$OUT/dmp_cuda.log"
