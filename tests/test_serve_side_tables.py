"""The scoring service on a declaration with side tables and two
histories (interactions: the items table joined by item_id, history per
user and per item), against the batch job.

One batch run (module scope) on 6,000 generated interactions with
--side_table items=... and --online_store trains a model and writes the
feature rows and predictions. The service, given the same side table,
must give each record the batch job's features (the joined item columns
and both entities' history features) and score.
"""

import glob
import json
import warnings

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines import batch
from pipelines import generate
from pipelines import serve
from schemas.dataset import load_dataset
from pipelines.serving import materialise
from transforms import online_store
from transforms.parse import rfc3339_to_micros
from tests.redis_server import RedisServer

with warnings.catch_warnings():   # Starlette's note that httpx2 exists
  warnings.simplefilter('ignore')
  from starlette.testclient import TestClient

DATASET = load_dataset('interactions')
SIDE = [n for n in DATASET.side_tables['items']['fields'] if n != 'item_id']
HISTORY = list(DATASET.history_feature_types())


def _rows(pattern):
  return [r for f in sorted(glob.glob(pattern))
          for r in pq.read_table(f).to_pylist()]


def _order(record):
  return (rfc3339_to_micros(record['event_time']), record['interaction_id'])


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('serve_side')
  server = RedisServer(tmp / 'redis').start()
  data = tmp / 'interactions.jsonl'
  assert generate.run(['--schema', 'interactions', '--output', str(data),
                       '--rows', '6000', '--seed', '5']) == 0
  out = tmp / 'out'
  summary = batch.run(['--schema', 'interactions', '--input', str(data),
                       '--side_table', f'items={tmp / "items.csv"}',
                       '--output_dir', str(out),
                       '--online_store', server.url(0)])
  try:
    yield dict(
        tmp=tmp, server=server, summary=summary,
        items=str(tmp / 'items.csv'), model_dir=str(out / 'model'),
        records=sorted((json.loads(line) for line in open(data)),
                       key=_order),
        features={r['interaction_id']: r for r in _rows(
            str(out / 'features' / '*.parquet'))},
        predictions={r['interaction_id']: r for r in _rows(
            str(out / 'predictions' / '*.parquet'))},
        out=out)
  finally:
    server.stop()


def _client(run, db):
  args = serve.parse_flags([
      '--schema', 'interactions', '--model_dir', run['model_dir'],
      '--online_store', run['server'].url(db),
      '--side_table', f'items={run["items"]}',
      '--store_timeout_ms', '2000'])   # a busy machine: answers, not speed
  return TestClient(serve.build_app(args))


def test_replayed_records_get_the_batch_features_and_score(run, tmp_path):
  """State as of a cut time (the batch materialisation of the earlier
  feature rows), then every later record scored in event-time order with
  ?update=true: each answer's features are its batch feature row's (the
  item's category and price from the side table, the user's and the
  item's history) and its score the batch prediction."""
  model = run['summary']['model']
  assert set(SIDE) & set(json.load(open(
      f'{run["model_dir"]}/metadata.json'))['raw_features'])
  cut = _order(run['records'][4800])[0]
  earlier = {r['interaction_id'] for r in run['records']
             if _order(r)[0] < cut}
  later = [r for r in run['records'] if _order(r)[0] >= cut]
  assert len(later) >= 1000
  table = pq.read_table(sorted(glob.glob(
      str(run['out'] / 'features' / '*.parquet'))))
  pq.write_table(table.filter(pa.compute.is_in(
      table.column('interaction_id'), value_set=pa.array(sorted(earlier)))),
      str(tmp_path / 'earlier.parquet'))
  written = materialise.materialise(
      PipelineOptions([]), DATASET, str(tmp_path / '*.parquet'),
      run['server'].url(1), model['version'], 4)
  assert written['writes_failed'] == 0
  client = _client(run, 1)
  for record in later:
    response = client.post('/score?update=true', content=json.dumps(record))
    assert response.status_code == 200, response.text
    body = response.json()
    rid = record['interaction_id']
    row, prediction = run['features'][rid], run['predictions'][rid]
    assert body['features'] == {n: row[n] for n in HISTORY}, rid
    assert body['side_tables'] == {n: row[n] for n in SIDE}, rid
    for key in ('score', 'predicted_label', 'model_version'):
      assert body[key] == prediction[key], (rid, key)
  # The store ends as the batch job left its own, for both entities.
  for spec in DATASET.histories:
    keys = online_store.Keys(DATASET, spec)
    batch_store = redis.Redis.from_url(run['server'].url(0))
    served_store = redis.Redis.from_url(run['server'].url(1))
    for entity in {r[spec.entity] for r in run['records']}:
      assert _state(served_store, keys, entity) == _state(
          batch_store, keys, entity), (spec.entity, entity)


def _state(client, keys, entity):
  times, records, latest = keys.of(entity)
  return (sorted(client.zrange(times, 0, -1, withscores=True)),
          client.hgetall(records), client.hgetall(latest))


def test_a_side_table_flag_for_no_declared_table_is_one_line(run, capsys):
  argv = ['--schema', 'interactions', '--model_dir', run['model_dir'],
          '--online_store', run['server'].url(0)]
  assert serve.main(argv + ['--side_table', f'shops={run["items"]}']) == 2
  err = capsys.readouterr().err.strip()
  assert err == ('error: --side_table shops: the declaration has no side '
                 'table shops (it has: items)')
  assert serve.main(argv + ['--side_table',
                            f'items={run["tmp"] / "nothing.csv"}']) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and 'nothing.csv' in err, err
