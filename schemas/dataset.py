"""One dataset declaration (schemas/<name>.yaml) and everything derived from it.

`load_dataset` reads a declaration and returns a `Dataset`, which derives:
  * the parser's field types and record rules (used by transforms.parse),
  * the history feature names (transforms.history),
  * the Arrow schemas of the silver (valid records) and gold (features) tables,
  * the Avro schema (`avro_schema`) and the TFDV schema (`tfdv_schema`),
  * the tf.Transform raw feature spec (`raw_feature_spec`).
"""

import dataclasses
import os
import re
from typing import Any, Dict, List, Optional, Tuple

import yaml

SCHEMA_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_SCHEMA = os.path.join(SCHEMA_DIR, 'transactions.yaml')

FIELD_TYPES = ('string', 'float', 'int', 'timestamp')
_DURATION = re.compile(r'^(\d+)([smhd])$')
_UNIT_SECONDS = {'s': 1, 'm': 60, 'h': 3600, 'd': 86400}


class SchemaError(ValueError):
  """The declaration cannot be read or is inconsistent."""


def parse_duration(text) -> int:
  """'24h' -> 86400. Integers are taken as seconds."""
  if isinstance(text, int):
    return text
  match = _DURATION.match(str(text).strip())
  if not match:
    raise SchemaError(
        f'bad duration {text!r}: use a number and a unit s/m/h/d, e.g. 24h')
  return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]


@dataclasses.dataclass(frozen=True)
class Field:
  name: str
  type: str
  required: bool = False
  min: Optional[float] = None
  max: Optional[float] = None
  allowed: Optional[Tuple[Any, ...]] = None
  pattern: Optional[str] = None
  max_length: Optional[int] = None
  domain: Optional[Tuple[str, ...]] = None
  cents: bool = False


@dataclasses.dataclass(frozen=True)
class Rule:
  """Cross-field rule: records matching `when` must satisfy `require`."""
  name: str
  when: Dict[str, Dict[str, List[Any]]]
  require: Dict[str, Dict[str, float]]


@dataclasses.dataclass(frozen=True)
class HistorySpec:
  value: str
  windows: Dict[str, int]          # name -> seconds, in declaration order
  aggregates: Tuple[str, ...]
  distinct: Dict[str, Tuple[str, ...]]
  novelty: Dict[str, str]
  ratio_to_mean: Optional[str]
  seconds_since_previous: bool
  calendar: Tuple[str, ...]

  @property
  def horizon(self) -> int:
    """The longest window: history older than this is never needed."""
    return max(self.windows.values())


@dataclasses.dataclass(frozen=True)
class Dataset:
  name: str
  fields: Dict[str, Field]
  roles: Dict[str, str]
  rules: Tuple[Rule, ...]
  history: HistorySpec
  aggregates: Dict[str, Any]
  transform: Dict[str, Any]
  drift: Dict[str, Dict[str, float]]
  path: str
  freshness: Dict[str, int] = dataclasses.field(default_factory=dict)
  min_examples: int = 0

  # Roles ------------------------------------------------------------------
  @property
  def id_field(self) -> str:
    return self.roles['id']

  @property
  def entity_field(self) -> str:
    return self.roles['entity']

  @property
  def timestamp_field(self) -> str:
    return self.roles['timestamp']

  @property
  def label_field(self) -> Optional[str]:
    return self.roles.get('label')

  # Derived feature names --------------------------------------------------
  def history_feature_types(self) -> Dict[str, str]:
    """Name -> type ('int' or 'float') of every history feature, in order."""
    h, e = self.history, self.entity_field
    out = {}
    for window in h.windows:
      for agg in h.aggregates:
        out[f'{e}_{agg}_{window}'] = 'int' if agg == 'count' else 'float'
    for field, windows in h.distinct.items():
      for window in windows:
        out[f'{e}_distinct_{field}_{window}'] = 'int'
    for field, window in h.novelty.items():
      out[f'{e}_is_new_{field}_{window}'] = 'int'
    if h.ratio_to_mean:
      out[f'{e}_{h.value}_to_mean_{h.ratio_to_mean}'] = 'float'
    if h.seconds_since_previous:
      out[f'{e}_seconds_since_previous'] = 'float'
    for part in h.calendar:
      out[f'event_{part}'] = 'int'
    return out

  def feature_types(self) -> Dict[str, str]:
    """Columns of the gold (feature) table: record fields then features."""
    out = {name: f.type for name, f in self.fields.items()}
    out.update(self.history_feature_types())
    return out

  def model_features(self) -> List[str]:
    """Raw inputs of the preprocessing_fn, in a stable order."""
    t = self.transform
    names = (list(t.get('numeric', {})) + list(t.get('bucketize', {})) +
             list(t.get('categorical', {})))
    return names

  # Schemas for storage ----------------------------------------------------
  def arrow_schema(self, types: Optional[Dict[str, str]] = None):
    """Arrow schema for a table of `types` (default: the record fields)."""
    import pyarrow as pa
    arrow_types = {'string': pa.string(), 'float': pa.float64(),
                   'int': pa.int64(), 'timestamp': pa.timestamp('us', tz='UTC')}
    types = types or {n: f.type for n, f in self.fields.items()}
    return pa.schema([pa.field(n, arrow_types[t]) for n, t in types.items()])

  def batch_schema(self, types: Optional[Dict[str, str]] = None):
    """Arrow schema of the pipeline's RecordBatches of `types` (default:
    the record fields): like `arrow_schema`, but timestamps are int64
    epoch microseconds, the form every transform computes with."""
    import pyarrow as pa
    arrow_types = {'string': pa.string(), 'float': pa.float64(),
                   'int': pa.int64(), 'timestamp': pa.int64()}
    types = types or {n: f.type for n, f in self.fields.items()}
    return pa.schema([pa.field(n, arrow_types[t]) for n, t in types.items()])

  def aggregate_schema(self, key_field: str):
    """Rows of the windowed aggregate table of `key_field` (batch; the
    streaming rows add `pane` and `pane_index`)."""
    import pyarrow as pa
    key_type = self.batch_schema().field(key_field).type
    return pa.schema([(key_field, key_type), ('window_start', pa.string()),
                      ('window_end', pa.string()), ('count', pa.int64()),
                      ('total_amount', pa.float64()),
                      ('mean_amount', pa.float64()),
                      ('fraud_rate', pa.float64())])

  def prediction_schema(self):
    """Rows of the predictions table."""
    return prediction_schema(self.id_field)

  def avro_schema(self) -> Dict[str, Any]:
    """Avro record schema for raw records (timestamps as RFC 3339 strings).

    Every field is nullable so that a file with a missing value still reads
    and the record reaches the dead-letter output instead of failing the
    reader.
    """
    avro_types = {'string': 'string', 'float': 'double', 'int': 'long',
                  'timestamp': 'string'}
    return {
        'type': 'record', 'name': _camel(self.name), 'namespace': 'mlpipe',
        'fields': [{'name': n, 'type': ['null', avro_types[f.type]],
                    'default': None} for n, f in self.fields.items()],
    }

  def tfdv_schema(self):
    """TFDV schema (tensorflow_metadata Schema proto) of the feature table.

    Required record fields and all history features have presence 1.0;
    allowed/domain lists become string domains; min/max become numeric
    domains. The timestamp is stored as int64 epoch microseconds.
    """
    from tensorflow_metadata.proto.v0 import schema_pb2
    schema = schema_pb2.Schema()
    schema.default_environment.append('TRAINING')
    schema.default_environment.append('SERVING')
    for name, ftype in self.feature_types().items():
      feature = schema.feature.add(name=name)
      feature.type = (schema_pb2.BYTES if ftype == 'string' else
                      schema_pb2.FLOAT if ftype == 'float' else schema_pb2.INT)
      feature.value_count.min = 1
      feature.value_count.max = 1
      field = self.fields.get(name)
      required = field is None or field.required
      feature.presence.min_fraction = 1.0 if required else 0.0
      feature.presence.min_count = 1 if required else 0
      if name == self.label_field:
        feature.not_in_environment.append('SERVING')
      if field is None:
        continue
      values = field.domain or (field.allowed if field.type == 'string'
                                else None)
      if values:
        domain = schema.string_domain.add(name=name)
        domain.value.extend(str(v) for v in values)
        feature.domain = name
      elif field.type == 'float' and (field.min is not None or
                                      field.max is not None):
        if field.min is not None:
          feature.float_domain.min = field.min
        if field.max is not None:
          feature.float_domain.max = field.max
      elif field.type == 'int' and field.allowed:
        feature.int_domain.min = int(min(field.allowed))
        feature.int_domain.max = int(max(field.allowed))
    if self.min_examples:
      schema.dataset_constraints.min_examples_count = self.min_examples
    for name, thresholds in self.drift.items():
      feature = next(f for f in schema.feature if f.name == name)
      if 'jensen_shannon' in thresholds:
        feature.drift_comparator.jensen_shannon_divergence.threshold = (
            thresholds['jensen_shannon'])
        feature.skew_comparator.jensen_shannon_divergence.threshold = (
            thresholds['jensen_shannon'])
      if 'l_infinity' in thresholds:
        feature.drift_comparator.infinity_norm.threshold = (
            thresholds['l_infinity'])
        feature.skew_comparator.infinity_norm.threshold = (
            thresholds['l_infinity'])
    return schema

  def raw_feature_spec(self) -> Dict[str, Any]:
    """tf.Transform feature spec of the preprocessing_fn's raw inputs."""
    import tensorflow as tf
    types = self.feature_types()
    tf_types = {'string': tf.string, 'float': tf.float32, 'int': tf.int64}
    spec = {name: tf.io.FixedLenFeature([], tf_types[types[name]])
            for name in self.model_features()}
    if self.label_field:
      spec[self.label_field] = tf.io.FixedLenFeature([], tf.int64)
    return spec


def prediction_schema(id_field: str):
  """Rows of a predictions table whose record id is `id_field` (the model
  handler knows the id field from the model, not the declaration)."""
  import pyarrow as pa
  return pa.schema([(id_field, pa.string()), ('score', pa.float64()),
                    ('predicted_label', pa.int64()),
                    ('model_version', pa.string())])


def _camel(name: str) -> str:
  return ''.join(part.capitalize() for part in re.split(r'[_\W]+', name))


def _check_field_options(where: str, name: str, opts: Dict[str, Any]):
  """Option values of the right kind: a declaration is data, and a wrong
  value must fail here with one line, not mid-run."""
  for key in ('min', 'max'):
    value = opts.get(key)
    if value is not None and (isinstance(value, bool) or
                              not isinstance(value, (int, float))):
      raise SchemaError(f'{where}: field {name}: {key} must be a number, '
                        f'got {value!r}')
  for key in ('allowed', 'domain'):
    if key in opts and not isinstance(opts[key], (list, tuple)):
      raise SchemaError(f'{where}: field {name}: {key} must be a list')
  if 'max_length' in opts and not (isinstance(opts['max_length'], int) and
                                   opts['max_length'] >= 0):
    raise SchemaError(f'{where}: field {name}: max_length must be a '
                      'non-negative integer')
  if 'pattern' in opts:
    try:
      re.compile(opts['pattern'])
    except (re.error, TypeError) as e:
      raise SchemaError(f'{where}: field {name}: bad pattern '
                        f'{opts["pattern"]!r}: {e}') from None
  for key in ('required', 'cents'):
    if key in opts and not isinstance(opts[key], bool):
      raise SchemaError(f'{where}: field {name}: {key} must be true or '
                        'false')


def _require(mapping, key, where):
  if key not in mapping:
    raise SchemaError(f'{where}: missing "{key}"')
  return mapping[key]


def load_dataset(path: str = DEFAULT_SCHEMA) -> Dataset:
  """Reads and checks a declaration; a name like 'transactions' also works."""
  if not path.endswith(('.yaml', '.yml')) and os.sep not in path:
    path = os.path.join(SCHEMA_DIR, f'{path}.yaml')
  try:
    with open(path, encoding='utf-8') as f:
      raw = yaml.safe_load(f)
  except OSError as e:
    raise SchemaError(f'cannot read schema {path}: {e.strerror}') from None
  except yaml.YAMLError as e:
    raise SchemaError(f'schema {path} is not valid YAML: {e}') from None
  if not isinstance(raw, dict):
    raise SchemaError(f'schema {path} must be a mapping')
  where = os.path.basename(path)

  fields = {}
  declared = _require(raw, 'fields', where)
  if not isinstance(declared, dict) or not declared:
    raise SchemaError(f'{where}: fields must be a mapping of name -> '
                      'options')
  for name, opts in declared.items():
    if opts is not None and not isinstance(opts, dict):
      raise SchemaError(f'{where}: field {name}: options must be a mapping')
    opts = dict(opts or {})
    _check_field_options(where, name, opts)
    ftype = opts.pop('type', None)
    if ftype not in FIELD_TYPES:
      raise SchemaError(f'{where}: field {name} has type {ftype!r}; '
                        f'expected one of {", ".join(FIELD_TYPES)}')
    for key in ('allowed', 'domain'):
      if key in opts:
        opts[key] = tuple(opts[key])
    try:
      fields[name] = Field(name=name, type=ftype, **opts)
    except TypeError as e:
      raise SchemaError(f'{where}: field {name}: {e}') from None

  roles = dict(_require(raw, 'roles', where))
  for role in ('id', 'entity', 'timestamp'):
    if roles.get(role) not in fields:
      raise SchemaError(f'{where}: role {role} must name a declared field')
  if roles.get('label') is not None and roles['label'] not in fields:
    raise SchemaError(f'{where}: role label must name a declared field')

  rules = tuple(Rule(name=r['name'], when=r.get('when', {}),
                     require=r['require']) for r in raw.get('rules', []))
  for rule in rules:
    for field in list(rule.when) + list(rule.require):
      if field not in fields:
        raise SchemaError(f'{where}: rule {rule.name} names unknown {field}')

  h = _require(raw, 'history', where)
  windows = {k: parse_duration(v) for k, v in h['windows'].items()}
  history = HistorySpec(
      value=h['value'], windows=windows,
      aggregates=tuple(h.get('aggregates', ())),
      distinct={k: tuple(v) for k, v in h.get('distinct', {}).items()},
      novelty=dict(h.get('novelty', {})),
      ratio_to_mean=h.get('ratio_to_mean'),
      seconds_since_previous=bool(h.get('seconds_since_previous', False)),
      calendar=tuple(h.get('calendar', ())))
  for agg in history.aggregates:
    if agg not in ('count', 'sum', 'mean', 'max'):
      raise SchemaError(f'{where}: unknown history aggregate {agg}')
  used = list(history.distinct.values()) + [[w] for w in
                                            history.novelty.values()]
  if history.ratio_to_mean:
    used.append([history.ratio_to_mean])
  for names in used:
    for window in names:
      if window not in windows:
        raise SchemaError(f'{where}: history uses undeclared window {window}')

  dataset = Dataset(
      name=raw.get('name', os.path.splitext(where)[0]), fields=fields,
      roles=roles, rules=rules, history=history,
      aggregates=dict(raw.get('aggregates', {})),
      transform=dict(raw.get('transform', {})),
      drift=dict(raw.get('drift', {})), path=os.path.abspath(path),
      min_examples=int(raw.get('min_examples', 0)),
      freshness={k: parse_duration(v)
                 for k, v in (raw.get('freshness') or {}).items()})
  known = dataset.feature_types()
  for name in dataset.model_features() + list(dataset.drift):
    if name not in known:
      raise SchemaError(f'{where}: {name} is not a field or history feature')
  return dataset
