"""Training library: `train(config, workdir)`; optimizer, checkpoints and metrics beside it."""
from mixtral_jax.trainer.trainer import train

__all__ = ["train"]
