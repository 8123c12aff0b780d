#!/bin/bash
# Router balance probes on one GPU (issue 9): the Mixtral-shaped model (softmax router, switch loss)
# trained to 200 steps under several settings at once, each printing max/min expert load per layer.
#   REPO=<repo> JOB_OUT=<dir> PROBES="name:lr:--set k=v --set k=v|..." bash benchmarks/gpu_balance.sh
set -u
: "${REPO:?set REPO}" "${JOB_OUT:?set JOB_OUT}"
PROBES=${PROBES:-"lr3e-4:3e-4:|z1e-3:1e-3:--set model.moe.z_loss_weight=1e-3|aux0.1:1e-3:--set model.moe.aux_loss_weight=0.1"}
STEPS=${STEPS:-200}
BUDGET=${BUDGET:-240}
n=$(echo "$PROBES" | tr '|' '\n' | wc -l)
export XLA_PYTHON_CLIENT_MEM_FRACTION=${MEM_FRACTION:-$(python3 -c "print(round(0.9 / $n, 3))")}
cd /tmp
deadline=$(( $(date +%s) + BUDGET - 5 ))
IFS='|' read -ra arr <<< "$PROBES"
for p in "${arr[@]}"; do
  name=${p%%:*}; rest=${p#*:}; lr=${rest%%:*}; sets=${rest#*:}
  mkdir -p "$JOB_OUT/$name"
  timeout -k 5 "$BUDGET" python3 "$REPO/benchmarks/train_step.py" --models mixtral --warmup 2 --steps 3 \
    --profile-steps 0 --balance-steps "$STEPS" --lr "$lr" $sets --deadline "$deadline" \
    --out "$JOB_OUT/$name" > "$JOB_OUT/$name/log.txt" 2>&1 &
done
wait
for p in "${arr[@]}"; do
  name=${p%%:*}
  echo "### $name"; grep "balance" "$JOB_OUT/$name/log.txt" | tail -3
  tail -3 "$JOB_OUT/$name/log.txt" | grep -i "error\|sanity" || true
done
