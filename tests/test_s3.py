"""s3:// wherever gs:// works, on a local S3 server (tests/s3_server.py):
Beam's own S3 file system for the input, every output, the model and the
registry; folders cleared by name (glob characters escaped); preflight
refusing a bucket or endpoint that does not answer, in one line."""

import os
import socket

import pytest
from apache_beam.io.filesystems import FileSystems

from pipelines import batch
from pipelines.outputs import files
from tests.output_rows import read_dead_letters, read_rows

pytest_plugins = ['tests.s3_server']

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO, 'data', 'sample', 'transactions.jsonl')


def _run(*argv):
  return batch.run([*argv, '--runner', 'DirectRunner'])


def test_clearing_an_s3_folder_spares_its_glob_sibling(s3_bucket):
  root = f's3://{s3_bucket}/clear'
  for folder in ('run[1]', 'run1', 'runa'):
    files.write_bytes(f'{root}/{folder}/silver/part-0', b'x')
  files.write_bytes(f'{root}/run[1]/silver/sub/part-1', b'x')
  assert files.files_in(f'{root}/run[1]/silver', 'part-*') == [
      f'{root}/run[1]/silver/part-0']
  files.clear(f'{root}/run[1]')
  assert not FileSystems.match([f'{root}/run[[]1]/**'])[0].metadata_list
  assert FileSystems.exists(f'{root}/run1/silver/part-0')
  assert FileSystems.exists(f'{root}/runa/silver/part-0')


def test_one_s3_client_per_setting(s3_bucket, monkeypatch):
  """Beam's S3 file system makes a client per call; transforms/beam_s3.py
  keeps one per set of settings (S3 options and AWS variables)."""
  from apache_beam.io.aws import s3io
  from apache_beam.options.pipeline_options import PipelineOptions
  first = s3io.S3IO(options=PipelineOptions([])).client
  assert s3io.S3IO(options=PipelineOptions([])).client is first
  other = s3io.S3IO(options=PipelineOptions(
      ['--s3_endpoint_url', 'http://127.0.0.1:9'])).client
  assert other is not first
  monkeypatch.setenv('AWS_ACCESS_KEY_ID', 'someone-else')
  assert s3io.S3IO(options=PipelineOptions([])).client is not first


def test_empty_files_on_s3(s3_bucket):
  """An empty file (a _SUCCESS marker, a sink's empty shard) is written:
  Beam's own S3 writer alone completes an upload of no part, which S3
  refuses (transforms/beam_s3.py)."""
  import apache_beam as beam
  from transforms.sinks import WriteJsonLines
  root = f's3://{s3_bucket}/empty'
  files.mark_complete(root)
  assert files.read_bytes(f'{root}/_SUCCESS') == b''
  with beam.Pipeline() as p:
    _ = p | beam.Create([]) | WriteJsonLines(f'{root}/dead_letter/part')
  shards = files.files_in(f'{root}/dead_letter', 'part*')
  assert shards and all(files.read_bytes(s) == b'' for s in shards)


def test_batch_run_reads_and_writes_s3(s3_bucket, report_runs):
  """Input, every output, the baseline statistics and the model (the
  champion of a registry on s3://) on s3://, over a stale file of an
  earlier run: the outputs of the same scoring run done locally (the
  session's `drifted` run, tests/report_runs.py: 1,500 rows scored with
  the `full` run's model)."""
  from pipelines.model.registry import Registry
  reference, reference_out = report_runs.summary['drifted'], str(
      report_runs.drifted)
  full = report_runs.full
  root = f's3://{s3_bucket}/run'
  registry = Registry(f'{root}/registry')
  entry = registry.register(str(full / 'model'), 'the full run\'s model')
  assert entry['status'] == 'champion'
  with open(report_runs.root.parent / 'inputs' / 'drifted.jsonl', 'rb') as f:
    files.write_bytes(f'{root}/in/drifted.jsonl', f.read())
  files.write_bytes(f'{root}/baseline/stats.pb',
                    (full / 'statistics' / 'stats.pb').read_bytes())
  out = f'{root}/out'
  files.write_bytes(f'{out}/silver/stale-00000-of-00001.parquet', b'old')

  summary = _run('--input', f'{root}/in/*.jsonl', '--output_dir', out,
                 '--registry', f'{root}/registry', '--no-train',
                 '--baseline_stats', f'{root}/baseline/stats.pb')

  assert summary['status'] == reference['status'] == 'ok'
  assert files.read_json(f'{out}/run_summary.json') == summary
  for key in ('records_read', 'records_valid', 'records_dead_lettered',
              'dead_letter_by_kind', 'feature_rows', 'aggregate_rows',
              'predictions_written'):
    assert summary[key] == reference[key], key
  assert summary['records_read_by_source'] == {f'{root}/in/*.jsonl': 1500}
  assert summary['validation']['drift'] == reference['validation']['drift']
  assert summary['model']['dir'] == f'{root}/registry/models/{entry["version"]}'
  assert summary['model']['version'] == reference['model']['version']
  for folder in ('silver', 'features'):
    got = read_rows(f'{out}/{folder}/*.parquet')
    assert got and got == read_rows(f'{reference_out}/{folder}/*.parquet')
  predictions = read_rows(f'{out}/predictions/*.parquet')
  want = read_rows(f'{reference_out}/predictions/*.parquet')
  assert len(predictions) == summary['predictions_written'] == len(want)
  for got, expected in zip(predictions, want):
    assert got['transaction_id'] == expected['transaction_id']
    assert got['score'] == pytest.approx(expected['score'], abs=1e-6)
  assert read_dead_letters(f'{out}/dead_letter/*.jsonl') == read_dead_letters(
      f'{reference_out}/dead_letter/*.jsonl')
  for marker in ('silver', 'dead_letter', 'predictions', 'validation'):
    assert files.read_bytes(f'{out}/{marker}/_SUCCESS') == b''
  assert FileSystems.exists(f'{out}/statistics/stats.pb')
  assert FileSystems.exists(f'{out}/report/index.html')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_preflight_refuses_what_s3_cannot_do(s3_bucket, capsys):
  """Exit 2 and one line, before any job starts (nothing is written)."""
  missing = f's3://no-such-bucket-{s3_bucket}'
  closed = f'http://127.0.0.1:{_free_port()}'
  cases = [
      (['--input', f'{missing}/in/*.jsonl'],
       f'--input {missing}/in/*.jsonl: bucket no-such-bucket-{s3_bucket} '
       'does not exist'),
      (['--input', SAMPLE, '--output_dir', f's3://{s3_bucket}/x',
        '--s3_endpoint_url', closed, '--no-train'],
       f'--output_dir s3://{s3_bucket}/x: no S3 endpoint answers'),
      (['--input', SAMPLE, '--output_dir', f's3://{s3_bucket}/train'],
       f'--output_dir s3://{s3_bucket}/train: training writes the transform '
       'graph through TensorFlow'),
  ]
  for argv, message in cases:
    assert batch.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'error: {message}'), err
    assert len(err.strip().splitlines()) == 1, err
  assert not FileSystems.match([f's3://{s3_bucket}/x/**'])[0].metadata_list
  assert not FileSystems.match([f's3://{s3_bucket}/train/**']
                               )[0].metadata_list
