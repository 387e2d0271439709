"""AnalyzeAndTransform -> train -> RunInference, end to end on synthetic rows.

One session fixture (`trained`, tests/trained_model.py) runs the
tf.Transform pipeline (writing Parquet `transformed/`) and trains the
default model once; the tests share it (and test_flink_kafka.py).
"""

from pipelines.base import quiet  # noqa: F401  pylint: disable=unused-import

import json
import hashlib
import pickle
import os
import shutil
import subprocess
import sys

import apache_beam as beam
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that
from apache_beam.testing.util import equal_to
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.model import stages as model_stages
from pipelines import train as train_cmd
from pipelines.model import training as train_lib
from schemas.dataset import load_dataset
from transforms import arrow
from transforms import inference
from transforms import preprocess
from transforms.sinks import WriteParquet

DATASET = load_dataset()
SCHEMA = DATASET.batch_schema(DATASET.feature_types())
T0_US = 1_700_000_000 * 1_000_000
# Training and serving run the same graph on the same float32 inputs, but
# TensorFlow's vectorised kernels may round a value's last bits differently
# by its position in the batch (seen: up to 2 ulps, 1.9e-6 at |x| < 8), and
# tf.Transform's batches are not the serving ones.
FLOAT32_TOL = 4e-6
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


def synthetic_rows(n=1200, is_fraud_rate=0.1, seed=0):
  rng = np.random.RandomState(seed)
  return [feature_row(i, fraud=rng.rand() < is_fraud_rate, rng=rng)
          for i in range(n)]


def to_batch(rows):
  """Feature rows -> one RecordBatch of the pipeline's flat feature columns
  (None as null)."""
  return pa.RecordBatch.from_pylist(rows, schema=SCHEMA)


def to_batches(rows, rows_per_batch):
  return [to_batch(rows[i:i + rows_per_batch])
          for i in range(0, len(rows), rows_per_batch)]


def batch_rows(batches):
  """PCollection contents of RecordBatches -> their rows, for matchers."""
  return [row for batch in batches for row in batch.to_pylist()]


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
  assert 'model.skops' in files and 'metadata.json' in files
  assert 'transform_fn/transform_fn/saved_model.pb' in files
  assert 'transform_fn/transformed_metadata/schema.pbtxt' in files
  on_disk = json.loads((trained['root'] / 'model' / 'metadata.json')
                       .read_text())
  assert on_disk == metadata
  assert set(metadata['files']) == set(files) - {'metadata.json'}
  # The version names the training data and settings and what was
  # learned, not the files (skops files differ byte for byte between
  # equal fits, tf.Transform's SavedModel between equal analyses).
  assert metadata['model_version'] == train_lib.learned_version(
      train_lib.data_version(trained['table'], DATASET, 'gbt'),
      (trained['root'] / 'model' / 'model.skops').read_bytes(),
      trained['transform_dir'])
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
  raw = to_batch(sorted(  # serving rows have no label
      (dict(r, is_fraud=None) for r in trained['rows']),
      key=lambda r: r['transaction_id']))
  handler = inference.TransformedSklearnModelHandler(trained['model_dir'])
  model = handler.load_model()
  serve_x = inference.transformed_matrix(model, raw)
  assert serve_x.shape == train_x.shape == (raw.num_rows, len(features))
  np.testing.assert_allclose(serve_x, train_x, rtol=0, atol=FLOAT32_TOL)
  # The unpadded graph agrees too (the padding only fixes the last bits).
  np.testing.assert_allclose(
      model.transform_layer(inference.grouped_feature_tensors(
          raw, metadata)).numpy(), train_x, rtol=0, atol=FLOAT32_TOL)
  # Serving values do not depend on the batch: 1200 rows at once, or in
  # slices of 1, 7 and 300 rows, give the very same bits.
  for size in (1, 7, 300):
    np.testing.assert_array_equal(
        np.concatenate([inference.transformed_matrix(model, b)
                        for b in arrow.slices(raw.slice(0, 300), size)]),
        serve_x[:300])
  # And the handler's scores are the model's scores on the training matrix,
  # one result per element, each with its element's rows in order.
  elements = [raw.slice(0, 20), raw.slice(20, 1), raw.slice(21, 29)]
  results = handler.run_inference(elements, model)
  assert [r.example for r in results] == elements
  assert [r.inference.num_rows for r in results] == [20, 1, 29]
  predictions = pa.Table.from_batches([r.inference for r in results])
  assert predictions.schema == DATASET.prediction_schema()
  assert predictions.column('transaction_id').to_pylist() == (
      raw.column('transaction_id').to_pylist()[:50])
  expected = model.estimator.predict_proba(train_x[:50])[:, 1]
  np.testing.assert_allclose(predictions.column('score').to_numpy(),
                             expected, rtol=0, atol=1e-9)
  assert predictions.column('predicted_label').to_pylist() == [
      int(s >= metadata['threshold']) for s in expected]
  assert set(predictions.column('model_version').to_pylist()) == {
      metadata['model_version']}
  assert all(r.model_id == metadata['model_version'] for r in results)


def test_scoring_formats_no_tensor(trained, monkeypatch):
  """The loaded transform graph binds its inputs without a failed try:
  called as a Keras layer, every call first failed to bind and formatted
  every input tensor into the TypeError's message (5 % of the Flink
  workers' time), then fell back."""
  from tensorflow.python.framework import ops  # pylint: disable=g-import-not-at-top
  formatted = []
  real = ops._EagerTensorBase.__repr__  # pylint: disable=protected-access
  monkeypatch.setattr(ops._EagerTensorBase, '__repr__',  # pylint: disable=protected-access
                      lambda t: formatted.append(1) or real(t))
  model = inference.TransformedSklearnModelHandler(
      trained['model_dir']).load_model()
  raw = to_batch([dict(r, is_fraud=None) for r in trained['rows'][:40]])
  assert inference.transformed_matrix(model, raw).shape[0] == 40
  assert not formatted


def test_the_graph_takes_one_tensor_per_type_not_one_per_feature(
    trained, monkeypatch):
  """Scoring a batch makes one input tensor per raw type (strings, floats,
  ints), not one per raw feature: each tensor made and checked against the
  signature cost more than the graph on a one-row batch (the service)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  model = inference.TransformedSklearnModelHandler(
      trained['model_dir']).load_model()
  metadata = model.metadata
  assert len(metadata['raw_features']) > 10
  args, kwargs = model.transform_layer.structured_input_signature
  [inputs] = list(args) + list(kwargs.values())
  assert sorted(inputs) == ['float', 'int', 'string']
  made = []
  real = tf.constant
  monkeypatch.setattr(tf, 'constant', lambda *a, **k: made.append(1) or
                      real(*a, **k))
  raw = to_batch([dict(r, is_fraud=None) for r in trained['rows'][:1]])
  matrix = inference.transformed_matrix(model, raw)
  assert matrix.shape == (1, len(metadata['features']))
  assert len(made) == 3


def test_a_process_that_scored_exits_without_a_traceback(trained):
  """The traced graph outlives TensorFlow's globals at exit; its
  destructor's TypeError used to print a traceback after the summary."""
  code = ('import pipelines.base.quiet, sys\n'
          'from transforms import inference\n'
          'from tests.test_train_inference import to_batch, synthetic_rows\n'
          f'model = inference.TransformedSklearnModelHandler({trained["model_dir"]!r})'
          '.load_model()\n'
          'rows = [dict(r, is_fraud=None) for r in synthetic_rows(20)]\n'
          'print(inference.transformed_matrix(model, to_batch(rows)).shape)\n')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True,
                          text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip().startswith('(20,')
  assert 'Traceback' not in result.stderr, result.stderr


def test_batch_scores_equal_scores_of_each_row_alone(trained):
  """Scoring rows together (one transform and model call) gives each row
  the score it gets alone: no row's result depends on its batch. Exactly:
  the transformed values are the same bits (PAD_ROWS), and a tree
  ensemble scores each row on its own."""
  rows = [dict(r, is_fraud=None) for r in trained['rows'][:60]]
  handler = inference.TransformedSklearnModelHandler(trained['model_dir'])
  model = handler.load_model()
  together = handler.run_inference([to_batch(rows[:25]), to_batch(rows[25:])],
                                   model)
  together = pa.Table.from_batches([r.inference for r in together])
  alone = pa.Table.from_batches(
      [r.inference for row in rows
       for r in handler.run_inference([to_batch([row])], model)])
  assert together.column('transaction_id').to_pylist() == [
      r['transaction_id'] for r in rows]
  assert together.to_pylist() == alone.to_pylist()
  # An empty element gets an empty prediction batch of the same schema.
  [empty] = handler.run_inference([to_batch([])], model)
  assert empty.inference.num_rows == 0
  assert empty.inference.schema == DATASET.prediction_schema()


def test_handler_refuses_missing_features(trained):
  handler = inference.TransformedSklearnModelHandler(trained['model_dir'])
  model = handler.load_model()
  rows = [dict(trained['rows'][0], amount=None)]
  with pytest.raises(ValueError, match='amount is missing in 1 row'):
    handler.run_inference([to_batch(rows)], model)
  no_amount = pa.Table.from_pylist(rows, schema=SCHEMA).drop(['amount'])
  with pytest.raises(ValueError, match='amount is missing'):
    handler.run_inference([no_amount], model)


def _copy_model(trained, tmp_path):
  target = str(tmp_path / 'model')
  shutil.copytree(trained['model_dir'], target)
  return target


def test_a_model_folder_loads_once_per_process_until_it_changes(
    trained, tmp_path):
  """Every load verifies the folder; an unchanged folder gives the model
  already loaded (the DirectRunner sets up a DoFn, so RunInference loads,
  for every bundle), a changed one is loaded anew."""
  model_dir = _copy_model(trained, tmp_path)
  first = inference.TransformedSklearnModelHandler(model_dir).load_model()
  again = inference.TransformedSklearnModelHandler(model_dir).load_model()
  assert again is first
  _edit_metadata(model_dir, threshold=0.125)
  edited = inference.TransformedSklearnModelHandler(model_dir).load_model()
  assert edited is not first
  assert edited.metadata['threshold'] == 0.125
  os.remove(os.path.join(model_dir, 'model.skops'))
  with pytest.raises(inference.ModelIntegrityError, match='missing'):
    inference.TransformedSklearnModelHandler(model_dir).load_model()


@pytest.mark.parametrize('relative', [
    'model.skops', 'transform_fn/transform_fn/assets/merchant_category'])
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
  os.remove(os.path.join(model_dir, 'model.skops'))
  with pytest.raises(inference.ModelIntegrityError, match='model.skops'):
    inference.verify_model_dir(model_dir)


def _rewrite(model_dir, relative, data):
  """Replaces a file and its recorded sha256, as anyone who can write the
  folder could: the hashes alone are no defence against that."""
  with open(os.path.join(model_dir, relative), 'wb') as f:
    f.write(data)
  path = os.path.join(model_dir, inference.METADATA_FILE)
  with open(path) as f:
    metadata = json.load(f)
  metadata['files'][relative] = hashlib.sha256(data).hexdigest()
  with open(path, 'w') as f:
    json.dump(metadata, f)


class Payload:
  """What an attacker would put in a model file: it runs code when
  unpickled (it writes a file next to the model)."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, 'w'))


def test_a_pickle_in_place_of_the_model_is_not_loaded(trained, tmp_path):
  model_dir = _copy_model(trained, tmp_path)
  marker = str(tmp_path / 'pwned')
  _rewrite(model_dir, 'model.skops', pickle.dumps(Payload(marker)))
  with pytest.raises(inference.ModelIntegrityError, match='not a skops'):
    inference.TransformedSklearnModelHandler(model_dir).load_model()
  assert not os.path.exists(marker)


def test_a_model_file_with_an_untrusted_type_is_refused(trained, tmp_path):
  import skops.io as sio
  model_dir = _copy_model(trained, tmp_path)
  _rewrite(model_dir, 'model.skops', sio.dumps(Payload(str(tmp_path / 'x'))))
  with pytest.raises(inference.ModelIntegrityError, match='untrusted type'):
    inference.TransformedSklearnModelHandler(model_dir).load_model()
  assert not os.path.exists(tmp_path / 'x')


@pytest.mark.parametrize('key,value', [
    ('model_file', '../elsewhere/model.skops'),
    ('model_file', '/etc/passwd'),
    ('transform_dir', '../../transform_fn'),
    ('split_file', '../elsewhere/split.parquet')])
def test_paths_that_leave_the_model_folder_are_refused(trained, tmp_path,
                                                       key, value):
  model_dir = _copy_model(trained, tmp_path)
  path = os.path.join(model_dir, inference.METADATA_FILE)
  with open(path) as f:
    metadata = json.load(f)
  metadata[key] = value
  with open(path, 'w') as f:
    json.dump(metadata, f)
  with pytest.raises(inference.ModelIntegrityError, match='leaves the model'):
    inference.verify_model_dir(model_dir)


@pytest.mark.parametrize('relative', [
    'model.skops',                                    # the estimator
    'transform_fn/transform_fn/saved_model.pb',       # a graph file
    'transform_fn/transform_fn/assets'])              # a graph folder
def test_a_link_out_of_the_model_folder_is_refused(trained, tmp_path,
                                                   relative):
  # The link's target has the very bytes metadata.json lists, so only
  # resolving the path can tell: the lexical check passes it.
  model_dir = _copy_model(trained, tmp_path)
  inside = os.path.join(model_dir, relative)
  outside = str(tmp_path / 'elsewhere')
  shutil.move(inside, outside)
  os.symlink(outside, inside)
  with pytest.raises(inference.ModelIntegrityError,
                     match=f'{relative} is a link that leaves the model'):
    inference.TransformedSklearnModelHandler(model_dir).load_model()


def test_a_link_inside_the_model_folder_still_loads(trained, tmp_path):
  model_dir = _copy_model(trained, tmp_path)
  os.rename(os.path.join(model_dir, 'model.skops'),
            os.path.join(model_dir, 'transform_fn', 'm'))
  os.symlink(os.path.join('transform_fn', 'm'),
             os.path.join(model_dir, 'model.skops'))
  # Refused as an unlisted file (transform_fn/m), not as a link that leaves.
  with pytest.raises(inference.ModelIntegrityError, match='not listed'):
    inference.verify_model_dir(model_dir)


@pytest.fixture
def signed(trained, tmp_path, monkeypatch):
  """A model trained with $MLPIPE_MODEL_KEY set: the trainer signs it."""
  monkeypatch.setenv(inference.SIGNING_KEY_ENV, 'operator secret')
  model_dir = str(tmp_path / 'signed')
  train_lib.train(trained['table'], transform_dir=trained['transform_dir'],
                  model_dir=model_dir, dataset=DATASET)
  return model_dir


def _edit_metadata(model_dir, **changes):
  path = os.path.join(model_dir, inference.METADATA_FILE)
  with open(path) as f:
    metadata = json.load(f)
  metadata.update(changes)
  with open(path, 'w') as f:
    json.dump(metadata, f)


def test_the_trainer_signs_with_the_key_and_only_signed_models_load(
    trained, signed, tmp_path):
  assert inference.verify_model_dir(signed)['signature']
  inference.TransformedSklearnModelHandler(signed).load_model()
  # The module's model was trained without the key: refused.
  with pytest.raises(inference.ModelIntegrityError, match='not signed'):
    inference.verify_model_dir(trained['model_dir'])
  # Replacing a file and its hash (as in _rewrite) breaks the signature.
  model_dir = str(tmp_path / 'rewritten')
  shutil.copytree(signed, model_dir)
  _rewrite(model_dir, 'model.skops', b'other bytes')
  with pytest.raises(inference.ModelIntegrityError, match='not signed'):
    inference.verify_model_dir(model_dir)


@pytest.mark.parametrize('changes', [
    {'threshold': 0.999},                              # every label flips
    {'risk': {'bands': [['low', 0.0], ['high', 0.01]],
              'confidence': 'probability'}},           # bands
    {'features': ['amount_xf']}])                       # what is scored
def test_an_edited_metadata_of_a_signed_model_is_refused(signed, changes):
  _edit_metadata(signed, **changes)
  with pytest.raises(inference.ModelIntegrityError, match='not signed'):
    inference.TransformedSklearnModelHandler(signed).load_model()


def test_rewriting_the_metadata_signs_it_again(signed):
  # The choice between model types adds `compared` after training.
  metadata = inference.read_metadata(signed)
  inference.write_metadata(signed, dict(metadata, compared={'chosen': 'gbt'}))
  assert inference.verify_model_dir(signed)['compared'] == {'chosen': 'gbt'}


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
                        'risk_category', 'confidence', 'split',
                        'model_version', 'scored_at'}
      assert p['scored_at'] is None      # no --reference_time
      # Not the batch run that trained the model: no row is marked.
      assert p['split'] == 'scored'
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


def test_each_prediction_says_the_split_its_row_was_in(trained):
  """Scored by the run that trained it (mark_splits), a row's `split` is
  train or eval as the trainer split it, by id; a row it never saw is
  `scored`; without mark_splits every row is `scored`."""
  train_rows, eval_rows = train_lib.split(trained['table'], DATASET, 0.2)
  unseen = [dict(r, transaction_id=f'new{i}') for i, r in
            enumerate(trained['rows'][:20])]
  batch = to_batch(trained['rows'] + unseen)
  marked = inference.TransformedSklearnModelHandler(
      trained['model_dir'], mark_splits=True)
  result, = marked.run_inference([batch], marked.load_model())
  split = dict(zip(result.inference.column('transaction_id').to_pylist(),
                   result.inference.column('split').to_pylist()))
  assert {i for i, s in split.items() if s == 'eval'} == set(
      eval_rows.column('transaction_id').to_pylist())
  assert {i for i, s in split.items() if s == 'train'} == set(
      train_rows.column('transaction_id').to_pylist())
  assert {i for i, s in split.items() if s == 'scored'} == {
      r['transaction_id'] for r in unseen}
  rows = trained['metadata']['training']['rows']
  assert list(split.values()).count('eval') == rows['eval']
  plain = inference.TransformedSklearnModelHandler(trained['model_dir'])
  result, = plain.run_inference([batch], plain.load_model())
  assert set(result.inference.column('split').to_pylist()) == {'scored'}


def test_score_batches_one_prediction_row_per_input_row(trained):
  rows = [dict(r, is_fraud=None) for r in trained['rows'][:90]]
  handler = inference.TransformedSklearnModelHandler(trained['model_dir'])
  expected = pa.Table.from_batches([r.inference for r in handler.run_inference(
      [to_batch(rows)], handler.load_model())]).to_pylist()
  schema = DATASET.prediction_schema()

  def check_schemas(batches):
    assert batches and all(b.schema == schema for b in batches)
    # 50-row inputs are cut into slices of at most max_batch_size rows.
    assert max(b.num_rows for b in batches) <= 16

  def close_to(expected_rows):
    def check(batches):
      got = sorted(batch_rows(batches), key=lambda r: r['transaction_id'])
      assert [r['transaction_id'] for r in got] == [
          r['transaction_id'] for r in expected_rows]
      for g, e in zip(got, expected_rows):
        assert g == dict(e, score=pytest.approx(e['score'], abs=1e-9))
    return check

  with TestPipeline() as p:
    predictions = (p
                   | beam.Create(to_batches(rows, 50))
                   | inference.ScoreBatches(trained['model_dir'],
                                            max_batch_size=16))
    assert_that(predictions, check_schemas, label='Schemas')
    assert_that(predictions, close_to(expected), label='Predictions')


def test_model_stages_transform_and_score(trained, tmp_path):
  """build_transform and build_score on a features Parquet table (its
  timestamps a timestamp column, as the features sink writes them)."""
  rows = trained['rows']
  features = tmp_path / 'features'
  features.mkdir()
  pq.write_table(pa.Table.from_pylist(
      rows, schema=DATASET.arrow_schema(DATASET.feature_types())),
                 str(features / 'part-0.parquet'), row_group_size=500)
  glob = str(features / '*.parquet')
  out = str(tmp_path / 'out')
  # FnApiRunner: the default DirectRunner first looks for Prism (slower).
  with beam.Pipeline('FnApiRunner') as p:
    model_stages.build_transform(p, DATASET, glob, out)
  p = beam.Pipeline('FnApiRunner')
  predictions = model_stages.build_score(p, DATASET, glob,
                                         trained['model_dir'], out)

  def check_schemas(schemas):
    assert schemas and set(schemas) == {str(DATASET.prediction_schema())}

  assert_that(predictions | beam.Map(lambda b: str(b.schema)),
              check_schemas, label='Schemas')
  result = p.run()
  result.wait_until_finish()
  counters = {c.key.metric.name: c.committed for c in
              result.metrics().query()['counters']}
  assert counters['feature_rows_scored'] == len(rows)
  assert counters['predictions_written'] == len(rows)

  # Transformed: the fixture's table again (same rows, same analysis).
  got = train_lib.read_transformed(
      str(tmp_path / 'out' / model_stages.TRANSFORMED)).sort_by(
          'transaction_id')
  want = trained['table'].sort_by('transaction_id')
  assert got.schema == want.schema == preprocess.transformed_arrow_schema(
      DATASET)
  for name in got.column_names:
    if pa.types.is_floating(got.schema.field(name).type):
      np.testing.assert_allclose(got.column(name).to_numpy(),
                                 want.column(name).to_numpy(), atol=1e-5)
    else:
      assert got.column(name).equals(want.column(name)), name

  # Predictions: JSON lines and Parquet hold the same rows, one per row.
  model = inference.TransformedSklearnModelHandler(trained['model_dir'])
  expected = sorted(pa.Table.from_batches(
      [r.inference for r in model.run_inference(
          [to_batch(rows)], model.load_model())]).to_pylist(),
                    key=lambda r: r['transaction_id'])
  folder = tmp_path / 'out' / model_stages.PREDICTIONS
  lines = sorted((json.loads(line) for f in sorted(folder.glob('*.jsonl'))
                  for line in open(f)), key=lambda r: r['transaction_id'])
  parquet = pa.concat_tables(
      pq.read_table(str(f)) for f in sorted(folder.glob('*.parquet'))
  ).sort_by('transaction_id')
  assert parquet.schema == DATASET.prediction_schema()
  assert parquet.to_pylist() == lines
  assert [r['transaction_id'] for r in lines] == [
      r['transaction_id'] for r in expected]
  for g, e in zip(lines, expected):
    assert g == dict(e, score=pytest.approx(e['score'], abs=1e-9))


def test_importance_is_computed_again_from_the_model_file(trained):
  """eval_importance (the kept model of --model_type auto) gives what
  train computes itself: same eval split, same estimator read back."""
  found = train_lib.eval_importance(trained['table'], trained['model_dir'],
                                    DATASET)
  assert found == trained['metadata']['importance']
  assert found['metric'] == 'roc_auc' and found['features']


def test_auto_computes_importance_for_the_kept_model_only(trained, tmp_path):
  """train_stage with auto: gbt and logreg compete on the fixture's rows;
  the kept model's metadata has its importance, the other candidate's has
  none (permuting every feature is the dearest part of training)."""
  out = tmp_path / 'out'
  shutil.copytree(trained['root'] / 'transformed',
                  out / model_stages.TRANSFORMED)
  shutil.copytree(trained['transform_dir'], out / model_stages.TRANSFORM_FN)
  (out / 'features').mkdir()
  pq.write_table(pa.Table.from_pylist(
      trained['rows'], schema=DATASET.arrow_schema(DATASET.feature_types())),
                 str(out / 'features' / 'part-0.parquet'))
  metadata = model_stages.train_stage(DATASET, str(out), 'auto', None)
  chosen = metadata['compared']['chosen']
  assert set(metadata['compared']['eval']) == {'gbt', 'logreg'}
  other, = {'gbt', 'logreg'} - {chosen}
  assert inference.read_metadata(str(
      out / model_stages.CANDIDATES / other))['importance'] is None
  kept = inference.verify_model_dir(str(out / model_stages.MODEL))
  assert kept['importance'] == metadata['importance']
  assert {f['feature'] for f in kept['importance']['features']} == set(
      DATASET.model_features())
  # The chosen candidate's own folder: trained without it.
  assert inference.read_metadata(str(
      out / model_stages.CANDIDATES / chosen))['importance'] is None


def test_logreg_baseline_and_cli(trained, tmp_path):
  code = train_cmd.main([
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


def _graph_with_one_constant_changed(transform_dir, copy_dir):
  """A copy of a tft output dir whose transform graph has one analyzer
  result moved by one float32 step (as an approximate quantile boundary
  or a mean reduced in another order would be on another runner)."""
  from tensorflow.core.protobuf import saved_model_pb2
  shutil.copytree(transform_dir, copy_dir)
  path = os.path.join(copy_dir, 'transform_fn', 'saved_model.pb')
  saved = saved_model_pb2.SavedModel.FromString(open(path, 'rb').read())
  for node in saved.meta_graphs[0].graph_def.node:
    tensor = node.attr['value'].tensor
    if node.op == 'Const' and tensor.dtype == 1 and tensor.float_val:
      before = np.float32(tensor.float_val[0])
      tensor.float_val[0] = float(np.nextafter(before, np.float32(np.inf)))
      break
  else:
    raise AssertionError('no float constant in the transform graph')
  with open(path, 'wb') as f:
    f.write(saved.SerializeToString())


def test_the_version_changes_with_what_was_learned(trained, tmp_path):
  """Same rows, a different analyzer output or estimator: another
  version; equal fits (whose skops bytes differ) and equal analyses
  (whose SavedModel bytes differ): the same version."""
  key = train_lib.data_version(trained['table'], DATASET, 'gbt')
  estimator = (trained['root'] / 'model' / 'model.skops').read_bytes()
  graph = trained['transform_dir']
  version = train_lib.learned_version(key, estimator, graph)
  assert version == trained['metadata']['model_version']

  moved = str(tmp_path / 'moved')
  _graph_with_one_constant_changed(graph, moved)
  assert train_lib.learned_version(key, estimator, moved) != version
  vocabulary = str(tmp_path / 'vocabulary')
  shutil.copytree(graph, vocabulary)
  asset = os.path.join(vocabulary, 'transform_fn', 'assets', 'country')
  with open(asset, 'a', encoding='utf-8') as f:
    f.write('ZZ\n')
  assert train_lib.learned_version(key, estimator, vocabulary) != version

  from sklearn.linear_model import LogisticRegression
  x = np.arange(40, dtype=float).reshape(20, 2)
  y = np.arange(20) % 2
  fit = lambda c: inference.dumps_estimator(
      LogisticRegression(C=c).fit(x, y))
  one, again, other = fit(1.0), fit(1.0), fit(0.5)
  assert one != again    # skops names its parts by object id
  assert inference.estimator_digest(one) == inference.estimator_digest(again)
  assert inference.estimator_digest(one) != inference.estimator_digest(other)
  assert (train_lib.learned_version(key, one, graph) ==
          train_lib.learned_version(key, again, graph) !=
          train_lib.learned_version(key, other, graph))


def test_train_refuses_non_empty_model_dir(trained):
  with pytest.raises(train_lib.TrainingError, match='not empty'):
    train_lib.train(trained['table'], transform_dir=trained['transform_dir'],
                    model_dir=trained['model_dir'], dataset=DATASET)
