"""Session fixtures for the report, metrics and history tests: four small
batch runs into one output root (so one run history), shared by
tests/test_report.py, test_metrics.py and test_history_runs.py (imported
by conftest.py so that each run happens once per session).

  features_only  a declaration without a label: stops after validation
  full           trains (logreg: quick), registers, drift against
                 features_only's statistics (same rows: no drift)
  drifted        scores new rows whose amounts are 4x with the full run's
                 model (--no-train --model_dir), drift against the full
                 run's statistics, skew against its training statistics
  stopped        50 rows, under the declaration's min_examples of 100:
                 the validation gate stops it; with --retain_runs 1 on its
                 own history, seeded with two older runs' lines
"""

import contextlib
import io as _io
import json
import types

import pytest
import yaml

from pipelines import batch
from pipelines.synthetic import transactions as generate
from schemas.dataset import load_dataset

ROWS = 3000


def _write(records, path):
  generate.write_records(records, str(path))
  return str(path)


def _batch(argv):
  """batch.main with stdout captured: (exit code, stdout)."""
  out = _io.StringIO()
  with contextlib.redirect_stdout(out):
    code = batch.main(argv + ['--runner', 'DirectRunner'])
  return code, out.getvalue()


@pytest.fixture(scope='session')
def report_runs(tmp_path_factory):
  base = tmp_path_factory.mktemp('report_runs')
  root = base / 'runs'
  root.mkdir()
  clean = generate.generate_transactions(rows=ROWS, seed=1)
  inputs = base / 'inputs'
  inputs.mkdir()
  rows = _write(generate.insert_broken(
      clean, generate.broken_records(clean, 1, 'jsonl', 30)),
                inputs / 'a.jsonl')
  later = generate.generate_transactions(rows=1500, seed=2,
                                         start='2026-11-01T00:00:00Z',
                                         days=10)
  drifted = _write([dict(r, amount=round(r['amount'] * 4, 2)) for r in later],
                   inputs / 'drifted.jsonl')
  tiny = _write(clean[:50], inputs / 'tiny.jsonl')

  declaration = yaml.safe_load(open(load_dataset().path, encoding='utf-8'))
  del declaration['roles']['label']
  declaration.pop('risk', None)
  unlabelled = base / 'unlabelled.yaml'
  unlabelled.write_text(yaml.safe_dump(declaration))

  registry = base / 'registry'
  runs = types.SimpleNamespace(root=root, registry=registry,
                               history=root / 'runs.jsonl', stdout={},
                               codes={})

  def run(name, argv):
    out = root / name
    runs.codes[name], runs.stdout[name] = _batch(
        ['--output_dir', str(out)] + argv)
    setattr(runs, name, out)

  run('features_only', ['--schema', str(unlabelled), '--input', rows])
  run('full', ['--input', rows, '--model_type', 'logreg', '--registry',
               str(registry), '--baseline_stats',
               str(root / 'features_only' / 'statistics' / 'stats.pb')])
  run('drifted', ['--input', drifted, '--no-train', '--model_dir',
                  str(root / 'full' / 'model'), '--baseline_stats',
                  str(root / 'full' / 'statistics' / 'stats.pb')])

  # The stopped run keeps its own history, seeded with two older runs:
  # one deletable, one holding a registry whose champion must survive.
  old = base / 'old_run'
  (old / 'silver').mkdir(parents=True)
  (old / 'run_summary.json').write_text('{"status": "ok"}')
  holder = base / 'run_with_registry'
  (holder / 'registry' / 'models' / 'v1').mkdir(parents=True)
  (holder / 'run_summary.json').write_text('{"status": "ok"}')
  (holder / 'registry' / 'index.json').write_text(json.dumps({'versions': [
      {'version': 'v1', 'dir': 'models/v1', 'status': 'champion',
       'history': []}]}))
  runs.stopped_history = base / 'stopped_runs.jsonl'
  runs.stopped_history.write_text(''.join(json.dumps(line) + '\n' for line in [
      {'seq': 1, 'output_dir': str(old), 'status': 'ok', 'health': 0.9,
       'summary': {'status': 'ok'}},
      {'seq': 2, 'output_dir': str(holder), 'status': 'ok', 'health': 0.9,
       'summary': {'status': 'ok', 'registry': {
           'root': str(holder / 'registry')}}}]))
  runs.old_run, runs.registry_holder = old, holder
  run('stopped', ['--input', tiny, '--history', str(runs.stopped_history),
                  '--retain_runs', '1'])
  runs.summary = {name: json.loads((getattr(runs, name) /
                                    'run_summary.json').read_text())
                  for name in ('features_only', 'full', 'drifted', 'stopped')}
  return runs
