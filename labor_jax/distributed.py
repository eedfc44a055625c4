"""Multi-process start-up: ``jax.distributed.initialize`` when configured or detected.

Every command that can span hosts (training, evaluation, prediction) calls
:func:`initialize` once, before it builds a mesh. :func:`plan` is the decision alone.
"""

from __future__ import annotations

import os
from typing import Mapping

import jax

from labor_jax.config import ConfigError
from labor_jax.training.config import DistributedConfig

# Set by GKE on TPU pods (JAX's GkeTpuCluster reads the first two). Plain Cloud TPU VMs set none
# of them: JAX finds those by the TPU on the PCI bus, see on_cloud_tpu.
TPU_ENV = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "TPU_ACCELERATOR_TYPE", "TPU_WORKER_ID")


def _jax_found_cloud_tpu() -> bool:
  """JAX's own test, run when ``jax`` is imported (jax/_src/cloud_tpu_init.py): a Google TPU on the
  PCI bus and libtpu installed. Its cluster classes (GceTpuCluster, GkeTpuCluster) then read the
  pod's workers from the VM metadata or GKE's variables."""
  try:
    from jax._src import cloud_tpu_init
  except ImportError:  # a future JAX without the private module: fall back to the variables
    return False
  return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def on_cloud_tpu(environ: Mapping[str, str] | None = None) -> bool:
  """Whether this process runs on a Cloud TPU VM or a GKE TPU node (and may use its TPU)."""
  environ = os.environ if environ is None else environ
  platforms = environ.get("JAX_PLATFORMS", "")
  if platforms and "tpu" not in platforms.split(","):
    return False
  return _jax_found_cloud_tpu() or any(environ.get(k) for k in TPU_ENV)


def plan(cfg: DistributedConfig, environ: Mapping[str, str] | None = None) -> dict | None:
  """The keyword arguments :func:`initialize` passes to ``jax.distributed.initialize``, or None
  when it does not call it.

  * ``initialize: false``: None.
  * a coordinator configured (``coordinator_address``...): those three arguments.
  * ``initialize: true``, or ``"auto"`` under SLURM with several tasks or on a Cloud TPU VM /
    GKE TPU node: no arguments; JAX reads the topology (SLURM's variables, the TPU metadata).
  """
  environ = os.environ if environ is None else environ
  given = [k for k in ("num_processes", "process_id") if getattr(cfg, k) is not None]
  if given and not cfg.coordinator_address:  # they would be ignored
    raise ConfigError(f"{' and '.join(given)} given without a coordinator address (--coordinator-address, "
                      "distributed.coordinator_address); under SLURM and on TPU pods JAX reads them itself")
  if cfg.num_processes is not None and cfg.process_id is not None and not 0 <= cfg.process_id < cfg.num_processes:
    raise ConfigError(f"process_id {cfg.process_id} is not one of the {cfg.num_processes} processes (0 to "
                      f"{cfg.num_processes - 1})")
  if cfg.initialize is False:
    return None
  if cfg.coordinator_address:
    return dict(coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes,
                process_id=cfg.process_id)
  if cfg.initialize is True:
    return {}
  slurm = int(environ.get("SLURM_NTASKS", "1") or 1) > 1
  return {} if slurm or on_cloud_tpu(environ) else None


def initialize(cfg: DistributedConfig) -> None:
  """Calls ``jax.distributed.initialize`` as :func:`plan` says.

  On the CPU (``JAX_PLATFORMS=cpu``) collectives go through gloo, so two local processes
  stand in for two hosts in tests."""
  kwargs = plan(cfg)
  if kwargs is None:
    return
  if os.environ.get("JAX_PLATFORMS", "") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)
