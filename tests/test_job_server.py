"""pipelines.cli.job_server: one Beam job server for all of a command's jobs
(the real cluster case: tests/test_runners.py's Flink session test)."""

import pytest
from apache_beam.options.pipeline_options import (JobServerOptions,
                                                  PipelineOptions,
                                                  PortableOptions)
from apache_beam.runners.portability.flink_runner import FlinkRunner

from pipelines.cli.job_server import (WORKER_CACHE_MS,
                                      keep_workers_between_stages,
                                      shared_job_server)


class FakeServer:
  """Stands for Beam's StopOnExitJobServer(FlinkJarJobServer): counts."""

  def __init__(self, log):
    self.log = log

  def start(self):
    self.log.append('start')
    return object()   # Beam's start() returns a gRPC stub

  def stop(self):
    self.log.append('stop')


@pytest.fixture
def servers(monkeypatch):
  log = []
  monkeypatch.setattr(FlinkRunner, 'default_job_server',
                      lambda self, options: FakeServer(log))
  return log


def _flink(*extra):
  return PipelineOptions(['--runner', 'FlinkRunner', '--flink_master',
                          'localhost:8081', '--flink_job_server_jar',
                          '/jars/js.jar', *extra])


def test_flink_jobs_share_one_server_stopped_at_the_end(servers):
  options = _flink()
  with shared_job_server(options) as endpoint:
    assert endpoint.startswith('localhost:')
    # Every pipeline built from these options (or a view of them) now
    # submits to the one server instead of starting its own.
    for _ in range(3):
      assert options.view_as(PortableOptions).job_endpoint == endpoint
    assert servers == ['start']
  assert servers == ['start', 'stop']
  assert options.view_as(PortableOptions).job_endpoint is None


def test_the_server_stops_when_a_stage_fails(servers):
  options = _flink()
  with pytest.raises(RuntimeError):
    with shared_job_server(options):
      raise RuntimeError('a job failed')
  assert servers == ['start', 'stop']


@pytest.mark.parametrize('flags', [
    ['--runner', 'DirectRunner'],
    ['--runner', 'DataflowRunner'],
    # a job server the user runs: theirs to start and stop
    ['--runner', 'FlinkRunner', '--job_endpoint', 'localhost:8099'],
    ['--runner', 'FlinkRunner', '--flink_master', 'flink:8081',
     '--flink_submit_uber_jar'],
])
def test_other_runners_are_left_alone(servers, flags):
  options = PipelineOptions(flags)
  before = options.get_all_options()
  with shared_job_server(options) as endpoint:
    assert endpoint is None
    assert options.get_all_options() == before
  assert not servers


def test_beam_starts_the_server_on_the_port_it_names(monkeypatch):
  """The endpoint given to the jobs is the port Beam's server listens on
  (Beam's start() returns a stub, so the port is chosen here)."""
  made = {}

  def default_job_server(self, options):
    made['job_port'] = options.view_as(JobServerOptions).job_port
    return FakeServer([])

  monkeypatch.setattr(FlinkRunner, 'default_job_server', default_job_server)
  options = _flink()
  with shared_job_server(options) as endpoint:
    assert endpoint == f'localhost:{made["job_port"]}'
    assert made['job_port'] > 0
  # --job_port is back to what was given (nothing).
  assert options.view_as(JobServerOptions).job_port == 0


@pytest.mark.parametrize('flags, expected', [
    # Beam's default 0 shuts a job's workers down between its stages.
    (['--runner', 'FlinkRunner'], WORKER_CACHE_MS),
    (['--runner', 'PortableRunner', '--job_endpoint', 'embed'],
     WORKER_CACHE_MS),
    (['--runner', 'FlinkRunner', '--environment_cache_millis', '500'], 500),
    (['--runner', 'DirectRunner'], 0),
])
def test_portable_batch_jobs_keep_their_workers_between_stages(flags,
                                                               expected):
  options = PipelineOptions(flags)
  keep_workers_between_stages(options)
  assert int(options.view_as(PortableOptions).environment_cache_millis) == (
      expected)
