"""Frechet distance between two sets of features (FID when they are FID Inception features).

Statistics are accumulated in float64 over batches, and the distance is pytorch-fid's
`calculate_frechet_distance`:

  d^2 = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrtm(sigma1 @ sigma2))

with its two guards: when sqrtm's result is not finite (a singular product, with the scipy
versions before 1.16), it is taken again of (sigma1 + eps I)(sigma2 + eps I); and a complex
result is accepted only when the imaginary parts of its diagonal are rounding noise.
"""
from typing import Tuple

import numpy as np
from absl import logging
from scipy import linalg

# pytorch-fid's tolerance on the imaginary part of sqrtm's diagonal.
_IMAGINARY_ATOL = 1e-3


class FeatureStatistics:
  """Mean and covariance of [N, D] features seen in batches, in float64.

  Batches are merged with Chan et al.'s pairwise update (centred sums of squares), which
  does not lose the covariance to cancellation when the mean is large against the spread.
  The covariance is unbiased (divided by N - 1), as numpy's np.cov and pytorch-fid's.
  """

  def __init__(self):
    self.count = 0
    self._mean = None
    self._centred_squares = None  # sum over samples of (x - mean)(x - mean)^T

  def update(self, features) -> None:
    features = np.asarray(features, np.float64)
    if features.ndim != 2:
      raise ValueError(f'features must be [N, D], got shape {features.shape}')
    if self._mean is not None and features.shape[1] != self._mean.shape[0]:
      raise ValueError(f'features of dimension {features.shape[1]} added to statistics of '
                       f'dimension {self._mean.shape[0]}')
    n = features.shape[0]
    if n == 0:
      return
    mean = features.mean(axis=0)
    centred = features - mean
    squares = centred.T @ centred
    if self._mean is None:
      self.count, self._mean, self._centred_squares = n, mean, squares
      return
    total = self.count + n
    delta = mean - self._mean
    self._centred_squares = (self._centred_squares + squares
                             + np.outer(delta, delta) * (self.count * n / total))
    self._mean = self._mean + delta * (n / total)
    self.count = total

  def mean(self) -> np.ndarray:
    if self.count == 0:
      raise ValueError('no features were added')
    return self._mean.copy()

  def covariance(self) -> np.ndarray:
    if self.count < 2:
      raise ValueError(f'a covariance needs at least 2 samples, got {self.count}')
    return self._centred_squares / (self.count - 1)

  def statistics(self) -> Tuple[np.ndarray, np.ndarray]:
    """(mu, sigma), the arguments of frechet_distance."""
    return self.mean(), self.covariance()


def _as_statistics(mu, sigma, name: str) -> Tuple[np.ndarray, np.ndarray]:
  mu = np.atleast_1d(np.asarray(mu, np.float64))
  sigma = np.atleast_2d(np.asarray(sigma, np.float64))
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(f'{name}: the mean must be [D] and the covariance [D, D], got '
                     f'{mu.shape} and {sigma.shape}')
  if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
    raise ValueError(f'{name}: the statistics hold non-finite values')
  return mu, sigma


def _sqrtm_of_product(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> np.ndarray:
  """sqrtm(sigma1 @ sigma2), retried with eps on both diagonals when it is not finite."""
  covmean = linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    logging.warning('Frechet distance: the covariance product is singular; adding %g to the '
                    'diagonal of both covariances', eps)
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=_IMAGINARY_ATOL):
      raise ValueError('Frechet distance: sqrtm(sigma1 @ sigma2) has an imaginary component of '
                       f'{np.abs(covmean.imag).max():.3g}; the covariances are not positive '
                       'semi-definite')
    covmean = covmean.real
  return covmean


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """The Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64."""
  mu1, sigma1 = _as_statistics(mu1, sigma1, 'first set')
  mu2, sigma2 = _as_statistics(mu2, sigma2, 'second set')
  if mu1.shape != mu2.shape:
    raise ValueError(f'the feature dimensions differ: {mu1.shape[0]} and {mu2.shape[0]}')
  diff = mu1 - mu2
  covmean = _sqrtm_of_product(sigma1, sigma2, eps)
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))
