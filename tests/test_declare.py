"""`pipelines.declare`: a declaration drafted from the data runs as drafted.

On the committed samples (transactions, interactions, items) and on small
generated tables of each task type (binary from a Yes/No CSV column,
multiclass from JSON lines, regression from Parquet): the draft loads, the
roles and task are the expected ones, and `pipelines.batch` runs it with
every well-formed row valid. An adversarial file (a column of mixed
numbers and texts, an all-null column, timestamps in two layouts) gives a
draft that says what it could not decide.
"""

import csv
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import batch, declare
from pipelines.declaring.draft import draft_declaration, scalar
from schemas.dataset import load_dataset
from transforms import inference

ROWS = 240


def _draft_file(tmp, data, **roles):
  draft = draft_declaration(str(data), **roles)
  path = tmp / 'draft.yaml'
  path.write_text(draft.text)
  return draft, load_dataset(str(path)), str(path)


def _run(tmp, schema, data):
  return batch.run(['--schema', schema, '--input', str(data), '--output_dir',
                    str(tmp / 'out'), '--runner', 'DirectRunner',
                    '--model_type', 'gbt'])


def _head(source, target, lines):
  with open(source) as f, open(target, 'w') as out:
    for _, line in zip(range(lines), f):
      out.write(line)


# Generated tables, one per task ---------------------------------------------
def _binary_csv(path):
  # A Yes/No label decided by pay_delay, an optional bill, local times
  # without an offset, customers repeated.
  rng = np.random.default_rng(1)
  with open(path, 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(['loan_id', 'customer_id', 'applied_at', 'income',
                'education', 'bill', 'pay_delay', 'default'])
    for i in range(ROWS):
      delay = int(rng.integers(-2, 9))
      w.writerow([f'L{i:05d}', f'c{i % 40:03d}',
                  f'2026-03-{1 + i // 12:02d} {i % 12 + 8:02d}:{i % 60:02d}:00',
                  f'{rng.lognormal(10, 1):.2f}',
                  ['graduate', 'university', 'high_school'][i % 3],
                  '' if i % 9 == 0 else f'{rng.normal(500, 100):.2f}',
                  delay, 'Yes' if delay > 3 else 'No'])


def _multiclass_jsonl(path):
  rng = np.random.default_rng(2)
  with open(path, 'w') as f:
    for i in range(ROWS):
      income = float(rng.normal(50, 15))
      risk = 'low' if income > 55 else 'medium' if income > 40 else 'high'
      f.write(json.dumps({'household': f'h{i}', 'income': round(income, 2),
                          'size': int(rng.integers(1, 7)),
                          'region': ['north', 'south'][i % 2],
                          'class': risk}) + '\n')


def _regression_parquet(path):
  rng = np.random.default_rng(3)
  temp = rng.normal(15, 5, ROWS)
  pq.write_table(pa.table({
      'reading_id': pa.array(np.arange(ROWS), pa.int64()),
      'temp': temp.round(2),
      'weather': pa.array([['clear', 'rain'][i % 2] for i in range(ROWS)]),
      'target': (3 * temp + rng.normal(0, 1, ROWS)).round(3)}), path)


TABLES = {
    'binary': ('credit.csv', _binary_csv, {'label': 'default'},
               {'id': 'loan_id', 'entity': 'customer_id',
                'timestamp': 'applied_at', 'label': 'default'}),
    'multiclass': ('survey.jsonl', _multiclass_jsonl, {},
                   {'label': 'class'}),
    'regression': ('readings.parquet', _regression_parquet,
                   {'label': 'target'},
                   {'id': 'reading_id', 'label': 'target'}),
}


@pytest.fixture(scope='module')
def generated(tmp_path_factory):
  """{task: (expected roles, draft, dataset, batch summary)}."""
  out = {}
  for task, (name, make, roles, expected) in TABLES.items():
    tmp = tmp_path_factory.mktemp(task)
    make(tmp / name)
    draft, dataset, schema = _draft_file(tmp, tmp / name, **roles)
    out[task] = expected, draft, dataset, _run(tmp, schema, tmp / name)
    out[task] += (inference.read_metadata(str(tmp / 'out' / 'model')),)
  return out


@pytest.mark.parametrize('task', sorted(TABLES))
def test_generated_tables_run_as_drafted(generated, task):
  expected, draft, dataset, summary, _ = generated[task]
  assert draft.roles == expected
  assert dataset.task == task
  assert summary['status'] == 'ok'
  # Every row well-formed, every row valid; the model trained on them.
  assert summary['records_read'] == ROWS
  assert summary['records_valid'] == ROWS
  assert summary['records_dead_lettered'] == 0
  assert summary['model']['task'] == task


def test_binary_draft_guesses_the_rest(generated):
  _, draft, dataset, _, metadata = generated['binary']
  # Yes/No quoted, the rarer one (Yes) the positive class.
  assert '{"No": 0, "Yes": 1}' in draft.text
  assert dataset.label.classes == {'No': 0, 'Yes': 1}
  assert dataset.fields['applied_at'].zone == 'UTC'
  assert dataset.fields['education'].allowed == (
      'graduate', 'high_school', 'university')
  # The optional bill is imputed; the skewed income log-z-scored.
  assert dataset.transform['numeric']['bill']['impute'] == 'mean'
  assert dataset.transform['numeric']['income']['scale'] == 'log_z_score'
  assert dataset.transform['numeric']['pay_delay']['scale'] == 'z_score'
  assert set(draft.guessed) == {'id', 'entity', 'timestamp'}
  assert dataset.history.entity == 'customer_id'
  # The label is pay_delay > 3: the model's importance ranks it first,
  # over the raw features (bill's two columns are one feature).
  ranked = [f['feature'] for f in metadata['importance']['features']]
  assert ranked[0] == 'pay_delay'
  assert set(ranked) == set(dataset.model_features())


def test_multiclass_draft_classes(generated):
  _, draft, dataset, _, metadata = generated['multiclass']
  assert dataset.label.class_names == ['high', 'low', 'medium']
  assert draft.guessed == ['label']      # named like one: class
  assert dataset.transform['categorical'] == {'region': {'oov_buckets': 1}}
  # The class is cut from income alone.
  assert metadata['importance']['features'][0]['feature'] == 'income'
  assert metadata['importance']['metric'] == 'neg_log_loss'


# The committed samples -------------------------------------------------------
def _unlabelled(draft, path):
  """The draft without its label: the run stops after validation (the
  generated tables train drafted models; this keeps these runs quick)."""
  path.write_text(''.join(
      line for line in draft.text.splitlines(keepends=True)
      if not line.startswith(('label:', '  label:'))))
  return str(path)


@pytest.mark.parametrize('sample, expected, head', [
    ('transactions.jsonl', {'id': 'transaction_id', 'entity': 'user_id',
                            'timestamp': 'event_time', 'label': 'is_fraud'},
     400),
    ('interactions.jsonl', {'id': 'interaction_id', 'entity': 'user_id',
                            'timestamp': 'event_time'}, 400),
    ('items.csv', {'id': 'item_id'}, 120),
])
def test_committed_samples(sample, expected, head, tmp_path):
  draft, dataset, _ = _draft_file(tmp_path, f'data/sample/{sample}')
  assert draft.roles == expected
  assert draft.undecided == []
  if sample == 'transactions.jsonl':
    assert dataset.task == 'binary'
    assert dataset.fields['amount'].type == 'float'
    assert dataset.fields['event_time'].type == 'timestamp'
    assert dataset.history.entity == 'user_id'
    # The sample's broken records are what the draft says they are.
    assert "('110.68 EUR')" in draft.text
  if sample == 'items.csv':
    assert dataset.fields['category'].allowed and not dataset.label
  # Drafted from the whole sample, run on its first records (well-formed):
  # every record valid, history features built where there is history.
  lines = head + (sample.endswith('.csv'))
  _head(f'data/sample/{sample}', tmp_path / sample, lines)
  summary = _run(tmp_path, _unlabelled(draft, tmp_path / 'unlabelled.yaml'),
                 tmp_path / sample)
  assert summary['stopped_after'] == 'validation: no label declared'
  assert summary['records_read'] == summary['records_valid'] == head
  assert summary['feature_rows'] == head


# The adversarial file ---------------------------------------------------------
def test_adversarial_file_says_what_it_could_not_decide(tmp_path):
  path = tmp_path / 'odd.csv'
  with open(path, 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(['row', 'mixed', 'empty', 'seen_at', 'Yes'])
    for i in range(100):
      w.writerow([i, i * 1.5 if i % 2 else f'n/a-{i}', '',
                  f'2026-01-{1 + i % 28:02d}T10:00:00Z' if i % 2 else
                  f'{1 + i % 28:02d}/01/2026 10:00', 'No' if i % 3 else 'Yes'])
  draft, dataset, schema = _draft_file(tmp_path, path)
  assert sorted(draft.undecided) == ['empty', 'mixed', 'seen_at']
  text = draft.text
  assert 'UNDECIDED (see their comments): mixed, empty, seen_at' in text
  assert 'mixed values: 50 numbers and 50 texts' in text
  assert 'every sampled value is empty' in text
  assert 'timestamps in more than one layout' in text
  # Undecided columns are strings that every value satisfies, and no
  # model input; a column named Yes stays a string key.
  for name in ('mixed', 'empty', 'seen_at'):
    assert dataset.fields[name].type == 'string'
    assert name not in dataset.model_features()
  assert 'Yes' in dataset.fields
  assert dataset.fields['Yes'].allowed == ('No', 'Yes')
  summary = _run(tmp_path, schema, path)
  assert summary['records_read'] == summary['records_valid'] == 100


def test_scalars_read_back_as_themselves():
  import yaml
  for value in ('Yes', 'no', 'on', 'null', '1.5', '007', '2011-01-01',
                'a: b', 'x#y', '[1]', 'plain', 'émoji ✓', 3, 2.5, '1h'):
    assert yaml.safe_load(f'k: {scalar(value)}')['k'] == value


def test_command_writes_the_draft_and_maps_errors(tmp_path, capsys):
  out = tmp_path / 'items.yaml'
  assert declare.main(['--input', 'data/sample/items.csv', '--output',
                       str(out)]) == 0
  assert load_dataset(str(out)).roles == {'id': 'item_id'}
  assert 'drafted: roles id=item_id' in capsys.readouterr().err
  assert declare.main(['--input', str(tmp_path / 'none*.csv')]) == 2
  assert 'matched no files' in capsys.readouterr().err
  assert declare.main(['--input', 'data/sample/items.csv',
                       '--label', 'nope']) == 2
  assert '--label nope: no such column' in capsys.readouterr().err
