"""Shared by the attention tests (test_kernels, test_attention_impl): one set of inputs that covers
grouped-query heads, packed rows and padded rows, and a tolerance check over pytrees."""

import jax
import jax.numpy as jnp
import numpy as np

from labor_jax import model


def close(a, b, atol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), atol=atol, rtol=atol)


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
