"""The batch flow runs unchanged on other runners, on gs://, and fails fast.

  * PortableRunner (embedded job service, LOOPBACK workers) and the
    DirectRunner's multi-processing mode give the DirectRunner's outputs;
  * DataflowRunner --dry_run translates the ingest graph and stages this
    project as a package, without network or credentials;
  * gs:// input and outputs on a local GCS emulator (tests/gcs_emulator.py);
  * pipelines.cli.preflight rejects runner setups that cannot work, one clear
    line each;
  * FlinkRunner up to its job server: options resolve, the launcher passes
    flags through, a missing job server jar fails fast;
  * FlinkRunner for real: the batch flow on a local Flink session cluster
    (tests/services.py, LOOPBACK workers, parallelism 2) gives the
    DirectRunner's outputs.
"""

import json
import os
import socket
import stat
import subprocess
import sys
import tarfile
import time
import urllib.request

import apache_beam as beam
import pytest
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import (FlinkRunnerOptions,
                                                  PipelineOptions,
                                                  PortableOptions)
from apache_beam.portability.api import beam_runner_api_pb2
from apache_beam.runners.portability.job_server import JavaJarJobServer

from pipelines import batch
from pipelines.outputs import files
from pipelines.cli import preflight
from pipelines.cli.preflight import PreflightError, check_runner, is_dry_run
from tests.services import flink_flags
from tests.test_parse import GOOD
from tests.output_rows import read_dead_letters, read_rows

pytest_plugins = ['tests.gcs_emulator', 'tests.services']

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNERS = os.path.join(REPO, 'runners')
VALID_ROWS = 46
BROKEN_LINES = [
    '{not json',
    json.dumps(dict(GOOD, transaction_id='tx900000001', amount='twelve')),
    json.dumps(dict(GOOD, transaction_id='tx900000002', currency='XYZ')),
    json.dumps({k: v for k, v in dict(GOOD, transaction_id='tx900000003')
                .items() if k != 'user_id'}),
]
# Dead letters from both branches of ParseAndValidate: the rules (above)
# and the dedupe step (below, two later copies of valid records). On Flink
# a counter after their Flatten lost one branch (#25.6).
DUPLICATE_IDS = ('tx000000003', 'tx000000017')
BROKEN_KINDS = {'malformed': 1, 'type_error': 1, 'not_allowed': 1,
                'missing_required': 1, 'duplicate': len(DUPLICATE_IDS)}


def _records_text() -> str:
  """46 valid records of 5 users over 3 days, then 4 broken lines and
  2 copies of valid records."""
  lines = []
  for i in range(VALID_ROWS):
    lines.append(json.dumps(dict(
        GOOD, transaction_id=f'tx{i:09d}', user_id=f'u{i % 5:05d}',
        merchant_id=f'm{i % 7:05d}', amount=round(5 + i * 1.25, 2),
        event_time=f'2026-10-0{1 + i % 3}T{(i * 7) % 24:02d}:{i % 60:02d}:00Z',
        is_fraud=int(i % 11 == 0))))
  copies = [line for line in lines
            if json.loads(line)['transaction_id'] in DUPLICATE_IDS]
  return '\n'.join(lines + BROKEN_LINES + copies) + '\n'


@pytest.fixture(scope='module')
def input_file(tmp_path_factory):
  path = tmp_path_factory.mktemp('input') / 'tx.jsonl'
  path.write_text(_records_text())
  return str(path)


def _run(input_path, output_dir, *flags):
  # 46 rows are below the schema's min_examples: the validation gate would
  # stop the run before the model stages this module compares.
  return batch.run(['--input', input_path, '--output_dir', output_dir,
                    '--no-fail_on_anomalies', *flags])


@pytest.fixture(scope='module')
def direct_run(input_file, tmp_path_factory):
  """The reference: every stage on the DirectRunner (in-memory)."""
  out = str(tmp_path_factory.mktemp('direct'))
  return _run(input_file, out, '--runner', 'DirectRunner'), out


def _flatten(value, prefix=''):
  if isinstance(value, dict):
    flat = {}
    for key, item in value.items():
      flat.update(_flatten(item, f'{prefix}{key}.'))
    return flat
  return {prefix.rstrip('.'): value}


def _comparable(summary):
  """The summary without paths (folders differ from run to run) and
  stage durations (measurements)."""
  flat = _flatten(summary)
  return {k: v for k, v in flat.items()
          if not k.startswith(('outputs.', 'stage_seconds.')) and
          k not in ('model.dir', 'trained_model.dir')}


def _assert_same_summary(summary, reference):
  got, want = _comparable(summary), _comparable(reference)
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    if isinstance(value, float):
      # Model metrics: tf.Transform's float reductions may differ in the
      # last bit with bundle order.
      assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    else:
      assert got[key] == value, key


def _assert_same_outputs(out, reference_out):
  features = read_rows(files.join(out, 'features', '*.parquet'))
  assert len(features) == VALID_ROWS
  assert features == read_rows(
      files.join(reference_out, 'features', '*.parquet'))
  predictions = read_rows(files.join(out, 'predictions', '*.parquet'))
  want = read_rows(files.join(reference_out, 'predictions', '*.parquet'))
  assert len(predictions) == len(want) == VALID_ROWS
  for got, expected in zip(predictions, want):
    assert got['transaction_id'] == expected['transaction_id']
    assert got['model_version'] == expected['model_version']
    # Same data, same graph: scores equal up to float32 transform rounding.
    assert got['score'] == pytest.approx(expected['score'], abs=1e-6)
  dead = read_dead_letters(files.join(out, 'dead_letter', '*.jsonl'))
  assert len(dead) == len(BROKEN_LINES) + len(DUPLICATE_IDS)
  assert dead == read_dead_letters(
      files.join(reference_out, 'dead_letter', '*.jsonl'))


def test_direct_run_is_the_expected_reference(direct_run):
  summary, out = direct_run
  assert summary['records_read'] == (VALID_ROWS + len(BROKEN_LINES) +
                                    len(DUPLICATE_IDS))
  assert summary['records_dead_lettered'] == sum(BROKEN_KINDS.values())
  assert summary['records_valid'] == VALID_ROWS
  assert summary['dead_letter_by_kind'] == BROKEN_KINDS
  assert summary['records_accounted_for'] is True
  assert summary['predictions_written'] == VALID_ROWS
  assert files.read_json(files.join(out, 'run_summary.json')) == summary


def test_portable_runner_loopback_matches_direct(input_file, direct_run,
                                                 tmp_path):
  reference, reference_out = direct_run
  out = str(tmp_path / 'portable')
  summary = _run(input_file, out, '--runner', 'PortableRunner',
                 '--job_endpoint', 'embed', '--environment_type', 'LOOPBACK')
  _assert_same_summary(summary, reference)
  _assert_same_outputs(out, reference_out)


def test_flink_session_cluster_matches_direct(input_file, direct_run,
                                             flink_cluster, tmp_path,
                                             monkeypatch):
  """Every stage (ingest, transform, predict) as jobs on the local Flink
  session cluster: the same counts, feature rows and predictions; the
  three jobs go to one job server, stopped when the run ends (Beam alone
  starts a JVM per job and keeps each until the process exits)."""
  calls = []
  for name in ('start', 'stop'):
    real = getattr(JavaJarJobServer, name)
    monkeypatch.setattr(JavaJarJobServer, name,
                        lambda self, real=real, name=name: (
                            calls.append(name), real(self))[1])
  reference, reference_out = direct_run
  out = str(tmp_path / 'flink')
  summary = _run(input_file, out, *flink_flags(flink_cluster))
  _assert_same_summary(summary, reference)
  _assert_same_outputs(out, reference_out)
  assert calls == ['start', 'stop']


def test_flink_task_heap_holds_a_batch_jobs_groups(flink_cluster):
  """runners/flink_cluster.sh gives the task heap, where Beam's batch
  translation holds each group's values, ~880 MB, the sort buffers
  (managed memory) ~800 MB and tasks 256 MB of direct memory (Beam's gRPC
  buffers, its classes loaded parent-first): at 3 GB with Flink's 40%
  managed the heap was ~280 MB and a 1M-row scoring run died of "Java
  heap space"; with 10% managed a statistics combine's record did not fit
  its sort buffer; with no task off-heap, "Direct buffer memory"."""
  rest = f'http://{flink_cluster.master}'
  with urllib.request.urlopen(f'{rest}/taskmanagers', timeout=10) as r:
    tm = json.load(r)['taskmanagers'][0]['id']
  with urllib.request.urlopen(f'{rest}/taskmanagers/{tm}', timeout=10) as r:
    memory = json.load(r)['memoryConfiguration']
  assert memory['taskHeap'] >= 800 << 20
  assert memory['managedMemory'] >= 700 << 20
  assert memory['taskOffHeap'] >= 256 << 20


def test_direct_multi_processing_matches_direct(input_file, direct_run,
                                                tmp_path):
  reference, reference_out = direct_run
  out = str(tmp_path / 'multi')
  summary = _run(input_file, out, '--runner', 'DirectRunner',
                 '--direct_num_workers', '2',
                 '--direct_running_mode', 'multi_processing')
  _assert_same_summary(summary, reference)
  _assert_same_outputs(out, reference_out)


# --- DataflowRunner dry run -------------------------------------------------


class NetworkUsed(BaseException):
  """Raised on any non-local name lookup. A BaseException, so that the
  retry loops of Beam and the Google clients (which catch Exception) do not
  turn it into minutes of back-off."""


@pytest.fixture
def no_network(monkeypatch):
  real = socket.getaddrinfo

  def getaddrinfo(host, *args, **kwargs):
    name = host.decode() if isinstance(host, bytes) else host
    if name not in (None, 'localhost', '127.0.0.1', '::1'):
      raise NetworkUsed(f'network lookup of {name}')
    return real(host, *args, **kwargs)

  monkeypatch.setattr(socket, 'getaddrinfo', getaddrinfo)


def _dataflow_flags(**overrides):
  flags = {'runner': 'DataflowRunner', 'project': 'mlpipe-test',
           'region': 'us-central1', 'temp_location': 'gs://mlpipe-test/tmp',
           'setup_file': os.path.join(REPO, 'setup.py'),
           'input': 'gs://mlpipe-test/in/*.jsonl',
           'output_dir': 'gs://mlpipe-test/out'}
  flags.update(overrides)
  return [f'--{k}={v}' for k, v in flags.items() if v is not None]


def test_dataflow_dry_run_translates_without_network(no_network):
  options = PipelineOptions(_dataflow_flags() + ['--dry_run=True',
                                                 '--no_auth'])
  assert is_dry_run(options)
  check_runner(options)  # no credentials needed for a dry run
  p = beam.Pipeline(options=options)
  batch.build_pipeline(p, options)
  result = p.run()
  result.wait_until_finish()
  assert result.state == 'DONE'

  proto = result.job.proto_pipeline
  names = {t.unique_name for t in proto.components.transforms.values()}
  for name in ('ReadRecords', 'ParseAndValidate', 'HistoryFeatures',
               'WriteSilver', 'WriteDeadLetters', 'WriteFeatures',
               'WriteAggregates[user_id]'):
    assert name in names
  # Every worker environment is a container that installs this project.
  staged = []
  for env in proto.components.environments.values():
    assert env.urn == 'beam:env:docker:v1'
    for artifact in env.dependencies:
      payload = beam_runner_api_pb2.ArtifactFilePayload.FromString(
          artifact.type_payload)
      staged.append(payload.path)
  sdists = [path for path in staged if path.endswith('.tar.gz')]
  assert len(sdists) == 1, staged
  with tarfile.open(sdists[0]) as tar:
    members = {m.split('/', 1)[1] for m in tar.getnames() if '/' in m}
  for needed in ('setup.py', 'pipelines/batch.py', 'transforms/read.py',
                 'schemas/transactions.yaml'):
    assert needed in members


def test_batch_run_dry_run_goes_through_the_entry_point(no_network, capsys):
  summary = batch.run(_dataflow_flags() + ['--dry_run=True', '--no_auth'])
  assert summary == {'status': 'dry run', 'runner': 'dataflowrunner',
                     'jobs': {'ingest': 'DONE'}}
  assert 'nothing was submitted' in capsys.readouterr().out


@pytest.mark.parametrize('value,expected', [
    ('True', True), ('true', True), ('False', False), ('0', False),
    (None, False)])
def test_is_dry_run_reads_the_flag_as_text(value, expected):
  argv = [] if value is None else [f'--dry_run={value}']
  assert is_dry_run(PipelineOptions(argv)) is expected


# --- gs:// on the GCS emulator ----------------------------------------------


def test_beam_filesystems_on_gcs_emulator(gcs_emulator):
  root = f'gs://{gcs_emulator}/fs'
  files.write_json(f'{root}/a/x.json', {'a': 1})
  assert files.read_json(f'{root}/a/x.json') == {'a': 1}
  FileSystems.rename([f'{root}/a/x.json'], [f'{root}/b/y.json'])
  FileSystems.copy([f'{root}/b/y.json'], [f'{root}/b/z.json'])
  listed = sorted(m.path for m in
                  FileSystems.match([f'{root}/**'])[0].metadata_list)
  assert listed == [f'{root}/b/y.json', f'{root}/b/z.json']
  FileSystems.delete([f'{root}/b/'])
  assert not FileSystems.match([f'{root}/**'])[0].metadata_list


def test_clear_empties_a_gcs_folder(gcs_emulator):
  """gs:// has no folders: clearing one deletes the objects under it."""
  folder = f'gs://{gcs_emulator}/clear/silver'
  files.write_bytes(f'{folder}/old-00000-of-00001.parquet', b'stale')
  files.write_bytes(f'{folder}/sub/old.json', b'stale')
  files.write_bytes(f'{folder}2/keep.json', b'kept')
  files.clear(folder)
  assert not FileSystems.match([f'{folder}/**'])[0].metadata_list
  assert files.read_bytes(f'{folder}2/keep.json') == b'kept'


def test_read_statistics_from_gcs(gcs_emulator):
  """The validation stage reads statistics on the driver, through Beam's
  FileSystems (tf.io.gfile would not reach the emulator)."""
  from tensorflow_metadata.proto.v0 import statistics_pb2
  from transforms.statistics import read_statistics
  stats = statistics_pb2.DatasetFeatureStatisticsList()
  stats.datasets.add(num_examples=7)
  path = f'gs://{gcs_emulator}/stats/stats.pb'
  files.write_bytes(path, stats.SerializeToString())
  assert read_statistics(path) == stats


def test_batch_run_on_gcs(gcs_emulator, input_file, direct_run):
  """Input and every output on gs://, over a stale earlier run. Scores
  with the reference model: training's tf.Transform writes through
  tf.io.gfile, out of the emulator's reach (tests/gcs_emulator.py)."""
  reference, reference_out = direct_run
  root = f'gs://{gcs_emulator}/run'
  with open(input_file, 'rb') as f:
    files.write_bytes(f'{root}/in/{os.path.basename(input_file)}', f.read())
  files.write_bytes(f'{root}/out/silver/stale-00000-of-00001.parquet', b'old')

  out = f'{root}/out'
  summary = _run(f'{root}/in/*.jsonl', out, '--runner', 'DirectRunner',
                 '--model_dir', reference['model']['dir'])

  assert files.read_json(f'{out}/run_summary.json') == summary
  for key in ('records_read', 'records_valid', 'records_dead_lettered',
              'dead_letter_by_kind', 'feature_rows', 'aggregate_rows'):
    assert summary[key] == reference[key], key
  assert summary['status'] == 'ok'
  assert summary['model']['version'] == reference['model']['version']
  assert summary['predictions_written'] == VALID_ROWS
  assert summary['outputs']['silver'] == f'{out}/silver'
  silver = read_rows(f'{out}/silver/*.parquet')
  assert len(silver) == VALID_ROWS
  assert silver == read_rows(files.join(reference_out, 'silver', '*.parquet'))
  _assert_same_outputs(out, reference_out)
  assert FileSystems.match([f'{out}/statistics/*'])[0].metadata_list
  assert FileSystems.match([f'{out}/predictions/*.parquet'])[0].metadata_list


# --- preflight --------------------------------------------------------------


@pytest.fixture
def java(monkeypatch, tmp_path):
  """A JAVA_HOME with a bin/java, and an existing Flink job server jar."""
  home = tmp_path / 'java'
  (home / 'bin').mkdir(parents=True)
  binary = home / 'bin' / 'java'
  binary.write_text('#!/bin/sh\nexit 0\n')
  binary.chmod(binary.stat().st_mode | stat.S_IEXEC)
  monkeypatch.setenv('JAVA_HOME', str(home))
  jar = tmp_path / 'beam-runners-flink-1.20-job-server.jar'
  jar.write_bytes(b'')
  return str(jar)


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
  """No emulator, no key file, no gcloud login, not on Google Cloud."""
  import google.auth
  from google.auth import exceptions
  for var in ('STORAGE_EMULATOR_HOST', 'GOOGLE_APPLICATION_CREDENTIALS',
              'K_SERVICE', 'CLOUD_RUN_JOB'):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv('CLOUDSDK_CONFIG', str(tmp_path / 'gcloud'))
  monkeypatch.setattr(preflight, '_DMI_PRODUCT_NAME',
                      str(tmp_path / 'no_dmi'))

  def default(*args, **kwargs):
    raise exceptions.DefaultCredentialsError(
        'Your default credentials were not found.')

  monkeypatch.setattr(google.auth, 'default', default)


@pytest.fixture
def emulator_env(monkeypatch):
  monkeypatch.setenv('STORAGE_EMULATOR_HOST', 'http://127.0.0.1:1')


def _flink_flags(master='localhost:8081', env='LOOPBACK', **extra):
  flags = ['--runner', 'FlinkRunner', '--flink_master', master,
           '--input', '/data/in/*.jsonl', '--output_dir', '/data/out']
  if env:
    flags += ['--environment_type', env]
  for key, value in extra.items():
    flags += [f'--{key}', value]
  return flags


@pytest.mark.parametrize('argv,message', [
    (_dataflow_flags(temp_location=None), 'needs --temp_location gs://'),
    (_dataflow_flags(temp_location='/tmp/beam'),
     '--temp_location must be a gs:// path'),
    (_dataflow_flags(temp_location='gs://b/tmp'),
     "'b' is not a valid Cloud Storage bucket name"),
    (_dataflow_flags(staging_location='staging'),
     '--staging_location must be a gs:// path'),
    (_dataflow_flags(project=None), 'DataflowRunner needs --project'),
    (_dataflow_flags(project='p'), "--project 'p' is not a Google Cloud"),
    (_dataflow_flags(region=None), 'DataflowRunner needs --region'),
    (_dataflow_flags(input='data/in/*.jsonl'),
     '--input data/in/*.jsonl is a local path but DataflowRunner workers'),
    (_dataflow_flags(output_dir='/tmp/out'),
     '--output_dir /tmp/out is a local path but DataflowRunner'),
    (_dataflow_flags(model_dir='file:///models/v1'),
     '--model_dir file:///models/v1 is a local path'),
    (_dataflow_flags(setup_file=None),
     'DataflowRunner workers cannot import this project: pass --setup_file'),
    (_dataflow_flags(setup_file='/nowhere/setup.py'),
     '--setup_file /nowhere/setup.py does not exist'),
    (_flink_flags(env=None),
     "--input /data/in/*.jsonl is a local path, which FlinkRunner's DOCKER "
     'workers cannot see'),
    (_flink_flags(master='flink-jm.example.com:8081', env='PROCESS'),
     'FlinkRunner workers run on --flink_master flink-jm.example.com:8081'),
    (_flink_flags(master='http://10.1.2.3:8081', env='LOOPBACK'),
     'LOOPBACK runs the Python workers in this process at localhost'),
    (_flink_flags(master='flink:8081', env='DOCKER', input='gs://bk/in/*',
                  output_dir='gs://bk/out'),
     "FlinkRunner's DOCKER workers cannot import this project"),
    (_flink_flags(flink_job_server_jar='/nonexistent.jar'),
     '--flink_job_server_jar /nonexistent.jar does not exist'),
    (['--runner', 'PortableRunner', '--job_endpoint', 'embed',
      '--input', 'in.jsonl'],
     "PortableRunner's DOCKER workers cannot see"),
])
def test_preflight_rejects(argv, message, java, emulator_env):
  with pytest.raises(PreflightError) as error:
    check_runner(PipelineOptions(argv))
  assert message in str(error.value)
  assert '\n' not in str(error.value)


def test_preflight_needs_java_for_the_flink_job_server(monkeypatch,
                                                       tmp_path):
  monkeypatch.setenv('JAVA_HOME', str(tmp_path))  # no bin/java in it
  with pytest.raises(PreflightError, match='no java was found'):
    check_runner(PipelineOptions(_flink_flags()))
  # A running job server needs no java here.
  check_runner(PipelineOptions(_flink_flags(job_endpoint='localhost:8099')))


def test_preflight_needs_credentials_for_gs_paths(no_credentials):
  argv = ['--input', 'in.jsonl', '--output_dir', 'gs://mlpipe-test/out']
  with pytest.raises(PreflightError) as error:
    check_runner(PipelineOptions(argv))
  assert str(error.value).startswith(
      '--output_dir gs://mlpipe-test/out needs Google Cloud credentials: '
      'no Google credentials')
  assert 'STORAGE_EMULATOR_HOST' in str(error.value)
  # A dry run reads and writes nothing, so it needs none.
  check_runner(PipelineOptions(_dataflow_flags() + ['--dry_run=True']))
  # Local paths need none either.
  check_runner(PipelineOptions(['--input', 'in.jsonl', '--output_dir', 'o']))


def test_preflight_reports_a_missing_key_file(no_credentials, monkeypatch,
                                              tmp_path):
  missing = str(tmp_path / 'key.json')
  monkeypatch.setenv('GOOGLE_APPLICATION_CREDENTIALS', missing)
  with pytest.raises(PreflightError,
                     match=f'GOOGLE_APPLICATION_CREDENTIALS={missing} is not'):
    check_runner(PipelineOptions(['--input', 'gs://mlpipe-test/in/*.jsonl']))


@pytest.mark.parametrize('argv', [
    [],  # DirectRunner with the defaults (local paths)
    ['--runner', 'DirectRunner', '--input', 'gs://bk/in/*.jsonl',
     '--output_dir', 'gs://bk/out'],
    ['--runner', 'PortableRunner', '--job_endpoint', 'embed',
     '--environment_type', 'LOOPBACK', '--input', 'in.jsonl'],
    _flink_flags(),  # local Flink, LOOPBACK: local paths are fine
    _flink_flags(master='[local]', env=None),  # Beam defaults to LOOPBACK
    _flink_flags(master='flink:8081', env='DOCKER', input='gs://bk/in/*',
                 output_dir='gs://bk/out', setup_file='setup.py'),
    _flink_flags(master='flink:8081', env='DOCKER', input='gs://bk/in/*',
                 output_dir='gs://bk/out', environment_config='r/mlpipe:1'),
    _flink_flags(master='flink:8081', env='EXTERNAL', input='gs://bk/in/*',
                 output_dir='gs://bk/out', environment_config='localhost:5'),
    _dataflow_flags(),
    # Streaming from Pub/Sub: the default (local) --input is not read.
    _dataflow_flags(input=None) + [
        '--input_subscription', 'projects/p/subscriptions/s'],
    _dataflow_flags(setup_file=None,
                    sdk_container_image='europe-docker.pkg.dev/p/r/mlpipe:1'),
])
def test_preflight_accepts(argv, java, emulator_env, monkeypatch):
  monkeypatch.chdir(REPO)  # for the relative --setup_file
  check_runner(PipelineOptions(argv))


# --- FlinkRunner up to the job server and the launchers ---------------------


@pytest.fixture
def fake_python(tmp_path):
  """An interpreter stand-in that prints its arguments, one a line."""
  path = tmp_path / 'python'
  path.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
  path.chmod(path.stat().st_mode | stat.S_IEXEC)
  return str(path)


def _launch(script, python, *args, **env):
  clean = {k: v for k, v in os.environ.items()
           if k not in ('FLINK_MASTER', 'ENVIRONMENT_TYPE', 'PARALLELISM',
                        'FLINK_JOB_SERVER_JAR', 'FLINK_VERSION', 'JOB_ENDPOINT',
                        'ENVIRONMENT_CONFIG', 'WORKER_POOL_PORT',
                        'SDK_WORKER_PARALLELISM', 'PROJECT', 'REGION', 'BUCKET',
                        'TEMP_LOCATION', 'STAGING_LOCATION',
                        'SDK_CONTAINER_IMAGE')}
  clean.update(env, PYTHON=python)
  return subprocess.run([os.path.join(RUNNERS, script), *args], env=clean,
                        capture_output=True, text=True, timeout=300,
                        check=False)


def test_launchers_pass_flags_through(fake_python):
  user = ['--input', 'gs://bk/in/*.jsonl', '--output_dir', 'gs://bk/o d']
  cases = {
      'direct.sh': ({}, ['--runner', 'DirectRunner']),
      'portable.sh': ({}, ['--runner', 'PortableRunner', '--job_endpoint',
                           'embed', '--environment_type', 'LOOPBACK']),
      'flink.sh': ({'FLINK_JOB_SERVER_JAR': '/jars/js.jar'},
                   ['--runner', 'FlinkRunner', '--flink_master',
                    'localhost:8081', '--environment_type', 'EXTERNAL',
                    '--parallelism', '2', '--environment_config',
                    '127.0.0.1:50000', '--sdk_worker_parallelism', '2',
                    '--flink_job_server_jar', '/jars/js.jar']),
      'dataflow.sh': ({'PROJECT': 'my-project', 'BUCKET': 'my-bucket'},
                      ['--runner', 'DataflowRunner', '--region',
                       'us-central1', '--project', 'my-project',
                       '--temp_location', 'gs://my-bucket/tmp',
                       '--staging_location', 'gs://my-bucket/staging',
                       '--setup_file', os.path.join(REPO, 'setup.py')]),
  }
  for script, (env, runner_flags) in cases.items():
    done = _launch(script, fake_python, *user, **env)
    assert done.returncode == 0, (script, done.stderr)
    assert done.stdout.splitlines() == (
        ['-m', 'pipelines.batch'] + runner_flags + user), script


def test_flink_launcher_options_resolve(fake_python, java):
  done = _launch('flink.sh', fake_python, '--input', 'in.jsonl',
                 FLINK_MASTER='localhost:8081', PARALLELISM='4',
                 FLINK_JOB_SERVER_JAR=java)
  argv = done.stdout.splitlines()[2:]  # after -m pipelines.batch
  options = PipelineOptions(argv)
  flink = options.view_as(FlinkRunnerOptions)
  assert flink.flink_master == 'localhost:8081'
  assert flink.parallelism == 4
  assert flink.flink_job_server_jar == java
  # The worker pool's processes (runners/worker_pool.sh), one per slot.
  portable = options.view_as(PortableOptions)
  assert portable.environment_type == 'EXTERNAL'
  assert portable.environment_config == '127.0.0.1:50000'
  assert int(portable.sdk_worker_parallelism) == 4
  check_runner(options)


def test_flink_without_job_server_jar_fails_fast(input_file, tmp_path):
  """Beam itself (no preflight): the missing jar stops the run in seconds,
  before any download or connection to Flink."""
  options = PipelineOptions(_flink_flags(
      input=input_file, output_dir=str(tmp_path / 'out'),
      flink_job_server_jar='/nonexistent.jar'))
  with pytest.raises(PreflightError):
    check_runner(options)
  p = beam.Pipeline(options=options)
  batch.build_pipeline(p, options)
  start = time.monotonic()
  with pytest.raises(ValueError, match='/nonexistent.jar'):
    p.run()
  assert time.monotonic() - start < 60


def test_flink_launcher_runs_the_pipeline_entry_point(input_file, tmp_path):
  """The real interpreter through runners/flink.sh: the run stops with the
  jar named, instead of hanging on a job server."""
  done = _launch('flink.sh', sys.executable, '--input', input_file,
                 '--output_dir', str(tmp_path / 'out'),
                 FLINK_JOB_SERVER_JAR='/nonexistent.jar')
  assert done.returncode != 0
  assert '/nonexistent.jar' in done.stderr
  assert 'Records read' not in done.stdout
