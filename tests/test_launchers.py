"""Launch: the TPU-pod and SLURM launchers (with fake gcloud / srun / sbatch on PATH) and the
multi-host start-up decision (distributed.plan) under faked environments."""

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from labor_jax import distributed
from labor_jax.config import ConfigError
from labor_jax.training.config import DistributedConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "my configs/run 1.yaml"  # a space
SETS = ["--set", "model.hf_path=/models/$USER/llama-2", "--set", "run_dir=runs/it's here"]  # $, quote, space
TRAIN_ARGV = ["-m", "labor_jax.train", "--config", CONFIG, *SETS]


def _recorder(path: Path, log: Path):
  """An executable that appends its argv (NUL-separated, one record per line) to ``log``."""
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(f'#!/usr/bin/env bash\nprintf "%s\\0" "$@" >> "{log}"\necho >> "{log}"\n')
  path.chmod(0o755)


def _records(log: Path):
  text = log.read_text() if log.exists() else ""
  return [record.split("\0") for record in text.split("\0\n") if record]


@pytest.fixture
def fake(tmp_path):
  bin_dir, log = tmp_path / "bin", tmp_path / "argv.log"
  for tool in ("gcloud", "srun"):
    _recorder(bin_dir / tool, log)
  # sbatch: runs the batch script at once, with the variables SLURM sets for --nodes / --gpus-per-node.
  (bin_dir / "sbatch").write_text("""#!/usr/bin/env bash
while [[ $1 == --* ]]; do
  case $1 in --nodes=*) export SLURM_JOB_NUM_NODES=${1#*=};; --gpus-per-node=*) export SLURM_GPUS_PER_NODE=${1#*=};; esac
  shift
done
exec bash "$@"
""")
  (bin_dir / "sbatch").chmod(0o755)
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TPU_"))}
  env.update(PATH=f"{bin_dir}:{env['PATH']}", USER="someone")
  return env, log


def _run(args, env, **kw):
  return subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, **kw)


# ------------------------------------------------------------------ TPU pod
def test_tpu_pod_launcher_quotes_every_argument(fake, tmp_path):
  env, log = fake
  repo = tmp_path / "the repo"  # the hosts' checkout, with a space in its path
  _recorder(repo / ".venv" / "bin" / "python", tmp_path / "python.log")
  env.update(TPU_NAME="my-v4-32", ZONE="us-central2-b", REPO_DIR=str(repo))
  out = _run(["bash", "scripts/launch_tpu_pod.sh", CONFIG, *SETS], env)
  assert out.returncode == 0, out.stderr
  [argv] = _records(log)
  assert argv[:8] == ["compute", "tpus", "tpu-vm", "ssh", "my-v4-32", "--zone", "us-central2-b", "--worker=all"]
  assert argv[8] == "--command"
  # What each host's shell makes of --command: the training argv, unchanged.
  run = subprocess.run(["bash", "-c", argv[9]], env=env, cwd=tmp_path, capture_output=True, text=True)
  assert run.returncode == 0, run.stderr
  assert _records(tmp_path / "python.log") == [TRAIN_ARGV]


def test_tpu_pod_dry_run_prints_the_exact_command(fake):
  env, log = fake
  env.update(TPU_NAME="my-v4-32", ZONE="us-central2-b", REPO_DIR="/srv/labor jax", PROJECT="p-1")
  dry = _run(["bash", "scripts/launch_tpu_pod.sh", "--dry-run", CONFIG, *SETS], env)
  assert dry.returncode == 0, dry.stderr
  assert not log.exists(), "--dry-run ran gcloud"
  [line] = dry.stdout.splitlines()
  assert shlex.split(line)[:2] == ["gcloud", "compute"]
  subprocess.run(["bash", "-c", line], env=env, check=True)  # pasting the printed line ...
  _run(["bash", "scripts/launch_tpu_pod.sh", CONFIG, *SETS], env, check=True)  # ... equals running the launcher
  pasted, launched = _records(log)
  assert pasted == launched and "--project" in launched


def test_tpu_pod_launcher_needs_its_settings(fake):
  env, _ = fake
  out = _run(["bash", "scripts/launch_tpu_pod.sh", CONFIG], env)
  assert out.returncode != 0 and "TPU_NAME" in out.stderr


# ------------------------------------------------------------------ SLURM
@pytest.mark.parametrize("gpu_env, gpus", [({"SLURM_GPUS_ON_NODE": "4"}, "4"),
                                          ({"SLURM_GPUS_PER_NODE": "h100:8"}, "8")])
def test_slurm_launcher_reads_gpus_per_node_and_quotes(fake, gpu_env, gpus):
  env, log = fake
  env.update(SLURM_JOB_NUM_NODES="2", **gpu_env)
  out = _run(["bash", "scripts/launch_slurm.sbatch", CONFIG, *SETS], env)
  assert out.returncode == 0, out.stderr
  [argv] = _records(log)
  assert argv == ["--kill-on-bad-exit=1", "--nodes=2", "--ntasks-per-node=1", f"--gpus-per-node={gpus}",
                  ".venv/bin/python", *TRAIN_ARGV]
  assert f"2 node(s) x {gpus} GPU(s) = {2 * int(gpus)} devices" in out.stderr


def test_slurm_dry_run_and_sbatch(fake):
  env, log = fake
  dry = _run(["sbatch", "--nodes=2", "--gpus-per-node=8", "scripts/launch_slurm.sbatch", "--dry-run", CONFIG, *SETS],
             env)
  assert dry.returncode == 0, dry.stderr
  assert not log.exists(), "--dry-run ran srun"
  [line] = dry.stdout.splitlines()
  subprocess.run(["bash", "-c", line], env=env, check=True)
  [argv] = _records(log)
  assert argv[:4] == ["--kill-on-bad-exit=1", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8"]
  assert argv[5:] == TRAIN_ARGV
  assert "--gpus-per-node" not in (ROOT / "scripts/launch_slurm.sbatch").read_text().split("#SBATCH", 1)[1].split(
      "set -euo")[0], "GPUs per node are hard-coded in the #SBATCH header"


def test_slurm_launcher_without_gpus_says_so(fake):
  env, log = fake
  out = _run(["bash", "scripts/launch_slurm.sbatch", CONFIG], env)
  assert out.returncode == 2 and "sbatch --gpus-per-node=N" in out.stderr
  assert not log.exists()


# ------------------------------------------------------------------ jax.distributed.initialize
@pytest.fixture
def no_tpu(monkeypatch):
  monkeypatch.setattr(distributed, "_jax_found_cloud_tpu", lambda: False)


def test_plan_on_a_tpu_vm_calls_initialize_without_arguments(monkeypatch):
  auto = DistributedConfig()
  # A plain Cloud TPU VM sets no TPU_* variables: JAX found the TPU on the PCI bus at import.
  monkeypatch.setattr(distributed, "_jax_found_cloud_tpu", lambda: True)
  assert distributed.plan(auto, {}) == {}
  assert distributed.plan(auto, {"JAX_PLATFORMS": "cpu"}) is None  # told not to use the TPU
  assert distributed.plan(DistributedConfig(initialize=False), {}) is None


def test_plan_from_the_environment(no_tpu):
  auto = DistributedConfig()
  assert distributed.plan(auto, {}) is None  # one CPU/GPU process
  assert distributed.plan(auto, {"SLURM_NTASKS": "1"}) is None
  assert distributed.plan(auto, {"SLURM_NTASKS": "4"}) == {}
  assert distributed.plan(auto, {"TPU_WORKER_HOSTNAMES": "t-0,t-1", "TPU_WORKER_ID": "1"}) == {}  # GKE
  assert distributed.plan(auto, {"TPU_ACCELERATOR_TYPE": "v5litepod-16"}) == {}
  assert distributed.plan(DistributedConfig(initialize=True), {}) == {}
  coord = DistributedConfig(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1)
  assert distributed.plan(coord, {}) == dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1)
  # given without a coordinator they were ignored in silence; a process outside the count hung the others
  with pytest.raises(ConfigError, match="num_processes given without a coordinator address"):
    distributed.plan(DistributedConfig(num_processes=3), {"SLURM_NTASKS": "4"})
  with pytest.raises(ConfigError, match=r"process_id 2 is not one of the 2 processes \(0 to 1\)"):
    distributed.plan(DistributedConfig(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=2), {})


def test_initialize_calls_jax_with_the_plan(monkeypatch):
  calls = []
  monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(distributed, "_jax_found_cloud_tpu", lambda: True)
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  distributed.initialize(DistributedConfig())
  monkeypatch.setattr(distributed, "_jax_found_cloud_tpu", lambda: False)
  for k in distributed.TPU_ENV + ("SLURM_NTASKS",):
    monkeypatch.delenv(k, raising=False)
  distributed.initialize(DistributedConfig())
  assert calls == [{}]
