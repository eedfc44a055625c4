"""Helpers for tests that train tiny runs in subprocesses (``python -m labor_jax.train``)."""

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

from tests import suite

TINY = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=2",
        "model.num_attention_heads=2", "model.num_key_value_heads=1", "data.seq_len=64", "batch_size=4",
        "optim.lr=0.003", "optim.warmup_steps=2", "log_every=1", "eval_batches=2", "progress=false"]


def train_args(run_dir, data_dir, *extra):
  out = ["--config", "configs/demo.yaml"]
  for s in TINY + [f"run_dir={run_dir}", f"data.dataset_dir={data_dir}", *extra]:
    out += ["--set", s]
  return out


ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
  """A TCP port on 127.0.0.1 that no one listens on now, for a test's JAX coordinator. It is bound by the coordinator
  only seconds later (after the child imports JAX), so it is drawn below the kernel's ephemeral range, which the
  kernel never hands out to a bind of port 0 (gloo's listeners, another test's sockets) in the meantime."""
  try:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
  except (OSError, ValueError, IndexError):
    low = 0
  rng = random.Random()
  for _ in range(100):
    port = rng.randrange(20000, low) if low > 21000 else 0  # 0: no such range here; the kernel picks one
    with socket.socket() as s:
      try:
        s.bind(("127.0.0.1", port))
      except OSError:
        continue
      return s.getsockname()[1]
  raise OSError("no free TCP port on 127.0.0.1 below the ephemeral range")


def cpu_env(devices: int = 1, optimize: bool = False, **extra) -> dict:
  """The environment of a subprocess of the suite on ``devices`` CPU devices: the suite's XLA flags
  (tests/suite.py: unoptimised code generation, loop emitters) with that device count, and ``extra``. ``optimize``:
  XLA's default code generation (without the suite's compile flags), for the few subprocesses that run long enough
  for it to pay (hundreds of steps)."""
  drop = {suite.DEVICE_COUNT, *(suite.COMPILE_FLAGS if optimize else ())}
  flags = suite.without(os.environ.get("XLA_FLAGS", ""), drop)
  return dict(os.environ, XLA_FLAGS=" ".join([*flags, f"{suite.DEVICE_COUNT}={devices}"]), JAX_PLATFORMS="cpu",
              **extra)


def spawn_train(run_dir, data_dir, *extra, devices=1, sleep=0.0, optimize=False):
  """``python -m labor_jax.train`` in a subprocess; ``sleep`` > 0 paces every step (tests.paced_train);
  ``optimize``: as in :func:`cpu_env`."""
  env = cpu_env(devices, optimize)
  cmd = ["-m", "labor_jax.train"] if not sleep else ["-m", "tests.paced_train", str(sleep)]
  return subprocess.Popen([sys.executable, *cmd, *train_args(run_dir, data_dir, *extra)], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_train(run_dir, data_dir, *extra, **kw):
  p = spawn_train(run_dir, data_dir, *extra, **kw)
  out, err = p.communicate(timeout=300)
  return p.returncode, out, err


def read_metrics(run_dir):
  return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_params(run_dir):
  from labor_jax.checkpoint import restore_params
  return restore_params(run_dir / "checkpoints")


def longest_resume(data_dir, split="test") -> int:
  """Tokens in the longest resume of ``split``: the longest attention sum of scoring it (numerics bounds)."""
  from data_pipeline.dataset_dir import DatasetDir
  src = DatasetDir(data_dir).source(split)
  return max(len(src[i]["tokens"]) for i in range(len(src)))
