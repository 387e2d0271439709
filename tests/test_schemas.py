"""The declaration drives everything; committed artefacts match it."""

import glob
import os

import pytest
import yaml

from schemas.dataset import SCHEMA_DIR, SchemaError, load_dataset
from pipelines.schema_files import artefacts

DECLARATIONS = sorted(glob.glob(os.path.join(SCHEMA_DIR, '*.yaml')))


@pytest.mark.parametrize('declaration', DECLARATIONS)
def test_committed_artefacts_match_the_declaration(declaration):
  for path, text in artefacts(declaration).items():
    with open(path, encoding='utf-8') as f:
      assert f.read() == text, (
          f'{os.path.basename(path)} is stale: run python -m pipelines.schema_files')


def test_adding_a_field_is_one_change(tmp_path):
  with open(os.path.join(SCHEMA_DIR, 'transactions.yaml')) as f:
    raw = yaml.safe_load(f)
  raw['fields']['device'] = {'type': 'string', 'required': False,
                             'allowed': ['ios', 'android', 'web']}
  path = tmp_path / 'with_device.yaml'
  path.write_text(yaml.safe_dump(raw))
  dataset = load_dataset(str(path))
  assert 'device' in dataset.arrow_schema().names
  assert 'device' in [f['name'] for f in dataset.avro_schema()['fields']]
  schema = dataset.tfdv_schema()
  device = next(f for f in schema.feature if f.name == 'device')
  assert device.presence.min_fraction == 0.0
  assert 'device' in dataset.feature_types()


@pytest.mark.parametrize('change,message', [
    (lambda raw: raw['fields']['amount'].update(type='money'),
     r"fields.amount.type: 'money' is not a type; use one of"),
    (lambda raw: raw['roles'].update(entity='nobody'),
     r"roles.entity: 'nobody' is not a declared field"),
    (lambda raw: raw['roles'].update(timestamp='amount'),
     r'roles.timestamp: amount has type float; give that field type: '
     r'timestamp'),
    (lambda raw: raw['roles'].pop('timestamp'),
     r'roles.entity: an entity needs a timestamp role'),
    (lambda raw: raw['history']['distinct'].update(country=['3d']),
     r"history.distinct.country: undeclared window '3d'; use one of 1h"),
    (lambda raw: raw['history'].update(windows={}),
     r'history.windows: no windows'),
    (lambda raw: raw['history'].update(aggregates=['median']),
     r"history.aggregates: unknown aggregate 'median'"),
    (lambda raw: raw['transform']['numeric'].update(ghost='z_score'),
     r"transform.numeric.ghost: 'ghost' is not a field or history feature"),
    (lambda raw: raw['transform']['numeric'].update(amount='cube'),
     r"transform.numeric.amount.scale: unknown scale 'cube'"),
    (lambda raw: raw['transform']['numeric'].update(merchant_category='none'),
     r'transform.numeric.merchant_category: merchant_category is a string; '
     r'list it under categorical'),
    (lambda raw: raw.update(fields=list(raw['fields'])),
     r'fields: missing or empty'),
    (lambda raw: raw['fields']['amount'].update(min='low'),
     r"fields.amount.min: must be a number, got 'low'"),
    (lambda raw: raw['fields']['user_id'].update(pattern='^u[0-9'),
     r'fields.user_id.pattern: bad regular expression'),
    # Python's re runs a back-reference; RE2, the one engine, cannot.
    (lambda raw: raw['fields']['user_id'].update(pattern=r'^(u)\1[0-9]+$'),
     r"fields.user_id.pattern: bad regular expression: RE2 cannot run "
     r"'\^\(u\)\\\\1\[0-9\]\+\$': .*invalid escape sequence.*; "
     r'write it in RE2 syntax'),
    (lambda raw: raw['fields']['user_id'].update(pattern='^(?=u)u[0-9]+$'),
     r'fields.user_id.pattern: bad regular expression: RE2 cannot run .*'
     r'look-around'),
    (lambda raw: raw['fields']['currency'].update(allowed='USD'),
     r'fields.currency.allowed: must be a list'),
    (lambda raw: raw['fields'].update(amount='float'),
     r'fields.amount: options must be a mapping'),
    (lambda raw: raw['fields']['amount'].update(colour='red'),
     r'fields.amount.colour: unknown key; use one of type'),
    (lambda raw: raw.update(histroy=raw['history']),
     r'histroy: unknown key; use one of name'),
    (lambda raw: raw['fields']['event_time'].update(zone='Mars/Olympus'),
     r"fields.event_time.zone: unknown time zone 'Mars/Olympus'"),
    (lambda raw: raw['fields']['amount'].update(zone='UTC'),
     r'fields.amount.zone: only a timestamp field takes it'),
    (lambda raw: raw.update(label={'classes': {'No': 0, 'Yes': 1}}),
     r'label.classes.No: is not a int value of is_fraud'),
    (lambda raw: raw.update(label={'classes': {0: 0, 1: 2}}),
     r'label.classes: class indices \[0, 2\] are not 0..n-1'),
    (lambda raw: raw.update(label={'task': 'ranking'}),
     r"label.task: 'ranking' is not a task"),
    (lambda raw: raw.update(label={'classes': 'yes-no'}),
     r"label.classes: 'yes-no' is not a mapping of raw value -> class index"),
    (lambda raw: raw['fields']['amount'].update(required=False),
     r'history.value: amount is optional; the history value must be '
     r'required'),
    (lambda raw: raw['fields'].update(tip={'type': 'float'}) or
     raw['transform']['numeric'].update(tip='z_score'),
     r'transform.numeric.tip: tip is optional and may be missing; declare '
     r'impute'),
    (lambda raw: raw['transform']['bucketize'].update(amount=0),
     r'transform.bucketize.amount.buckets: must be a positive integer'),
    (lambda raw: raw['aggregates'].update(keys=['ghost']),
     r"aggregates.keys: 'ghost' is not a string or int field"),
    (lambda raw: raw['freshness'].update(max_age='soon'),
     r"freshness.max_age: bad duration 'soon'"),
    # An int label read as 0/1 without saying so dead-lettered every other
    # value as "not one of the allowed values".
    (lambda raw: raw['fields']['is_fraud'].pop('allowed'),
     r'label.task: is_fraud is an int label with neither a task nor '
     r'classes; declare label.task: regression, or classes'),
    # Names the pipeline gives its own output columns.
    (lambda raw: raw['fields'].update(score={'type': 'float'}),
     r'fields.score: the name is a column the pipeline adds to the '
     r'predictions; rename the field'),
    (lambda raw: raw['fields'].update(model_version={'type': 'string'}),
     r'fields.model_version: the name is a column the pipeline adds'),
    (lambda raw: raw['fields'].update(prediction={'type': 'float'}),
     r'fields.prediction: the name is a column the pipeline adds'),
    (lambda raw: raw['fields'].update(__source={'type': 'string'}),
     r"fields.__source: names starting with __ are the reader's own columns"),
    (lambda raw: raw['fields'].update(amount_xf={'type': 'float'}),
     r'fields.amount_xf: the name is the column of transformed amount'),
    (lambda raw: raw['fields'].update(count={'type': 'string',
                                             'required': True}) or
     raw['aggregates'].update(keys=['count']),
     r'aggregates.keys: count is also a column of its aggregate table'),
])
def test_inconsistent_declarations_are_refused(tmp_path, change, message):
  with open(os.path.join(SCHEMA_DIR, 'transactions.yaml')) as f:
    raw = yaml.safe_load(f)
  change(raw)
  path = tmp_path / 'bad.yaml'
  path.write_text(yaml.safe_dump(raw))
  with pytest.raises(SchemaError, match=message) as raised:
    load_dataset(str(path))
  # One line, naming the file first.
  assert str(raised.value).startswith('bad.yaml: ')
  assert '\n' not in str(raised.value)


def test_unreadable_schema(tmp_path):
  with pytest.raises(SchemaError, match='cannot read schema'):
    load_dataset(str(tmp_path / 'missing.yaml'))
  bad = tmp_path / 'bad.yaml'
  bad.write_text('fields: [unclosed')
  with pytest.raises(SchemaError, match='not valid YAML'):
    load_dataset(str(bad))


# YAML itself: aliases, duplicate keys ------------------------------------------
def _laughs(depth=9):
  """'Billion laughs': `depth` anchors of 9 aliases of the one before;
  9**depth strings once written out, a few hundred bytes as written."""
  rows = ['&a0 [' + ', '.join(['lol'] * 9) + ']']
  rows += [f'&a{i} [' + ', '.join([f'*a{i - 1}'] * 9) + ']'
           for i in range(1, depth)]
  return '[' + ', '.join(rows) + ']'


SMALL = """
name: small
fields:
  id: {type: string, required: true}
  amount: &money {type: float, required: true, min: 0}
  country: {type: string, allowed: ALLOWED}
"""


def _declaration(tmp_path, text):
  path = tmp_path / 'small.yaml'
  path.write_text(text)
  return str(path)


@pytest.mark.parametrize('text,message', [
    # 9**9 values in `allowed`: refused before any is built.
    (SMALL.replace('ALLOWED', _laughs()),
     r'^small.yaml: aliases expand to over 10000 more values; write the '
     r'values out once$'),
    (SMALL.replace('ALLOWED', '&loop [US, *loop]'),
     r'^small.yaml: line 6: an alias refers to the value that contains it'),
    (SMALL.replace('ALLOWED', '[US]') + '  amount: {type: int}\n',
     r"^small.yaml: line 7: key 'amount' is given twice \(first on line 5\); "
     r'give each key once$'),
    (SMALL.replace('ALLOWED', '[US]') + 'name: other\n',
     r"^small.yaml: line 7: key 'name' is given twice \(first on line 2\)"),
    (SMALL.replace('ALLOWED', '[[US, CA], GB]'),
     r'^small.yaml: fields.country.allowed: holds a list, not a value'),
])
def test_alias_bombs_and_duplicate_keys_are_refused(tmp_path, text, message):
  with pytest.raises(SchemaError, match=message) as raised:
    load_dataset(_declaration(tmp_path, text))
  assert '\n' not in str(raised.value)


def test_a_few_aliases_and_merge_keys_still_load(tmp_path):
  dataset = load_dataset(_declaration(tmp_path, SMALL.replace(
      'ALLOWED', '[US]') .replace(
          '  country:', '  tip: {<<: *money, required: false}\n  country:')))
  assert dataset.fields['tip'].type == 'float'
  assert dataset.fields['tip'].min == 0
  assert dataset.fields['tip'].required is False


def test_the_safe_loader_serves_any_yaml_the_project_reads():
  """The loader a retrain policy (or any YAML file) can use: the same
  refusals, one line each, with the name it is given."""
  from pipelines.base.errors import UsageError
  from pipelines.base.safe_yaml import YamlError, load_yaml
  assert load_yaml('min_rows: 10\nlimits: &l [1, 2]\nagain: *l\n',
                   'policy.yaml') == {'min_rows': 10, 'limits': [1, 2],
                                      'again': [1, 2]}
  for text, message in [
      ('min_rows: 10\nmin_rows: 20\n', "policy.yaml: line 2: key "
       "'min_rows' is given twice (first on line 1); give each key once"),
      ('x: ' + _laughs(6), 'policy.yaml: aliases expand to over 10000 more '
       'values; write the values out once'),
      ('x: ' + '[' * 1000 + ']' * 1000, 'policy.yaml is not valid YAML: '
       'nested too deep'),
      ('x: !!python/object/apply:os.system [echo]',
       'policy.yaml is not valid YAML: could not determine a constructor')]:
    with pytest.raises(YamlError) as raised:
      load_yaml(text, 'policy.yaml')
    assert str(raised.value).startswith(message)
    assert '\n' not in str(raised.value)
    assert isinstance(raised.value, UsageError)   # exit 2


def test_an_int_label_takes_its_classes_from_allowed_or_its_task(tmp_path):
  """Declared values say the classes; task: binary alone means 0/1."""
  def label(fields_is_fraud, spec):
    with open(os.path.join(SCHEMA_DIR, 'transactions.yaml')) as f:
      raw = yaml.safe_load(f)
    raw['fields']['is_fraud'] = fields_is_fraud
    raw.pop('risk')
    if spec:
      raw['label'] = spec
    path = tmp_path / 'label.yaml'
    path.write_text(yaml.safe_dump(raw))
    return load_dataset(str(path)).label
  three = label({'type': 'int', 'allowed': [1, 2, 3]}, None)
  assert (three.task, three.classes) == ('multiclass', {1: 0, 2: 1, 3: 2})
  two = label({'type': 'int', 'allowed': [1, 2]}, None)
  assert (two.task, two.classes) == ('binary', {1: 0, 2: 1})
  explicit = label({'type': 'int'}, {'task': 'binary'})
  assert (explicit.task, explicit.classes) == ('binary', {0: 0, 1: 1})
  counts = label({'type': 'int', 'min': 0}, {'task': 'regression'})
  assert (counts.task, counts.classes) == ('regression', None)
