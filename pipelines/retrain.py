"""Retraining on a policy: decide, train a challenger, compare, promote.

  python -m pipelines.retrain --registry data/registry \\
      --run_dir data/scored --input 'data/latest/*.jsonl' \\
      --policy retrain.yaml --output_dir data/retrain

The full description and the code: `pipelines.model.retraining`. This module holds
the flags, the call and the exit codes.
"""

from pipelines.base import quiet  # noqa: F401  pylint: disable=unused-import

import argparse
import sys
from typing import Any, Dict, List, Optional

from pipelines import batch
from pipelines.cli import preflight
from pipelines.cli.shell import run_command
from transforms.formats import FORMATS
from pipelines.model.retraining import (DECISION_FILE, LOG_FILE, RETRAIN,
                                        RetrainError, decide, trigger_text)
from pipelines.outputs import files


class _Parser(argparse.ArgumentParser):
  """Bad flags are a RetrainError: one line, exit 2."""

  def error(self, message):
    raise RetrainError(message)


def parser() -> argparse.ArgumentParser:
  p = _Parser(prog='python -m pipelines.retrain',
              description='Decides on a policy whether to retrain, trains a '
              'challenger, compares it with the champion and promotes it '
              'when it is better by the margin.',
              epilog='Flags this command does not define (--runner, ...) go '
              'to the challenger\'s pipelines.batch run.')
  p.add_argument('--registry', required=True, help='Model registry folder.')
  p.add_argument('--policy', required=True, help='Policy YAML (README: '
                 '"Retraining").')
  p.add_argument('--run_dir', required=True,
                 help="The latest scoring run's --output_dir: its "
                 'validation/drift.json and skew.json, and its feature rows '
                 '(the comparison data).')
  p.add_argument('--monitoring', default=None,
                 help='Monitoring report.json (default: <run_dir>/'
                 'monitoring/report.json when it exists).')
  p.add_argument('--input', default=None,
                 help='Glob of labelled records of the latest window: the '
                 "challenger's training data.")
  p.add_argument('--input_format', default=None,
                 choices=FORMATS)
  p.add_argument('--labels', default=None,
                 help="Late labels for the run's feature rows (as for "
                 "pipelines.monitor); default: the rows' own label column.")
  p.add_argument('--labels_format', default=None,
                 choices=FORMATS)
  p.add_argument('--challenger', default=None,
                 help='Compare this registered candidate instead of '
                 'training one.')
  p.add_argument('--model_type', default=None,
                 choices=['gbt', 'logreg', 'linear'],
                 help="The challenger's model type (default: the "
                 "champion's).")
  p.add_argument('--schema', default='transactions',
                 help='Dataset declaration: a name in schemas/ or a path.')
  p.add_argument('--reference_time', default=None,
                 help='RFC 3339 time recorded with the decision and any '
                 'promotion (default: the latest event time of the run\'s '
                 'feature rows).')
  p.add_argument('--output_dir', required=True,
                 help='The decision goes to <output_dir>/retrain/, the '
                 "challenger's run to <output_dir>/retrain/challenger/.")
  return p


def parse(argv: List[str]) -> argparse.Namespace:
  args, beam_args = parser().parse_known_args(argv)
  try:
    # What is left goes to the challenger's batch run: Beam's flags and
    # the batch job's; a misspelt flag stops here, not silently later.
    preflight.check_flags(beam_args)
  except preflight.PreflightError as e:
    raise RetrainError(str(e)) from None
  args.beam_args = beam_args
  return args


def run(argv: Optional[List[str]] = None) -> Dict[str, Any]:
  """Parses flags and decides (training a challenger with pipelines.batch
  when a trigger fires); returns the decision."""
  return decide(parse(sys.argv[1:] if argv is None else argv), batch.run)


def summary_lines(decision: Dict[str, Any], output_dir: str) -> List[str]:
  lines = [f'Champion:       {decision["champion"]["version"]}']
  lines += [f'Trigger:        {trigger_text(t)}'
            for t in decision['triggers']]
  challenger = decision['challenger']
  if challenger:
    how = ('trained on the latest window' if challenger['trained_here']
           else 'registered earlier')
    lines.append(f'Challenger:     {challenger["version"]} ({how})')
  c = decision['comparison']
  if c and c['enough']:
    m = c['metric']
    lines.append(f'Comparison:     {m} on {c["rows"]} rows ({c["positives"]}'
                 f' positive): champion {c["champion"][m]:.4f}, challenger '
                 f'{c["challenger"][m]:.4f}')
  lines.append(f'Decision:       {decision["action"]}; champion '
               f'{decision["champion_after"]}')
  lines.append('Written to:     '
               f'{files.join(output_dir, RETRAIN, DECISION_FILE)}')
  return lines


def main(argv: Optional[List[str]] = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if '-h' in argv or '--help' in argv:
    parser().print_help()
    return 0
  args = run_command(lambda: parse(argv))
  if isinstance(args, int):
    return args

  def body():
    decision = decide(args, batch.run)
    print('\n'.join(summary_lines(decision, args.output_dir)), flush=True)

  def failed(e):
    what = ('retraining (training the challenger)'
            if isinstance(e, batch.RunFailed) else 'retraining')
    return files.failure_line(e, files.join(args.output_dir, RETRAIN,
                                            LOG_FILE), what)
  return run_command(body, failed)


if __name__ == '__main__':
  sys.exit(main())
