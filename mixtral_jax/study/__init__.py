"""The multi-hop study (issue 13): sweep the attention variants of experiments/multihop.py.

  python -m mixtral_jax.study --workdir=runs/study --seeds=0,1,2 --jobs=3

Library: `sweep.run_sweep` / `sweep.run_one` (train, evaluate, time decode), `report.build` /
`report.write` (mean and spread over seeds, markdown tables, plots). Kept import-free so that
`python -m mixtral_jax.study --help` does not start jax.
"""
