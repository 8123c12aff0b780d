#!/bin/bash
# benchmarks/multi_gpu.py on the lent GPUs (issue 14). N=1 on one H200: the collectives degenerate
# (one peer); the check forces the expert-parallel path on one device (ragged_all_to_all with one
# peer) against the global path at bf16; the step is the weak-scaling baseline.
# Run by the lead as: REPO=... JOB_OUT=... timeout <secs> bash $REPO/benchmarks/gpu_multigpu.sh
# On an 8-GPU host the whole command is:
#   NCCL_NVLS_ENABLE=0 python $REPO/benchmarks/multi_gpu.py --out $JOB_OUT --n 8
set -u
: "${REPO:?}" "${JOB_OUT:?}"
export NCCL_NVLS_ENABLE=0          # NVLink multicast stays off (device notes)
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
mkdir -p "$JOB_OUT/check" "$JOB_OUT/step"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
# correctness + collectives (small), then the step; each under its own limit.
timeout 9 python3 "$REPO/benchmarks/multi_gpu.py" --out "$JOB_OUT/check" --parts check,collectives \
  --check_layers 1 --check_seq 512 --reps 3
echo "check+collectives rc=$?"
timeout 15 python3 "$REPO/benchmarks/multi_gpu.py" --out "$JOB_OUT/step" --parts step \
  --layers 6 --experts 32 --tokens_per_gpu 8192 --seq 4096 --steps 3
echo "step rc=$?"
echo; cat "$JOB_OUT/check/multi_gpu.md" "$JOB_OUT/step/multi_gpu.md" 2>/dev/null
