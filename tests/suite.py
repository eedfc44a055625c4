"""The suite's own set-up, apart from tests/conftest.py so that tests/test_suite_setup.py can check it: the XLA flags
every process of the run gets, and when the ``devices`` marker skips a test."""

# Eight fake CPU devices, for the mesh tests (a subprocess sets its own count: tests.runs.cpu_env).
DEVICE_COUNT = "--xla_force_host_platform_device_count"
DEVICE_FLAGS = {DEVICE_COUNT: "8"}
# Unoptimised XLA:CPU code generation, and XLA's loop emitters for fusions in place of its newer MLIR fusion
# emitters: the suite's models are tiny, so compiling, not running, is most of its time. The first takes about a
# third off the suite's CPU time, the second about a fifth more (docs/benchmarks.md). Numerical bounds come from
# float32 arithmetic (tests/numerics.py), which neither flag changes: they allow any order of the sums. Both are
# CPU compile-time choices: set XLA_DEFAULTS_ENV=1 to leave them out (scripts/gpu_check.sh does on an accelerator,
# whose tests compile as users do and whose jax may not know a flag of this one's).
COMPILE_FLAGS = {"--xla_backend_optimization_level": "0", "--xla_cpu_use_fusion_emitters": "false"}
XLA_DEFAULTS_ENV = "LABOR_JAX_TESTS_XLA_DEFAULTS"


def flag_names(flags: str) -> set[str]:
  """The flags named in an ``XLA_FLAGS`` string (``--name=value`` or a bare ``--name``)."""
  return {f.partition("=")[0] for f in flags.split()}


def without(flags: str, names) -> list[str]:
  """The flags of an ``XLA_FLAGS`` string but those named in ``names``."""
  return [f for f in flags.split() if f.partition("=")[0] not in names]


def xla_flags(flags: str, compile_flags: bool = True) -> str:
  """``flags`` (a caller's ``XLA_FLAGS``) with the suite's flags that it does not set: a caller's own value wins."""
  given = flag_names(flags)
  wanted = DEVICE_FLAGS | (COMPILE_FLAGS if compile_flags else {})
  return " ".join([*flags.split(), *(f"{k}={v}" for k, v in wanted.items() if k not in given)])


def devices_skip(needed: int, backend: str, count: int) -> str | None:
  """Why a test marked ``@pytest.mark.devices(needed)`` is skipped on ``count`` devices of ``backend``, or None:
  only an accelerator with fewer devices skips it. On the CPU the suite's 8 fake devices are always there, so fewer
  is a fault in the set-up and the test runs (and fails)."""
  if backend != "cpu" and count < needed:
    return f"needs {needed} devices; this {backend} backend has {count}"
  return None
