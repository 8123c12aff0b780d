#!/bin/bash
# Decode kernels on one GPU (issue 8): correctness vs the XLA reference first (inside decode.py,
# B=2, T=8K, per-row lengths), then where MSA / summary decode time goes at 1M (--parts), the
# sparse kernels' tile sweep (--tune) and the table at 128K and 1M, B=1.
#   REPO=<repo root> JOB_OUT=<dir> timeout 90 bash $REPO/benchmarks/gpu_decode.sh
# decode.py rewrites $JOB_OUT/decode.md after every section, so a run cut short keeps its figures.
set -u
: "${REPO:?set REPO to the repository root}"
: "${JOB_OUT:?set JOB_OUT to an output directory}"
BUDGET=${DECODE_BUDGET_S:-66}
mkdir -p "$JOB_OUT"
cd /tmp
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
timeout "$BUDGET" python3 "$REPO/benchmarks/decode.py" --out "$JOB_OUT" \
  --seqs 131072,1048576 --batches 1 --parts --tune ${DECODE_EXTRA:-}
echo "decode.py exit status $?"
echo "==== $JOB_OUT/decode.md ===="
cat "$JOB_OUT/decode.md" 2>/dev/null || echo "(no decode.md)"
