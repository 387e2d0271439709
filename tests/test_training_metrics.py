"""The trainer's binary metrics and threshold, recomputed with scikit-learn.

`pipelines.model.training.train` trains on a tiny hand-made transformed
table (two features, a few hundred rows; no tf.Transform run: the trainer
only copies the transform folder). The test rebuilds the trainer's time
split from the rows, refits the threshold model, picks the threshold by
scoring every candidate with scikit-learn's F1, and recomputes ROC AUC,
average precision and precision/recall at the threshold from the saved
model; all must equal what the trainer wrote to metadata.json.
"""

import json

import pipelines.base.quiet  # noqa: F401  (before TensorFlow)
import numpy as np
import pyarrow as pa
import pytest
from sklearn.metrics import (average_precision_score, f1_score,
                             precision_score, recall_score, roc_auc_score)

from pipelines.model import training
from schemas.dataset import load_dataset
from transforms import inference
from transforms import preprocess

DECLARATION = """
name: tiny
roles: {id: tx, timestamp: at, label: bad}
label: {classes: [0, 1]}
fields:
  tx: {type: string, required: true}
  at: {type: timestamp, required: true}
  x: {type: float, required: true}
  kind: {type: string, required: true, allowed: [a, b, c]}
  bad: {type: int, required: false}
transform:
  numeric: {x: z_score}
  categorical: {kind: {}}
"""
ROWS = 400
UNLABELLED = 10
T0_US = 1_700_000_000 * 1_000_000


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """(dataset, the transformed table, the model folder). logreg: gbt's
  three fits take far longer and the metric code is the same."""
  root = tmp_path_factory.mktemp('tiny')
  (root / 'tiny.yaml').write_text(DECLARATION)
  dataset = load_dataset(str(root / 'tiny.yaml'))
  rng = np.random.default_rng(5)
  x = rng.normal(size=ROWS)
  kind = rng.integers(0, 3, ROWS)
  bad = (rng.random(ROWS) < 1 / (1 + np.exp(-(2 * x + kind - 2.5))))
  labels = pa.array(bad.astype(np.int64), mask=np.arange(ROWS) < UNLABELLED)
  table = pa.table({
      'x_xf': x.astype(np.float32), 'kind_xf': kind,
      'tx': [f't{i:04d}' for i in range(ROWS)],
      # Rows out of time order, so that the split must sort them.
      'at': T0_US + rng.permutation(ROWS) * 60_000_000,
      'bad': labels}, schema=preprocess.transformed_arrow_schema(dataset))
  transform_dir = root / 'transform'
  (transform_dir / 'transform_fn').mkdir(parents=True)
  # An empty SavedModel: no analyzer output to hash into the version.
  (transform_dir / 'transform_fn' / 'saved_model.pb').write_bytes(b'')
  model_dir = root / 'model'
  training.train(table, transform_dir=str(transform_dir),
                 model_dir=str(model_dir), dataset=dataset,
                 model='logreg')
  return dataset, table, model_dir


def test_binary_metrics_and_threshold_equal_scikit_learns(trained):
  dataset, table, model_dir = trained
  written = json.loads((model_dir / 'metadata.json').read_text())
  features = written['features']
  assert features == ['x_xf', 'kind_xf']
  labelled = table.filter(table.column('bad').is_valid())
  x = np.column_stack([labelled.column(f).to_numpy().astype(np.float64)
                       for f in features])
  y = labelled.column('bad').to_numpy()

  # The time split, rebuilt: labelled rows by (time, id), the latest 20%
  # evaluate; of the training rows, the latest 20% pick the threshold.
  order = np.lexsort((np.array(labelled.column('tx').to_pylist()),
                      labelled.column('at').to_numpy()))
  n_eval = round(0.2 * len(order))
  train_rows, eval_rows = order[:-n_eval], order[-n_eval:]
  assert written['training']['rows'] == {'train': len(train_rows),
                                         'eval': len(eval_rows)}
  n_pick = round(0.2 * len(train_rows))
  fit_rows, pick_rows = train_rows[:-n_pick], train_rows[-n_pick:]

  # The threshold: of every score on the picking rows, the one whose
  # predictions (score >= it) have the highest F1; the lowest on a tie.
  def fitted(rows):
    return training.make_estimator(
        written['model_type'], features, written['categorical_features'],
        [], 'binary').fit(x[rows], y[rows])

  pick_scores = fitted(fit_rows).predict_proba(x[pick_rows])[:, 1]
  candidates = np.unique(pick_scores)
  f1 = [f1_score(y[pick_rows], (pick_scores >= t).astype(int))
        for t in candidates]
  threshold = float(candidates[int(np.argmax(f1))])
  assert written['threshold'] == pytest.approx(threshold, abs=1e-12)
  assert written['threshold_selection']['f1'] == pytest.approx(max(f1))
  assert written['threshold_selection']['method'] == (
      'max_f1_on_latest_20pct_of_train')

  # The saved model is the refit on the whole training split.
  with open(model_dir / 'model.skops', 'rb') as f:
    model = inference.loads_estimator(f.read(), 'model')
  np.testing.assert_allclose(model.predict_proba(x)[:, 1],
                             fitted(train_rows).predict_proba(x)[:, 1])

  for name, rows in (('train', train_rows), ('eval', eval_rows)):
    scores, labels = model.predict_proba(x[rows])[:, 1], y[rows]
    predicted = (scores >= threshold).astype(int)
    got = written['metrics'][name]
    assert (got['rows'], got['positives']) == (len(rows), labels.sum())
    assert got['roc_auc'] == pytest.approx(roc_auc_score(labels, scores))
    assert got['pr_auc'] == pytest.approx(
        average_precision_score(labels, scores))
    assert got['precision'] == pytest.approx(
        precision_score(labels, predicted, zero_division=0))
    assert got['recall'] == pytest.approx(
        recall_score(labels, predicted, zero_division=0))
  # The model learned: the comparisons above are not of a constant score.
  assert written['metrics']['eval']['roc_auc'] > 0.75


def test_a_random_split_names_its_threshold_rows_truly(tmp_path, trained):
  """Without a timestamp the rows that pick the threshold are a seeded
  stratified fifth of the training split, not its "latest" fifth: the
  method says so, and the threshold is the max-F1 one on those rows."""
  dataset, table, _ = trained
  (tmp_path / 'untimed.yaml').write_text(
      DECLARATION.replace('timestamp: at, ', '').replace(
          '  at: {type: timestamp, required: true}\n', ''))
  untimed = load_dataset(str(tmp_path / 'untimed.yaml'))
  table = table.drop(['at'])
  transform_dir = tmp_path / 'transform' / 'transform_fn'
  transform_dir.mkdir(parents=True)
  (transform_dir / 'saved_model.pb').write_bytes(b'')
  written = training.train(table, transform_dir=str(tmp_path / 'transform'),
                           model_dir=str(tmp_path / 'model'),
                           dataset=untimed, model='logreg')
  selection = written['threshold_selection']
  assert selection['method'] == (
      'max_f1_on_stratified_random_20pct_of_train_seed_0')
  assert 'random' in written['training']['split']
  labelled = table.filter(table.column('bad').is_valid())
  train_rows, _ = training.split(labelled, untimed, 0.2)
  fit_rows, pick_rows = training.stratified_split(train_rows, 'tx', 'bad')
  matrix = lambda rows: np.column_stack(
      [rows.column(f).to_numpy().astype(np.float64)
       for f in written['features']])
  model = training.make_estimator(
      'logreg', written['features'], written['categorical_features'], [],
      'binary').fit(matrix(fit_rows), fit_rows.column('bad').to_numpy())
  scores = model.predict_proba(matrix(pick_rows))[:, 1]
  labels = pick_rows.column('bad').to_numpy()
  f1 = {t: f1_score(labels, (scores >= t).astype(int))
        for t in np.unique(scores)}
  assert selection['threshold'] == pytest.approx(max(f1, key=f1.get),
                                                 abs=1e-12)
