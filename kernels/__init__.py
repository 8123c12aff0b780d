"""Pallas kernels for mixtral_jax (installed as mixtral_jax.kernels)."""
from .block_sparse_attention import *  # noqa: F401,F403
from .block_sparse_attention import __all__  # noqa: F401
