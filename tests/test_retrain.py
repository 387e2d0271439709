"""pipelines.retrain: the policy decides, the challenger is compared with
the champion on the same rows, and only a better one is promoted.

One module-wide world (the Beam runs are the slow part): a champion
trained with --registry on window A; two later windows B scored by it with
A's statistics as the drift baseline and monitored with their labels, one
with amounts shifted (x5, as tests/test_batch.py's drift test), one clean;
and a model trained on A's transformed rows with shuffled labels (a model
that learned nothing: the worse one).
"""

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pytest

from pipelines import batch
from pipelines.synthetic import transactions as generate
from pipelines import monitor, retrain
from pipelines.model import retraining as retrain_lib
from pipelines.model import training as train
from pipelines.model.registry import CANDIDATE, CHAMPION, RETIRED, Registry
from schemas.dataset import load_dataset

POLICY = """\
# Retrain when any feature drifted, or ROC AUC fell by more than 0.05.
max_drifted_features: 0
max_auc_drop: 0.05
metric: roc_auc
promote_margin: 0.01
min_eval_rows: 100
min_eval_positives: 3
"""


def _windows(root):
  """Window A (ten days) and window B, the ten days after it: the same
  generator draw moved in time (clean: the same distribution, so any
  drift is the shift's), and with every purchase's amount times five."""
  def draw(start):
    return generate.generate_transactions(rows=2000, users=40, seed=12,
                                          start=start, days=10)
  b = draw('2026-09-11T00:00:00Z')
  shifted = [dict(r, amount=round(r['amount'] * 5, 2))
             if r['channel'] != 'refund' else r for r in b]
  paths = {}
  for name, rows in (('a', draw('2026-09-01T00:00:00Z')), ('clean', b),
                     ('shifted', shifted)):
    paths[name] = str(root / f'{name}.jsonl')
    generate.write_records(rows, paths[name])
  return paths


@pytest.fixture(scope='module')
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp('retrain')
  registry = str(root / 'registry')
  inputs = _windows(root)
  trained = batch.run(['--input', inputs['a'], '--output_dir',
                       str(root / 'a'), '--registry', registry])
  assert trained['registry']['status'] == CHAMPION
  runs = {}
  for name in ('shifted', 'clean'):
    out = str(root / name)
    batch.run(['--input', inputs[name], '--output_dir', out, '--registry',
               registry, '--no-train', '--baseline_stats',
               str(root / 'a' / 'statistics' / 'stats.pb')])
    monitor.run(['--predictions', f'{out}/predictions', '--labels',
                 inputs[name], '--registry', registry, '--output_dir', out])
    runs[name] = {'run_dir': out, 'input': inputs[name]}
  # The worse model: A's rows with their labels shuffled.
  table = train.read_transformed(str(root / 'a' / 'transform' /
                                     'transformed'))
  labels = table.column('is_fraud').to_numpy()
  shuffled = table.set_column(
      table.column_names.index('is_fraud'), 'is_fraud',
      pa.array(np.random.default_rng(0).permutation(labels)))
  worse = train.train(shuffled, transform_dir=str(
      root / 'a' / 'transform' / 'transform_fn'),
                      model_dir=str(root / 'shuffled'),
                      dataset=load_dataset())
  (root / 'policy.yaml').write_text(POLICY)
  return {'root': root, 'registry': registry, 'runs': runs,
          'champion': trained['model']['version'],
          'worse_dir': str(root / 'shuffled'),
          'worse': worse['model_version'], 'policy': str(root / 'policy.yaml')}


def _registry_copy(world, tmp_path, name='registry'):
  target = str(tmp_path / name)
  shutil.copytree(world['registry'], target)
  return target


def _argv(world, registry, run, out, *extra):
  return ['--registry', registry, '--policy', world['policy'],
          '--run_dir', world['runs'][run]['run_dir'],
          '--input', world['runs'][run]['input'],
          '--output_dir', str(out)] + list(extra)


def _decisions(registry):
  with open(os.path.join(registry, 'decisions.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_clean_data_does_not_trigger_a_retrain(world, tmp_path, capsys):
  registry = _registry_copy(world, tmp_path)
  assert retrain.main(_argv(world, registry, 'clean', tmp_path / 'o1')) == 0
  decision = json.load(open(tmp_path / 'o1' / 'retrain' / 'decision.json'))
  assert decision['retrain'] is False and decision['action'] == 'none'
  by_name = {t['trigger']: t for t in decision['triggers']}
  assert by_name['max_drifted_features']['value'] == 0
  assert by_name['max_auc_drop']['value'] is not None
  assert not any(t['fired'] for t in decision['triggers'])
  assert decision['reasons'][0].startswith('no trigger fired')
  assert decision['challenger'] is None
  assert not os.path.exists(tmp_path / 'o1' / 'retrain' / 'challenger')
  assert Registry(registry).champion()['version'] == world['champion']
  assert 'Decision:       none' in capsys.readouterr().out
  # The same inputs decide the same, byte for byte; both are logged.
  assert retrain.main(_argv(world, registry, 'clean', tmp_path / 'o2')) == 0
  assert ((tmp_path / 'o1' / 'retrain' / 'decision.json').read_bytes() ==
          (tmp_path / 'o2' / 'retrain' / 'decision.json').read_bytes())
  assert _decisions(registry) == [decision, decision]


def test_a_worse_challenger_is_not_promoted(world, tmp_path):
  decisions = []
  for name in ('r1', 'r2'):
    registry = _registry_copy(world, tmp_path, name)
    Registry(registry).register(world['worse_dir'], 'shuffled labels',
                                at='2026-09-10T00:00:00Z')
    assert retrain.main(_argv(world, registry, 'shifted', tmp_path / name,
                              '--challenger', world['worse'])) == 0
    decisions.append((tmp_path / name / 'retrain' / 'decision.json')
                     .read_bytes())
    statuses = {e['version']: e['status']
                for e in Registry(registry).entries()}
    assert statuses == {world['champion']: CHAMPION,
                        world['worse']: CANDIDATE}
  assert decisions[0] == decisions[1]   # deterministic
  decision = json.loads(decisions[0])
  assert decision['retrain'] is True
  drifted = {t['trigger']: t for t in decision['triggers']}[
      'max_drifted_features']
  assert drifted['fired'] and 'amount' in drifted['detail']
  c = decision['comparison']
  # Every labelled row of B is after both models' training data (A).
  assert c['rows'] > 1500 and c['excluded_rows'] == 0
  assert c['champion']['roc_auc'] > 0.9
  # A model of shuffled labels: ~0.6-0.72 on the shifted rows B,
  # depending on the fit's noise (0.72 with scikit-learn on one OpenMP
  # thread, as the tests run it); far below the champion either way.
  assert c['challenger']['roc_auc'] < 0.8
  assert c['difference'] < decision['policy']['promote_margin']
  assert decision['action'] == 'kept_champion'
  assert decision['champion_after'] == world['champion']
  assert decision['reasons'][-1].startswith('champion kept: roc_auc')


def test_shifted_amounts_retrain_and_a_better_challenger_is_promoted(
    world, tmp_path):
  # The champion here is the model that learned nothing.
  registry = str(tmp_path / 'registry')
  Registry(registry).register(world['worse_dir'], 'shuffled labels',
                              at='2026-09-10T00:00:00Z')
  out = tmp_path / 'o'
  assert retrain.main(_argv(world, registry, 'shifted', out)) == 0
  decision = json.load(open(out / 'retrain' / 'decision.json'))
  assert decision['retrain'] is True
  by_name = {t['trigger']: t for t in decision['triggers']}
  assert by_name['max_drifted_features']['fired']
  assert 'amount' in by_name['max_drifted_features']['detail']
  # The monitoring report is of the model that scored the run, not of
  # this champion: that trigger is said to be not evaluated.
  assert by_name['max_auc_drop']['value'] is None
  assert 'the champion is' in by_name['max_auc_drop']['note']
  challenger = decision['challenger']
  assert challenger['trained_here'] is True
  assert os.path.exists(out / 'retrain' / 'challenger' / 'model')
  c = decision['comparison']
  # Only rows after the challenger's training rows (B's latest fifth).
  assert 0 < c['rows'] < 600 and c['excluded_rows'] > 1000
  assert c['challenger']['roc_auc'] > c['champion']['roc_auc'] + 0.01
  assert decision['action'] == 'promoted'
  entries = {e['version']: e for e in Registry(registry).entries()}
  assert entries[challenger['version']]['status'] == CHAMPION
  assert entries[world['worse']]['status'] == RETIRED
  assert entries[challenger['version']]['history'][-1]['at'] == (
      decision['at'])
  assert _decisions(registry) == [decision]


@pytest.mark.parametrize('policy,message', [
    ('max_drifted_features: 0\nmax_drift: 1\n', "unknown key 'max_drift'"),
    ('metric: roc_auc\n', 'no trigger'),
    ('max_auc_drop: lots\n', 'max_auc_drop must be a non-negative number'),
    ('max_drifted_features: 1\nmetric: accuracy\n', 'metric must be one of'),
    ('- a list\n', 'must be a mapping'),
    # nan is never above a limit and .inf is never exceeded: both refused.
    ('max_auc_drop: .nan\n', 'max_auc_drop must be a finite number, not nan'),
    ('max_score_psi: .inf\n', 'max_score_psi must be a finite number, not inf'),
    ('max_drifted_features: 1\npromote_margin: .NaN\n',
     'promote_margin must be a finite number'),
    # The later of two keys no longer wins silently.
    ('max_auc_drop: 0.5\nmax_auc_drop: 0.01\n', "key 'max_auc_drop' is given"),
])
def test_a_bad_policy_is_one_line_and_exit_2(world, tmp_path, capsys, policy,
                                             message):
  path = tmp_path / 'policy.yaml'
  path.write_text(policy)
  argv = _argv(world, str(tmp_path / 'none'), 'clean', tmp_path / 'o')
  argv[argv.index('--policy') + 1] = str(path)
  assert retrain.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and message in err[0], err


def test_no_champion_no_run_or_a_misspelt_flag_is_exit_2(
    world, tmp_path, capsys):
  assert retrain.main(_argv(world, str(tmp_path / 'empty'), 'clean',
                            tmp_path / 'o')) == 2
  assert 'has no champion' in capsys.readouterr().err
  argv = _argv(world, world['registry'], 'clean', tmp_path / 'o')
  argv[argv.index('--run_dir') + 1] = str(tmp_path)
  assert retrain.main(argv) == 2
  assert 'not the output of a batch run' in capsys.readouterr().err
  assert retrain.main(_argv(world, world['registry'], 'clean',
                            tmp_path / 'o', '--lables', 'x.jsonl')) == 2
  assert 'unknown flag --lables' in capsys.readouterr().err
  assert not os.path.exists(os.path.join(world['registry'],
                                         'decisions.jsonl'))


def test_a_report_value_that_is_not_a_number_fires_nothing_and_stays_json():
  # A monitoring report with nan (a score PSI of an empty window, say): the
  # trigger is not evaluated, and the decision holds standard JSON only.
  champion = {'version': 'v1'}
  monitoring = {'model': {'version': 'v1'}, 'metrics': {'roc_auc': 0.7},
                'eval_metrics': {'roc_auc': float('nan')},
                'score_drift': {'psi': float('inf')}}
  policy = dict(retrain_lib.DEFAULTS, max_auc_drop=0.01, max_score_psi=0.2)
  checked = retrain_lib.triggers(policy, None, None, monitoring, champion,
                                 {'monitoring': 'report.json'})
  assert [(t['trigger'], t['value'], t['fired']) for t in checked] == [
      ('max_auc_drop', None, False), ('max_score_psi', None, False)]
  assert all('not a number' in t['note'] for t in checked)
  json.dumps(checked, allow_nan=False)   # raises on NaN or Infinity
