#!/bin/bash
# Recipe probes for the study on the lent GPU (issue 13): one variant under several candidate
# recipes at once (benchmarks/study_recipe.py), inside BUDGET seconds. Two files come back:
# recipe.md (the table) and recipe_log.txt (the driver's log with each failed candidate's tail).
#   REPO=<repo> JOB_OUT=<dir> [VARIANT=full STEPS=800 BUDGET=330] bash benchmarks/gpu_recipe.sh
set -u
: "${REPO:?set REPO}" "${JOB_OUT:?set JOB_OUT}"
BUDGET=${BUDGET:-330}
mkdir -p "$JOB_OUT"
cd /tmp
if [ -z "${CANDS:-}" ]; then
  CANDS=('base:' 'noqk:model.qk_norm="none"'
         'hd64:model.head_dim=64;model.num_heads=4;model.num_kv_heads=2;model.rotary_dim=32'
         'lr1e-3:train.learning_rate=1e-3' 'bias1e-2:model.moe.bias_update_rate=1e-2'
         'nocurr:data.curriculum=()' 'b32:train.batch_size=32')
else
  IFS='|' read -r -a CANDS <<< "$CANDS"
fi
s=$(date +%s)
python3 "$REPO/benchmarks/study_recipe.py" --out /tmp/recipe --variant "${VARIANT:-full}" \
  --steps "${STEPS:-800}" --deadline $(( s + BUDGET - 15 )) "${CANDS[@]}" \
  > "$JOB_OUT/recipe_log.txt" 2>&1
echo "recipe rc=$? in $(( $(date +%s) - s )) s"
cp /tmp/recipe/recipe.md "$JOB_OUT/" 2>/dev/null
grep -v "^WARNING:root:block_sparse_attention" "$JOB_OUT/recipe_log.txt" | tail -c 4000
