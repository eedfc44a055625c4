"""Shared fixtures. Eight fake CPU devices so sharding tests run on a laptop-sized machine."""

import fcntl
import os
import shutil
import tempfile
from pathlib import Path

from tests import numerics, suite  # suite: the XLA flags and devices marker (checked by test_suite_setup.py)

# The suite's XLA flags (tests/suite.py) under the caller's, which are kept and win for a flag they set:
# `XLA_FLAGS=--xla_cpu_max_isa=AVX2 bash scripts/test.sh` runs the suite as on a CPU without AVX-512 (docs/index.md).
# Subprocesses take them through tests.runs.cpu_env, with their own device count.
os.environ["XLA_FLAGS"] = suite.xla_flags(os.environ.get("XLA_FLAGS", ""),
                                          compile_flags=os.environ.get(suite.XLA_DEFAULTS_ENV) != "1")
# Every compiled program goes to the run's compilation cache (pytest_configure), however quick to compile: the
# suite's processes (two workers and the CLIs they start) compile many programs of the same shapes.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def pytest_configure(config):
  """One persistent XLA compilation cache for the whole run, made by the controlling process before the
  pytest-xdist workers start: both workers and every subprocess the tests start (the CLIs, two-process
  runs) inherit it through JAX_COMPILATION_CACHE_DIR, so a program that many tests compile alike (the
  tiny models' steps) compiles once per run. It starts empty, so the suite's timings include filling it,
  and it is removed at the end. A JAX_COMPILATION_CACHE_DIR set by the caller is used as it is."""
  config.addinivalue_line("markers", "devices(n): needs n JAX devices; skipped on an accelerator that has fewer "
                          "(scripts/gpu_check.sh on one GPU), never on the CPU, where the suite makes 8")
  if hasattr(config, "workerinput"):
    return
  if numerics.MARGINS_ENV not in os.environ:  # every process's passed comparisons, for the summary's margins line
    fd, config._labor_jax_margins = tempfile.mkstemp(prefix="labor_jax_tests_margins_", suffix=".jsonl")
    os.close(fd)
    os.environ[numerics.MARGINS_ENV] = config._labor_jax_margins
  if "JAX_COMPILATION_CACHE_DIR" in os.environ:
    return
  config._labor_jax_cache = tempfile.mkdtemp(prefix="labor_jax_tests_jax_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = config._labor_jax_cache


def machine() -> str:
  """This CPU as the docs name machines (:func:`labor_jax.runtime.cpu_description`) and its bfloat16 instructions,
  which change what a bfloat16 product costs, not what the suite's bounds allow."""
  from labor_jax import runtime
  bf16 = [f for f in runtime.BF16_CPU_FLAGS if f in runtime.cpu_flags()]
  return f"{runtime.cpu_description()}, {' '.join(bf16) or 'no bfloat16 instructions'}"


def pytest_terminal_summary(terminalreporter):
  """The machine and the XLA flags under the run's result (also with -q): a failure or a timing in a CI log
  names the CPU it came from; and how near this machine came to the float32 bounds (tests/numerics.py)."""
  terminalreporter.write_line(f"labor_jax: {machine()}; XLA_FLAGS={os.environ['XLA_FLAGS']}")
  margins = os.environ.get(numerics.MARGINS_ENV)
  line = margins and numerics.nearest(margins)
  if line:
    terminalreporter.write_line(line)


def pytest_runtest_setup(item):
  """``@pytest.mark.devices(n)``: skipped where an accelerator backend has fewer than n devices
  (:func:`tests.suite.devices_skip`); on the CPU it always runs."""
  marker = item.get_closest_marker("devices")
  if marker is None:
    return
  import jax
  reason = suite.devices_skip(marker.args[0], jax.default_backend(), jax.device_count())
  if reason:
    pytest.skip(reason)


def pytest_unconfigure(config):
  cache = getattr(config, "_labor_jax_cache", None)
  if cache:
    shutil.rmtree(cache, ignore_errors=True)
  margins = getattr(config, "_labor_jax_margins", None)
  if margins:
    Path(margins).unlink(missing_ok=True)


@pytest.fixture(scope="session")
def torch():
  torch = pytest.importorskip("torch", reason="parity tests need the [test] extra (torch==2.13.0)")
  torch.set_num_threads(2)
  return torch


def _once_per_run(tmp_path_factory, worker_id: str, name: str, make) -> Path:
  """``make(path)`` run once per test run at ``path``, and ``path``: under pytest-xdist the workers share it (the
  first to take the lock builds it, the others wait for it and reuse it), so a session fixture that only tests
  reading it use is built once, not once per worker. Without xdist it is an ordinary session fixture."""
  base = tmp_path_factory.getbasetemp()
  root = base.parent if worker_id != "master" else base  # the run's directory, above the workers' own
  path = root / "shared" / name
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path.parent / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    if not (path.parent / f"{name}.done").exists():
      if path.exists():  # a worker that failed half-way
        shutil.rmtree(path)
      make(path)
      (path.parent / f"{name}.done").touch()
  return path


@pytest.fixture(scope="session")
def nlsy_dataset(tmp_path_factory, worker_id):
  """The embedded NLSY panel built once per test run (small SentencePiece vocabulary). Read only."""
  def make(out):
    from data_pipeline import build
    assert build.main(["--out", str(out), "--vocab-size", "600"]) == 0
  return _once_per_run(tmp_path_factory, worker_id, "nlsy", make)


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory, worker_id, nlsy_dataset):
  """A tiny random Llama as a Hugging Face directory with the NLSY dataset's tokenizer: SmolLM2's stand-in.
  Read only."""
  def make(out):
    import jax

    from data_pipeline.dataset_dir import DatasetDir
    from labor_jax import model
    from labor_jax.config import llama_tiny
    from labor_jax.interop import hf
    data = DatasetDir(nlsy_dataset)
    config = llama_tiny(vocab_size=data.tokenizer().vocab_size)
    hf.save(config, model.init_params(config, jax.random.key(0)), out, tokenizer_dir=data.tokenizer_dir)
  return _once_per_run(tmp_path_factory, worker_id, "tiny_hf", make)


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory, worker_id, nlsy_dataset):
  """A tiny run of 8 steps with checkpoints at 4 and 8, trained once per test run. Read only (tests that
  change it work on a copy)."""
  from tests.runs import run_train

  def make(run_dir):
    code, out, err = run_train(run_dir, nlsy_dataset, "steps=8", "ckpt_every=4", "eval_every=4",
                               "peak_flops_per_chip=1.0e+12")  # an MFU figure on the CPU too
    assert code == 0, err
  return _once_per_run(tmp_path_factory, worker_id, "uninterrupted", make)


# The longest files start first (by their durations in a full run, 2026-12-04), so that under pytest-xdist (scripts/test.sh: two workers, one file each at a
# time) none of them is left running alone at the end.
SLOW_FIRST = ("test_sharded_scoring.py", "test_experiments.py", "test_train.py", "test_forecast.py", "test_bench_gpu.py",
              "test_main_job.py", "test_foundation_job.py",
              "test_evaluate.py", "test_peft.py", "test_untrusted.py", "test_plan.py", "test_kernels.py",
              "test_selection.py", "test_checkpoints.py", "test_scorer.py", "test_train_core.py", "test_epochs.py",
              "test_multihost_save.py", "test_docs_examples.py", "test_full_disk.py", "test_gguf.py", "test_fuzz_panels.py",
              "test_lora.py", "test_model.py")


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(SLOW_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))
