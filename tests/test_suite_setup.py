"""tests/conftest.py itself: the suite's XLA flags merged into a caller's, and the ``devices`` marker, whose skip
only an accelerator with fewer devices can take (here with the backend replaced)."""

import os
import types

import jax
import pytest

from tests import conftest


def test_a_callers_flags_are_kept_and_win():
  merged = conftest._with_suite_flags("--xla_cpu_max_isa=AVX2 --xla_backend_optimization_level=2").split()
  assert merged[:2] == ["--xla_cpu_max_isa=AVX2", "--xla_backend_optimization_level=2"]
  assert "--xla_backend_optimization_level=0" not in merged  # the caller's level, not the suite's
  assert "--xla_force_host_platform_device_count=8" in merged and "--xla_cpu_use_fusion_emitters=false" in merged
  assert conftest._with_suite_flags("").split() == [f"{k}={v}" for k, v in conftest.SUITE_XLA_FLAGS.items()]


def test_this_process_has_the_suite_flags_and_eight_devices():
  given = dict(f.split("=", 1) for f in os.environ["XLA_FLAGS"].split())
  assert given.get("--xla_force_host_platform_device_count") == "8"
  if jax.default_backend() == "cpu":
    assert jax.device_count() == 8


def _item(n):
  return types.SimpleNamespace(get_closest_marker=lambda name: pytest.mark.devices(n).mark if name == "devices"
                               else None)


def test_devices_marker_skips_only_an_accelerator_with_fewer_devices(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(jax, "device_count", lambda: 1)
  with pytest.raises(pytest.skip.Exception, match="needs 8 devices; this gpu backend has 1"):
    conftest.pytest_runtest_setup(_item(8))
  conftest.pytest_runtest_setup(_item(1))  # enough devices: runs
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  conftest.pytest_runtest_setup(_item(8))  # the CPU never skips: fewer devices there is a set-up fault
  conftest.pytest_runtest_setup(types.SimpleNamespace(get_closest_marker=lambda name: None))  # no marker
