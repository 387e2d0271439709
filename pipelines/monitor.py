"""Model monitoring: a run's predictions joined with labels that arrive later.

  python -m pipelines.monitor --predictions data/scored/predictions \\
      --labels 'labels/*.jsonl' --registry models/ --output_dir data/scored

The full description and the code: `pipelines.model.monitoring`. This module holds
the flags, the call and the exit codes.
"""

from pipelines.base import quiet  # noqa: F401  pylint: disable=unused-import

import argparse
import sys
from typing import Any, Dict, List, Optional

from pipelines.cli.shell import run_command
from transforms.formats import FORMATS
from pipelines.model.monitoring import (LOG_FILE, MONITORING, MonitorError,
                                        monitor)
from pipelines.outputs import files


class _Parser(argparse.ArgumentParser):
  """Bad flags are a MonitorError: one line, exit 2."""

  def error(self, message):
    raise MonitorError(message)


def parser() -> argparse.ArgumentParser:
  p = _Parser(prog='python -m pipelines.monitor',
              description='Joins predictions with late labels by id and '
              'writes <output_dir>/monitoring/report.json.')
  p.add_argument('--predictions', required=True,
                 help='Folder or glob of prediction Parquet files (a batch '
                 "run's predictions/).")
  p.add_argument('--labels', required=True,
                 help='Glob of label files (.jsonl, .csv, .avro, .parquet): '
                 'id, label and, if declared, the timestamp.')
  p.add_argument('--labels_format', default=None,
                 choices=FORMATS,
                 help='Format of the label files when names do not tell.')
  p.add_argument('--schema', default='transactions',
                 help='Dataset declaration: a name in schemas/ or a path.')
  model = p.add_mutually_exclusive_group(required=True)
  model.add_argument('--registry', help='Model registry folder: the model '
                     "is the entry of the predictions' model_version.")
  model.add_argument('--model_dir', help='The model folder that made the '
                     'predictions.')
  p.add_argument('--output_dir', required=True,
                 help='The report goes to <output_dir>/monitoring/.')
  return p


def _monitor(args: argparse.Namespace) -> Dict[str, Any]:
  return monitor(predictions=args.predictions, labels=args.labels,
                 output_dir=args.output_dir, schema=args.schema,
                 registry=args.registry, model_dir=args.model_dir,
                 labels_format=args.labels_format)


def run(argv: Optional[List[str]] = None) -> Dict[str, Any]:
  """Parses flags, writes the report; returns it (with its `path`)."""
  return _monitor(parser().parse_args(argv))


def _f(value) -> str:
  return 'n/a' if value is None else f'{value:.3f}'


def summary_lines(out: Dict[str, Any]) -> List[str]:
  c, m, drift = out['counts'], out['metrics'], out['score_drift']
  lines = [
      f'Model:                 {out["model"]["version"]} (threshold '
      f'{out["model"]["threshold"]:.4g})',
      f'Predictions:           {c["predictions"]} ({c["prediction_duplicates"]}'
      f' duplicate rows), {c["predictions_without_label"]} without a label',
      f'Labels:                {c["labels"]} ({c["label_duplicates"]} '
      f'duplicate rows, {c["label_conflicts"]} conflicting, '
      f'{c["labels_rejected"]} rejected), {c["labels_without_prediction"]} '
      'for unknown ids',
      f'Matched:               {c["matched"]} ({c["positives"]} positive)',
  ]
  if m:
    cm = m['confusion_matrix']
    lines += [
        f'ROC AUC / PR AUC:      {_f(m["roc_auc"])} / {_f(m["pr_auc"])} '
        f'(eval {_f(out["eval_metrics"]["roc_auc"])} / '
        f'{_f(out["eval_metrics"]["pr_auc"])})',
        f'Precision / recall:    {_f(m["precision"])} / {_f(m["recall"])} '
        f'(tp {cm["tp"]}, fp {cm["fp"]}, fn {cm["fn"]}, tn {cm["tn"]})']
  else:
    lines.append('Metrics:               none: no prediction has a label yet')
  if out['trend']:
    lines.append(f'Days:                  {len(out["trend"]["days"])}')
  if drift:
    lines.append(f'Score drift:           JS distance {drift["js_distance"]:.3f}'
                 f' (base 2), PSI {drift["psi"]:.3f}')
  else:
    lines.append('Score drift:           not measured (the model has no '
                 'eval score distribution)')
  lines.append(f'Report:                {out["path"]}')
  return lines


def main(argv: Optional[List[str]] = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if '-h' in argv or '--help' in argv:
    parser().print_help()
    return 0
  args = run_command(lambda: parser().parse_args(argv))
  if isinstance(args, int):
    return args

  def body():
    print('\n'.join(summary_lines(_monitor(args))), flush=True)

  # A failure: one line on stderr, the traceback in a log next to the report.
  return run_command(body, lambda e: files.failure_line(
      e, files.join(args.output_dir, MONITORING, LOG_FILE), 'monitoring'))


if __name__ == '__main__':
  sys.exit(main())
