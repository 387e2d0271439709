"""The NumPy category coding swapped into loaded HistGradientBoosting
models gives scikit-learn's own matrix and predictions, bit for bit."""

import numpy as np
import pytest
from sklearn.ensemble import (HistGradientBoostingClassifier,
                              HistGradientBoostingRegressor)
from sklearn.linear_model import LogisticRegression

from transforms.category_codes import CategoryCodes, fast_category_codes


def _rows(n, seed):
  rng = np.random.default_rng(seed)
  x = np.column_stack([
      rng.normal(size=n),
      rng.integers(0, 12, size=n).astype(float),   # categorical
      rng.exponential(size=n),
      rng.integers(0, 3, size=n).astype(float)])   # categorical
  y = ((x[:, 1] % 3 == 0) ^ (x[:, 0] > 0.5)).astype(int)
  return x, y


def _hostile(x):
  """Unknown categories (never in training, between and beyond the known
  ones), missing values in every column, and -0.0."""
  x = x.copy()
  x[::7, 1] = 40.0
  x[1::11, 1] = 5.5
  x[::5, 3] = np.nan
  x[2::9, 0] = np.nan
  x[3::13, 3] = -1.0
  x[4::17, 1] = -0.0
  return x


@pytest.mark.parametrize('model', [HistGradientBoostingClassifier,
                                   HistGradientBoostingRegressor])
def test_the_swapped_coding_gives_the_same_matrix_and_predictions(model):
  x, y = _rows(2000, 1)
  x[::31, 3] = np.nan      # missing values seen in training too
  estimator = model(categorical_features=[False, True, False, True],
                    max_iter=20, random_state=0).fit(x, y)
  test = _hostile(_rows(500, 2)[0])
  coded = estimator._preprocessor.transform(test)  # pylint: disable=protected-access
  predict = (estimator.predict_proba if hasattr(estimator, 'predict_proba')
             else estimator.predict)
  expected = predict(test)
  one_row = predict(test[:1])

  fast_category_codes(estimator)

  assert isinstance(estimator._preprocessor, CategoryCodes)  # pylint: disable=protected-access
  assert np.isnan(coded).any()
  np.testing.assert_array_equal(
      estimator._preprocessor.transform(test), coded)  # pylint: disable=protected-access
  np.testing.assert_array_equal(predict(test), expected)
  np.testing.assert_array_equal(predict(test[:1]), one_row)


def test_estimators_without_the_known_coding_are_left_as_they_are():
  x, y = _rows(300, 3)
  numeric_only = HistGradientBoostingClassifier(max_iter=5).fit(x, y)
  linear = LogisticRegression().fit(x, y)
  assert fast_category_codes(numeric_only)._preprocessor is None  # pylint: disable=protected-access
  assert fast_category_codes(linear) is linear
  assert not hasattr(linear, '_preprocessor')
