"""RecordBatches and Tables pickle as Arrow IPC (transforms.arrow_pickle):
what Beam's coders and the stateful steps' state carry between steps."""

import pickle

from apache_beam.coders import coders
import numpy as np
import pyarrow as pa
import pytest

import transforms.common  # noqa: F401  (installs the reducers)
from transforms import arrow_pickle


def _batch(rows=1000):
  rng = np.random.default_rng(0)
  schema = pa.schema([
      ('id', pa.string()), ('amount', pa.float64()), ('n', pa.int64()),
      ('at', pa.timestamp('us', tz='UTC')), ('flag', pa.bool_()),
      ('big', pa.large_string()), ('tags', pa.list_(pa.string()))],
                     metadata={b'declared': b'transactions'})
  return pa.RecordBatch.from_arrays([
      pa.array([f'id{i}' if i % 7 else None for i in range(rows)]),
      pa.array(rng.random(rows)),
      pa.array(np.arange(rows)),
      pa.array(np.arange(rows) * 1_000_000, pa.timestamp('us', tz='UTC')),
      pa.array([i % 3 == 0 for i in range(rows)]),
      pa.array([f'é{i}' for i in range(rows)], pa.large_string()),
      pa.array([[f't{i}'] * (i % 3) for i in range(rows)])], schema=schema)


@pytest.mark.parametrize('protocol', [2, 4, 5])
def test_a_batch_reads_back_equal_with_its_schema(protocol):
  batch = _batch()
  back = pickle.loads(pickle.dumps(batch, protocol))
  assert back.equals(batch)
  assert back.schema.equals(batch.schema, check_metadata=True)


def test_a_slice_carries_its_own_rows_only():
  """pyarrow's own pickle wrote a slice with its parent's whole buffers."""
  batch = _batch(20000)
  whole = len(pickle.dumps(batch))
  piece = batch.slice(5000, 100)
  data = pickle.dumps(piece)
  assert len(data) < whole / 50
  assert pickle.loads(data).equals(piece)


def test_empty_batches_and_tables_keep_their_schema():
  batch = _batch().slice(0, 0)
  back = pickle.loads(pickle.dumps(batch))
  assert back.num_rows == 0 and back.schema.equals(batch.schema)
  table = pa.Table.from_batches([_batch(10), _batch(5)])
  assert pickle.loads(pickle.dumps(table)).equals(table)
  empty = table.schema.empty_table()
  assert pickle.loads(pickle.dumps(empty)).equals(empty)


def test_beams_coders_use_it():
  batch = _batch()
  for coder in (coders.FastPrimitivesCoder(), coders.PickleCoder()):
    key, back = coder.decode(coder.encode((3, batch)))
    assert key == 3 and back.equals(batch)
  # The element is Arrow's IPC stream inside the pickle, not pyarrow's
  # column-by-column reduction.
  assert arrow_pickle.batch_from_ipc.__name__.encode() in pickle.dumps(batch)
