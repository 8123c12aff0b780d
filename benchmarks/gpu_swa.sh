#!/bin/bash
# Issue 10 (swa helper): sliding-window block-sparse kernels on the GPU. Budget ~50 s.
#   cd /tmp && REPO=<repo> JOB_OUT=<dir> timeout 60 bash $REPO/benchmarks/gpu_swa.sh
# 1. correctness of the window kernels (Mosaic GPU, Triton) vs the XLA reference at bf16 2e-2,
# 2. SWA (window 4K) forward at 128K vs cuDNN dense causal, 3. peak training-step memory vs T.
# Parts after the time budget are skipped (and say so); the table lands in $JOB_OUT/swa.md.
set -u
OUT=${JOB_OUT:-/tmp/swa_out}
mkdir -p "$OUT"
cd /tmp
timeout 48 python3 "$REPO/benchmarks/memory.py" --out "$OUT" --budget 36 --reps 3 \
  --seqs 8192,32768,131072 --layers swa,moba,msa,full,full@xla 2>&1 | tee "$OUT/memory_log.txt"
echo "memory.py exit: ${PIPESTATUS[0]}"
cat "$OUT/swa.md" 2>/dev/null
