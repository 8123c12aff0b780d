"""Eight fake CPU devices, set before jax is imported anywhere in the test session."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")  # quiets libtpu's start-up if installed

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
