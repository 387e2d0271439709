"""Java FlinkPipelineOptions declared for Python (pipelines.cli.options.
FlinkJavaOptions) pass our flag check and are among the options the
FlinkRunner sends the job server; unset, they are not sent."""

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.cli import preflight
from pipelines.cli.options import FlinkJavaOptions  # noqa: F401  (declares them)


def test_execution_mode_for_batch_reaches_the_job_server():
  argv = ['--execution_mode_for_batch', 'BATCH_FORCED']
  preflight.check_flags(argv)
  # What the portable runner serialises for the job server.
  sent = PipelineOptions(argv).get_all_options(drop_default=True)
  assert sent['execution_mode_for_batch'] == 'BATCH_FORCED'
  assert 'execution_mode_for_batch' not in PipelineOptions([]).get_all_options(
      drop_default=True)


def test_execution_mode_for_batch_takes_only_flinks_modes():
  with pytest.raises(SystemExit):
    PipelineOptions(['--execution_mode_for_batch', 'BATCH']).get_all_options()
