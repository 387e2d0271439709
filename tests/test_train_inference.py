"""AnalyzeAndTransform -> train -> RunInference, end to end on synthetic rows.

One module-scoped fixture runs the tf.Transform pipeline (writing Parquet
`transformed/`) and trains the default model once; the tests share it.
"""

from pipelines import quiet  # noqa: F401  pylint: disable=unused-import

import json
import os
import shutil

import apache_beam as beam
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that
from apache_beam.testing.util import equal_to
import numpy as np
import pytest

from pipelines import train as train_lib
from schemas.dataset import load_dataset
from transforms import arrow
from transforms import inference
from transforms import preprocess

DATASET = load_dataset()
T0_US = 1_700_000_000 * 1_000_000
# Training and serving features must agree to float32 precision: both run the
# same graph on the same float32 inputs, so the expected difference is 0.
FLOAT32_TOL = 1e-6
CATEGORIES = ['grocery', 'restaurant', 'fuel', 'travel', 'electronics']
COUNTRIES = ['US', 'CA', 'GB', 'DE', 'NG']


def feature_row(i, fraud=False, rng=None, **overrides):
  """A feature-table row with every key of dataset.feature_types().

  Fraud-like rows tend to be large online amounts in unusual places after a
  burst of activity; every signal overlaps between the classes.
  """
  rng = rng or np.random.RandomState(i)
  refund = not fraud and i % 23 == 0
  amount = (rng.lognormal(5.0, 0.8) if fraud else rng.lognormal(3.5, 0.8))
  amount = round(-amount if refund else amount, 2)
  count_1h = int(rng.poisson(2 if fraud else 0.5))
  row = {}
  for name, ftype in DATASET.feature_types().items():
    row[name] = ('x' if ftype == 'string' else
                 0.0 if ftype == 'float' else 0)
  row.update({
      'transaction_id': f'tx{i:09d}',
      'user_id': f'u{i % 97:05d}',
      'merchant_id': f'm{i % 211:05d}',
      'merchant_category': ('electronics' if fraud and rng.rand() < 0.4 else
                            CATEGORIES[rng.randint(len(CATEGORIES))]),
      'amount': amount,
      'currency': ['USD', 'EUR', 'GBP'][i % 3],
      'channel': ('refund' if refund else
                  'online' if rng.rand() < (0.8 if fraud else 0.3) else 'pos'),
      'country': ('NG' if rng.rand() < (0.3 if fraud else 0.02) else
                  COUNTRIES[rng.randint(4)]),
      'event_time': T0_US + i * 60_000_000,
      'is_fraud': int(fraud),
      'user_id_count_1h': count_1h,
      'user_id_count_24h': count_1h + int(rng.poisson(3)),
      'user_id_count_7d': count_1h + int(rng.poisson(15)),
      'user_id_sum_1h': round(abs(amount) * count_1h, 2),
      'user_id_sum_24h': round(abs(amount) * (count_1h + 3), 2),
      'user_id_sum_7d': round(abs(amount) * (count_1h + 15), 2),
      'user_id_mean_24h': round(rng.lognormal(3.5, 0.5), 2),
      'user_id_mean_7d': round(rng.lognormal(3.5, 0.5), 2),
      'user_id_max_24h': round(rng.lognormal(4.0, 0.5), 2),
      'user_id_max_7d': round(rng.lognormal(4.5, 0.5), 2),
      'user_id_distinct_merchant_id_24h': int(rng.poisson(2 if fraud else 1)),
      'user_id_distinct_country_24h': int(
          1 + rng.poisson(0.5 if fraud else 0.1)),
      'user_id_is_new_country_7d': int(rng.rand() < (0.4 if fraud else 0.1)),
      'user_id_is_new_merchant_id_7d': int(rng.rand() < (0.6 if fraud
                                                         else 0.3)),
      'user_id_amount_to_mean_7d': round(
          amount / rng.lognormal(3.5, 0.3), 4),
      'user_id_seconds_since_previous': float(
          rng.exponential(3000 if fraud else 20000)),
      'event_hour': int((i // 60) % 24),
  })
  row.update(overrides)
  assert set(row) == set(DATASET.feature_types())
  return row


def synthetic_rows(n=1200, fraud_rate=0.1, seed=0):
  rng = np.random.RandomState(seed)
  return [feature_row(i, fraud=rng.rand() < fraud_rate, rng=rng)
          for i in range(n)]


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """Runs AnalyzeAndTransform (-> Parquet) and trains the gbt model once."""
  root = tmp_path_factory.mktemp('e2e')
  rows = synthetic_rows()
  transform_dir = str(root / 'transform')
  types = preprocess.input_types(DATASET)
  with beam.Pipeline() as p:
    transformed = (p
                   | beam.Create(rows)
                   | arrow.RowsToTFXIOBatches(types, min_batch_size=100,
                                              max_batch_size=500)
                   | preprocess.AnalyzeAndTransform(
                       DATASET, transform_dir, temp_dir=str(root / 'tmp')))
    _ = transformed | beam.io.WriteToParquet(
        str(root / 'transformed' / 'part'),
        preprocess.transformed_arrow_schema(DATASET),
        file_name_suffix='.parquet')
  table = train_lib.read_transformed(str(root / 'transformed'))
  model_dir = str(root / 'model')
  metadata = train_lib.train(table, transform_dir=transform_dir,
                             model_dir=model_dir, dataset=DATASET)
  return {'root': root, 'rows': rows, 'table': table, 'metadata': metadata,
          'model_dir': model_dir, 'transform_dir': transform_dir}


def test_transformed_rows_pass_id_time_and_label_through(trained):
  table, rows = trained['table'], trained['rows']
  assert table.num_rows == len(rows)
  by_id = {r['transaction_id']: r for r in rows}
  got = table.select(['transaction_id', 'event_time', 'is_fraud']).to_pylist()
  assert {g['transaction_id'] for g in got} == set(by_id)
  for g in got:
    raw = by_id[g['transaction_id']]
    assert (g['event_time'], g['is_fraud']) == (raw['event_time'],
                                                raw['is_fraud'])


def test_model_dir_layout_and_metadata(trained):
  model_dir, metadata = trained['model_dir'], trained['metadata']
  files = inference.list_files(model_dir)
  assert 'model.joblib' in files and 'metadata.json' in files
  assert 'transform_fn/transform_fn/saved_model.pb' in files
  assert 'transform_fn/transformed_metadata/schema.pbtxt' in files
  on_disk = json.loads((trained['root'] / 'model' / 'metadata.json')
                       .read_text())
  assert on_disk == metadata
  assert set(metadata['files']) == set(files) - {'metadata.json'}
  assert metadata['model_version'] == inference.content_version(
      metadata['files'])
  assert metadata['features'] == preprocess.transformed_feature_names(DATASET)
  assert 0.0 < metadata['threshold'] < 1.0
  tr = metadata['training']
  # Time split: every training row is earlier than every evaluation row.
  assert tr['train_time_range']['max_us'] <= tr['eval_time_range']['min_us']
  assert tr['rows']['eval'] == round(0.2 * len(trained['rows']))
  bins = metadata['metrics']['eval']['reliability']
  assert len(bins) == 10
  assert sum(b['count'] for b in bins) == tr['rows']['eval']


def test_model_quality_on_separable_data(trained):
  ev = trained['metadata']['metrics']['eval']
  assert ev['roc_auc'] > 0.9
  assert ev['pr_auc'] > 0.6
  # The threshold came from the training split; it must still work later.
  assert ev['recall'] > 0.5 and ev['precision'] > 0.3
  assert ev['brier'] < 0.1


def test_no_train_serve_skew(trained):
  """The matrix training used equals what the serving handler builds."""
  metadata = trained['metadata']
  features = metadata['features']
  table = trained['table'].sort_by('transaction_id')
  train_x = inference.feature_matrix(
      {n: table.column(n) for n in features}, features)
  raw = sorted(trained['rows'], key=lambda r: r['transaction_id'])
  for r in raw:  # serving rows have no label
    r['is_fraud'] = None
  handler = inference.TransformedSklearnModelHandler(trained['model_dir'])
  model = handler.load_model()
  serve_x = inference.feature_matrix(
      model.transform_layer(inference.raw_feature_tensors(
          raw, metadata['raw_features'])), features)
  assert serve_x.shape == train_x.shape == (len(raw), len(features))
  np.testing.assert_allclose(serve_x, train_x, rtol=0, atol=FLOAT32_TOL)
  # And the handler's scores are the model's scores on the training matrix.
  results = handler.run_inference(raw[:50], model)
  expected = model.estimator.predict_proba(train_x[:50])[:, 1]
  np.testing.assert_allclose([r.inference['score'] for r in results],
                             expected, rtol=0, atol=1e-9)
  assert all(r.model_id == metadata['model_version'] for r in results)


def _copy_model(trained, tmp_path):
  target = str(tmp_path / 'model')
  shutil.copytree(trained['model_dir'], target)
  return target


@pytest.mark.parametrize('relative', [
    'model.joblib', 'transform_fn/transform_fn/assets/merchant_category'])
def test_tampered_file_refused(trained, tmp_path, relative):
  model_dir = _copy_model(trained, tmp_path)
  inference.TransformedSklearnModelHandler(model_dir).load_model()  # intact
  with open(os.path.join(model_dir, relative), 'ab') as f:
    f.write(b'\n')
  with pytest.raises(inference.ModelIntegrityError, match=relative):
    inference.TransformedSklearnModelHandler(model_dir).load_model()


def test_missing_and_unlisted_files_refused(trained, tmp_path):
  model_dir = _copy_model(trained, tmp_path)
  with open(os.path.join(model_dir, 'extra.txt'), 'w') as f:
    f.write('x')
  with pytest.raises(inference.ModelIntegrityError, match='extra.txt'):
    inference.verify_model_dir(model_dir)
  os.remove(os.path.join(model_dir, 'extra.txt'))
  os.remove(os.path.join(model_dir, 'model.joblib'))
  with pytest.raises(inference.ModelIntegrityError, match='model.joblib'):
    inference.verify_model_dir(model_dir)


def test_score_records_one_prediction_per_input(trained):
  rows = trained['rows'][:40]
  serving = [dict(r, is_fraud=None) for r in rows]
  version = trained['metadata']['model_version']
  threshold = trained['metadata']['threshold']

  def check(predictions):
    ids = sorted(p['transaction_id'] for p in predictions)
    assert ids == sorted(r['transaction_id'] for r in rows)
    for p in predictions:
      assert set(p) == {'transaction_id', 'score', 'predicted_label',
                        'model_version'}
      assert p['model_version'] == version
      assert 0.0 <= p['score'] <= 1.0
      assert p['predicted_label'] == int(p['score'] >= threshold)

  with TestPipeline() as p:
    predictions = (p | beam.Create(serving)
                   | inference.ScoreRecords(trained['model_dir'],
                                            max_batch_size=16))
    assert_that(predictions, check)
    assert_that(predictions | beam.Map(lambda x: x['transaction_id']),
                equal_to([r['transaction_id'] for r in rows]),
                label='Ids')


def test_logreg_baseline_and_cli(trained, tmp_path):
  code = train_lib.main([
      '--transformed', str(trained['root'] / 'transformed' / '*.parquet'),
      '--transform_dir', trained['transform_dir'],
      '--model_dir', str(tmp_path / 'logreg'), '--model', 'logreg',
      '--model_version', 'run-42'])
  assert code == 0
  metadata = inference.verify_model_dir(str(tmp_path / 'logreg'))
  assert metadata['model_version'] == 'run-42'
  assert metadata['model_type'] == 'logreg'
  assert metadata['metrics']['eval']['roc_auc'] > 0.9


def test_training_is_deterministic(trained, tmp_path):
  again = train_lib.train(trained['table'],
                          transform_dir=trained['transform_dir'],
                          model_dir=str(tmp_path / 'again'), dataset=DATASET)
  assert again['model_version'] == trained['metadata']['model_version']
  assert again['metrics'] == trained['metadata']['metrics']


def test_train_refuses_non_empty_model_dir(trained):
  with pytest.raises(train_lib.TrainingError, match='not empty'):
    train_lib.train(trained['table'], transform_dir=trained['transform_dir'],
                    model_dir=trained['model_dir'], dataset=DATASET)
