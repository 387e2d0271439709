"""The model registry: every trained model version, and which one serves.

    python -m pipelines.registry list --registry data/registry
    python -m pipelines.registry promote v1234abcd --registry data/registry --reason "beats v99 by 0.01 ROC AUC"
    python -m pipelines.registry rollback --registry data/registry --reason "bad alerts"

The full description and the code: `pipelines.model.registry`. This module holds
the flags, the call and the exit codes.
"""

import pipelines.base.quiet  # noqa: F401  (first: silences start-up noise)

import argparse
import sys
from typing import List, Optional

from pipelines.cli.shell import run_command
from pipelines.model.registry import Registry, RegistryError


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog='python -m pipelines.registry',
      description='List, promote and roll back registered models.')
  p.add_argument('command', choices=['list', 'promote', 'rollback'])
  p.add_argument('version', nargs='?', help='the version to promote')
  p.add_argument('--registry', required=True, help='registry folder')
  p.add_argument('--reason', default='by hand',
                 help='why (kept in the index)')
  p.add_argument('--at', default=None,
                 help='RFC 3339 time recorded with the change')
  return p


def table(entries) -> str:
  """The `list` table: one line per version, oldest first."""
  lines = [f'{"version":<20} {"status":<10} {"type":<7} {"task":<10} '
           f'{"eval metric":<22} {"registered":<26} top feature']
  for e in entries:
    metrics = e.get('metrics') or {}
    key = next((k for k in ('roc_auc', 'log_loss', 'rmse') if
                metrics.get(k) is not None), None)
    shown = f'{key} {metrics[key]:.4f}' if key else '-'
    top = next(iter((e.get('importance') or {}).get('top', {})), '-')
    lines.append(f'{e["version"]:<20} {e["status"]:<10} '
                 f'{str(e.get("model_type")):<7} {str(e.get("task")):<10} '
                 f'{shown:<22} {e.get("registered_at") or "-":<26} {top}')
  return '\n'.join(lines)


def _run(args: argparse.Namespace):
  registry = Registry(args.registry)
  if args.command == 'list':
    print(table(registry.entries()))
  elif args.command == 'promote':
    if not args.version:
      raise RegistryError('promote needs a version (see list)')
    entry = registry.promote(args.version, args.reason, args.at)
    print(f'{entry["version"]} is now the champion of {args.registry}')
  else:
    entry = registry.rollback(args.reason, args.at)
    print(f'rolled back: {entry["version"]} is the champion of '
          f'{args.registry} again')


def main(argv: Optional[List[str]] = None) -> int:
  args = parser().parse_args(argv)
  return run_command(lambda: _run(args))


if __name__ == '__main__':
  sys.exit(main())
