"""Flink and Kafka runs that cannot work stop before any job starts: one
line, exit code 2 (pipelines.preflight.check_services, check_kafka)."""

import socket
import zipfile

import pytest

from pipelines import batch, streaming
from tests.test_runners import input_file  # noqa: F401  (fixture)


def _free_port() -> int:
  """A port nothing listens on (bound, then released)."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture
def launcher(tmp_path):
  """A launcher jar like runners/fetch_jars.sh's, whose Class-Path names a
  jar that is there."""
  (tmp_path / 'beam').mkdir()
  (tmp_path / 'beam' / 'a.jar').write_bytes(b'')
  jar = tmp_path / 'launcher.jar'
  with zipfile.ZipFile(jar, 'w') as z:
    z.writestr('META-INF/MANIFEST.MF', 'Manifest-Version: 1.0\n'
               'Main-Class: x.Main\nClass-Path: beam/a.jar\n')
  return str(jar)


def _one_error_line(capsys) -> str:
  err = [l for l in capsys.readouterr().err.splitlines()
         if l.startswith('error:')]
  assert len(err) == 1, err
  return err[0]


def _flink(master, jar):
  return ['--runner', 'FlinkRunner', '--flink_master', master,
          '--environment_type', 'LOOPBACK', '--flink_job_server_jar', jar]


def test_batch_refuses_a_flink_cluster_that_is_not_up(input_file, launcher,
                                                      tmp_path, capsys):
  master = f'localhost:{_free_port()}'
  code = batch.main(['--input', input_file, '--output_dir',
                     str(tmp_path / 'out'), *_flink(master, launcher)])
  assert code == 2
  line = _one_error_line(capsys)
  assert f'--flink_master {master}: no Flink REST endpoint answers' in line
  assert 'runners/flink_cluster.sh start' in line
  assert not (tmp_path / 'out').exists()


def test_batch_refuses_a_missing_job_server_jar(input_file, tmp_path, capsys):
  code = batch.main(['--input', input_file, '--output_dir',
                     str(tmp_path / 'out'), '--runner', 'FlinkRunner',
                     '--flink_master', '[local]'])
  assert code == 2
  assert 'FlinkRunner needs --flink_job_server_jar' in _one_error_line(capsys)


def test_batch_refuses_a_launcher_whose_jars_are_gone(input_file, launcher,
                                                      tmp_path, capsys):
  (tmp_path / 'beam' / 'a.jar').unlink()
  code = batch.main(['--input', input_file, '--output_dir',
                     str(tmp_path / 'out'), *_flink('[local]', launcher)])
  assert code == 2
  assert 'names beam/a.jar, which does not exist' in _one_error_line(capsys)


def _kafka(tmp_path, launcher, servers, **extra):
  flags = ['--output_dir', str(tmp_path / 'out'), *_flink('[local]',
                                                         launcher),
           '--bootstrap_servers', servers, '--input_topic', 'tx',
           '--kafka_expansion_jar', launcher]
  for key, value in extra.items():
    flags += [f'--{key}', value]
  return flags


def test_streaming_refuses_a_broker_that_does_not_answer(tmp_path, launcher,
                                                         capsys):
  servers = f'127.0.0.1:{_free_port()}'
  assert streaming.main(_kafka(tmp_path, launcher, servers)) == 2
  line = _one_error_line(capsys)
  assert f'--bootstrap_servers {servers}: no Kafka broker answers' in line


def test_streaming_refuses_a_missing_expansion_jar(tmp_path, launcher,
                                                   capsys):
  argv = _kafka(tmp_path, launcher, '127.0.0.1:9092',
                kafka_expansion_jar=str(tmp_path / 'none.jar'))
  assert streaming.main(argv) == 2
  assert 'none.jar does not exist' in _one_error_line(capsys)


def test_streaming_refuses_kafka_on_the_direct_runner(tmp_path, launcher,
                                                      capsys):
  argv = ['--output_dir', str(tmp_path / 'out'), '--bootstrap_servers',
          '127.0.0.1:9092', '--input_topic', 'tx']
  assert streaming.main(argv) == 2
  assert 'DirectRunner cannot run KafkaIO' in _one_error_line(capsys)
