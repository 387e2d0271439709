"""Several model types in one run: each trained and evaluated on the same
split, the best kept and registered, the others' metrics beside it."""

import json

import pytest

from pipelines import batch, generate
from pipelines.registry import Registry
from transforms import inference


@pytest.fixture(scope='module')
def compared(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('selection')
  data = tmp / 'tx.jsonl'
  assert generate.run(['--output', str(data), '--rows', '3000', '--seed',
                       '4']) == 0
  summary = batch.run(['--input', str(data), '--output_dir', str(tmp / 'out'),
                       '--model_type', 'gbt,logreg', '--registry',
                       str(tmp / 'registry')])
  return summary, tmp


def test_the_best_type_is_kept_with_the_others_beside_it(compared):
  summary, tmp = compared
  metadata = inference.read_metadata(str(tmp / 'out' / 'model'))
  table = metadata['compared']
  assert table['metric'] == 'roc_auc'
  assert set(table['eval']) == {'gbt', 'logreg'}
  aucs = {k: v['roc_auc'] for k, v in table['eval'].items()}
  assert table['chosen'] == max(aucs, key=aucs.get)
  assert metadata['model_type'] == table['chosen']
  assert metadata['metrics']['eval']['roc_auc'] == aucs[table['chosen']]
  # Both were evaluated on the same rows.
  rows = {json.dumps(inference.read_metadata(
      str(tmp / 'out' / 'model_candidates' / k))['training']['rows'])
          for k in ('gbt', 'logreg')}
  assert len(rows) == 1
  # Still a verifiable model, and registered with the comparison.
  inference.verify_model_dir(str(tmp / 'out' / 'model'))
  entry = Registry(str(tmp / 'registry')).champion()
  assert entry['model_type'] == table['chosen']
  assert entry['compared'] == table
  assert summary['model']['compared'] == table


def test_an_unknown_type_is_one_line(tmp_path, capsys):
  assert batch.main(['--output_dir', str(tmp_path), '--model_type',
                     'gbt,forest']) == 2
  assert "--model_type 'gbt,forest': give one or more of" in \
      capsys.readouterr().err
