"""tests/numerics.py, the float32 bound the parity, mesh and kernel tests use: it passes a sum taken in
another order and rejects what a real fault does."""

import numpy as np
import pytest

from tests import numerics


def _sums(n=4096, rows=64, seed=0):
  """Row sums of float32 terms of mixed sign, in order and in a shuffled order: [rows] each."""
  r = np.random.RandomState(seed)
  x_RN = (r.randn(rows, n) * 30).astype(np.float32)
  forward = np.zeros(rows, np.float32)
  for j in range(n):  # one term at a time in float32, as a sequential loop rounds
    forward += x_RN[:, j]
  shuffled = np.zeros(rows, np.float32)
  for j in r.permutation(n):
    shuffled += x_RN[:, j]
  return forward, shuffled


def test_a_sum_in_another_order_passes_and_differs():
  a, b = _sums()
  assert not np.array_equal(a, b)  # the orders really round differently
  numerics.assert_close(b, a, terms=4096, what="shuffled sum")


def test_a_thousand_ulps_or_a_swapped_element_fails():
  a, b = _sums()
  numerics.assert_close(b, a, terms=4096)
  bumped = a.copy()
  i = int(np.argmax(np.abs(a)))
  bumped[i] = a[i] + 1000 * np.spacing(np.abs(a).max())  # 1000 ulps of the largest value
  with pytest.raises(AssertionError, match=r"bound .* at index \(%d,\)" % i):
    numerics.assert_close(bumped, a, terms=4096)  # 4 sqrt(4096) = 256 eps |a|max; 1000 ulps >= 500 eps |a|max
  swapped = a.copy()
  j, k = int(np.argmax(a)), int(np.argmin(a))
  swapped[[j, k]] = swapped[[k, j]]
  with pytest.raises(AssertionError, match="max \\|got - want\\|"):
    numerics.assert_close(swapped, a, terms=4096)


def test_the_bound_scales_with_magnitude_terms_layers_and_dtype():
  one = numerics.tolerance([2.0], terms=16)
  assert one == pytest.approx(numerics.C * numerics.EPS_F32 * 4 * 2.0)
  assert numerics.tolerance([20.0], terms=16) == pytest.approx(10 * one)
  assert numerics.tolerance([2.0], terms=64, layers=3) == pytest.approx(2 * 3 * one)
  assert numerics.tolerance([2.0], terms=16, eps=numerics.EPS_BF16) == pytest.approx(2 ** 16 * one)
  assert numerics.tolerance([1e-3], terms=16) == numerics.tolerance([1.0], terms=16)  # the floor
  assert numerics.tolerance([1e-3], terms=16, floor=0.0) == pytest.approx(1e-3 * one / 2.0)
  assert numerics.tolerance([1e-3], terms=16, scale=30.0) == numerics.tolerance([30.0], terms=16)


def test_shapes_and_non_finite_entries_must_agree():
  numerics.assert_close([-np.inf, 1.0], [-np.inf, 1.0], terms=1)
  with pytest.raises(AssertionError, match="non-finite"):
    numerics.assert_close([-np.inf, 1.0], [-1e30, 1.0], terms=1)
  with pytest.raises(AssertionError, match="shapes"):
    numerics.assert_close([1.0, 2.0], [1.0], terms=1)


def test_passed_comparisons_are_recorded_for_the_margins_line(tmp_path, monkeypatch):
  path = tmp_path / "margins.jsonl"
  monkeypatch.setenv(numerics.MARGINS_ENV, str(path))
  assert numerics.nearest(path) is None  # no file yet: no line
  bound = numerics.tolerance([1.0], terms=16)
  numerics.assert_close([1.0 + bound / 4], [1.0], terms=16, what="a quarter")
  numerics.assert_close([1.0 + bound / 2], [1.0], terms=16, what="a half")
  with pytest.raises(AssertionError):
    numerics.assert_close([1.0 + 2 * bound], [1.0], terms=16, what="twice")  # a failure is not recorded
  line = numerics.nearest(path)
  assert line.startswith("numerics: 2 comparisons in 1 tests passed")
  assert "the nearest used 0.50 of its bound" in line and "(a half:" in line
  assert "test_numerics.py::test_passed_comparisons_are_recorded_for_the_margins_line" in line
