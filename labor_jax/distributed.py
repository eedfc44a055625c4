"""Multi-process start-up: ``jax.distributed.initialize`` when configured or detected.

Every command that can span hosts (training, evaluation, prediction) calls
:func:`initialize` once, before it builds a mesh.
"""

from __future__ import annotations

import os

import jax

from labor_jax.train_config import DistributedConfig


def initialize(cfg: DistributedConfig) -> None:
  """Calls ``jax.distributed.initialize`` when ``cfg.initialize`` is true, or when it is "auto" and
  a coordinator is configured, SLURM runs several tasks, or a TPU pod names several workers.

  On the CPU (``JAX_PLATFORMS=cpu``) collectives go through gloo, so two local processes
  stand in for two hosts in tests."""
  want = cfg.initialize is True or (cfg.initialize == "auto" and (
      cfg.coordinator_address or "SLURM_NTASKS" in os.environ and int(os.environ["SLURM_NTASKS"]) > 1
      or "TPU_WORKER_HOSTNAMES" in os.environ and "," in os.environ["TPU_WORKER_HOSTNAMES"]))
  if not want:
    return
  if os.environ.get("JAX_PLATFORMS", "") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {}
  if cfg.coordinator_address:
    kwargs = dict(coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes,
                  process_id=cfg.process_id)
  jax.distributed.initialize(**kwargs)
