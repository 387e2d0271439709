"""Trains a scikit-learn model on tf.Transform output, for the label's task.

  python -m pipelines.train --transformed out/transformed \\
      --transform_dir out/transform --model_dir out/model [--model logreg]

The full description and the code: `pipelines.model.training`. This module holds
the flags, the call and the exit codes.
"""

from pipelines.base import quiet  # noqa: F401  pylint: disable=unused-import

import argparse
import json
import sys
from typing import List, Optional

from pipelines.cli.shell import run_command
from pipelines.model.registry import Registry
from pipelines.model.training import MODELS, read_transformed, train
from schemas.dataset import load_dataset


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog='python -m pipelines.train',
                              description=__doc__.split('\n')[0])
  p.add_argument('--transformed', required=True,
                 help='directory or glob of transformed Parquet files')
  p.add_argument('--transform_dir', required=True,
                 help='tf.Transform output dir (WriteTransformFn)')
  p.add_argument('--model_dir', required=True)
  p.add_argument('--model', choices=MODELS, default='gbt',
                 help='gbt (any task), logreg (classes) or linear '
                 '(regression)')
  p.add_argument('--schema', default='transactions',
                 help='dataset declaration: a name in schemas/ or a '
                 'path to a .yaml (as for pipelines.batch)')
  p.add_argument('--eval_fraction', type=float, default=0.2)
  p.add_argument('--statistics', default=None,
                 help='training statistics path, recorded in metadata')
  p.add_argument('--model_version', default=None,
                 help='version to record (default: content hash)')
  p.add_argument('--registry', default=None,
                 help='register the model there (pipelines.registry)')
  return p


def _train(args: argparse.Namespace):
  metadata = train(
      read_transformed(args.transformed), transform_dir=args.transform_dir,
      model_dir=args.model_dir, dataset=load_dataset(args.schema),
      model=args.model, eval_fraction=args.eval_fraction,
      statistics_path=args.statistics, model_version=args.model_version)
  if args.registry:
    times = metadata['training'].get('eval_time_range') or {}
    entry = Registry(args.registry).register(
        args.model_dir, 'trained by pipelines.train', at=times.get('max'))
    print(f'registered {entry["version"]} as {entry["status"]} in '
          f'{args.registry}', file=sys.stderr)
  ev = metadata['metrics']['eval']
  print(json.dumps({'model_version': metadata['model_version'],
                    'task': metadata['task'],
                    'threshold': metadata['threshold'],
                    'eval': {k: v for k, v in ev.items()
                             if not isinstance(v, (list, dict))}},
                   indent=2))


def main(argv: Optional[List[str]] = None) -> int:
  args = parser().parse_args(argv)
  return run_command(lambda: _train(args))


if __name__ == '__main__':
  sys.exit(main())
