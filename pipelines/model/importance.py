"""Which raw features a model relies on: scikit-learn's permutation
importance on the eval split, per raw feature.

One raw feature may become several model columns (its transformed value
and its missing-value indicator), and permuting one of them alone would
leave the other telling the model where the value was. So the columns of
one raw feature are permuted together: scikit-learn's
`permutation_importance` permutes the columns of a matrix of row numbers,
one column per raw feature, and `_Grouped` builds the model's input from
it, each raw feature's columns taken from the rows its column names (a
permuted column of row numbers is that feature's columns permuted
together, the other features' left in place).

The score is the task's eval metric, higher better: ROC AUC (binary),
minus the log loss (multiclass), minus the RMSE (regression); a feature's
importance is the mean drop of that score over `N_REPEATS` seeded
permutations (with its standard deviation), on at most `MAX_ROWS` eval
rows (seeded draw).
"""

from typing import Any, Dict, List, Optional, Sequence

import numpy as np

N_REPEATS = 3
MAX_ROWS = 2000
RANDOM_STATE = 0


class _Grouped:
  """The model seen through a matrix of row numbers, one column per raw
  feature (module docstring)."""

  def __init__(self, estimator, x: np.ndarray,
               groups: Sequence[Sequence[int]]):
    self.estimator, self.x, self.groups = estimator, x, groups

  def fit(self, *_):
    """Never called: the model is fitted (scikit-learn checks it exists)."""
    raise NotImplementedError

  def rebuild(self, rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.int64)
    out = np.empty((len(rows), self.x.shape[1]), self.x.dtype)
    for g, columns in enumerate(self.groups):
      out[:, columns] = self.x[rows[:, g]][:, columns]
    return out


def _scorer(task: str, n_classes: int):
  from sklearn.metrics import log_loss, mean_squared_error, roc_auc_score

  def score(grouped: _Grouped, rows: np.ndarray, y: np.ndarray) -> float:
    x = grouped.rebuild(rows)
    model = grouped.estimator
    if task == 'binary':
      return float(roc_auc_score(y, model.predict_proba(x)[:, 1]))
    if task == 'multiclass':
      full = np.zeros((len(y), n_classes))
      full[:, np.asarray(model.classes_)] = model.predict_proba(x)
      return -float(log_loss(y, full, labels=list(range(n_classes))))
    return -float(np.sqrt(mean_squared_error(y, model.predict(x))))
  return score


METRIC = {'binary': 'roc_auc', 'multiclass': 'neg_log_loss',
          'regression': 'neg_rmse'}


def raw_groups(features: Sequence[str], raw_features: Sequence[str],
               suffix: str, missing_suffix: str) -> Dict[str, List[int]]:
  """{raw feature: indices of its columns in `features`}: `<raw><suffix>`
  and `<raw><missing_suffix><suffix>`."""
  index = {f: i for i, f in enumerate(features)}
  out = {}
  for raw in raw_features:
    columns = [index[name] for name in (f'{raw}{suffix}',
                                        f'{raw}{missing_suffix}{suffix}')
               if name in index]
    if columns:
      out[raw] = columns
  return out


def permutation_importance(estimator, x: np.ndarray, y: np.ndarray,
                           groups: Dict[str, List[int]], task: str,
                           n_classes: int = 2) -> Dict[str, Any]:
  """{metric, n_repeats, rows, features: [{feature, columns, mean, std}]}
  sorted by importance (then name); None when the eval split cannot be
  scored (a binary split with one class)."""
  from sklearn import inspection
  if task == 'binary' and len(np.unique(y)) < 2:
    return None
  if len(y) > MAX_ROWS:
    keep = np.sort(np.random.default_rng(RANDOM_STATE).choice(
        len(y), MAX_ROWS, replace=False))
    x, y = x[keep], y[keep]
  names = list(groups)
  rows = np.repeat(np.arange(len(y))[:, None], len(names), axis=1)
  grouped = _Grouped(estimator, x, [groups[n] for n in names])
  result = inspection.permutation_importance(
      grouped, rows, y, scoring=_scorer(task, n_classes),
      n_repeats=N_REPEATS, random_state=RANDOM_STATE)
  features = [{'feature': name, 'columns': len(groups[name]),
               'mean': float(result.importances_mean[i]),
               'std': float(result.importances_std[i])}
              for i, name in enumerate(names)]
  features.sort(key=lambda f: (-f['mean'], f['feature']))
  return {'metric': METRIC[task], 'n_repeats': N_REPEATS, 'rows': len(y),
          'method': 'sklearn.inspection.permutation_importance on the eval '
                    'split, columns of one raw feature permuted together',
          'features': features}


# Features the model relies on that moved ------------------------------------
TOP_DRIFT = 10


def important_drift(importance: Optional[Dict[str, Any]],
                    comparisons: Dict[str, Optional[Dict[str, Any]]],
                    top: int = TOP_DRIFT) -> Optional[Dict[str, Any]]:
  """The `top` most important raw features with their distance in each
  comparison (drift.json / skew.json of pipelines.validation, by name:
  {'drift': ..., 'skew': ...}), and the important ones over a threshold:

    {features: [{feature, importance, drift: {value, threshold, drifted},
                 skew: {...}}], drifted: [names]}

  None without importance; a feature a comparison did not measure has
  null there."""
  if not importance:
    return None
  rows, drifted = [], []
  for f in importance['features'][:top]:
    row = {'feature': f['feature'], 'importance': f['mean']}
    moved = False
    for kind, result in comparisons.items():
      measured = ((result or {}).get('features') or {}).get(f['feature'])
      if measured and measured.get('value') is not None:
        row[kind] = {k: measured.get(k) for k in
                     ('value', 'threshold', 'drifted', 'measure')}
        moved |= bool(measured.get('drifted'))
      else:
        row[kind] = None
    rows.append(row)
    if moved:
      drifted.append(f['feature'])
  return {'metric': importance['metric'], 'features': rows,
          'drifted': drifted}
