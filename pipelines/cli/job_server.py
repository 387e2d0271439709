"""One Beam job server for all the Beam jobs of one command.

`pipelines.batch` runs up to four Beam jobs one after another (ingest,
transform, predict, materialise). Given no --job_endpoint, Beam's
FlinkRunner starts a job server (a JVM from --flink_job_server_jar) for
every job and stops them only when the process exits: each start cost
10-70 s on this machine (a JVM, then the runner's classes), and each
finished job's server stayed resident (~400-650 MB) beside the next one's.
`shared_job_server` starts one for the command and points every job at it
with --job_endpoint.

`keep_workers_between_stages` sets Beam's --environment_cache_millis for
a batch job on a portable runner: with Beam's default (0) the runner shuts
a job's Python workers down whenever no stage holds them, between two
stages of one job, and starts new ones (each imports TensorFlow and TFDV
again) for the next; a worker shut down under a running bundle failed
1M-row ingest jobs ("call is closed"). Beam's Flink runner honours the
cache time only when its classes come from Flink's own classloader:
runners/flink_cluster.sh puts them there.
"""

import contextlib
from typing import Iterator, Optional

from apache_beam.options.pipeline_options import (FlinkRunnerOptions,
                                                  JobServerOptions,
                                                  PipelineOptions,
                                                  PortableOptions)
from apache_beam.runners.portability.flink_runner import FlinkRunner
from apache_beam.utils.subprocess_server import pick_port

from pipelines.cli.preflight import runner_name


def _own_job_server(options: PipelineOptions) -> bool:
  """FlinkRunner would start a job server of its own for each job: no
  --job_endpoint given and not the uber-jar submission (whose 'server' is
  a per-job upload, nothing to share)."""
  return (runner_name(options) == 'flinkrunner' and
          not options.view_as(PortableOptions).job_endpoint and
          not options.view_as(FlinkRunnerOptions).flink_submit_uber_jar)


# Long enough to bridge the gap between two stages of a job (the next one's
# tasks deployed, seconds under heavy load), short enough that a finished
# job's workers are gone soon after it (the cache outlives a job by this
# much, beside the next job's workers).
WORKER_CACHE_MS = 30_000
_PORTABLE = ('flinkrunner', 'portablerunner', 'sparkrunner')


def keep_workers_between_stages(options: PipelineOptions) -> None:
  """On a portable runner, --environment_cache_millis WORKER_CACHE_MS
  unless the flag was given (changes `options` in place)."""
  portable = options.view_as(PortableOptions)
  given = options.get_all_options(drop_default=True)
  if (runner_name(options) in _PORTABLE and
      'environment_cache_millis' not in given):
    portable.environment_cache_millis = WORKER_CACHE_MS


@contextlib.contextmanager
def shared_job_server(options: PipelineOptions) -> Iterator[Optional[str]]:
  """Within the block, every `beam.Pipeline(options=options)` submits to
  one job server started here (--job_endpoint is set on `options`, which
  is changed in place); it is stopped, and the flag cleared, when the block
  ends. Yields the endpoint, or None when the runner needs no job server
  of its own (DirectRunner, Dataflow, a given --job_endpoint): then
  `options` are left alone."""
  if not _own_job_server(options):
    yield None
    return
  # Beam's own choice of server and arguments (the jar, --flink_master
  # with its http:// scheme, set on `options` as Beam does), started once
  # instead of once per job, on a port known here: Beam's start() returns
  # a gRPC stub, not its address (the server reads the port when made).
  ports = options.view_as(JobServerOptions)
  given = ports.job_port
  port, = pick_port(given)
  ports.job_port = port
  try:
    server = FlinkRunner().default_job_server(options)
  finally:
    ports.job_port = given
  server.start()
  endpoint = f'localhost:{port}'
  portable = options.view_as(PortableOptions)
  portable.job_endpoint = endpoint
  try:
    yield endpoint
  finally:
    portable.job_endpoint = None
    server.stop()
