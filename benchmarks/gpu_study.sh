#!/bin/bash
# The multi-hop study on the lent GPU (issue 13): `python -m mixtral_jax.study` for VARIANTS x SEEDS
# with JOBS processes sharing the GPU, inside BUDGET seconds. Finished runs of an earlier call can be
# carried in as PREV (a folder of <variant>_seed<s>.json = run.json): the sweep reads them back
# instead of redoing them. Outputs: report.md and study.tar.gz (report.json, the plots, each run's
# run.json and metrics.jsonl, the sweep log and the runs' log tails).
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
# EXTRA_VARIANTS / EXTRA_SEEDS: a second grid run alongside in the same workdir (e.g. more seeds
# of the headline variants); the report then covers every finished run of both.
if [ -n "${EXTRA_VARIANTS:-}" ]; then
  timeout -k 5 "$BUDGET" python3 -m mixtral_jax.study --workdir="$WD" --variants="$EXTRA_VARIANTS" \
    --seeds="${EXTRA_SEEDS:-1,2}" --jobs="${EXTRA_JOBS:-6}" --nosummarize ${STEPS:+--steps=$STEPS} ${MODIFIERS:+--modifiers=$MODIFIERS} \
    > "$JOB_OUT/extra_log.txt" 2>&1 &
fi
timeout -k 5 "$BUDGET" python3 -m mixtral_jax.study --workdir="$WD" --variants="$VARIANTS" \
  --seeds="$SEEDS" --jobs="$JOBS" --nosummarize ${STEPS:+--steps=$STEPS} ${MODIFIERS:+--modifiers=$MODIFIERS} > "$JOB_OUT/sweep_log.txt" 2>&1
rc=$?
wait
echo "study rc=$rc in $(( $(date +%s) - start )) s"
# The report over every finished run in the workdir (a time-limited sweep: those that finished).
WD="$WD" RC=$rc SWEEP_S=$(( $(date +%s) - start )) JOBS_N=$(( JOBS + ${EXTRA_JOBS:-0} )) \
  timeout 90 python3 - <<'PYEOF' || true
import datetime, glob, json, os
from mixtral_jax.study import report as report_lib
wd = os.environ["WD"]
runs = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(wd, "*", "seed*", "run.json")))]
if runs:
  date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  if os.environ["RC"] != "0":
    date += ", partial sweep (time limit)"
  meta = {"date": date, "device": runs[0]["device"],
          "platform": runs[0]["platform"], "jax": runs[0]["jax"], "modifiers": [m for m in os.environ.get("MODIFIERS", "").split(",") if m],
          "seeds": sorted({r["seed"] for r in runs}), "jobs": int(os.environ["JOBS_N"]),
          "sweep_seconds": float(os.environ["SWEEP_S"]),
          "total_run_seconds": round(sum(r["train_seconds"] + r["eval_seconds"] for r in runs), 1)}
  report_lib.write(report_lib.build(runs, meta), wd)
  print(f"summarized {len(runs)} finished runs")
PYEOF
# What comes back is few files (the device tool returns at most a handful): report.md, and
# study.tar.gz with report.json, the plots, each run's run.json and metrics.jsonl, the logs' tails.
PACK=/tmp/study_pack; rm -rf "$PACK"; mkdir -p "$PACK/runs"
for d in "$WD"/*/seed*; do
  [ -d "$d" ] || continue
  v=$(basename "$(dirname "$d")"); s=${d##*seed}
  cp "$d/run.json" "$PACK/runs/${v}_seed$s.json" 2>/dev/null
  cp "$d/metrics.jsonl" "$PACK/runs/${v}_seed$s.metrics.jsonl" 2>/dev/null
done
cp "$WD"/report.json "$WD"/report.md "$WD"/*.png "$PACK/" 2>/dev/null
for f in "$WD"/*.log; do [ -f "$f" ] && tail -c 3000 "$f" > "$PACK/runs/$(basename "$f").tail"; done
mv "$JOB_OUT/sweep_log.txt" "$JOB_OUT"/extra_log.txt "$PACK/" 2>/dev/null
tar czf "$JOB_OUT/study.tar.gz" -C "$PACK" .
cp "$PACK/report.md" "$JOB_OUT/" 2>/dev/null
cat "$JOB_OUT/report.md" 2>/dev/null || tail -40 "$PACK/sweep_log.txt"
