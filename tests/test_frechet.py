"""Feature statistics and the Frechet distance against numpy and pytorch-fid's
calculate_frechet_distance, in float64 (relative tolerance 1e-6 on the distance)."""
import numpy as np
import pytest
import scipy.linalg
from pytorch_fid.fid_score import calculate_frechet_distance

from instaflow_jax.evaluation import frechet

_TOLERANCE = 1e-6


def _relu_features(n: int, dim: int, seed: int, shift: float = 0.0, dead: int = 0) -> np.ndarray:
  """Inception-like features: non-negative, the first `dead` dimensions always zero."""
  rng = np.random.default_rng(seed)
  features = np.maximum(rng.normal(shift, 1.0, (n, dim)), 0.0)
  features[:, :dead] = 0.0
  return features


def _statistics(features: np.ndarray):
  stats = frechet.FeatureStatistics()
  stats.update(features)
  return stats.statistics()


def _assert_close(ours: float, ref: float):
  assert abs(ours - ref) <= _TOLERANCE * abs(ref), f'ours {ours!r}, pytorch-fid {ref!r}'


def test_streamed_statistics_match_numpy():
  # A mean far from zero against the spread: naive sums of squares would lose the covariance.
  features = 1e3 + _relu_features(103, 12, seed=0, dead=2)
  stats = frechet.FeatureStatistics()
  for start, stop in ((0, 1), (1, 40), (40, 40), (40, 103)):
    stats.update(features[start:stop].astype(np.float32))
  reference = features.astype(np.float32).astype(np.float64)
  assert stats.count == 103
  np.testing.assert_allclose(stats.mean(), reference.mean(axis=0), rtol=1e-14)
  np.testing.assert_allclose(stats.covariance(), np.cov(reference, rowvar=False), rtol=1e-9,
                             atol=1e-12)


# Full rank; fewer samples than dimensions and dead dimensions (the covariances are singular).
@pytest.mark.parametrize('n, dim, dead', ((500, 32, 0), (20, 64, 8)),
                         ids=('full_rank', 'rank_deficient'))
def test_matches_pytorch_fid(n, dim, dead):
  stats1 = _statistics(_relu_features(n, dim, seed=1, dead=dead))
  stats2 = _statistics(_relu_features(n, dim, seed=2, shift=0.3, dead=dead))
  _assert_close(frechet.frechet_distance(*stats1, *stats2),
                calculate_frechet_distance(*stats1, *stats2))


def _sqrtm_failing_on_singular(real_sqrtm, calls):
  """scipy.linalg.sqrtm as scipy < 1.16 behaved: not finite for a singular matrix. Since its
  rewrite in 1.16 it returns finite values there, and the eps path is otherwise not reached."""
  def sqrtm(matrix, disp=True):
    singular = np.linalg.matrix_rank(matrix) < matrix.shape[0]
    calls.append(singular)
    root = np.full(matrix.shape, np.inf) if singular else real_sqrtm(matrix)
    return root if disp else (root, np.inf if singular else 0.0)
  return sqrtm


def test_singular_product_takes_the_eps_path_like_pytorch_fid(monkeypatch):
  stats1 = _statistics(_relu_features(20, 64, seed=3, dead=8))
  stats2 = _statistics(_relu_features(20, 64, seed=4, shift=0.3, dead=8))
  calls = []
  monkeypatch.setattr(scipy.linalg, 'sqrtm', _sqrtm_failing_on_singular(scipy.linalg.sqrtm, calls))
  ours = frechet.frechet_distance(*stats1, *stats2)
  assert calls == [True, False]  # singular, then the offset product
  _assert_close(ours, calculate_frechet_distance(*stats1, *stats2))


def test_identical_statistics_give_zero():
  stats = _statistics(_relu_features(300, 16, seed=5))
  assert abs(frechet.frechet_distance(*stats, *stats)) <= 1e-9


def test_errors():
  eye = np.eye(3)
  with pytest.raises(ValueError, match='imaginary component of 1; the covariances are not'):
    frechet.frechet_distance(np.zeros(3), -eye, np.zeros(3), eye)
  with pytest.raises(ValueError, match='the feature dimensions differ: 3 and 2'):
    frechet.frechet_distance(np.zeros(3), eye, np.zeros(2), np.eye(2))
  with pytest.raises(ValueError, match=r'first set: the mean must be \[D\] and the covariance'):
    frechet.frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), eye)
  with pytest.raises(ValueError, match='second set: the statistics hold non-finite values'):
    frechet.frechet_distance(np.zeros(3), eye, np.full(3, np.nan), eye)
  stats = frechet.FeatureStatistics()
  with pytest.raises(ValueError, match='no features were added'):
    stats.mean()
  stats.update(np.zeros((1, 4)))
  with pytest.raises(ValueError, match='a covariance needs at least 2 samples, got 1'):
    stats.covariance()
  with pytest.raises(ValueError, match='dimension 5 added to statistics of dimension 4'):
    stats.update(np.zeros((2, 5)))
  with pytest.raises(ValueError, match=r'features must be \[N, D\], got shape \(4,\)'):
    stats.update(np.zeros(4))
