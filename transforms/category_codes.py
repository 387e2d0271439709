"""The category coding of a fitted HistGradientBoosting model, as one
NumPy look-up per categorical column.

With categorical features, scikit-learn's HistGradientBoosting models
code them at every prediction through a fitted ColumnTransformer (an
OrdinalEncoder on the categorical columns, a check_array on the others;
`_preprocessor`). Its output is exact and cheap in bulk, but its fixed
cost per call (joblib's sequential Parallel, column indexing, dataframe
detection, `np.isin` over the categories: ~1.8 ms) is most of a one-row
prediction, which is what the scoring service and a stream's small
bundles pay. `fast_category_codes` swaps it, once after loading, for
`CategoryCodes`: the same table of categories, searched with
`np.searchsorted`. The output is the same matrix, bit for bit (the
encoder's codes as float64, unknown and missing values as NaN, the
categorical columns first): tests/test_category_codes.py checks it, and
the parity tests the scores. Any other preprocessor shape (a scikit-learn
release that builds it differently) is left untouched.
"""

from typing import Any

import numpy as np


class CategoryCodes:
  """A fitted HistGradientBoosting `_preprocessor` as NumPy look-ups:
  `transform(X)` -> [codes of the categorical columns, then the others],
  float64, as the ColumnTransformer it replaces returns them."""

  def __init__(self, categorical: np.ndarray, numerical: np.ndarray,
               categories):
    self.categorical, self.numerical = categorical, numerical
    self.categories = [np.asarray(c, dtype=np.float64) for c in categories]

  def transform(self, X) -> np.ndarray:  # pylint: disable=invalid-name
    x = np.asarray(X, dtype=np.float64)
    out = np.empty((x.shape[0], len(self.categorical) + len(self.numerical)))
    for j, (column, known) in enumerate(zip(self.categorical,
                                            self.categories)):
      values = x[:, column]
      # The encoder's code is the value's index in its sorted categories
      # (NaN sorts last and never equals itself): a value not found is
      # unknown, and unknown and missing values are both coded NaN.
      at = np.minimum(np.searchsorted(known, values), len(known) - 1)
      out[:, j] = np.where(known[at] == values, at, np.nan)
    out[:, len(self.categorical):] = x[:, self.numerical]
    return out


def _swappable(preprocessor: Any):
  """(categorical, numerical, categories) of a preprocessor built as
  scikit-learn 1.9's HistGradientBoosting builds it, else None."""
  steps = getattr(preprocessor, 'transformers_', None)
  if not steps or len(steps) < 2 or [s[0] for s in steps[:2]] != [
      'encoder', 'numerical']:
    return None
  if any(s[1] != 'drop' for s in steps[2:]):
    return None
  encoder, numerical = steps[0][1], steps[1][1]
  if (type(encoder).__name__ != 'OrdinalEncoder'
      or encoder.handle_unknown != 'use_encoded_value'
      or not np.isnan(encoder.unknown_value)
      or not np.isnan(encoder.encoded_missing_value)
      or type(numerical).__name__ != 'FunctionTransformer'):
    return None
  masks = [np.asarray(s[2]) for s in steps[:2]]
  # Every column is in exactly one of the two (nothing left to the
  # remainder), as HistGradientBoosting builds them.
  if any(m.dtype != bool for m in masks) or not np.all(masks[0] ^ masks[1]):
    return None
  categories = encoder.categories_
  if any(np.asarray(c).dtype.kind not in 'fiu' for c in categories):
    return None
  return (np.flatnonzero(masks[0]), np.flatnonzero(masks[1]), categories)


def fast_category_codes(estimator: Any) -> Any:
  """The estimator, its categorical preprocessing swapped for
  `CategoryCodes` when it is a HistGradientBoosting model with one of the
  shape `_swappable` knows; any other estimator as it is."""
  found = _swappable(getattr(estimator, '_preprocessor', None))
  if found is not None:
    estimator._preprocessor = CategoryCodes(*found)  # pylint: disable=protected-access
  return estimator
