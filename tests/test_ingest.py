"""POST /ingest (pipelines/serving/ingest.py, command pipelines/ingest.py):
an upload of sample records plus broken lines answers with exact counts
and the dead-letter rows, the accepted records land atomically, and the
batch job's reader and validator over the landing folder read exactly
the accepted records."""

import csv
import io
import json
import os

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from starlette.testclient import TestClient

from pipelines import ingest
from pipelines.serving.ingest import KafkaPublisher, Landing, make_app
from schemas.dataset import load_dataset
from tests.test_parse import GOOD
from transforms.common import DEAD_LETTER, VALID
from transforms.parse import ParseAndValidate
from transforms.read import ReadRecords

pytest_plugins = ['tests.services']

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO, 'data', 'sample', 'transactions.jsonl')
# The sample's first 310 lines are valid records with distinct ids (its
# broken records come later).
with open(SAMPLE, encoding='utf-8') as _f:
  LINES = [next(_f).rstrip('\n') for _ in range(310)]
FIRST = json.loads(LINES[0])
BROKEN = [  # each with the kind the batch job gives it
    ('{not json', 'malformed'),
    (json.dumps(dict(GOOD, transaction_id='tx900000001', amount='twelve')),
     'type_error'),
    (json.dumps(dict(GOOD, transaction_id='tx900000002', currency='XYZ')),
     'not_allowed'),
    (json.dumps({k: v for k, v in dict(GOOD, transaction_id='tx900000003')
                 .items() if k != 'user_id'}), 'missing_required'),
]
# A later copy of the first record: valid on its own, a duplicate to the
# batch job, which keeps the earliest copy.
COPY = json.dumps(dict(FIRST, event_time='2026-12-01T00:00:00Z'))


@pytest.fixture(scope='module')
def dataset():
  return load_dataset('transactions')


@pytest.fixture
def client(dataset, tmp_path):
  landing = Landing(dataset, str(tmp_path / 'landing'), max_body_bytes=1 << 20)
  with TestClient(make_app(landing)) as c:
    yield c, tmp_path / 'landing'


def _csv_body(lines):
  """Records as CSV with a header; the last row has a column too many."""
  records = [json.loads(l) for l in lines]
  out = io.StringIO()
  writer = csv.DictWriter(out, fieldnames=list(records[0]),
                          lineterminator='\n')
  writer.writeheader()
  writer.writerows(records)
  return out.getvalue() + 'tx1,u1,m1,grocery,1.0,EUR,pos,FR,x,0,extra\n'


def test_an_upload_answers_exact_counts_and_lands_the_accepted(
    client, dataset):
  client, landing = client
  body = '\n'.join(LINES[:300] + [line for line, _ in BROKEN] + [COPY]) + '\n'
  answer = client.post('/ingest?format=jsonl', content=body.encode())
  assert answer.status_code == 200, answer.text
  got = answer.json()
  name = got['landed'].rsplit('/', 1)[-1]
  assert name.startswith('upload-') and name.endswith('.jsonl')
  assert {k: got[k] for k in ('dataset', 'format', 'records', 'accepted',
                              'dead_lettered')} == {
      'dataset': 'transactions', 'format': 'jsonl', 'records': 305,
      'accepted': 301, 'dead_lettered': 4}
  assert [(r['position'], r['error_kind'], r['raw'], r['source_file'])
          for r in got['dead_letter']] == [
      (300 + i, kind, line, name) for i, (line, kind) in enumerate(BROKEN)]
  # The accepted records' text as sent, in order; nothing else in the
  # folder (the temporary file was renamed).
  assert os.listdir(landing) == [name]
  assert (landing / name).read_text() == '\n'.join(LINES[:300] + [COPY]) + (
      '\n')

  again = client.post('/ingest?format=jsonl', content=body.encode())
  assert again.json() == got          # the same body lands once
  assert os.listdir(landing) == [name]

  csv_answer = client.post('/ingest?format=csv',
                           content=_csv_body(LINES[300:310]).encode()).json()
  assert (csv_answer['records'], csv_answer['accepted'],
          csv_answer['dead_lettered']) == (11, 10, 1)
  assert csv_answer['dead_letter'][0]['error_kind'] == 'malformed'
  assert csv_answer['dead_letter'][0]['position'] == 10
  assert len(os.listdir(landing)) == 2

  # The batch job's reader and parse-and-validate step over the landing
  # folder: exactly the accepted records, the copy now a duplicate.
  accepted_ids = [json.loads(l)['transaction_id'] for l in LINES]
  with TestPipeline() as p:
    raw = p | ReadRecords(str(landing / 'upload-*'), dataset)
    parsed = raw | ParseAndValidate(dataset)
    read = (raw | 'CountRead' >> beam.Map(lambda b: b.num_rows)
            | beam.CombineGlobally(sum))
    assert_that(read, equal_to([301 + 10]), label='read exactly accepted')
    assert_that(parsed[VALID] | beam.FlatMap(
        lambda b: b.column('transaction_id').to_pylist()),
                equal_to(accepted_ids), label='valid')
    assert_that(parsed[DEAD_LETTER] | beam.FlatMap(
        lambda b: b.column('error_kind').to_pylist()),
                equal_to(['duplicate']), label='dead letters')


def test_what_an_upload_cannot_do(client):
  client, landing = client
  big = b'x' * ((1 << 20) + 1)
  answer = client.post('/ingest?format=jsonl', content=big)
  assert answer.status_code == 413
  assert 'over 1048576 bytes' in answer.json()['error']

  def chunks():   # no Content-Length: refused while it streams
    for _ in range(17):
      yield b'y' * (1 << 16)
  assert client.post('/ingest?format=jsonl', content=chunks()
                     ).status_code == 413
  for query in ('', '?format=avro', '?format=xml'):
    answer = client.post(f'/ingest{query}', content=LINES[0].encode())
    assert answer.status_code == 400
    assert answer.json()['error'].startswith('give ?format= one of jsonl, csv')
  assert not os.path.exists(landing) or os.listdir(landing) == []
  assert client.get('/healthz').json()['dataset'] == 'transactions'


def test_the_command_refuses_bad_flags_in_one_line(tmp_path, capsys):
  blocker = tmp_path / 'file'
  blocker.write_text('')
  for argv, message in [
      ([], 'the following arguments are required: --landing'),
      (['--landing', str(blocker / 'landing')],
       f'--landing {blocker / "landing"} cannot be written: Not a directory'),
      (['--landing', str(tmp_path), '--max_body_bytes', '0'],
       '--max_body_bytes must be positive'),
      (['--landing', str(tmp_path), '--bootstrap_servers', '127.0.0.1:9'],
       '--bootstrap_servers and --topic go together')]:
    assert ingest.main(argv) == 2
    assert capsys.readouterr().err == f'error: {message}\n'


def test_accepted_records_also_go_to_kafka(dataset, tmp_path, kafka_broker):
  """With a publisher, the accepted records of a JSON-lines and a CSV
  upload are on the topic before the answer, keyed by user, each one the
  streaming job's decoder and validator accept."""
  from tests.services import consume_all
  from transforms.parse import RecordValidator
  from transforms.stream_sources import decode_message
  publisher = KafkaPublisher(kafka_broker, 'uploads')
  landing = Landing(dataset, str(tmp_path / 'landing'), 1 << 20,
                    publisher=publisher)
  try:
    with TestClient(make_app(landing)) as client:
      first = client.post('/ingest?format=jsonl', content=(
          '\n'.join(LINES[:5] + [BROKEN[0][0]]) + '\n').encode()).json()
      second = client.post('/ingest?format=csv',
                           content=_csv_body(LINES[5:8]).encode()).json()
  finally:
    publisher.close()
  assert first['published'] == {'topic': 'uploads', 'messages': 5}
  assert second['published'] == {'topic': 'uploads', 'messages': 3}
  values = consume_all(kafka_broker, 'uploads', 8, timeout_s=30)
  records = [json.loads(v) for v in values]
  assert sorted(r['transaction_id'] for r in records) == sorted(
      json.loads(l)['transaction_id'] for l in LINES[:8])
  validator = RecordValidator(dataset)
  for value in values:
    record = validator.validate(decode_message(value, 'kafka:uploads'))
    assert record['transaction_id'].startswith('tx')
  by_id = {r['transaction_id']: r for r in records}
  for line in LINES[:5]:   # JSON lines: the record's own values
    assert by_id[json.loads(line)['transaction_id']] == json.loads(line)
  csv_record = by_id[json.loads(LINES[5])['transaction_id']]
  assert csv_record['amount'] == str(json.loads(LINES[5])['amount'])
