#!/bin/bash
# Issue 10's memory target on one GPU: peak memory of one training step (compiled, not run) vs T
# for swa, moba and msa layers (and full for contrast) from 8K to 128K, on the kernels.
#   REPO=<repo> JOB_OUT=<dir> bash benchmarks/gpu_memory.sh
set -u
: "${REPO:?set REPO}" "${JOB_OUT:?set JOB_OUT}"
mkdir -p "$JOB_OUT"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # compile-only: leave the GPU to jobs alongside
cd /tmp
timeout -k 5 "${BUDGET:-300}" python3 "$REPO/benchmarks/memory.py" --out "$JOB_OUT" --parts memory \
  --budget "$(( ${BUDGET:-300} - 20 ))" --seqs "${SEQS:-8192,16384,32768,65536,131072}" \
  --layers "${LAYERS:-swa,moba,msa,full}" > "$JOB_OUT/memory_log.txt" 2>&1
echo "memory.py exit: $?"
cat "$JOB_OUT/swa.md" 2>/dev/null || tail -30 "$JOB_OUT/memory_log.txt"
