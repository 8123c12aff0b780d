#!/bin/bash
# Issue 10 MSA on one GPU (H200), ~110 s: kernel correctness vs the XLA reference (bf16 2e-2: block
# scores, selection, out, dq/dk/dv), prefill rows vs cuDNN dense causal at 32K and 128K (fwd and
# fwd+bwd), then a small MSA model trained at 32K tokens through mixtral_jax.train.
#   cd /tmp && REPO=<repo> JOB_OUT=<dir> timeout 110 bash $REPO/benchmarks/gpu_msa.sh
# Steps are capped by `timeout` so one hang cannot eat the rest; rows print as they finish.
set -u
: "${REPO:?set REPO}" "${JOB_OUT:?set JOB_OUT}"
mkdir -p "$JOB_OUT"
cd /tmp
PY=${PY:-python3}
PREFILL_S=${PREFILL_S:-58}
TRAIN_S=${TRAIN_S:-45}
TRAIN_STEPS=${TRAIN_STEPS:-20}

echo "== prefill (check at T=2048 first) =="
timeout "$PREFILL_S" $PY "$REPO/benchmarks/prefill.py" --seqs 32768,131072 --long-seqs '' \
  --xla-seqs '' --reps 2 --check-seq 2048 --out "$JOB_OUT" ${PREFILL_ARGS:-}
echo "prefill exit $?"

echo "== train: experiments/msa_32k.py, $TRAIN_STEPS steps at 32K tokens =="
rm -rf /tmp/msa32k_run
timeout "$TRAIN_S" $PY -m mixtral_jax.train --config="$REPO/experiments/msa_32k.py" \
  --workdir=/tmp/msa32k_run --noprogress --config.train.steps="$TRAIN_STEPS" \
  --config.train.log_every=2 ${TRAIN_ARGS:-}
echo "train exit $?"
cp /tmp/msa32k_run/metrics.jsonl "$JOB_OUT/train_metrics.jsonl" 2>/dev/null

echo "== summary =="
cat "$JOB_OUT/prefill.md" 2>/dev/null || echo "(no prefill table)"
$PY - "$JOB_OUT/train_metrics.jsonl" <<'PYEOF'
import json, sys
try:
  rows = [json.loads(l) for l in open(sys.argv[1])]
except OSError:
  sys.exit(print("(no train metrics)"))
print("\n| step | loss | lm_loss | msa_kl | tokens/s | peak GiB |\n|---|---|---|---|---|---|")
for r in rows:
  f = lambda k: f"{r[k]:.4g}" if isinstance(r.get(k), (int, float)) else "-"
  print(f"| {r['step']} | {f('loss')} | {f('lm_loss')} | {f('aux_loss/msa_kl')} | "
        f"{f('tokens_per_second')} | {f('memory/peak_gib')} |")
PYEOF
