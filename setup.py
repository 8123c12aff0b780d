"""mixtral_jax: sparse Mixture-of-Experts language models and their attention in JAX."""
import setuptools

setuptools.setup(
    name="mixtral_jax",
    version="0.1.0",
    description="Flax NNX Mixture-of-Experts LMs (Mixtral, MiniMax M2/M3) with Pallas block-sparse attention",
    python_requires=">=3.11",
    packages=(
        setuptools.find_packages(include=["mixtral_jax", "mixtral_jax.*"])
        + ["mixtral_jax.kernels"]
        + ["mixtral_jax.kernels." + p for p in setuptools.find_packages("kernels")]
        + ["mixtral_jax.experiments"]
    ),
    # kernels/ and experiments/ live at the top of the repo but install as mixtral_jax.kernels and
    # mixtral_jax.experiments: a top-level package named `kernels` would collide with an existing
    # PyPI package, and experiment files import each other (the M2 variants build on M2).
    package_dir={"mixtral_jax.kernels": "kernels", "mixtral_jax.experiments": "experiments"},
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12",
        "optax",
        "orbax-checkpoint",
        "ml-collections",
        "grain",
        "tensorboardX",
        "tqdm",
        "matplotlib",
        "absl-py",
        "numpy",
        "ml_dtypes",  # bfloat16 / float8 numpy dtypes of safetensors files (convert/safetensors_io.py)
    ],
    extras_require={
        "test": [
            "pytest",
            "pytest-xdist",
            "hypothesis",
            "torch==2.13.0",
            "transformers>=5",
            "nbclient",   # tests/test_notebook.py executes notebooks/quickstart.ipynb
            "nbformat",
            "ipykernel",
        ],
        "tpu": ["jax[tpu]"],
    },
)
