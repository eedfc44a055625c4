"""One table from logical axis names to mesh axes, and the checks around it.

The model names every parameter and main activation axis (``("embed", "mlp")``); a
rules table maps each name to a mesh axis of ``("data", "fsdp", "tensor")`` or to
``None`` (replicated). FSDP versus tensor parallelism is an edit of this table.
A name with no rule, two names of one array on the same mesh axis, or a dimension
that the mesh axis does not divide are errors, never a silent replication.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
Rules = Sequence[tuple[str, Any]]

# Default table: parameters are split over fsdp along "embed" and over tensor along the
# head / mlp / vocab axes (Megatron style); the batch is split over data and fsdp.
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
    ("head_dim", None),
    ("lora_rank", None),
    ("layers", None),  # the stacked-layer axis of scan_layers models
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


class ShardingError(ValueError):
  """A logical axis without a rule, a mesh-axis collision, or an indivisible dimension."""


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh over ``devices`` (default: all devices, all processes)."""
  devices = jax.devices() if devices is None else list(devices)
  want = data * fsdp * tensor
  if want != len(devices):
    raise ShardingError(f"mesh data={data} x fsdp={fsdp} x tensor={tensor} = {want} devices, "
                        f"but {len(devices)} are available")
  return Mesh(np.asarray(devices).reshape(data, fsdp, tensor), MESH_AXES)


def logical_to_mesh(spec: Sequence[str | None], rules: Rules = DEFAULT_RULES,
                    what: str = "array") -> PartitionSpec:
  """Maps one tuple of logical names to a mesh PartitionSpec; raises on gaps and collisions."""
  table = dict(rules)
  out, used = [], {}
  for name in spec:
    if name is None:
      out.append(None)
      continue
    if name not in table:
      raise ShardingError(f"{what}: logical axis {name!r} has no sharding rule")
    target = table[name]
    for axis in (target if isinstance(target, tuple) else (target,)):
      if axis is None:
        continue
      if axis in used:
        raise ShardingError(f"{what}: logical axes {used[axis]!r} and {name!r} both map to mesh axis {axis!r}")
      used[axis] = name
    out.append(target)
  return PartitionSpec(*out)


def axis_size(mesh: Mesh, target) -> int:
  """Devices along ``target``: a mesh axis name, a tuple of them, or None (1)."""
  if target is None:
    return 1
  return int(np.prod([mesh.shape[a] for a in (target if isinstance(target, tuple) else (target,))]))


def sharding_for(shape: Sequence[int], logical: Sequence[str | None], mesh: Mesh,
                 rules: Rules = DEFAULT_RULES, what: str = "array") -> NamedSharding:
  """NamedSharding for one array; checks that each sharded dimension divides evenly."""
  spec = logical_to_mesh(logical, rules, what)
  for dim, target in zip(shape, spec):
    size = axis_size(mesh, target)
    if dim % size:
      raise ShardingError(f"{what}: dimension {dim} is not divisible by mesh axes {target!r} of size {size}")
  return NamedSharding(mesh, spec)


def tree_shardings(shapes: Any, logical: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
  """Shardings for a tree of ShapeDtypeStructs given the matching tree of logical specs."""
  def one(path, shape, spec):
    return sharding_for(shape.shape, tuple(spec), mesh, rules, what=jax.tree_util.keystr(path))
  return jax.tree_util.tree_map_with_path(one, shapes, logical,
                                          is_leaf=lambda x: isinstance(x, PartitionSpec))


def parse_mesh(text: str) -> dict[str, int]:
  """``"data=2,fsdp=2,tensor=2"`` -> {"data": 2, "fsdp": 2, "tensor": 2} (missing axes are 1)."""
  out = {a: 1 for a in MESH_AXES}
  for part in filter(None, (p.strip() for p in text.split(","))):
    name, _, value = part.partition("=")
    if name not in MESH_AXES or not value.isdigit() or int(value) < 1:
      raise ShardingError(f"--mesh {text!r}: expected AXIS=N[,AXIS=N...] with AXIS in {MESH_AXES} and N >= 1")
    out[name] = int(value)
  return out


def scoring_mesh(spec: str | None, param_bytes: int, devices=None, device_bytes: int | None = None) -> Mesh:
  """The mesh for inference: ``spec`` ("data=N,fsdp=M,tensor=K") when given; otherwise every device
  on ``data`` when the parameters take at most a quarter of one device's memory (``device_bytes``, by
  default what the runtime reports; unknown on the CPU: assumed to fit), else every device on ``fsdp``.
  A quarter leaves room for the scorer's caches and tree pass (the scoring plans of Llama-2-7B and
  13B that set it are in docs/training.md)."""
  devices = jax.devices() if devices is None else list(devices)
  if spec:
    return make_mesh(**parse_mesh(spec), devices=devices)
  limit = device_bytes or (devices[0].memory_stats() or {}).get("bytes_limit")
  fits = limit is None or param_bytes <= limit / 4
  return make_mesh(data=len(devices), devices=devices) if fits else make_mesh(fsdp=len(devices), devices=devices)


def to_host(x: jax.Array) -> np.ndarray:
  """A global array as one host array on every process (gathered across processes when needed)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def unsharded_params(params: Any, min_size: int = 2 ** 12) -> list[str]:
  """Paths of parameters with at least ``min_size`` elements that are fully replicated."""
  bad = []
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    if x.size >= min_size and x.sharding.is_fully_replicated and len(x.sharding.device_set) > 1:
      bad.append(jax.tree_util.keystr(path))
  return bad
