#!/bin/bash
# Issue 8's model-level decode row on one GPU: benchmarks/decode_model.py (full vs MSA vs MoBA
# layers at M2 attention dims, 128K cache), through generate's decode_step and in a device loop.
#   REPO=<repo> JOB_OUT=<dir> bash benchmarks/gpu_decode_model.sh
set -u
: "${REPO:?set REPO}" "${JOB_OUT:?set JOB_OUT}"
mkdir -p "$JOB_OUT"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${DM_MEM_FRACTION:-0.1}  # leaves the GPU to jobs alongside
cd /tmp
timeout -k 5 "${BUDGET_DM:-240}" python3 "$REPO/benchmarks/decode_model.py" --out "$JOB_OUT" \
  --context "${CONTEXT:-131072}" --patterns "${PATTERNS:-full,msa,msa@mean,moba}" > "$JOB_OUT/log.txt" 2>&1
echo "decode_model.py exit: $?"
grep -v "^[WIE][0-9]" "$JOB_OUT/log.txt" | tail -12
