#!/usr/bin/env bash
# The whole reproduction (benchmarks/repro/README.md): three studies and one training run through
# the denoiselab CLI, then the report. Every step resumes where an interrupted run stopped: run it
# again. Outputs: ./runs/repro (checkpoints, Tune state), ./mlflow.db (experiment denoiselab-repro),
# benchmarks/repro/results (table, verdicts, plots).
set -euo pipefail
cd "$(dirname "$0")/../.."
DL=${DENOISELAB:-.venv/bin/denoiselab}
start=$(date +%s)
"$DL" search benchmarks/repro/methods.yaml
"$DL" search benchmarks/repro/meme.yaml
"$DL" train benchmarks/repro/dmp_base.yaml
"$DL" search benchmarks/repro/dmp.yaml
"$DL" review --studies repro-methods repro-meme repro-dmp --claims benchmarks/repro/claims.yaml \
    --out benchmarks/repro/results
echo "reproduction: $(( $(date +%s) - start )) s"
