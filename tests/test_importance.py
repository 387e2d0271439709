"""Permutation importance per raw feature (pipelines.model.importance)."""

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import Ridge

from pipelines.model import importance


def _table(n=600, seed=0):
  rng = np.random.default_rng(seed)
  decides = rng.normal(size=n)
  noise = rng.normal(size=(n, 2))
  # bill: a value column and its missing indicator, one raw feature.
  missing = (rng.random(n) < 0.3).astype(float)
  bill = np.where(missing == 1, 0.0, rng.normal(size=n))
  x = np.column_stack([noise[:, 0], decides, bill, noise[:, 1], missing])
  features = ['a_xf', 'decides_xf', 'bill_xf', 'b_xf', 'bill_missing_xf']
  return x, decides, missing, features


def test_the_feature_that_alone_decides_the_label_ranks_first():
  x, decides, _, features = _table()
  y = (decides > 0).astype(int)
  model = HistGradientBoostingClassifier(random_state=0).fit(x[:400], y[:400])
  groups = importance.raw_groups(features, ['a', 'decides', 'bill', 'b'],
                                 '_xf', '_missing')
  assert groups == {'a': [0], 'decides': [1], 'bill': [2, 4], 'b': [3]}
  result = importance.permutation_importance(model, x[400:], y[400:],
                                             groups, 'binary')
  ranked = [f['feature'] for f in result['features']]
  assert ranked[0] == 'decides'
  # Without it the model guesses: the AUC drops by about half (0.5 at
  # chance from ~1.0); the noise columns barely matter.
  top = result['features'][0]
  assert top['mean'] > 0.3
  assert all(abs(f['mean']) < 0.05 for f in result['features'][1:])
  assert result['metric'] == 'roc_auc' and result['rows'] == 200


def test_columns_of_one_raw_feature_are_permuted_together():
  # The label is where bill was missing: the indicator column alone
  # carries it, and permuting bill's two columns together removes it.
  x, _, missing, features = _table(seed=1)
  y = missing.astype(int)
  model = HistGradientBoostingClassifier(random_state=0).fit(x[:400], y[:400])
  groups = importance.raw_groups(features, ['a', 'decides', 'bill', 'b'],
                                 '_xf', '_missing')
  result = importance.permutation_importance(model, x[400:], y[400:],
                                             groups, 'binary')
  first = result['features'][0]
  assert (first['feature'], first['columns']) == ('bill', 2)
  assert first['mean'] > 0.3


def test_regression_and_determinism():
  x, decides, _, features = _table(seed=2)
  y = 3 * decides + 0.1 * x[:, 0]
  model = Ridge().fit(x[:400], y[:400])
  groups = importance.raw_groups(features, ['a', 'decides', 'bill', 'b'],
                                 '_xf', '_missing')
  first = importance.permutation_importance(model, x[400:], y[400:], groups,
                                            'regression')
  again = importance.permutation_importance(model, x[400:], y[400:], groups,
                                            'regression')
  assert first == again
  assert first['metric'] == 'neg_rmse'
  assert first['features'][0]['feature'] == 'decides'
  # One class only: nothing to score, no importance.
  assert importance.permutation_importance(
      model, x[:5], np.zeros(5, int), groups, 'binary') is None


def test_important_features_with_their_drift_and_skew():
  found = {'metric': 'roc_auc', 'features': [
      {'feature': 'amount', 'mean': 0.3, 'std': 0.01, 'columns': 1},
      {'feature': 'country', 'mean': 0.1, 'std': 0.01, 'columns': 1},
      {'feature': 'channel', 'mean': 0.0, 'std': 0.0, 'columns': 1}]}
  drift = {'features': {
      'amount': {'value': 0.27, 'threshold': 0.1, 'drifted': True,
                 'measure': 'jensen_shannon_distance'},
      'country': {'value': 0.02, 'threshold': 0.1, 'drifted': False},
      'channel': {'value': 0.5, 'threshold': 0.1, 'drifted': True}}}
  skew = {'features': {'country': {'value': 0.3, 'threshold': 0.1,
                                   'drifted': True}}}
  moved = importance.important_drift(found, {'drift': drift, 'skew': skew},
                                     top=2)
  # The two most important; channel drifted but is not among them.
  assert [f['feature'] for f in moved['features']] == ['amount', 'country']
  assert moved['drifted'] == ['amount', 'country']
  assert moved['features'][0]['drift']['value'] == 0.27
  assert moved['features'][0]['skew'] is None   # not measured
  assert importance.important_drift(None, {'drift': drift}) is None
  nothing = importance.important_drift(found, {'drift': None, 'skew': None})
  assert nothing['drifted'] == []
