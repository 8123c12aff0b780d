#!/bin/bash
# Issue 9 on one GPU: training-step MFU of the M2-shaped and the Mixtral-shaped model (each run
# checks its loss is finite and decreasing), a profile of each step, then the Mixtral-shaped
# balance run (switch loss 0.02) continued towards 200 steps until the budget is spent.
#   cd /tmp && REPO=... JOB_OUT=... timeout 130 bash $REPO/benchmarks/gpu_mfu.sh
# BUDGET (s, default 125) is this script's own wall budget; each sub-step has its own timeout.
set -u
: "${REPO:?set REPO}" "${JOB_OUT:?set JOB_OUT}"
BUDGET=${BUDGET:-125}
START=$(date +%s)
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
PY=${PYTHON:-python3}
B="$REPO/benchmarks/train_step.py ${SMOKE:+--smoke}"  # SMOKE=1: tiny CPU check of this script
left() { echo $(( START + BUDGET - $(date +%s) )); }

echo "== M2-shaped (4 layers, 64 experts top-8 width 1536): sanity + timing + profile"
timeout 55 $PY $B --models m2 --warmup 3 --steps 6 --profile-steps 2 --out $JOB_OUT/m2
echo "m2 rc=$? after $(( $(date +%s) - START )) s"

L=$(left)
echo "== Mixtral-shaped (4 layers, d 2048, 8 experts top-2 width 5632): sanity + timing + profile + balance (${L}s left)"
timeout $(( L > 5 ? L - 2 : 3 )) $PY $B --models mixtral --warmup 3 --steps 8 --profile-steps 2 \
  --balance-steps 200 --deadline $(( START + BUDGET - 4 )) --out $JOB_OUT/mixtral
echo "mixtral rc=$? after $(( $(date +%s) - START )) s"

for m in m2 mixtral; do
  [ -f $JOB_OUT/$m/train_step.md ] && { echo; echo "### $m"; cat $JOB_OUT/$m/train_step.md; }
done
