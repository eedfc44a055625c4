"""Shared fixtures. Eight fake CPU devices so sharding tests run on a laptop-sized machine."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def torch():
  torch = pytest.importorskip("torch", reason="parity tests need the [test] extra (torch==2.13.0)")
  torch.set_num_threads(2)
  return torch
