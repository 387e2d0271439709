"""Drafts a declaration (schemas/*.yaml) from a sample of the data.

  python -m pipelines.declare --input data/credit.csv --label default > credit.yaml
  python -m pipelines.batch --schema credit.yaml --input data/credit.csv

The full description and the code: `pipelines.declaring.draft`. This
module holds the flags, the call and the exit codes (0 drafted; 2 bad
flags, an input that cannot be read or a role naming no column).
"""

from pipelines.base import quiet  # noqa: F401  pylint: disable=unused-import

import argparse
import sys
from typing import List, Optional

from pipelines.base.errors import UsageError
from pipelines.cli.shell import run_command
from pipelines.declaring.draft import draft_declaration
from pipelines.declaring.sample import SAMPLE_ROWS
from transforms.formats import FORMATS


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog='python -m pipelines.declare',
                              description=__doc__.split('\n')[0])
  p.add_argument('--input', required=True,
                 help='glob of files in any input format (as for '
                 'pipelines.batch)')
  p.add_argument('--input_format', choices=FORMATS, default=None,
                 help='when the file names do not tell')
  p.add_argument('--label', default=None, help='the label column')
  p.add_argument('--id', default=None, help='the id column')
  p.add_argument('--timestamp', default=None, help='the event-time column')
  p.add_argument('--entity', default=None,
                 help='the column whose history is kept')
  p.add_argument('--sample_rows', type=int, default=SAMPLE_ROWS,
                 help='records read to infer from (default %(default)s)')
  p.add_argument('--output', default=None,
                 help='write the draft there instead of to stdout')
  return p


def main(argv: Optional[List[str]] = None) -> int:
  args = parser().parse_args(argv)

  def body():
    if args.sample_rows < 1:
      raise UsageError(f'--sample_rows {args.sample_rows}: give a positive '
                       'number of records')
    draft = draft_declaration(
        args.input, input_format=args.input_format, label=args.label,
        id_field=args.id, timestamp=args.timestamp, entity=args.entity,
        sample_rows=args.sample_rows)
    if args.output:
      with open(args.output, 'w', encoding='utf-8') as f:
        f.write(draft.text)
    else:
      sys.stdout.write(draft.text)
    roles = ', '.join(f'{k}={v}' for k, v in draft.roles.items()) or 'none'
    print(f'drafted: roles {roles}; task {draft.task or "none"}; '
          f'{len(draft.undecided)} undecided; review the comments at the top',
          file=sys.stderr)
  return run_command(body)


if __name__ == '__main__':
  sys.exit(main())
