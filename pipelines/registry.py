"""The model registry: every trained model version, and which one serves.

    python -m pipelines.registry list --registry data/registry
    python -m pipelines.registry promote v1234abcd --registry data/registry --reason "beats v99 by 0.01 ROC AUC"
    python -m pipelines.registry rollback --registry data/registry --reason "bad alerts"

A registry is a folder, local or gs://:

    index.json            every version: status, metrics, data and declaration
                          hashes, model type, task, training range, and its
                          history of status changes (when and why)
    models/<version>/     the model directory (as pipelines.train writes it)
    promotions/<n>.json   one pointer per champion change, {"version",
                          "dir"}, numbered: the streaming job watches these
                          to follow the champion without a restart

Statuses: candidate (registered), champion (the one that scores; at most
one), retired (a former champion). The first model registered becomes the
champion; later ones are candidates until promoted. Registering a version
the registry already holds changes nothing (reruns are idempotent).

Times in the index come from the caller (`at`: the run's --reference_time,
else the latest event time of the model's training data), never from the
clock, so the same runs give the same index. The index is written whole to
a temporary file and renamed over the old one (on object stores, one
object upload), so a crash leaves the old index or the new one, never half
of one; a model directory is copied before the index names it, and a
champion pointer is written after the index. Writers hold the registry's
lock (`<registry>/index.lock`, local folders), so two promotions at once
both land. Exit codes: 0 done; 2 bad flags, an unknown version, or an
index.json of the wrong shape (one line on stderr); 3 a failure.
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
           f'{"eval metric":<22} registered']
  for e in entries:
    metrics = e.get('metrics') or {}
    key = next((k for k in ('roc_auc', 'log_loss', 'rmse') if
                metrics.get(k) is not None), None)
    shown = f'{key} {metrics[key]:.4f}' if key else '-'
    lines.append(f'{e["version"]:<20} {e["status"]:<10} '
                 f'{str(e.get("model_type")):<7} {str(e.get("task")):<10} '
                 f'{shown:<22} {e.get("registered_at") or "-"}')
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
