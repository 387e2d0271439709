"""Synthetic e-commerce interactions (view -> click -> cart -> purchase)
and their items side table.

    python -m pipelines.generate --schema interactions \\
        --output /tmp/interactions.jsonl --rows 20000 --seed 7

writes the interaction records (any format of pipelines.generate) and
`items.csv` beside them (--items_output to put it elsewhere). The data and
how it is drawn: pipelines.synthetic.interactions. Exit codes: 0 written,
2 bad flags or an output that cannot be written (one line on stderr).
"""

import pipelines.base.quiet  # noqa: F401  pylint: disable=unused-import

import os
import sys
import time
from typing import Optional, Sequence

from pipelines.base.errors import UsageError
from pipelines.cli.shell import run_command
from pipelines.synthetic import interactions
from pipelines.synthetic.common import (Parser, add_common_flags,
                                        insert_broken, output_format)


def _parser():
  p = Parser(prog='pipelines.generate --schema interactions',
             description=__doc__.split('\n\n', maxsplit=1)[0])
  p.add_argument('--schema', choices=['interactions'], default='interactions',
                 help='Always interactions here (pipelines.generate '
                 'dispatches on it).')
  add_common_flags(p, f'Users (default rows/{interactions.ROWS_PER_USER}).')
  p.add_argument('--items_output', default=None,
                 help='Items side table (CSV; default items.csv beside '
                 '--output).')
  p.add_argument('--items', type=int, default=None,
                 help=f'Items (default rows/{interactions.ROWS_PER_ITEM}, '
                 'at least 10).')
  return p


def run(argv: Optional[Sequence[str]] = None) -> int:
  """Parses flags, generates and writes both files; returns 0. Bad flags,
  and an output that cannot be written, exit 2 with one line
  (SystemExit)."""
  parser = _parser()
  args = parser.parse_args(argv)
  items_output = (args.items_output or
                  interactions.default_items_output(args.output))
  began = time.monotonic()  # only for the summary line, never the data
  written = args.output
  try:
    fmt = output_format(args.output, args.format)
    if args.broken < 0:
      raise UsageError(f'--broken must be >= 0, got {args.broken}')
    if os.path.abspath(items_output) == os.path.abspath(args.output):
      raise UsageError(f'--items_output and --output are both {args.output}')
    clean, items = interactions.generate_interactions(
        args.rows, args.users, args.items, args.seed, args.start, args.days)
    broken = interactions.broken_records(clean, args.seed, fmt, args.broken)
    interactions.write_interactions(insert_broken(clean, broken),
                                    args.output, fmt)
    written = items_output
    interactions.write_items(items, items_output)
  except UsageError as e:
    parser.error(str(e))
  except OSError as e:
    parser.error(f'cannot write {written}: {e.strerror}')
  bought = sum(r['interaction_type'] == 'purchase' for r in clean)
  print(f'wrote {len(clean) + len(broken)} records to {args.output} '
        f'({len(clean)} clean, {bought / max(len(clean), 1):.2%} purchases, '
        f'{len(broken)} broken) and {len(items)} items to {items_output} '
        f'in {time.monotonic() - began:.1f}s')
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  return run_command(lambda: run(argv))


if __name__ == '__main__':
  sys.exit(main())
