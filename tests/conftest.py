"""Shared test set-up: 8 fake CPU devices for sharding tests and small HF checkpoints built offline."""

import os

# Must precede the first jax import of the session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from tests.reference import hf_models  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A random-init untied Qwen3 (GQA 3, head_dim != hidden/heads) saved by transformers.

    Returns (directory, torch model). Shared by model, sampler and train-step tests.
    """
    path = str(tmp_path_factory.mktemp("tiny_qwen3"))
    model = hf_models.build_and_save(path, hf_models.TINY)
    return path, model
