"""hf.save from two processes (2 CPU devices each, gloo): the gathered export equals the source."""

import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.runs import cpu_env, free_port

SCRIPT = r"""
import sys
import jax
from labor_jax import distributed, sharding
from labor_jax.interop import hf
from labor_jax.training.config import DistributedConfig

src, out, port, pid, scan = sys.argv[1:6]
distributed.initialize(DistributedConfig(
    initialize=True, coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=int(pid)))
mesh = sharding.make_mesh(fsdp=2, tensor=2)
config, params = hf.load(src, mesh=mesh, scan_layers=scan == "1")
assert any(not x.is_fully_addressable for x in jax.tree.leaves(params)), "nothing spans both processes"
hf.save(config, params, out, max_shard_size="100KB")
print("saved by process", jax.process_index())
"""


def _tensors(path):
  out = {}
  for f in sorted(path.glob("*.safetensors")):
    out.update(load_file(f))
  return out


@pytest.mark.parametrize("scan", ["0", "1"])
def test_two_process_save_equals_source(tmp_path, scan):
  import jax

  from labor_jax import model
  from labor_jax.interop import hf
  from labor_jax.config import LlamaConfig
  config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
  hf.save(config, model.init_params(config, jax.random.key(3)), tmp_path / "src")
  port = free_port()
  env = cpu_env(2)
  procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(tmp_path / "src"), str(tmp_path / "out"), str(port),
                             str(i), scan], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  results = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, results):
    assert p.returncode == 0, err[-3000:]
  src, out = _tensors(tmp_path / "src"), _tensors(tmp_path / "out")
  assert sorted(src) == sorted(out)
  for name in src:
    np.testing.assert_array_equal(out[name], src[name], err_msg=name)
  assert (tmp_path / "out" / "model.safetensors.index.json").exists()  # 100KB shards: an index
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temporary directory left behind
