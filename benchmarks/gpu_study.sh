#!/bin/bash
# The multi-hop study on the lent GPU (issue 13): `python -m mixtral_jax.study` for VARIANTS x SEEDS
# with JOBS processes sharing the GPU, inside BUDGET seconds. Finished runs of an earlier call can be
# carried in as PREV (a folder of <variant>_seed<s>.json = run.json): the sweep reads them back
# instead of redoing them. Outputs (flat, small): report.json/md, the plots, each run's run.json and
# metrics.jsonl, and the sweep log.
#   REPO=<repo> JOB_OUT=<dir> VARIANTS=full,msa SEEDS=0 bash benchmarks/gpu_study.sh
set -u
: "${REPO:?set REPO}" "${JOB_OUT:?set JOB_OUT}"
VARIANTS=${VARIANTS:-full,swa,swa_hybrid,lightning_hybrid,msa,moba}
SEEDS=${SEEDS:-0,1,2}
JOBS=${JOBS:-6}
BUDGET=${BUDGET:-480}
WD=${WD:-/tmp/study}
mkdir -p "$JOB_OUT/runs" "$WD"
if [ -n "${PREV:-}" ]; then
  for f in "$PREV"/*_seed*.json; do
    [ -f "$f" ] || continue
    b=$(basename "$f" .json); v=${b%_seed*}; s=${b##*_seed}
    mkdir -p "$WD/$v/seed$s" && cp "$f" "$WD/$v/seed$s/run.json"
  done
fi
cd /tmp
start=$(date +%s)
timeout -k 5 "$BUDGET" python3 -m mixtral_jax.study --workdir="$WD" --variants="$VARIANTS" \
  --seeds="$SEEDS" --jobs="$JOBS" ${STEPS:+--steps=$STEPS} > "$JOB_OUT/sweep_log.txt" 2>&1
rc=$?
echo "study rc=$rc in $(( $(date +%s) - start )) s"
if [ $rc -ne 0 ]; then  # a time-limited sweep: summarize the runs that finished
  WD="$WD" timeout 60 python3 - <<'PYEOF' || true
import glob, json, os
from mixtral_jax.study import report as report_lib
wd = os.environ["WD"]
runs = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(wd, "*", "seed*", "run.json")))]
if runs:
  meta = {"date": "partial sweep (time limit)", "device": runs[0]["device"],
          "platform": runs[0]["platform"], "jax": runs[0]["jax"], "modifiers": [],
          "seeds": sorted({r["seed"] for r in runs}), "jobs": None, "sweep_seconds": None,
          "total_run_seconds": round(sum(r["train_seconds"] + r["eval_seconds"] for r in runs), 1)}
  report_lib.write(report_lib.build(runs, meta), wd)
  print(f"summarized {len(runs)} finished runs")
PYEOF
fi
for d in "$WD"/*/seed*; do
  [ -d "$d" ] || continue
  v=$(basename "$(dirname "$d")"); s=${d##*seed}
  cp "$d/run.json" "$JOB_OUT/runs/${v}_seed$s.json" 2>/dev/null
  cp "$d/metrics.jsonl" "$JOB_OUT/runs/${v}_seed$s.metrics.jsonl" 2>/dev/null
done
cp "$WD"/report.json "$WD"/report.md "$WD"/*.png "$JOB_OUT/" 2>/dev/null
for f in "$WD"/*.log; do [ -f "$f" ] && tail -c 3000 "$f" > "$JOB_OUT/runs/$(basename "$f").tail"; done
cat "$JOB_OUT/report.md" 2>/dev/null || tail -40 "$JOB_OUT/sweep_log.txt"
