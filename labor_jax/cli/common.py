"""What the command lines share: the training commands' exit codes (train, main, experiments), the
inference commands' flags (evaluate, predict, forecast, export): the model source, the checkpoint
step, the device mesh, batching and multi-process start-up, parsed into library arguments; and the
experiments' report (table.md, summary.json)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from data_pipeline.errors import PanelError
from data_pipeline.gguf_tokenizer import GGUFError
from labor_jax import checkpoint as ckpt_lib
from labor_jax import distributed, inference, runtime, sharding
from labor_jax.training import hooks
from labor_jax.config import ConfigError
from labor_jax.interop import hf
from labor_jax.training.config import DistributedConfig

EXIT_CONFIG, EXIT_NAN, EXIT_WRITE = 2, 3, 4
# What a bad model source, dataset, mesh, input file or output path raises: one line on stderr and exit 2 (an
# OSError's line names its file: a missing input, an output under /proc or a read-only mount).
INPUT_ERRORS = (OSError, ConfigError, sharding.ShardingError, hf.CheckpointError, PanelError, GGUFError)


def positive(text: str) -> int:
  """argparse type: an integer >= 1 (a count of workers, devices, years...)."""
  return _int_at_least(text, 1)


def count(text: str) -> int:
  """argparse type: an integer >= 0 (0 meaning none: bootstrap resamples, paths shown)."""
  return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
  try:
    v = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
  if v < low:
    raise argparse.ArgumentTypeError(f"must be {'positive' if low == 1 else f'>= {low}'}, got {v}")
  return v


def run_training(fn: Callable[[], object]) -> int:
  """Calls ``fn``: exit 0, or a bad config's one line and 2, or a non-finite loss's one line and 3, or a
  checkpoint that could not be written (full disk) one line and 4."""
  try:
    fn()
  # GGUF / HF sources named by model.hf_path, and a path in the config that is missing or in the way
  except (ConfigError, GGUFError, hf.CheckpointError, FileNotFoundError, NotADirectoryError, FileExistsError) as e:
    print(f"config error: {e}", file=sys.stderr)
    return EXIT_CONFIG
  except hooks.NonFiniteLoss as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_NAN
  except ckpt_lib.CheckpointWriteError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return EXIT_WRITE
  return 0


def add_model_flags(ap: argparse.ArgumentParser, run_help: str = "run directory of labor_jax.train") -> None:
  """The model to use: ``--run RUN`` or ``--hf DIR|FILE.gguf``, and ``--adapter`` (a PEFT adapter on ``--hf``)."""
  which = ap.add_mutually_exclusive_group(required=True)
  which.add_argument("--run", help=run_help)
  which.add_argument("--hf", help="a Hugging Face checkpoint directory (or a .gguf file) that was never a labor_jax run")
  ap.add_argument("--adapter", help="with --hf: a PEFT LoRA adapter directory applied to it")
  ap.add_argument("--dtype", choices=("float32", "bfloat16", "auto"),
                  help="with --hf: the compute dtype (default float32; auto: bfloat16 where the hardware runs it "
                       "natively, as model.dtype: auto); a run computes in its own model.dtype")


def model_source(args: argparse.Namespace, hf_only: tuple[str, ...] = ("adapter", "dtype")) -> str:
  """``--run`` or ``--hf``; ConfigError when a flag of ``hf_only`` (``--adapter``, ``--dtype``, ...) is given with
  ``--run``."""
  given = [f"--{name}" for name in hf_only if getattr(args, name, None)]
  if given and not args.hf:
    raise ConfigError(f"{' and '.join(given)} apply to --hf models (a run has its own)")
  if args.hf and getattr(args, "step", None) is not None:
    raise ConfigError("--step applies to --run (a run's checkpoints); a --hf model has one set of weights")
  if args.hf and inference.source_kind(args.hf) == inference.RUN:
    raise ConfigError(f"--hf {args.hf} is a labor_jax.train run: use --run (scored at its best checkpoint)")
  return args.run or args.hf


def add_mesh_flags(ap: argparse.ArgumentParser, batch: bool = True) -> None:
  """--mesh, --chunk, the multi-process flags and --no-progress; --batch-workers when ``batch``."""
  g = ap.add_argument_group("devices")
  g.add_argument("--mesh", help="device mesh, e.g. data=8 or fsdp=4,tensor=2 (default: every device on data when "
                                "the parameters take at most a quarter of one device, otherwise on fsdp)")
  if batch:
    g.add_argument("--batch-workers", type=positive, default=16,
                   help="at most this many workers scored per batch, all processes together (a multiple of the "
                        "mesh's data x fsdp; the workers are spread evenly over the fewest batches)")
  g.add_argument("--chunk", type=positive, help="workers per tree pass of the scorer (bounds memory; default: the whole "
                                            "batch under 1B parameters, else one worker per batch device)")
  g.add_argument("--coordinator-address", help="host:port of process 0, for several processes without SLURM "
                                               "or a TPU pod (those are detected)")
  g.add_argument("--num-processes", type=positive, help="processes in all (with --coordinator-address)")
  g.add_argument("--process-id", type=count, help="this process, from 0 (with --coordinator-address)")
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
  ap.add_argument("--step", help="a run's checkpoint: 'best' (the default: lowest value of the run's eval_metric), "
                                 "'last' (also 'latest') or a step number")


def step(args: argparse.Namespace) -> int | str:
  """``--step`` as :func:`labor_jax.inference.open_model` takes it; ConfigError for anything else."""
  if args.step is None:
    return "best"
  if str(args.step).isdigit():
    return int(args.step)
  if args.step not in inference.STEPS:
    raise ConfigError(f"--step {args.step!r}: expected 'best', 'last' (or 'latest') or a step number")
  return args.step


class JobBar:
  """One progress bar with an ETA over a whole job (the main job, ``experiments foundation``) whose pieces of
  work are weighted in ``units`` (estimates of their cost; only the ETA depends on them). It never runs past
  its total, so an estimate too low for one piece costs accuracy, not the bar.

  The unit is one training step of a SmolLM2-sized fine-tune with its share of the run's validations and
  set-up (8.0 minutes for 141 steps: 3.4 s); the other pieces' costs against it come from the main job's parts
  on the 2-core CPU (docs/main_job.md#what-it-costs)."""
  TINY_STEP = 0.03  # a step of the 0.6M tiny LLM: 600 steps and 12 validations in about 66 s
  SCORE = 20.0  # scoring the NLSY test split with the foundation model: about a minute (lower blocks shared)
  SCORE_TINY = 1.0  # the same with the tiny LLM
  BASELINES = 6.0  # fitting and scoring the baselines (the CAREER-style transformer trains)

  def __init__(self, total: float, desc: str):
    from tqdm import tqdm
    # smoothing=0: the ETA from the job's average rate so far. The units already carry each piece's share of its
    # validations and set-up; tqdm's default (a moving average of recent updates) read the step after a
    # 70-second validation as the rate and showed an ETA of 48 minutes for a moment.
    self.bar = tqdm(total=total, unit="step", desc=desc, dynamic_ncols=True, file=sys.stdout, smoothing=0,
                    bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} [{elapsed}<{remaining}]")

  def advance(self, units: float) -> None:
    self.bar.update(max(0.0, min(units, self.bar.total - self.bar.n)))

  def write(self, line: str) -> None:
    self.bar.write(line)

  def close(self) -> None:
    self.advance(self.bar.total)  # the job is done whatever the estimates said
    self.bar.close()

  def hook(self, units: float = 1.0) -> hooks.Hook:
    """A training hook that advances the bar ``units`` per optimizer step."""
    return _StepProgress(self, units)

  def train(self, recipe: str, run_dir: str | Path, data_dir: str | Path, units: float = 1.0, **changes) -> dict:
    """:func:`labor_jax.training.recipes.train` with the bar advancing ``units`` a step; the steps an
    interrupted run already made count as done."""
    from labor_jax.training.recipes import finished_steps, planned_steps, train
    self.advance(min(finished_steps(run_dir), planned_steps(recipe, data_dir, changes)) * units)
    return train(recipe, run_dir, data_dir, hooks=[*hooks.default_hooks(), self.hook(units)], **changes)


def model_name(model: str | Path, hf_dir: Path) -> str:
  """A foundation model's short name for tables: a GGUF file's stem before its quantisation suffix
  (``SmolLM2-135M-Instruct``), else the Hugging Face directory's name (not the conversion cache's hashed one)."""
  return Path(model).stem.split(".")[0] if str(model).endswith(".gguf") else Path(hf_dir).name


def dataset(path: str | Path, build: Callable[[Path], dict], show: bool = True) -> "DatasetDir":
  """The dataset directory ``path``, first built by ``build(path)`` (which returns the summary, printed with
  ``show``) unless a finished one is there (an interrupted job reuses it)."""
  from data_pipeline.dataset_dir import DatasetDir, format_summary
  d = DatasetDir(path)
  if not (d.path / "summary.json").exists():
    info = build(d.path)
    if show:
      print(format_summary(info), flush=True)
  return d.check()


class _StepProgress(hooks.Hook):
  def __init__(self, job: JobBar, units: float):
    self.job, self.units = job, units

  def after_step(self, trainer, info):
    self.job.advance(self.units)


def diff_cell(row: dict, star: bool = False) -> str:
  """A report's log-perplexity difference with its 95% interval, ``+0.012 [-0.003, +0.027]`` (with `` *``
  after it when ``star`` and the interval excludes zero), or ``-`` for a row without a difference."""
  if "log_ppl_diff" not in row:
    return "-"
  ci = row.get("log_ppl_diff_ci")
  cell = f"{row['log_ppl_diff']:+.3f}"
  if ci:
    cell += f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" + (" *" if star and row.get("excludes_zero") else "")
  return cell


def write_report(out: Path, result: dict, lines: list[str], t0: float) -> dict:
  """Stamps ``result`` with the machine, the date and the seconds since ``t0``, writes ``OUT/table.md``
  (``lines`` and that stamp) and ``OUT/summary.json``, each whole or not at all, and prints the table."""
  result.update(machine=runtime.cpu_description(), date=datetime.date.today().isoformat(),
                seconds=time.perf_counter() - t0)
  lines = [*lines, f"Machine: {result['machine']}; {result['date']}; {result['seconds']:.0f} s in all."]
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  for name, text in (("summary.json", json.dumps(result, indent=2) + "\n"), ("table.md", "\n".join(lines) + "\n")):
    tmp = out / f".{name}.tmp"
    tmp.write_text(text)
    os.replace(tmp, out / name)
  print("\n" + "\n".join(lines), flush=True)
  return result
