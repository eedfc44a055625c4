"""Next-token cross-entropy fused with the output projection (the LM head).

``linear_cross_entropy(x_BTD, w_DV, targets_BT, mask_BT)`` is
``sum(mask * softmax_cross_entropy(x @ w, targets))`` without ever holding the
[B, T, V] logits of the whole batch, and with a hand-written backward pass:

* The sequence is cut into chunks of ``chunk`` positions (``lax.scan``). For each chunk
  the forward pass computes the logits, their log-sum-exp, the loss, and at once the
  gradient ``g = (softmax - one_hot) * mask`` (formed with an iota compare, not the
  scatter that autodiff of ``take_along_axis`` produces) and its two products
  ``dx = g @ w.T`` and ``dw += x.T @ g``. Only ``dx`` ([B, T, D]) and ``dw`` ([D, V])
  are kept for the backward pass, so the float32 logits and their gradient never exist
  for the whole batch at once.
* It lowers the peak memory of long rows at a large vocabulary and costs no speed at the
  default chunk; much smaller chunks are slower (the plans and timings are in
  docs/benchmarks.md).

``weight_grad=False`` (a frozen head, as in LoRA) skips the ``dw`` matmul entirely.
Matmuls run in ``dtype`` (the model's compute dtype) with float32 accumulation; the
softmax and the loss are float32.

Shape suffixes: B batch, T positions, C positions per chunk, N = B * C rows, D hidden size,
V vocabulary.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax


CHUNK_ELEMENTS = 2 ** 25  # logits per chunk when ``chunk`` is None: 128 MiB in float32


def _chunk_size(batch: int, length: int, vocab: int, chunk: int | None) -> int:
  """The largest divisor of ``length`` that is at most ``chunk``; by default, at most what
  keeps a chunk's logits within CHUNK_ELEMENTS."""
  if chunk is None:
    chunk = max(1, CHUNK_ELEMENTS // (batch * vocab))
  if chunk >= length:
    return length
  return max(c for c in range(1, chunk + 1) if length % c == 0)


def _chunks(a, c):
  """[B, T, ...] -> [T / c, B, c, ...] (the scan axis first)."""
  b, t = a.shape[:2]
  return jnp.moveaxis(a.reshape(b, t // c, c, *a.shape[2:]), 1, 0)


def _unchunk(a):
  n, b, c = a.shape[:3]
  return jnp.moveaxis(a, 0, 1).reshape(b, n * c, *a.shape[3:])


def _chunk_logits(x_BCD, w_DV, dtype):
  b, c, d = x_BCD.shape  # 2-D matmuls: XLA:CPU runs them faster than with [B, C] leading axes
  return jnp.dot(x_BCD.reshape(b * c, d).astype(dtype), w_DV.astype(dtype),
                 preferred_element_type=jnp.float32).reshape(b, c, -1)


def _chunk_loss(logits_BCV, targets_BC, mask_BC):
  """(masked loss sum, exp(logits - max) [B, C, V], its row sums [B, C]) of one chunk's float32
  logits: the exponentials are taken once, for the loss and its gradient."""
  max_BC = jnp.max(logits_BCV, axis=-1)
  max_BC = jnp.where(jnp.isfinite(max_BC), max_BC, 0.0)
  exp_BCV = jnp.exp(logits_BCV - max_BC[..., None])
  sum_BC = jnp.sum(exp_BCV, axis=-1)
  lse_BC = max_BC + jnp.log(sum_BC)
  target_BC = jnp.take_along_axis(logits_BCV, targets_BC[..., None], axis=-1)[..., 0]
  return jnp.sum((lse_BC - target_BC) * mask_BC), exp_BCV, sum_BC


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def linear_cross_entropy(x_BTD: jax.Array, w_DV: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array,
                         chunk: int | None = None, weight_grad: bool = True, dtype=None) -> jax.Array:
  """Sum over positions of ``mask * cross_entropy(x @ w, targets)`` (float32 scalar).

  Args:
    x_BTD: final hidden states (after the last norm).
    w_DV: the output projection (``lm_head`` kernel, or the embedding transposed when tied).
    targets_BT: int next-token ids.
    mask_BT: loss weights (0/1).
    chunk: positions per chunk (the largest divisor of T not above it); None: as many as
      keep a chunk's logits within :data:`CHUNK_ELEMENTS`.
    weight_grad: compute the gradient of ``w_DV`` (False for a frozen head: its gradient is
      then reported as zero).
    dtype: matmul dtype (default: ``x_BTD.dtype``).
  """
  del weight_grad
  total, _, _ = _run(x_BTD, w_DV, targets_BT, mask_BT, chunk, dtype, grad_x=False, grad_w=False)
  return total


def _run(x_BTD, w_DV, targets_BT, mask_BT, chunk, dtype, *, grad_x: bool, grad_w: bool):
  """(loss sum, dx or None, dw or None), one chunk of positions at a time."""
  dtype = dtype or x_BTD.dtype
  c = _chunk_size(x_BTD.shape[0], x_BTD.shape[1], w_DV.shape[1], chunk)
  w_c = w_DV.astype(dtype)

  def body(dw_DV, xs):
    x_BCD, y_BC, m_BC = xs
    logits_BCV = _chunk_logits(x_BCD, w_c, dtype)
    loss, exp_BCV, sum_BC = _chunk_loss(logits_BCV, y_BC, m_BC)
    if not grad_x:
      return dw_DV, (loss, None)
    # d loss / d logits = (softmax - one_hot(target)) * mask, formed without a scatter.
    hot_BCV = jax.lax.broadcasted_iota(jnp.int32, logits_BCV.shape, 2) == y_BC[..., None]
    g_BCV = ((exp_BCV * (1.0 / sum_BC)[..., None] - hot_BCV) * m_BC[..., None]).astype(dtype)
    b, c, d = x_BCD.shape
    g_NV = g_BCV.reshape(b * c, -1)
    # g @ w.T and x.T @ g as single dot_generals: with a separate transpose XLA:CPU runs bfloat16 in float32.
    dx_BCD = jax.lax.dot_general(g_NV, w_c, (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32).reshape(b, c, d)
    if grad_w:
      dw_DV = dw_DV + jax.lax.dot_general(x_BCD.reshape(b * c, d).astype(dtype), g_NV, (((0,), (0,)), ((), ())),
                                          preferred_element_type=jnp.float32)
    return dw_DV, (loss, dx_BCD)

  xs = (_chunks(x_BTD, c), _chunks(targets_BT, c), _chunks(mask_BT.astype(jnp.float32), c))
  dw0 = jnp.zeros(w_DV.shape, jnp.float32) if grad_w else None
  if c == x_BTD.shape[1]:  # a single chunk: no loop
    dw, (loss, dx) = body(dw0, jax.tree.map(lambda a: a[0], xs))
    losses, dx = loss[None], None if dx is None else dx[None]
  else:
    dw, (losses, dx) = jax.lax.scan(body, dw0, xs)
  dx = None if dx is None else _unchunk(dx)
  return jnp.sum(losses), dx, dw


def _fwd(x_BTD, w_DV, targets_BT, mask_BT, chunk, weight_grad, dtype):
  total, dx_BTD, dw_DV = _run(x_BTD, w_DV, targets_BT, mask_BT, chunk, dtype, grad_x=True, grad_w=weight_grad)
  # Residuals are the finished gradients, in their inputs' dtypes (scaled by the incoming
  # cotangent below), so nothing of size B x T x V outlives the forward pass.
  return total, (dx_BTD.astype(x_BTD.dtype), None if dw_DV is None else dw_DV.astype(w_DV.dtype))


def _bwd(chunk, weight_grad, dtype, res, ct):
  dx_BTD, dw_DV = res
  return (ct.astype(dx_BTD.dtype) * dx_BTD, None if dw_DV is None else ct.astype(dw_DV.dtype) * dw_DV, None, None)


linear_cross_entropy.defvjp(_fwd, _bwd)


def reference_cross_entropy(x_BTD, w_DV, targets_BT, mask_BT, dtype=None):
  """The same loss through plain logits and optax (for tests and comparisons)."""
  dtype = dtype or x_BTD.dtype
  logits_BTV = _chunk_logits(x_BTD, w_DV, dtype)
  return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT)
                 * mask_BT.astype(jnp.float32))
