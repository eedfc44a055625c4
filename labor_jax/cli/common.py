"""What the command lines share: the training commands' exit codes (train, main, experiments), and
the inference commands' flags (evaluate, predict, forecast, export): the checkpoint step, the device
mesh, batching and multi-process start-up, parsed into library arguments."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

import numpy as np

from data_pipeline.errors import PanelError
from data_pipeline.gguf_tokenizer import GGUFError
from labor_jax import checkpoint as ckpt_lib
from labor_jax import distributed, inference, sharding
from labor_jax.training import hooks
from labor_jax.config import ConfigError
from labor_jax.interop import hf
from labor_jax.training.config import DistributedConfig

EXIT_CONFIG, EXIT_NAN, EXIT_WRITE = 2, 3, 4
# What a bad model source, dataset, mesh or input file raises: one line on stderr and exit 2.
INPUT_ERRORS = (FileNotFoundError, ConfigError, sharding.ShardingError, hf.CheckpointError, PanelError, GGUFError)


def run_training(fn: Callable[[], object]) -> int:
  """Calls ``fn``: exit 0, or a bad config's one line and 2, or a non-finite loss's one line and 3, or a
  checkpoint that could not be written (full disk) one line and 4."""
  try:
    fn()
  except (ConfigError, GGUFError, hf.CheckpointError) as e:  # GGUF / HF sources named by model.hf_path
    print(f"config error: {e}", file=sys.stderr)
    return EXIT_CONFIG
  except hooks.NonFiniteLoss as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_NAN
  except ckpt_lib.CheckpointWriteError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return EXIT_WRITE
  return 0


def add_mesh_flags(ap: argparse.ArgumentParser, batch: bool = True) -> None:
  """--mesh, --chunk, the multi-process flags and --no-progress; --batch-workers when ``batch``."""
  g = ap.add_argument_group("devices")
  g.add_argument("--mesh", help="device mesh, e.g. data=8 or fsdp=4,tensor=2 (default: every device on data when "
                                "the parameters take at most a quarter of one device, otherwise on fsdp)")
  if batch:
    g.add_argument("--batch-workers", type=int, default=16,
                   help="workers scored per batch, all processes together (a multiple of the mesh's data x fsdp)")
  g.add_argument("--chunk", type=int, help="workers per tree pass of the scorer (bounds memory; default: the whole "
                                            "batch under 1B parameters, else one worker per batch device)")
  g.add_argument("--coordinator-address", help="host:port of process 0, for several processes without SLURM "
                                               "or a TPU pod (those are detected)")
  g.add_argument("--num-processes", type=int, help="processes in all (with --coordinator-address)")
  g.add_argument("--process-id", type=int, help="this process (with --coordinator-address)")
  g.add_argument("--no-progress", action="store_true", help="no progress bar")


def start(args: argparse.Namespace) -> None:
  """``jax.distributed.initialize`` when several processes are configured or detected."""
  distributed.initialize(DistributedConfig(
      initialize="auto", coordinator_address=args.coordinator_address, num_processes=args.num_processes,
      process_id=args.process_id))


def mesh(args: argparse.Namespace, source) -> "sharding.Mesh":
  """The mesh of ``--mesh``, or the default for the size of the model ``source`` (read without its weights)."""
  config = inference.model_config(source)
  return sharding.scoring_mesh(args.mesh, config.num_params() * np.dtype(config.jnp_param_dtype).itemsize)


def add_step_flag(ap: argparse.ArgumentParser) -> None:
  ap.add_argument("--step", default="best", help="a run's checkpoint: 'best' (lowest value of the run's eval_metric), "
                                                 "'last' (also 'latest') or a step number")


def step(args: argparse.Namespace) -> int | str:
  """``--step`` as :func:`labor_jax.inference.open_model` takes it."""
  return int(args.step) if str(args.step).isdigit() else args.step
