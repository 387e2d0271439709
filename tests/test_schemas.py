"""The declaration drives everything; committed artefacts match it."""

import glob
import os

import pytest
import yaml

from schemas.dataset import SCHEMA_DIR, SchemaError, load_dataset
from schemas.generate import artefacts

DECLARATIONS = sorted(glob.glob(os.path.join(SCHEMA_DIR, '*.yaml')))


@pytest.mark.parametrize('declaration', DECLARATIONS)
def test_committed_artefacts_match_the_declaration(declaration):
  for path, text in artefacts(declaration).items():
    with open(path, encoding='utf-8') as f:
      assert f.read() == text, (
          f'{os.path.basename(path)} is stale: run python -m schemas.generate')


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
    (lambda raw: raw['fields']['amount'].update(type='money'), 'type'),
    (lambda raw: raw['roles'].update(entity='nobody'), 'role entity'),
    (lambda raw: raw['history']['distinct'].update(country=['3d']),
     'undeclared window 3d'),
    (lambda raw: raw['transform']['numeric'].update(ghost='z_score'),
     'ghost is not a field'),
    (lambda raw: raw.update(fields=list(raw['fields'])), 'must be a mapping'),
    (lambda raw: raw['fields']['amount'].update(min='low'),
     'min must be a number'),
    (lambda raw: raw['fields']['user_id'].update(pattern='^u[0-9'),
     'bad pattern'),
    (lambda raw: raw['fields']['currency'].update(allowed='USD'),
     'allowed must be a list'),
    (lambda raw: raw['fields'].update(amount='float'),
     'options must be a mapping'),
])
def test_inconsistent_declarations_are_refused(tmp_path, change, message):
  with open(os.path.join(SCHEMA_DIR, 'transactions.yaml')) as f:
    raw = yaml.safe_load(f)
  change(raw)
  path = tmp_path / 'bad.yaml'
  path.write_text(yaml.safe_dump(raw))
  with pytest.raises(SchemaError, match=message):
    load_dataset(str(path))


def test_unreadable_schema(tmp_path):
  with pytest.raises(SchemaError, match='cannot read schema'):
    load_dataset(str(tmp_path / 'missing.yaml'))
  bad = tmp_path / 'bad.yaml'
  bad.write_text('fields: [unclosed')
  with pytest.raises(SchemaError, match='not valid YAML'):
    load_dataset(str(bad))
