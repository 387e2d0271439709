"""The run report: one self-contained HTML page per batch run.

    python -m pipelines.report --output_dir data/output

The full description and the code: `pipelines.reporting.report`. This module holds
the flags, the call and the exit codes.
"""

from pipelines.base import quiet  # noqa: F401  (first: silences TensorFlow)

import argparse
import sys
from typing import List, Optional

from apache_beam.io.filesystems import FileSystems

from pipelines.base.errors import UsageError
from pipelines.cli.shell import run_command
from pipelines.outputs import files
from pipelines.reporting import report
from pipelines.runs import run_history


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python -m pipelines.report',
      description='Rewrites a batch run\'s report/index.html from its files.')
  parser.add_argument('--output_dir', required=True,
                      help='the run\'s --output_dir')
  parser.add_argument('--history', default=None,
                      help='its run history (default: runs.jsonl beside it)')
  return parser


def main(argv: Optional[List[str]] = None) -> int:
  """Exit codes: 0 written (its path printed), 2 bad flags or a folder
  without run_summary.json, 3 a failure while rendering."""
  args = _parser().parse_args(argv)

  def body():
    if not FileSystems.exists(files.join(args.output_dir,
                                         report.SUMMARY_FILE)):
      raise UsageError(f'{args.output_dir} holds no {report.SUMMARY_FILE}')
    print(report.write_report(
        args.output_dir, None,
        args.history or run_history.default_path(args.output_dir)))

  return run_command(body)


if __name__ == '__main__':
  sys.exit(main())
