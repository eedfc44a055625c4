"""The suite's own set-up (tests/suite.py, used by tests/conftest.py and tests.runs.cpu_env): its XLA flags merged
under a caller's, in this process and in subprocesses, and the ``devices`` marker, whose skip only an accelerator
with fewer devices takes."""

import os

import jax
import pytest

from tests import suite
from tests.runs import cpu_env


def test_a_callers_flags_are_kept_and_win():
  merged = suite.xla_flags("--xla_cpu_max_isa=AVX2 --xla_backend_optimization_level=2").split()
  assert merged[:2] == ["--xla_cpu_max_isa=AVX2", "--xla_backend_optimization_level=2"]
  assert "--xla_backend_optimization_level=0" not in merged  # the caller's level, not the suite's
  assert "--xla_force_host_platform_device_count=8" in merged and "--xla_cpu_use_fusion_emitters=false" in merged
  assert suite.xla_flags("").split() == [f"{k}={v}" for k, v in (suite.DEVICE_FLAGS | suite.COMPILE_FLAGS).items()]
  # a bare boolean flag counts as set; XLA's defaults asked for: the device count only
  assert suite.xla_flags("--xla_cpu_use_fusion_emitters").split() == [
      "--xla_cpu_use_fusion_emitters", "--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0"]
  assert suite.xla_flags("", compile_flags=False) == "--xla_force_host_platform_device_count=8"


def test_this_process_and_its_subprocesses_have_the_suite_flags():
  given = suite.flag_names(os.environ["XLA_FLAGS"])
  defaults = os.environ.get(suite.XLA_DEFAULTS_ENV) == "1"
  wanted = set(suite.DEVICE_FLAGS) | (set() if defaults else set(suite.COMPILE_FLAGS))
  assert wanted <= given, os.environ["XLA_FLAGS"]
  if jax.default_backend() == "cpu":
    assert jax.device_count() == 8
  # a subprocess: its own device count; optimised, without the compile flags (any other flag kept)
  sub = cpu_env(2)["XLA_FLAGS"].split()
  assert sub.count("--xla_force_host_platform_device_count=2") == 1 and not any(f.endswith("count=8") for f in sub)
  assert suite.flag_names(cpu_env(1, optimize=True)["XLA_FLAGS"]).isdisjoint(suite.COMPILE_FLAGS)
  assert given - set(suite.COMPILE_FLAGS) <= suite.flag_names(cpu_env(1, optimize=True)["XLA_FLAGS"])


def _runs(needed, backend, count):
  """The marker's decision through the conftest hook's own helper: True when the test runs."""
  return suite.devices_skip(needed, backend, count) is None


def test_devices_marker_skips_only_an_accelerator_with_fewer_devices():
  assert suite.devices_skip(8, "gpu", 1) == "needs 8 devices; this gpu backend has 1"
  assert not _runs(4, "tpu", 2)
  assert _runs(1, "gpu", 1) and _runs(8, "gpu", 8)  # enough devices
  assert _runs(8, "cpu", 1)  # the CPU never skips: fewer devices there is a set-up fault, and the test fails


@pytest.mark.devices(8)
def test_a_marked_test_runs_on_this_machines_devices():
  """The conftest hook on a marked test: it runs here (a fault in the hook fails it; whether to skip is
  :func:`tests.suite.devices_skip`'s, checked above)."""
  assert jax.default_backend() != "cpu" or jax.device_count() >= 8
