"""Shared by the attention tests (test_kernels, test_attention_impl): one set of inputs that covers
grouped-query heads, packed rows and padded rows, and a float32 tolerance check over pytrees."""

import jax
import jax.numpy as jnp
import numpy as np

from labor_jax import model
from tests import numerics


def close(a, b, *, terms, layers=1, floor=1.0):
  """Every leaf of ``a`` within :func:`tests.numerics.assert_close`'s float32 bound of ``b``'s (sums of
  ``terms`` terms through ``layers`` layers, relative to that leaf's magnitude, ``floor`` at least)."""
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for i, (x, y) in enumerate(zip(leaves_a, leaves_b)):
    numerics.assert_close(x, y, terms=terms, layers=layers, floor=floor, what=f"leaf {i}")


def attention_inputs(b=2, t=16, h=4, k=2, e=8, prefix=0, seed=0):
  """(q, k, v, mask, do): GQA (4 query heads on 2 key/value heads by default); row 0 packs two
  segments, row 1 ends in padding (segment 0: fully masked query rows); ``prefix`` cached keys
  visible to every query; the pass's ``attention.Mask``; an output cotangent for gradients."""
  r = np.random.RandomState(seed)
  q = jnp.asarray(r.randn(b, t, h, e), jnp.float32)
  kk = jnp.asarray(r.randn(b, prefix + t, k, e), jnp.float32)
  v = jnp.asarray(r.randn(b, prefix + t, k, e), jnp.float32)
  seg = np.ones((b, t), np.int32)
  seg[0, t // 2:] = 2
  seg[1, -3:] = 0
  if prefix:
    mask = model._pass_mask(jnp.asarray(seg > 0), jnp.ones((b, prefix)))
  else:
    mask = model._pass_mask(jnp.asarray(seg > 0), None, jnp.asarray(seg))
  do = jnp.asarray(r.randn(b, t, h, e), jnp.float32)
  return q, kk, v, mask, do
