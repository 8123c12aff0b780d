#!/bin/bash
# Determinism of the study on the GPU (issue 13): reruns one (variant, seed) of an earlier sweep
# in a fresh workdir and compares every evaluated number and every logged training metric with
# that sweep's run.json / metrics.jsonl (REF_RUN, REF_METRICS). Without REF_RUN it trains the
# (variant, seed) twice at once in two workdirs and compares the two.
#   REPO=<repo> JOB_OUT=<dir> VARIANT=msa SEED=2 STEPS=1800 REF_RUN=<run.json> \
#     REF_METRICS=<metrics.jsonl> bash benchmarks/gpu_rerun.sh
#   REPO=<repo> JOB_OUT=<dir> VARIANT=msa SEED=2 STEPS=300 bash benchmarks/gpu_rerun.sh
set -u
: "${REPO:?set REPO}" "${JOB_OUT:?set JOB_OUT}" "${VARIANT:?}" "${SEED:?}"
WD=${WD:-/tmp/rerun}
mkdir -p "$JOB_OUT"
if [ -z "${REF_RUN:-}" ]; then
  TWIN=/tmp/rerun_twin; rm -rf "$TWIN"
  export XLA_PYTHON_CLIENT_MEM_FRACTION=${RERUN_MEM_FRACTION:-0.08}
  (cd /tmp && python3 -m mixtral_jax.study --workdir="$TWIN" --variants="$VARIANT" --seeds="$SEED" \
     --jobs=1 --nosummarize ${STEPS:+--steps=$STEPS} ${MODIFIERS:+--modifiers=$MODIFIERS} > "$JOB_OUT/twin_log.txt" 2>&1) &
  REF_RUN=$TWIN/$VARIANT/seed$SEED/run.json; REF_METRICS=$TWIN/$VARIANT/seed$SEED/metrics.jsonl
fi
export XLA_PYTHON_CLIENT_MEM_FRACTION=${RERUN_MEM_FRACTION:-0.1}  # leaves the GPU to jobs alongside
rm -rf "$WD"; mkdir -p "$JOB_OUT"
cd /tmp
start=$(date +%s)
python3 -m mixtral_jax.study --workdir="$WD" --variants="$VARIANT" --seeds="$SEED" --jobs=1 \
  --nosummarize ${STEPS:+--steps=$STEPS} ${MODIFIERS:+--modifiers=$MODIFIERS} > "$JOB_OUT/rerun_log.txt" 2>&1
echo "rerun rc=$? in $(( $(date +%s) - start )) s"
wait
RUN="$WD/$VARIANT/seed$SEED" REF_RUN="$REF_RUN" REF_METRICS="${REF_METRICS:-}" python3 - <<'PYEOF'
import json, os
run_dir = os.environ["RUN"]
new, ref = json.load(open(os.path.join(run_dir, "run.json"))), json.load(open(os.environ["REF_RUN"]))
diffs, n = [], 0
for key in ("accuracy", "token_accuracy"):
  for task, by_len in ref[key].items():
    for length, v in by_len.items():
      n += 1
      if new[key][task][length] != v:
        diffs.append((key, task, length, v, new[key][task][length]))
print(f"evaluated numbers: {n - len(diffs)} of {n} identical")
for d in diffs[:20]:
  print("  differs:", d)
if os.environ.get("REF_METRICS"):
  read = lambda p: [json.loads(l) for l in open(p) if l.strip()]
  a, b = read(os.environ["REF_METRICS"]), read(os.path.join(run_dir, "metrics.jsonl"))
  skip = {"time", "second", "mfu", "memory"}  # timings and peak memory are not results
  same = worst = 0
  rows = min(len(a), len(b))
  for x, y in zip(a, b):
    keys = [k for k in x if k in y and isinstance(x[k], (int, float)) and not any(s in k for s in skip)]
    if all(x[k] == y[k] for k in keys):
      same += 1
    else:
      worst = max([worst] + [abs(x[k] - y[k]) for k in keys])
  print(f"training metric rows: {same} of {rows} identical (of {len(a)} / {len(b)} logged); "
        f"largest difference {worst:g}")
PYEOF
tail -c 1500 "$JOB_OUT/rerun_log.txt" > "$JOB_OUT/rerun_log_tail.txt"; rm -f "$JOB_OUT/rerun_log.txt" "$JOB_OUT/twin_log.txt"
