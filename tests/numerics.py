"""Tolerances from floating-point arithmetic, for tests that compare two computations of the same numbers
taken in different orders (meshes, chunk sizes, fused versus naive kernels, our model versus transformers).

Where the bound comes from. float32 keeps 24 significant bits: one rounding moves a value x by at most
eps/2 * |x|, eps = 2**-23 ~ 1.19e-7 (bfloat16: eps = 2**-7, its roundings 2**-8 ~ 3.9e-3 relative; use
EPS_BF16). A dot product or sum of n terms taken in another order (a sharded contraction, a tiled matmul,
another vector width) differs by at most ~n * eps * sum|terms| (worst case), and by ~sqrt(n) * eps * that
typically, the roundings being independent and of either sign. A transformer layer feeds its output to the
next one through residual adds and normalisations that neither amplify nor remove relative error, so each
layer adds about the same again: linear in the number of layers. A softmax or log-sum-exp of values of
magnitude M subtracts the maximum, so its absolute error is ~eps * M (plus ~sqrt(n) * eps from the sum of
exponentials): a log-probability of -26 is good to a few times eps * 26 ~ 3e-6, not to 1e-7.

So two float32 evaluations of one function, both correct, agree to

    bound = C * eps * sqrt(terms) * layers * max(max|want|, floor)

with ``terms`` the length of the longest reordered sum (hidden or intermediate size, sequence length,
vocabulary), ``layers`` the number of transformer layers the error passes through, ``max|want|`` the
magnitude of the values (or ``scale=``: the magnitude of what the error grew from, e.g. the logits behind
probabilities), ``floor`` = 1 so that values near zero are held to an absolute eps-sized bound rather than
to zero, and C = 4: a few standard deviations of the random walk of roundings. The bound is tens of eps
times the values: a real fault (a permuted head, a dropped layer, a misplaced shard) moves results by a
good fraction of their magnitude and fails it, and each test that uses this keeps such a broken variant.

How close a machine comes to the bounds: with ``LABOR_JAX_TESTS_MARGINS`` naming a file (tests/conftest.py sets one
for every run), each comparison that passes appends its error and bound there as a JSON line, and the run's summary
names the comparison nearest its bound (:func:`nearest`).
"""

import json
import os

import numpy as np

EPS_F32 = 2.0 ** -23  # float32 machine epsilon (1 ulp at 1.0)
EPS_BF16 = 2.0 ** -7  # bfloat16 machine epsilon (8 significant bits); a rounding is half of it, 2**-8
C = 4.0  # roundings of either sign: a few standard deviations of their random walk
MARGINS_ENV = "LABOR_JAX_TESTS_MARGINS"


def forward_terms(config, tokens: int = 0) -> dict:
  """``terms`` and ``layers`` of a transformer forward pass of ``config``: its longest reordered sums are
  the projections' contractions (hidden, intermediate size) and attention over ``tokens`` positions."""
  return {"terms": max(config.hidden_size, config.intermediate_size, tokens), "layers": config.num_hidden_layers}


def tolerance(want, *, terms: int, layers: int = 1, eps: float = EPS_F32, scale: float | None = None,
              floor: float = 1.0) -> float:
  """C * eps * sqrt(terms) * layers * max(scale, floor); ``scale`` defaults to max|want|."""
  if scale is None:
    scale = float(np.max(np.abs(np.asarray(want, np.float64)), initial=0.0))
  return C * eps * np.sqrt(terms) * layers * max(scale, floor)


def assert_close(got, want, *, terms: int, layers: int = 1, eps: float = EPS_F32, scale: float | None = None,
                 floor: float = 1.0, what: str = "") -> float:
  """Raises AssertionError unless max|got - want| <= :func:`tolerance` (same arguments) and both have the
  same shape and the same non-finite entries; returns the largest error. ``what`` names the comparison in
  the message, which gives the largest error, the bound, and where the largest error is."""
  g, w = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert g.shape == w.shape, f"{what}: shapes {g.shape} != {w.shape}"
  finite = np.isfinite(w)
  assert np.array_equal(finite, np.isfinite(g)) and np.array_equal(g[~finite], w[~finite]), \
      f"{what}: non-finite entries differ"
  if scale is None:
    scale = float(np.max(np.abs(w[finite]), initial=0.0))
  bound = tolerance(w, terms=terms, layers=layers, eps=eps, scale=scale, floor=floor)
  err = np.zeros(w.shape)
  err[finite] = np.abs(g[finite] - w[finite])
  if err.size == 0:
    return 0.0
  at = np.unravel_index(np.argmax(err), err.shape)
  worst = float(err[at])
  if worst <= bound:
    _record(what, worst, bound)
  assert worst <= bound, (f"{what}: max |got - want| = {worst:.3g} > bound {bound:.3g} = {C:g} * eps {eps:.3g} * "
                          f"sqrt({terms} terms) * {layers} layers * max(scale {scale:.3g}, floor {floor:g}), at index "
                          f"{tuple(int(i) for i in at)}: got {g[at]!r}, want {w[at]!r}")
  return worst


def _record(what: str, worst: float, bound: float) -> None:
  """One JSON line for a passed comparison in the file ``LABOR_JAX_TESTS_MARGINS`` names, if any: the test (pytest's
  PYTEST_CURRENT_TEST), ``what``, the error and the bound. One short write in append mode, so the suite's
  processes can share the file. A comparison that fails is not written: its failure says more."""
  path = os.environ.get(MARGINS_ENV)
  if not path:
    return
  test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]
  line = json.dumps({"test": test, "what": what, "error": worst, "bound": bound}) + "\n"
  with open(path, "a", encoding="utf-8") as f:
    f.write(line)


def nearest(path: str | os.PathLike) -> str | None:
  """One line on the comparisons recorded in ``path`` (see :func:`_record`): how many, and the one whose error came
  nearest its bound, as a fraction of it; None when there are none."""
  try:
    with open(path, encoding="utf-8") as f:
      rows = [json.loads(line) for line in f if line.strip()]
  except FileNotFoundError:
    return None
  if not rows:
    return None
  top = max(rows, key=lambda r: r["error"] / r["bound"] if r["bound"] > 0 else 0.0)
  ratio = top["error"] / top["bound"] if top["bound"] > 0 else 0.0
  tests = len({r["test"] for r in rows})
  return (f"numerics: {len(rows)} comparisons in {tests} tests passed their float32 bounds; the nearest used "
          f"{ratio:.2f} of its bound: {top['test']} ({top['what'] or 'unnamed'}: error {top['error']:.3g}, bound "
          f"{top['bound']:.3g})")
