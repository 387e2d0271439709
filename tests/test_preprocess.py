"""preprocessing_fn against hand-computed results on a tiny dataset.

The dataset declaration is narrowed to one feature of each kind; one
module-scoped AnalyzeAndTransform run feeds all assertions.
"""

from pipelines.base import quiet  # noqa: F401  pylint: disable=unused-import

import dataclasses
import json
import os
import pickle

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pytest
import tensorflow as tf
import tensorflow_transform as tft

from schemas.dataset import load_dataset
from transforms import arrow
from transforms import inference
from transforms import preprocess

SMALL = load_dataset().with_transform({
    'numeric': {'amount': 'log_z_score', 'user_id_count_24h': 'z_score',
                'user_id_is_new_country_7d': 'none'},
    'bucketize': {'event_hour': 2},
    'categorical': {'channel': {'oov_buckets': 1}},
})
# Distinct frequencies so the vocabulary order is unambiguous:
# pos x4, online x3, refund x2, atm x1.
CHANNELS = ['pos', 'online', 'pos', 'refund', 'online', 'atm', 'pos',
            'refund', 'online', 'pos']
AMOUNTS = [12.5, 250.0, 3.0, -40.0, 99.99, 60.0, 0.0, -7.25, 1500.0, 20.0]
COUNTS = [0, 1, 1, 2, 3, 5, 8, 0, 13, 2]
HOURS = [0, 2, 4, 6, 8, 10, 12, 14, 16, 18]


def small_row(i):
  """A row with the input columns of SMALL (features + passthrough keys)."""
  return {'transaction_id': f'tx{i:09d}', 'event_time': 1_000_000 * (50 + i),
          'is_fraud': None if i == 4 else i % 2,
          'amount': AMOUNTS[i], 'user_id_count_24h': COUNTS[i],
          'user_id_is_new_country_7d': i % 3 == 0 and 1 or 0,
          'event_hour': HOURS[i], 'channel': CHANNELS[i]}


def _z(values):
  values = np.asarray(values, dtype=np.float64)
  return (values - values.mean()) / values.std()  # population std, as tft


def small_batch(rows):
  """Rows -> a RecordBatch of flat input columns (None as null)."""
  types = preprocess.input_types(SMALL)
  return pa.RecordBatch.from_pylist(rows, schema=SMALL.batch_schema(types))


def _describe(batch):
  """An output element -> JSON: its type, schema and rows."""
  return json.dumps({'type': type(batch).__name__,
                     'schema': str(batch.schema), 'rows': batch.to_pylist()})


@pytest.fixture(scope='module')
def result(tmp_path_factory):
  root = tmp_path_factory.mktemp('preprocess')
  rows = [small_row(i) for i in range(len(AMOUNTS))]
  types = preprocess.input_types(SMALL)
  assert set(rows[0]) == set(types)
  transform_dir = str(root / 'transform')
  with beam.Pipeline() as p:
    # Two batches: analysis must combine across them.
    _ = (p
         | beam.Create([small_batch(rows[:6]), small_batch(rows[6:])])
         | arrow.ToTFXIOBatches(types)
         | preprocess.AnalyzeAndTransform(SMALL, transform_dir,
                                          temp_dir=str(root / 'tmp'))
         | beam.Map(_describe)
         | beam.io.WriteToText(str(root / 'out'), shard_name_template=''))
  with open(root / 'out') as f:
    elements = [json.loads(line) for line in f]
  out = sorted((r for e in elements for r in e['rows']),
               key=lambda r: r['transaction_id'])
  return {'rows': rows, 'out': out, 'elements': elements,
          'transform_dir': transform_dir}


def test_output_columns(result):
  schema = preprocess.transformed_arrow_schema(SMALL)
  expected = {f.name for f in schema}
  assert expected == {'amount_xf', 'user_id_count_24h_xf',
                      'user_id_is_new_country_7d_xf', 'event_hour_xf',
                      'channel_xf', 'transaction_id', 'event_time',
                      'is_fraud'}
  # RecordBatches of flat columns of exactly the transformed schema.
  assert result['elements']
  assert {(e['type'], e['schema']) for e in result['elements']} == {
      ('RecordBatch', str(schema))}
  assert len(result['out']) == len(result['rows'])
  assert all(set(r) == expected for r in result['out'])


def test_passthrough_id_time_label(result):
  got = [(r['transaction_id'], r['event_time'], r['is_fraud'])
         for r in result['out']]
  assert got == [(r['transaction_id'], r['event_time'], r['is_fraud'])
                 for r in result['rows']]
  assert got[4][2] is None  # a missing label stays missing


def test_z_score(result):
  got = [r['user_id_count_24h_xf'] for r in result['out']]
  np.testing.assert_allclose(got, _z(COUNTS), atol=1e-5)


def test_log_z_score_keeps_sign(result):
  signed_log = [np.sign(a) * np.log1p(abs(a)) for a in AMOUNTS]
  got = [r['amount_xf'] for r in result['out']]
  np.testing.assert_allclose(got, _z(signed_log), atol=1e-5)
  # Refunds (negative amounts) sort below a zero amount.
  zero = got[AMOUNTS.index(0.0)]
  assert got[AMOUNTS.index(-40.0)] < got[AMOUNTS.index(-7.25)] < zero


def test_none_scale_is_unchanged(result):
  assert [r['user_id_is_new_country_7d_xf'] for r in result['out']] == [
      float(r['user_id_is_new_country_7d']) for r in result['rows']]


def test_vocabulary_indices(result):
  output = tft.TFTransformOutput(result['transform_dir'])
  assert output.vocabulary_by_name('channel') == [b'pos', b'online',
                                                  b'refund', b'atm']
  index = {'pos': 0, 'online': 1, 'refund': 2, 'atm': 3}
  assert [r['channel_xf'] for r in result['out']] == [index[c]
                                                      for c in CHANNELS]


def test_buckets(result):
  # Two quantile buckets over 0, 2, ..., 18: the boundary lies in (8, 10].
  assert [r['event_hour_xf'] for r in result['out']] == [0] * 5 + [1] * 5


def test_serving_graph_oov_and_boundaries(result):
  """The written graph maps unseen values to the OOV index, needs no label."""
  layer = tft.TFTransformOutput(
      result['transform_dir']).transform_features_layer()
  probe = [dict(small_row(0), channel='crypto', event_hour=8),
           dict(small_row(1), channel='atm', event_hour=10)]
  out = layer(inference.raw_feature_tensors(
      small_batch(probe), preprocess.raw_input_types(SMALL)))
  assert 'is_fraud' not in out
  assert out['channel_xf'].numpy().tolist() == [4, 3]  # 4 = first OOV index
  assert out['event_hour_xf'].numpy().tolist() == [0, 1]
  assert out['channel_xf'].dtype == tf.int64


def test_transform_dir_layout(result):
  files = inference.list_files(result['transform_dir'])
  assert 'transform_fn/saved_model.pb' in files
  assert 'transformed_metadata/schema.pbtxt' in files
  assert not any(rel.startswith('tmp') for rel in files)
  assert os.path.isfile(os.path.join(result['transform_dir'], 'transform_fn',
                                     'assets', 'channel'))


def test_preprocessing_fn_pickles_and_checks_scales():
  fn = preprocess.make_preprocessing_fn(SMALL)
  again = pickle.loads(pickle.dumps(fn))
  assert again.keywords == fn.keywords
  assert fn.keywords['bucketize'] == {
      'event_hour': {'buckets': 2, 'indicator': False}}
  with pytest.raises(ValueError, match='amount'):
    SMALL.with_transform({'numeric': {'amount': 'log'}})


def test_to_tfxio_batch_nulls_are_null_lists():
  """Flat columns -> one-value large_lists; a null value -> a null list."""
  table = pa.Table.from_batches([
      pa.RecordBatch.from_pydict(
          {'channel': ['pos', None], 'amount': [1.5, None],
           'event_time': pa.array([1, 2], pa.timestamp('us', tz='UTC')),
           'is_fraud': [1, None], 'extra': ['dropped', 'dropped']}),
      pa.RecordBatch.from_pydict(
          {'channel': ['atm'], 'amount': [0.1],
           'event_time': pa.array([3], pa.timestamp('us', tz='UTC')),
           'is_fraud': pa.array([None], pa.int64()),
           'extra': ['dropped']})])
  types = {'is_fraud': 'int', 'channel': 'string', 'amount': 'float',
           'event_time': 'timestamp', 'user_id_count_24h': 'int'}
  batch = arrow.to_tfxio_batch(table, types)
  assert batch.schema == arrow.tfxio_arrow_schema(types)
  assert batch.schema.field('channel').type == pa.large_list(
      pa.large_binary())
  assert batch.to_pydict() == {
      'is_fraud': [[1], None, None],
      'channel': [[b'pos'], None, [b'atm']],
      # float32, as tf.Example floats: 0.1 is rounded.
      'amount': [[1.5], None, [float(np.float32(0.1))]],
      'event_time': [[1], [2], [3]],           # epoch microseconds
      'user_id_count_24h': [None, None, None],  # absent column: all missing
  }
  assert [batch.column(n).null_count for n in types] == [2, 1, 1, 0, 3]
  # A slice keeps its own rows.
  assert arrow.to_tfxio_batch(table.slice(1, 2), types).to_pydict()[
      'channel'] == [None, [b'atm']]


def test_flatten_transformed_lists_and_unary_passthrough():
  """tf.Transform's output: one-value lists -> flat values, an empty or
  null list -> null, ids bytes -> str, a unary passthrough on every row."""
  schema = pa.schema([('amount_xf', pa.float32()),
                      ('transaction_id', pa.string()),
                      ('event_time', pa.int64()), ('is_fraud', pa.int64())])

  def lists(values, value_type, mask=None):
    offsets = np.cumsum([0] + [len(v) for v in values])
    flat = [x for v in values for x in v]
    return pa.LargeListArray.from_arrays(
        pa.array(offsets, pa.int64()), pa.array(flat, value_type),
        mask=None if mask is None else pa.array(mask))

  batch = pa.RecordBatch.from_arrays(
      [lists([[0.5], [-1.0], [2.0]], pa.float32()),
       lists([[b'tx1'], [b'tx2'], [b'tx3']], pa.large_binary()),
       lists([[1], [], [0]], pa.int64(), mask=[False, False, True])],
      names=['amount_xf', 'transaction_id', 'is_fraud'])
  unary = {'event_time': lists([[7]], pa.int64())}
  out = preprocess.flatten_transformed((batch, unary), schema)
  assert out.schema == schema
  assert out.to_pydict() == {
      'amount_xf': [0.5, -1.0, 2.0],
      'transaction_id': ['tx1', 'tx2', 'tx3'],
      'event_time': [7, 7, 7],
      'is_fraud': [1, None, None]}
  with pytest.raises(ValueError, match='no column event_time'):
    preprocess.flatten_transformed((batch, {}), schema)
