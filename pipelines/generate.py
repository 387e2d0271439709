"""Synthetic card transactions with learnable fraud, in every input format.

    python -m pipelines.generate --output /tmp/tx.parquet --rows 1000000

(data/sample/README.md has the exact command of the committed sample;
`--schema interactions` runs pipelines.generate_interactions.) The data and
how it is drawn: pipelines.synthetic.transactions. The same flags always
give byte-identical files. `--broken N` mixes in N records that the parser
must dead-letter. Exit codes: 0 written, 2 bad flags or an output that
cannot be written (one line on stderr).
"""

import pipelines.base.quiet  # noqa: F401  pylint: disable=unused-import

import argparse
import sys
import time
from typing import Optional, Sequence

from pipelines import generate_interactions
from pipelines.base.errors import UsageError
from pipelines.cli.shell import run_command
from pipelines.synthetic import transactions
from pipelines.synthetic.common import (Parser, add_common_flags,
                                        insert_broken, output_format)

SCHEMAS = ('transactions', 'interactions')


def _parser():
  p = Parser(prog='pipelines.generate',
             description=__doc__.split('\n\n', maxsplit=1)[0])
  p.add_argument('--schema', choices=SCHEMAS, default='transactions',
                 help='Dataset: transactions (default) or interactions '
                 '(pipelines.generate_interactions: adds --items and '
                 '--items_output).')
  add_common_flags(
      p, f'Card holders (default rows/{transactions.ROWS_PER_USER}).')
  return p


def run(argv: Optional[Sequence[str]] = None) -> int:
  """Parses flags, generates and writes; returns 0. Bad flags, and an
  output that cannot be written, exit 2 with one line (SystemExit)."""
  argv = sys.argv[1:] if argv is None else list(argv)
  # Peek at --schema only: the interactions generator has flags of its own.
  peek = argparse.ArgumentParser(add_help=False)
  peek.add_argument('--schema')
  if peek.parse_known_args(argv)[0].schema == 'interactions':
    return generate_interactions.run(argv)
  parser = _parser()
  args = parser.parse_args(argv)
  began = time.monotonic()  # only for the summary line, never the data
  try:
    fmt = output_format(args.output, args.format)
    if args.broken < 0:
      raise UsageError(f'--broken must be >= 0, got {args.broken}')
    clean = transactions.generate_transactions(
        args.rows, args.users, args.seed, args.start, args.days)
    broken = transactions.broken_records(clean, args.seed, fmt, args.broken)
    transactions.write_records(insert_broken(clean, broken), args.output, fmt)
  except UsageError as e:
    parser.error(str(e))
  except OSError as e:
    parser.error(f'cannot write {args.output}: {e.strerror}')
  fraud = sum(r['is_fraud'] for r in clean)
  print(f'wrote {len(clean) + len(broken)} records to {args.output} '
        f'({len(clean)} clean, {fraud / max(len(clean), 1):.2%} fraud, '
        f'{len(broken)} broken) in {time.monotonic() - began:.1f}s')
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  return run_command(lambda: run(argv))


if __name__ == '__main__':
  sys.exit(main())
