"""What a command asks Flink's REST API directly, beyond Beam's job service.

Beam's Flink job server runs a job on a session cluster from a thread of
its own; cancelling the Beam job (PipelineResult.cancel) stops that thread
and the job server, but the Flink job runs on, holding its slots (seen:
a stopped streaming job kept both slots and the next batch job waited for
them forever). `cancel_flink_job` cancels it on the cluster.
"""

import json
import urllib.request
from typing import Optional

from apache_beam.options.pipeline_options import PipelineOptions

_MAGIC_MASTERS = ('[auto]', '[local]')


def _rest_url(options: PipelineOptions) -> Optional[str]:
  flags = options.get_all_options(drop_default=False)
  master = flags.get('flink_master') or '[auto]'
  if master in _MAGIC_MASTERS or flags.get('job_endpoint'):
    return None
  url = master if '://' in master else 'http://' + master
  return url.rstrip('/')


def flink_job_name(result) -> str:
  """The Flink job's name of a portable PipelineResult: its Beam job id up
  to the first '_' (BeamApp-<user>-<time>-<hash>_<uuid> -> BeamApp-...)."""
  return str(getattr(result, '_job_id', '') or '').split('_', 1)[0]


def cancel_flink_job(options: PipelineOptions, result,
                     timeout: float = 10) -> int:
  """Cancels the running Flink jobs of `result` on --flink_master's
  cluster; returns how many. 0 when the runner is not a Flink session
  cluster or nothing answers (the job then ends with its cluster)."""
  url, name = _rest_url(options), flink_job_name(result)
  if not url or not name:
    return 0
  try:
    with urllib.request.urlopen(f'{url}/jobs/overview',
                                timeout=timeout) as response:
      jobs = json.load(response).get('jobs', [])
    cancelled = 0
    for job in jobs:
      if job.get('name') == name and job.get('state') in (
          'RUNNING', 'CREATED', 'RESTARTING', 'INITIALIZING'):
        request = urllib.request.Request(
            f'{url}/jobs/{job["jid"]}?mode=cancel', method='PATCH')
        with urllib.request.urlopen(request, timeout=timeout):
          cancelled += 1
    return cancelled
  except (OSError, ValueError):
    return 0
