"""The run history: one JSON line per batch run, and its trend.

    python -m pipelines.history --runs data/runs.jsonl

The full description and the code: `pipelines.runs.run_history`. This module holds
the flags, the call and the exit codes.
"""

import argparse
import sys
from typing import List, Optional

from apache_beam.io.filesystems import FileSystems

from pipelines.base.errors import UsageError
from pipelines.cli.shell import run_command
from pipelines.runs import run_history


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python -m pipelines.history',
      description='Prints the trend of the runs in a run history.')
  parser.add_argument('--runs', required=True,
                      help='the history file (runs.jsonl beside the run '
                      'folders, or the --history of the runs)')
  parser.add_argument('--last', type=int, default=None,
                      help='only the latest N runs')
  return parser


def main(argv: Optional[List[str]] = None) -> int:
  """Exit codes: 0 printed, 2 bad flags or no such history file."""
  args = _parser().parse_args(argv)

  def body():
    if not FileSystems.exists(args.runs):
      raise UsageError(f'--runs {args.runs} does not exist')
    entries, broken = run_history.load(args.runs)
    if args.last:
      entries = entries[-args.last:]
    print(run_history.table(entries))
    if broken:
      print(run_history.skipped_note(broken))

  return run_command(body)


if __name__ == '__main__':
  sys.exit(main())
