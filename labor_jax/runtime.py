"""Process set-up for the CPU: keep glibc malloc from handing XLA fresh pages every step.

XLA:CPU allocates each executable's temporary buffer (tens to hundreds of MB for a
training step) with ``posix_memalign`` on one of its worker threads and frees it when the
step ends. Under glibc's defaults that buffer is larger than a per-thread arena's heap
(64 MiB) or than the mmap threshold, so every step maps fresh memory and then unmaps it;
the kernel zero-fills each page on first touch: page faults and system time in every step.

:func:`tune_malloc` makes all threads share the main arena (``M_ARENA_MAX=1``) and raises
the mmap and trim thresholds to 1 GiB, so the buffer is reused from the heap (the step times
with and without are in docs/benchmarks.md). The price is that freed memory up to 1 GiB stays
with the process instead of going back to the OS.

It has to run before XLA's thread pools exist (before the first JAX computation), so the
command-line entry points (train, evaluate, predict, the main job, the benchmarks) call it
first thing. ``LABOR_JAX_MALLOC_TUNING=0`` turns it off. It does nothing outside glibc.
The same settings can be given without code as environment variables
(``MALLOC_ARENA_MAX=1 MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824``).

:func:`auto_dtype` is what ``model.dtype: auto`` means: bfloat16 compute on GPUs and TPUs and on
CPUs that run bfloat16 natively (the ``avx512_bf16`` or ``amx_bf16`` flag), float32 elsewhere.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
import sys

# mallopt parameters from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
THRESHOLD = 1 << 30

_done: bool | None = None


def tune_malloc() -> bool:
  """Applies the settings once per process; True when they are in effect."""
  global _done
  if _done is not None:
    return _done
  _done = False
  if os.environ.get("LABOR_JAX_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.gnu_get_libc_version  # glibc only: musl and others have no such tunables
  except (OSError, AttributeError):
    return False
  _done = all(libc.mallopt(param, value) == 1 for param, value in
              ((M_MMAP_THRESHOLD, THRESHOLD), (M_TRIM_THRESHOLD, THRESHOLD), (M_ARENA_MAX, 1)))
  return _done


def cpu_description() -> str:
  """'AMD EPYC, 2 CPUs, AVX-512': the model name lscpu prints, the CPUs this process may use and
  whether they have AVX-512 (Linux); elsewhere the platform's words. Benchmarks and the
  experiments' table name the machine with it."""
  cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  try:
    with open("/proc/cpuinfo") as f:
      info = f.read()
  except OSError:
    return f"{platform.processor() or platform.machine()}, {cpus} CPUs"
  model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
  flags = cpu_flags()
  isa = "AVX-512" if "avx512f" in flags else "AVX2 only" if "avx2" in flags else "no AVX2"
  return f"{model}, {cpus} CPUs, {isa}"


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of CPUs with bfloat16 dot-product instructions


@functools.lru_cache(maxsize=None)
def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
  """The flags of the first CPU in ``path`` (Linux: ``flags`` on x86, ``Features`` on Arm); empty where there is
  no such file."""
  try:
    with open(path) as f:
      for line in f:
        if line.startswith(("flags", "Features")):
          return frozenset(line.split(":", 1)[1].split())
  except OSError:
    pass
  return frozenset()


def auto_dtype(platform: str | None = None, flags: frozenset[str] | None = None) -> tuple[str, str]:
  """(compute dtype, why) for ``model.dtype: auto``: bfloat16 off the CPU (``platform``: a JAX backend
  name or a chip; None: ``jax.default_backend()``), on a CPU with one of :data:`BF16_CPU_FLAGS`
  (``flags``; None: :func:`cpu_flags`) bfloat16 too, else float32 (bfloat16 emulated in float32
  would be slower and no more accurate)."""
  if platform is None:
    import jax
    platform = jax.default_backend()
  if platform != "cpu":
    return "bfloat16", f"on {platform}"
  flags = cpu_flags() if flags is None else flags
  native = [f for f in BF16_CPU_FLAGS if f in flags]
  if native:
    return "bfloat16", f"the CPU has {native[0]}"
  return "float32", f"the CPU has neither {' nor '.join(BF16_CPU_FLAGS)}"
