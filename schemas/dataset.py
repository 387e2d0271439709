"""One dataset declaration (schemas/<name>.yaml) and everything derived from it.

`load_dataset` reads a declaration, checks it whole (every mistake is one
`SchemaError` line naming the file, the key and the fix) and returns a
`Dataset`, which derives:
  * the parser's field types and record rules (transforms.parse), including
    derived fields: a `record_id` when no id is declared, timestamps
    composed from a date and an hour field;
  * the history feature names of each declared entity (transforms.history_features);
  * the Arrow schemas of the silver (valid records), gold (features),
    aggregate and prediction tables;
  * the Avro schema (`avro_schema`) and the TFDV schema (`tfdv_schema`);
  * the label's task and classes, and the tf.Transform inputs.

Every role and every section but `fields` is optional: a table without an
id is identified by source file and position, one without entity and
timestamp has no history, aggregates or time split, one without a label
stops after validation.
"""

import dataclasses
import datetime
import os
import re
from typing import Any, Dict, List, Optional, Tuple

from pipelines.base.errors import UsageError
from pipelines.base.safe_yaml import YamlError, load_yaml
from schemas import patterns
from schemas.sources import load_source

SCHEMA_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_SCHEMA = os.path.join(SCHEMA_DIR, 'transactions.yaml')

FIELD_TYPES = ('string', 'float', 'int', 'timestamp')
TASKS = ('binary', 'multiclass', 'regression')
HISTORY_AGGREGATES = ('count', 'sum', 'mean', 'max')
SCALES = ('z_score', 'log_z_score', 'none')
IMPUTE = ('mean', 'zero')
# The record id of a dataset that declares none: "<file name>:<position>".
RECORD_ID = 'record_id'
# The column of a missing-value indicator of transformed feature <name>.
MISSING_SUFFIX = '_missing'
# The transformed (tf.Transform output) column of model input <name>.
TRANSFORMED_SUFFIX = '_xf'

_DURATION = re.compile(r'^(\d+)([smhd])$')
_UNIT_SECONDS = {'s': 1, 'm': 60, 'h': 3600, 'd': 86400}
_SECTIONS = ('name', 'description', 'roles', 'label', 'fields', 'rules',
             'min_examples', 'freshness', 'history', 'aggregates',
             'transform', 'drift', 'side_tables', 'negatives', 'risk',
             'source')
_FIELD_OPTIONS = ('type', 'required', 'min', 'max', 'allowed', 'pattern',
                  'max_length', 'domain', 'cents', 'format', 'zone', 'from')
_HISTORY_KEYS = ('entity', 'value', 'windows', 'aggregates', 'distinct',
                 'novelty', 'rates', 'ratio_to_mean',
                 'seconds_since_previous', 'calendar')


class SchemaError(UsageError, ValueError):
  """The declaration cannot be read or is inconsistent."""


def parse_duration(text) -> int:
  """'24h' -> 86400. Integers are taken as seconds."""
  if isinstance(text, int) and not isinstance(text, bool):
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
  # Timestamps: a strptime format for values without RFC 3339's layout, and
  # the zone of values that carry none (IANA name, e.g. Europe/Lisbon).
  format: Optional[str] = None
  zone: Optional[str] = None
  # Composed timestamp: {'date': field, 'hour': field, 'date_format': fmt}.
  compose: Optional[Dict[str, str]] = None
  # Not read from the record: computed by the parser (record id, composed
  # timestamps).
  derived: bool = False


@dataclasses.dataclass(frozen=True)
class Rule:
  """Cross-field rule: records matching `when` must satisfy `require`."""
  name: str
  when: Dict[str, Dict[str, List[Any]]]
  require: Dict[str, Dict[str, float]]


@dataclasses.dataclass(frozen=True)
class LabelSpec:
  """The label: its field, task and classes (raw value -> class index)."""
  field: str
  task: str = 'binary'
  classes: Optional[Dict[Any, int]] = None

  @property
  def class_names(self) -> List[Any]:
    """Raw value of each class index (the first raw value mapped to it)."""
    names: Dict[int, Any] = {}
    for value, index in (self.classes or {}).items():
      names.setdefault(index, value)
    return [names[i] for i in sorted(names)]

  @property
  def is_classification(self) -> bool:
    return self.task != 'regression'


@dataclasses.dataclass(frozen=True)
class HistorySpec:
  entity: str
  value: Optional[str]
  windows: Dict[str, int]          # name -> seconds, in declaration order
  aggregates: Tuple[str, ...]
  distinct: Dict[str, Tuple[str, ...]]
  novelty: Dict[str, str]
  ratio_to_mean: Optional[str]
  seconds_since_previous: bool
  calendar: Tuple[str, ...]
  rates: Dict[str, Dict[str, Tuple[Any, ...]]] = dataclasses.field(
      default_factory=dict)        # field -> {name: values}, per window

  @property
  def horizon(self) -> int:
    """The longest window: history older than this is never needed."""
    return max(self.windows.values())

  def feature_types(self) -> Dict[str, str]:
    """Name -> type ('int' or 'float') of this entity's features, in order."""
    e, out = self.entity, {}
    for window in self.windows:
      for agg in self.aggregates:
        out[f'{e}_{agg}_{window}'] = 'int' if agg == 'count' else 'float'
      for field, named in self.rates.items():
        for name in named:
          out[f'{e}_{field}_{name}_rate_{window}'] = 'float'
    for field, windows in self.distinct.items():
      for window in windows:
        out[f'{e}_distinct_{field}_{window}'] = 'int'
    for field, window in self.novelty.items():
      out[f'{e}_is_new_{field}_{window}'] = 'int'
    if self.ratio_to_mean:
      out[f'{e}_{self.value}_to_mean_{self.ratio_to_mean}'] = 'float'
    if self.seconds_since_previous:
      out[f'{e}_seconds_since_previous'] = 'float'
    for part in self.calendar:
      out[f'event_{part}'] = 'int'
    return out


@dataclasses.dataclass(frozen=True)
class Dataset:
  name: str
  fields: Dict[str, Field]
  roles: Dict[str, str]
  rules: Tuple[Rule, ...]
  histories: Tuple[HistorySpec, ...]
  aggregates: Dict[str, Any]
  transform: Dict[str, Any]
  drift: Dict[str, Dict[str, float]]
  path: str
  freshness: Dict[str, int] = dataclasses.field(default_factory=dict)
  min_examples: int = 0
  label: Optional[LabelSpec] = None
  side_tables: Dict[str, Any] = dataclasses.field(default_factory=dict)
  negatives: Dict[str, Any] = dataclasses.field(default_factory=dict)
  # {'bands': [(name, lower score edge), ...], 'confidence': method}
  risk: Dict[str, Any] = dataclasses.field(default_factory=dict)
  # Where records come from besides files: {'http': HttpSource}
  # (schemas.sources).
  source: Dict[str, Any] = dataclasses.field(default_factory=dict)

  # Roles ------------------------------------------------------------------
  @property
  def has_id(self) -> bool:
    """True when records carry their own id (duplicates are dropped)."""
    return 'id' in self.roles

  @property
  def id_field(self) -> str:
    return self.roles.get('id', RECORD_ID)

  @property
  def entity_field(self) -> Optional[str]:
    return self.roles.get('entity')

  @property
  def timestamp_field(self) -> Optional[str]:
    return self.roles.get('timestamp')

  @property
  def label_field(self) -> Optional[str]:
    return self.label.field if self.label else None

  @property
  def task(self) -> Optional[str]:
    return self.label.task if self.label else None

  @property
  def history(self) -> Optional[HistorySpec]:
    """The first (usually only) entity's history, None without history."""
    return self.histories[0] if self.histories else None

  @property
  def input_fields(self) -> Dict[str, Field]:
    """The fields read from a record (not derived)."""
    return {n: f for n, f in self.fields.items() if not f.derived}

  @property
  def aggregate_keys(self) -> List[str]:
    return list(self.aggregates.get('keys', ()))

  @property
  def aggregate_values(self) -> List[str]:
    return list(self.aggregates.get('values', ()))

  # Derived feature names --------------------------------------------------
  def history_feature_types(self) -> Dict[str, str]:
    """Name -> type ('int' or 'float') of every history feature, in order."""
    out = {}
    for spec in self.histories:
      out.update(spec.feature_types())
    return out

  def feature_types(self) -> Dict[str, str]:
    """Columns of the gold (feature) table: record fields, side-table
    columns, then history features."""
    out = {name: f.type for name, f in self.fields.items()}
    for table in self.side_tables.values():
      out.update((n, f.type) for n, f in table['fields'].items()
                 if n != table['key'])
    out.update(self.history_feature_types())
    return out

  def model_features(self) -> List[str]:
    """Raw inputs of the preprocessing_fn, in a stable order."""
    t = self.transform
    return (list(t.get('numeric', {})) + list(t.get('bucketize', {})) +
            list(t.get('categorical', {})))

  def optional_columns(self) -> List[str]:
    """Feature-table columns that may be null: optional record fields and
    side-table columns (an unknown key)."""
    out = [n for n, f in self.fields.items() if not f.required and
           not f.derived]
    for table in self.side_tables.values():
      out += [n for n in table['fields'] if n != table['key']]
    return out

  def with_transform(self, transform: Dict[str, Any]) -> 'Dataset':
    """This dataset with another `transform:` section (as written in a
    declaration), checked and normalised as `load_dataset` does."""
    normal = _load_transform(_Checker(os.path.basename(self.path)),
                             {'transform': transform}, self.feature_types(),
                             self.optional_columns())
    return dataclasses.replace(self, transform=normal)

  # Labels -----------------------------------------------------------------
  def label_index(self, column):
    """Label column (pyarrow, declared type) -> what the model learns:
    int64 class index (classification) or float64 (regression); null where
    the label is missing or not a declared class."""
    import pyarrow as pa
    import pyarrow.compute as pc
    if isinstance(column, pa.ChunkedArray):
      column = column.combine_chunks()
    if not self.label.is_classification:
      return column.cast(pa.float64())
    classes = self.label.classes
    keys = pa.array(list(classes), column.type)
    indices = pa.array(list(classes.values()), pa.int64())
    return indices.take(pc.index_in(column, value_set=keys))

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
    streaming rows add `pane` and `pane_index`): the key, the window, the
    count, total_<v> and mean_<v> of each declared value field, and
    <label>_rate (share of the positive class) for a binary label."""
    import pyarrow as pa
    key_type = self.batch_schema().field(key_field).type
    columns = [(key_field, key_type), ('window_start', pa.string()),
               ('window_end', pa.string()), ('count', pa.int64())]
    for value in self.aggregate_values:
      columns += [(f'total_{value}', pa.float64()),
                  (f'mean_{value}', pa.float64())]
    if self.task == 'binary':
      columns.append((f'{self.label_field}_rate', pa.float64()))
    return pa.schema(columns)

  def prediction_schema(self):
    """Rows of the predictions table."""
    return prediction_schema(self.id_field, self.fields[self.id_field].type,
                             self.task or 'binary', bool(self.risk))

  def avro_schema(self) -> Dict[str, Any]:
    """Avro record schema for raw records (timestamps as strings).

    Every field is nullable so that a file with a missing value still reads
    and the record reaches the dead-letter output instead of failing the
    reader.
    """
    avro_types = {'string': 'string', 'float': 'double', 'int': 'long',
                  'timestamp': 'string'}
    return {
        'type': 'record', 'name': _camel(self.name), 'namespace': 'mlpipe',
        'fields': [{'name': n, 'type': ['null', avro_types[f.type]],
                    'default': None} for n, f in self.input_fields.items()],
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
    optional = set(self.optional_columns())
    for name, ftype in self.feature_types().items():
      feature = schema.feature.add(name=name)
      feature.type = (schema_pb2.BYTES if ftype == 'string' else
                      schema_pb2.FLOAT if ftype == 'float' else schema_pb2.INT)
      feature.value_count.min = 1
      feature.value_count.max = 1
      field = self.fields.get(name)
      required = name not in optional
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


def prediction_schema(id_field: str, id_type: str = 'string',
                      task: str = 'binary', risk: bool = False):
  """Rows of a predictions table whose record id is `id_field` of type
  `id_type` (the model handler knows both from the model's metadata):
    binary      id, score = P(positive class), predicted_label (0/1), and
                with declared risk bands risk_category and confidence
    multiclass  id, score = P(predicted class), predicted_label (class
                index), predicted_class (the class's declared value)
    regression  id, prediction
  each followed by split (train or eval: the row was in the scoring
  model's training or eval split, by its id; scored: in neither), model_version
  and scored_at (the run's reference time, RFC 3339, null without one)."""
  import pyarrow as pa
  id_types = {'string': pa.string(), 'int': pa.int64()}
  columns = [(id_field, id_types[id_type])]
  if task == 'regression':
    columns.append(('prediction', pa.float64()))
  else:
    columns += [('score', pa.float64()), ('predicted_label', pa.int64())]
  if task == 'multiclass':
    columns.append(('predicted_class', pa.string()))
  if risk and task == 'binary':
    columns += [('risk_category', pa.string()), ('confidence', pa.float64())]
  columns += [('split', pa.string()), ('model_version', pa.string()),
              ('scored_at', pa.string())]
  return pa.schema(columns)


def output_columns() -> Dict[str, str]:
  """Name -> table of every column the pipeline adds to a record's id in
  its outputs (from `prediction_schema`, for every task, with risk bands):
  no field may take one of these names."""
  out = {}
  for task in TASKS:
    for name in prediction_schema('', 'string', task, True).names[1:]:
      out.setdefault(name, 'the predictions')
  return out


def _check_derived_names(c: '_Checker', dataset: 'Dataset'):
  """Names the declaration derives must not meet a field's: transformed
  model inputs and indicators, and the columns of each aggregate table."""
  fields = dataset.feature_types()
  t = dataset.transform
  derived = {f'{n}{TRANSFORMED_SUFFIX}': f'transformed {n}'
             for n in dataset.model_features()}
  derived.update(
      (f'{n}{MISSING_SUFFIX}{TRANSFORMED_SUFFIX}', f'the indicator of {n}')
      for section in ('numeric', 'bucketize')
      for n, opts in t.get(section, {}).items() if opts['indicator'])
  for name, what in derived.items():
    if name in fields:
      c.fail(f'fields.{name}', f'the name is the column of {what}',
             'rename the field')
  for key in dataset.aggregate_keys:
    names = dataset.aggregate_schema(key).names
    if names.count(key) > 1:
      c.fail('aggregates.keys', f'{key} is also a column of its aggregate '
             f'table ({", ".join(names[1:])})', 'rename the field')


def _camel(name: str) -> str:
  return ''.join(part.capitalize() for part in re.split(r'[_\W]+', name))


# Loading and checking ---------------------------------------------------------
class _Checker:
  """Raises one-line SchemaErrors: '<file>: <key>: <problem>; <fix>'."""

  def __init__(self, where: str):
    self.where = where

  def fail(self, key: str, problem: str, fix: str = ''):
    raise SchemaError(f'{self.where}: {key}: {problem}' +
                      (f'; {fix}' if fix else ''))

  def mapping(self, value, key: str, fix: str = 'write it as key: value '
              'lines') -> Dict[str, Any]:
    if value is None:
      return {}
    if not isinstance(value, dict):
      self.fail(key, f'must be a mapping, got {type(value).__name__}', fix)
    return value

  def known_keys(self, mapping: Dict[str, Any], allowed, key: str):
    for name in mapping:
      if name not in allowed:
        self.fail(f'{key}.{name}' if key else str(name), 'unknown key',
                  f'use one of {", ".join(allowed)}')

  def duration(self, value, key: str) -> int:
    try:
      seconds = parse_duration(value)
    except SchemaError:
      self.fail(key, f'bad duration {value!r}', 'use a number and a unit '
                's/m/h/d, e.g. 24h')
    if seconds <= 0:
      self.fail(key, 'must be positive')
    return seconds


def _check_field_options(c: _Checker, name: str, opts: Dict[str, Any]):
  """Option values of the right kind: a declaration is data, and a wrong
  value must fail here with one line, not mid-run."""
  key = f'fields.{name}'
  c.known_keys(opts, _FIELD_OPTIONS, key)
  for option in ('min', 'max'):
    value = opts.get(option)
    if value is not None and (isinstance(value, bool) or
                              not isinstance(value, (int, float))):
      c.fail(f'{key}.{option}', f'must be a number, got {value!r}')
  for option in ('allowed', 'domain'):
    if option in opts and not isinstance(opts[option], (list, tuple)):
      c.fail(f'{key}.{option}', 'must be a list', 'write [a, b, c]')
    for value in opts.get(option) or ():
      if not isinstance(value, (str, int, float)):
        c.fail(f'{key}.{option}', f'holds a {type(value).__name__}, not a '
               'value', 'write [a, b, c] of strings or numbers')
  if 'max_length' in opts and not (isinstance(opts['max_length'], int) and
                                   opts['max_length'] >= 0):
    c.fail(f'{key}.max_length', 'must be a non-negative integer')
  if 'pattern' in opts:
    # RE2 on every path (schemas.patterns): a pattern it cannot run is
    # refused here, not left to an engine that backtracks.
    problem = patterns.check(opts['pattern'])
    if problem:
      c.fail(f'{key}.pattern', f'bad regular expression: {problem}',
             'write it in RE2 syntax')
  for option in ('required', 'cents'):
    if option in opts and not isinstance(opts[option], bool):
      c.fail(f'{key}.{option}', 'must be true or false')
  if opts.get('type') != 'timestamp':
    for option in ('format', 'zone', 'from'):
      if option in opts:
        c.fail(f'{key}.{option}', 'only a timestamp field takes it',
               'set type: timestamp or remove it')
  if 'zone' in opts:
    import zoneinfo
    try:
      zoneinfo.ZoneInfo(str(opts['zone']))
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
      c.fail(f'{key}.zone', f'unknown time zone {opts["zone"]!r}',
             'use an IANA name such as UTC or Europe/Lisbon')
  if 'format' in opts:
    _check_time_format(c, f'{key}.format', opts['format'])
  if 'format' in opts and not _has_year(opts['format']):
    c.fail(f'{key}.format', f'{opts["format"]!r} has no year: every value '
           'would fall in 1900', 'add %Y, or compose the time: from: {date: '
           f'{name}, date_format: ..., year: 2011}}')


def time_directives(fmt: str) -> Tuple[str, ...]:
  """The directive letters of a strptime format: '%Y-%m-%%' -> Y, m, %."""
  return tuple(re.findall(r'%(.)', fmt))


# strptime directives that carry a year: a format without one dates every
# value in 1900.
YEAR_DIRECTIVES = frozenset('YyGcx')


def _has_year(fmt: str) -> bool:
  return bool(set(time_directives(fmt)) & YEAR_DIRECTIVES)


def _check_time_format(c: _Checker, key: str, fmt):
  """A strptime format Python's strptime compiles (the per-value
  definition), e.g. no directive given twice."""
  if not (isinstance(fmt, str) and '%' in fmt):
    c.fail(key, f'{fmt!r} is not a strptime format', "e.g. '%Y-%m-%d'")
  try:
    datetime.datetime.strptime('', fmt)
  except ValueError as e:
    if 'does not match format' not in str(e):
      c.fail(key, f'{fmt!r}: {e}', 'see the strptime directives')
  except re.error:
    c.fail(key, f'{fmt!r} gives a directive twice', 'give each part once')


def _check_constant_parts(c: _Checker, key: str, compose: Dict[str, Any]):
  """`from:` takes a date field or a fixed date `since`; a date format
  without a year needs the constant `year`. Normalises `since` to
  'YYYY-MM-DD'."""
  if ('date' in compose) == ('since' in compose):
    c.fail(key, 'needs a date field or a fixed date (since), not both',
           'e.g. from: {date: day, hour: hour} or from: {since: 2011-01-01, '
           'hour: hour_of_year}')
  if 'since' in compose:
    since = compose['since']
    if 'hour' not in compose:
      c.fail(key, 'a fixed date needs an hour field', 'add hour: <field>')
    for option in ('date_format', 'year'):
      if option in compose:
        c.fail(f'{key}.{option}', 'goes with a date field, not with since',
               'remove it')
    try:
      if isinstance(since, datetime.datetime):
        raise ValueError
      since = since if isinstance(since, datetime.date) else (
          datetime.date.fromisoformat(str(since)))
    except ValueError:
      c.fail(f'{key}.since', f'{compose["since"]!r} is not a date',
             'write it as 2011-01-01')
    compose['since'] = since.isoformat()
    return
  date_format = compose.get('date_format', '%Y-%m-%d')
  _check_time_format(c, f'{key}.date_format', date_format)
  year = compose.get('year')
  if year is None and not _has_year(date_format):
    c.fail(f'{key}.date_format', f'{date_format!r} has no year: every date '
           'would fall in 1900', 'add %Y, or declare the year: year: 2011')
  if year is not None:
    if _has_year(date_format):
      c.fail(f'{key}.year', f'{date_format!r} has a year of its own',
             'remove year or the year from date_format')
    if isinstance(year, bool) or not isinstance(year, int) or not (
        1678 <= year <= 2261):
      c.fail(f'{key}.year', f'{year!r} is not a year 1678-2261')


def _load_fields(c: _Checker, raw) -> Dict[str, Field]:
  declared = raw.get('fields')
  if not isinstance(declared, dict) or not declared:
    c.fail('fields', 'missing or empty', 'declare a mapping of field name '
           '-> {type: string|float|int|timestamp, ...}')
  fields = {}
  reserved = output_columns()
  for name, opts in declared.items():
    if name == RECORD_ID:
      c.fail(f'fields.{name}', 'the name is reserved for the record id of a '
             'dataset without an id role', 'rename the field')
    if name in reserved:
      c.fail(f'fields.{name}', f'the name is a column the pipeline adds to '
             f'{reserved[name]}', 'rename the field')
    if str(name).startswith('__'):
      c.fail(f'fields.{name}', 'names starting with __ are the reader\'s own '
             'columns', 'rename the field')
    if opts is not None and not isinstance(opts, dict):
      c.fail(f'fields.{name}', 'options must be a mapping',
             'e.g. {type: float, required: true}')
    opts = dict(opts or {})
    ftype = opts.get('type')
    if ftype not in FIELD_TYPES:
      c.fail(f'fields.{name}.type', f'{ftype!r} is not a type',
             f'use one of {", ".join(FIELD_TYPES)}')
    _check_field_options(c, name, opts)
    opts.pop('type')
    for key in ('allowed', 'domain'):
      if key in opts:
        opts[key] = tuple(opts[key])
    compose = opts.pop('from', None)
    if compose is not None:
      compose = dict(c.mapping(compose, f'fields.{name}.from'))
      c.known_keys(compose, ('date', 'hour', 'date_format', 'year', 'since'),
                   f'fields.{name}.from')
      _check_constant_parts(c, f'fields.{name}.from', compose)
    fields[name] = Field(name=name, type=ftype, compose=compose,
                         derived=compose is not None, **opts)
  for name, field in fields.items():
    if not field.compose:
      continue
    date, hour = field.compose.get('date'), field.compose.get('hour')
    if date is not None and (fields.get(date) is None or
                             fields[date].type != 'string'):
      c.fail(f'fields.{name}.from.date', f'{date!r} is not a declared '
             'string field', 'name the field holding the date text')
    if hour is not None and (fields.get(hour) is None or
                             fields[hour].type != 'int'):
      c.fail(f'fields.{name}.from.hour', f'{hour!r} is not a declared int '
             'field', 'name the field holding the hour 0-23')
  return fields


def _load_roles(c: _Checker, raw, fields) -> Dict[str, str]:
  roles = dict(c.mapping(raw.get('roles'), 'roles'))
  c.known_keys(roles, ('id', 'entity', 'timestamp', 'label'), 'roles')
  for role, name in list(roles.items()):
    if name is None:
      del roles[role]
    elif name not in fields:
      c.fail(f'roles.{role}', f'{name!r} is not a declared field',
             'declare it under fields: or fix the name')
  if 'id' in roles and fields[roles['id']].type not in ('string', 'int'):
    c.fail('roles.id', f'{roles["id"]} is a {fields[roles["id"]].type}',
           'an id is a string or int field')
  if 'timestamp' in roles and fields[roles['timestamp']].type != 'timestamp':
    c.fail('roles.timestamp', f'{roles["timestamp"]} has type '
           f'{fields[roles["timestamp"]].type}',
           'give that field type: timestamp (with format/zone if needed)')
  if 'entity' in roles and 'timestamp' not in roles:
    c.fail('roles.entity', 'an entity needs a timestamp role',
           'declare roles.timestamp or remove roles.entity')
  return roles


def _load_label(c: _Checker, raw, fields, roles) -> Optional[LabelSpec]:
  spec = dict(c.mapping(raw.get('label'), 'label'))
  name = roles.pop('label', None)
  if spec and name is None:
    c.fail('label', 'declared without roles.label',
           'add roles: {label: <field>}')
  if name is None:
    return None
  c.known_keys(spec, ('task', 'classes'), 'label')
  field = fields[name]
  task = spec.get('task')
  if task is None:
    if field.type == 'int' and 'classes' not in spec and not field.allowed:
      # Read as 0/1 it dead-lettered every other value as not allowed.
      c.fail('label.task', f'{name} is an int label with neither a task nor '
             'classes', 'declare label.task: regression, or classes (e.g. '
             'classes: [0, 1])')
    known = (set(_classes(c, spec['classes']).values())
             if spec.get('classes') is not None else set(field.allowed or ()))
    task = ('regression' if field.type == 'float' else
            'multiclass' if len(known) > 2 else 'binary')
  if task not in TASKS:
    c.fail('label.task', f'{task!r} is not a task',
           f'use one of {", ".join(TASKS)}')
  if task == 'regression':
    if field.type not in ('float', 'int'):
      c.fail('label.task', f'regression needs a numeric label; {name} is a '
             f'{field.type}', 'use task: binary or multiclass with classes')
    if 'classes' in spec:
      c.fail('label.classes', 'a regression label has no classes',
             'remove classes')
    return LabelSpec(name, task, None)
  if field.type in ('float', 'timestamp'):
    c.fail('roles.label', f'{name} is a {field.type}: a class label is a '
           'string or int field', 'declare task: regression for numbers')
  if 'classes' in spec:
    classes = _classes(c, spec['classes'])
  elif field.allowed:
    classes = {v: i for i, v in enumerate(field.allowed)}
  elif field.type == 'int' and task == 'binary':
    classes = {0: 0, 1: 1}
  else:
    c.fail('label.classes', f'{name} needs its classes',
           'e.g. classes: {No: 0, Yes: 1} (raw value -> class index)')
  for value in classes:
    if isinstance(value, bool):
      c.fail(f'label.classes.{value}', 'is how YAML reads an unquoted '
             'Yes/No/on/off', "quote the class: 'Yes': 1")
    ok = isinstance(value, str) if field.type == 'string' else (
        isinstance(value, int) and not isinstance(value, bool))
    if not ok:
      c.fail(f'label.classes.{value}', f'is not a {field.type} value of '
             f'{name}', 'quote strings; ints unquoted')
  indices = sorted(set(classes.values()))
  if indices != list(range(len(indices))):
    c.fail('label.classes', f'class indices {indices} are not 0..n-1',
           'number the classes 0, 1, 2, ...')
  if task == 'binary' and indices != [0, 1]:
    c.fail('label.classes', f'a binary label maps to 0 and 1, not {indices}',
           'use task: multiclass for more classes')
  if task == 'multiclass' and len(indices) < 3:
    c.fail('label.classes', 'multiclass needs at least 3 classes',
           'use task: binary')
  return LabelSpec(name, task, classes)


def _classes(c: _Checker, value) -> Dict[Any, int]:
  if isinstance(value, list):
    return {v: i for i, v in enumerate(value)}
  if isinstance(value, dict) and value and all(
      isinstance(i, int) and not isinstance(i, bool)
      for i in value.values()):
    return dict(value)
  c.fail('label.classes', f'{value!r} is not a mapping of raw value -> '
         'class index', 'e.g. classes: {No: 0, Yes: 1} or [No, Yes]')


def _load_history(c: _Checker, raw, fields, roles) -> Tuple[HistorySpec, ...]:
  declared = raw.get('history')
  if declared is None or declared == {} or declared == []:
    return ()
  specs = declared if isinstance(declared, list) else [declared]
  out, names = [], {}
  for i, h in enumerate(specs):
    key = 'history' if not isinstance(declared, list) else f'history[{i}]'
    h = c.mapping(h, key)
    c.known_keys(h, _HISTORY_KEYS, key)
    if 'timestamp' not in roles:
      c.fail(key, 'history needs roles.timestamp (and an entity)',
             'declare the roles or remove the history section')
    entity = h.get('entity', roles.get('entity'))
    if entity is None:
      c.fail(f'{key}.entity', 'no entity', 'set entity: <field> or '
             'roles.entity')
    if entity not in fields:
      c.fail(f'{key}.entity', f'{entity!r} is not a declared field')
    if not fields[entity].required:
      c.fail(f'{key}.entity', f'{entity} is optional',
             'history needs the entity on every record: make it required')
    windows_raw = c.mapping(h.get('windows'), f'{key}.windows')
    if not windows_raw:
      c.fail(f'{key}.windows', 'no windows', 'e.g. windows: {1h: 3600, '
             '24h: 86400}')
    windows = {str(k): c.duration(v, f'{key}.windows.{k}')
               for k, v in windows_raw.items()}
    value = h.get('value')
    aggregates = tuple(h.get('aggregates', ('count',)))
    for agg in aggregates:
      if agg not in HISTORY_AGGREGATES:
        c.fail(f'{key}.aggregates', f'unknown aggregate {agg!r}',
               f'use {", ".join(HISTORY_AGGREGATES)}')
    needs_value = (set(aggregates) - {'count'}) or h.get('ratio_to_mean')
    if needs_value and value is None:
      c.fail(f'{key}.value', 'sum, mean, max and ratio_to_mean need a value '
             'field', 'set value: <numeric field>')
    if value is not None:
      if value not in fields or fields[value].type not in ('float', 'int'):
        c.fail(f'{key}.value', f'{value!r} is not a numeric field')
      if not fields[value].required:
        c.fail(f'{key}.value', f'{value} is optional',
               'the history value must be required')
    rates = {}
    for field, values in c.mapping(h.get('rates'), f'{key}.rates').items():
      if field not in fields:
        c.fail(f'{key}.rates.{field}', 'not a declared field')
      values = values if isinstance(values, list) else [values]
      rates[field] = {str(v): (v,) for v in values}
    spec = HistorySpec(
        entity=entity, value=value, windows=windows, aggregates=aggregates,
        distinct={k: tuple(v) for k, v in
                  c.mapping(h.get('distinct'), f'{key}.distinct').items()},
        novelty=dict(c.mapping(h.get('novelty'), f'{key}.novelty')),
        ratio_to_mean=h.get('ratio_to_mean'),
        seconds_since_previous=bool(h.get('seconds_since_previous', False)),
        calendar=tuple(h.get('calendar', ())), rates=rates)
    for field in list(spec.distinct) + list(spec.novelty):
      if field not in fields:
        c.fail(f'{key}: distinct/novelty', f'{field!r} is not a declared '
               'field')
    used = [(f'{key}.distinct.{f}', w) for f, ws in spec.distinct.items()
            for w in ws]
    used += [(f'{key}.novelty.{f}', w) for f, w in spec.novelty.items()]
    if spec.ratio_to_mean:
      used.append((f'{key}.ratio_to_mean', spec.ratio_to_mean))
    for where, window in used:
      if window not in windows:
        c.fail(where, f'undeclared window {window!r}',
               f'use one of {", ".join(windows)}')
    for part in spec.calendar:
      if part != 'hour':
        c.fail(f'{key}.calendar', f'unknown part {part!r}', 'use [hour]')
    for name in spec.feature_types():
      if name in names or name in fields:
        c.fail(key, f'feature {name} is declared twice',
               'declare calendar once, one history per entity')
      names[name] = True
    out.append(spec)
  return tuple(out)


def _load_aggregates(c: _Checker, raw, fields, roles, histories):
  a = dict(c.mapping(raw.get('aggregates'), 'aggregates'))
  if not a:
    return {}
  c.known_keys(a, ('keys', 'values', 'window_size', 'window_period'),
               'aggregates')
  if 'timestamp' not in roles:
    c.fail('aggregates', 'windowed aggregates need roles.timestamp',
           'declare it or remove the aggregates section')
  keys = a.get('keys')
  if not isinstance(keys, list) or not keys:
    c.fail('aggregates.keys', 'must be a non-empty list of fields')
  for key in keys:
    if key not in fields or fields[key].type not in ('string', 'int'):
      c.fail('aggregates.keys', f'{key!r} is not a string or int field')
  values = a.get('values')
  if values is None:
    values = [histories[0].value] if histories and histories[0].value else []
  for value in values:
    if value not in fields or fields[value].type not in ('float', 'int'):
      c.fail('aggregates.values', f'{value!r} is not a numeric field')
    if not fields[value].required:
      c.fail('aggregates.values', f'{value} is optional',
             'aggregate required fields only')
  a['keys'], a['values'] = list(keys), list(values)
  for option in ('window_size', 'window_period'):
    if option in a:
      c.duration(a[option], f'aggregates.{option}')
  return a


def _load_transform(c: _Checker, raw, known: Dict[str, str],
                    optional: List[str]) -> Dict[str, Any]:
  """Normalises `transform:` to {numeric: {name: {scale, impute,
  indicator}}, bucketize: {name: {buckets, impute, indicator}},
  categorical: {name: {oov_buckets}}}."""
  t = dict(c.mapping(raw.get('transform'), 'transform'))
  c.known_keys(t, ('numeric', 'bucketize', 'categorical'), 'transform')
  out = {}
  for section in ('numeric', 'bucketize', 'categorical'):
    entries = c.mapping(t.get(section), f'transform.{section}')
    normal = {}
    for name, opts in entries.items():
      key = f'transform.{section}.{name}'
      if name not in known:
        c.fail(key, f'{name!r} is not a field or history feature',
               'fix the name or declare the feature')
      if section == 'numeric':
        opts = {'scale': opts} if isinstance(opts, str) else c.mapping(
            opts, key)
        c.known_keys(opts, ('scale', 'impute', 'indicator'), key)
        if opts.get('scale', 'z_score') not in SCALES:
          c.fail(f'{key}.scale', f'unknown scale {opts["scale"]!r}',
                 f'use one of {", ".join(SCALES)}')
        opts = {'scale': opts.get('scale', 'z_score'), **opts}
      elif section == 'bucketize':
        opts = {'buckets': opts} if isinstance(opts, int) else c.mapping(
            opts, key)
        c.known_keys(opts, ('buckets', 'impute', 'indicator'), key)
        if not isinstance(opts.get('buckets'), int) or opts['buckets'] < 1:
          c.fail(f'{key}.buckets', 'must be a positive integer')
      else:
        opts = dict(c.mapping(opts, key))
        c.known_keys(opts, ('oov_buckets',), key)
        opts.setdefault('oov_buckets', 0)
      if section != 'categorical':
        if known[name] == 'string':
          c.fail(key, f'{name} is a string', 'list it under categorical')
        impute = opts.get('impute')
        if impute is not None and impute not in IMPUTE and (
            isinstance(impute, bool) or not isinstance(impute, (int, float))):
          c.fail(f'{key}.impute', f'{impute!r}', 'use mean, zero or a number')
        if name in optional and impute is None:
          c.fail(key, f'{name} is optional and may be missing',
                 'declare impute: mean|zero|<number> (and indicator: true '
                 'to keep where it was missing)')
        opts['indicator'] = bool(opts.get('indicator', False))
      elif known[name] not in ('string', 'int'):
        c.fail(key, f'{name} is a {known[name]}',
               'categorical features are string or int fields')
      normal[name] = opts
    out[section] = normal
  return out


def load_dataset(path: str = DEFAULT_SCHEMA) -> Dataset:
  """Reads and checks a declaration; a name like 'transactions' also works."""
  if not path.endswith(('.yaml', '.yml')) and os.sep not in path:
    path = os.path.join(SCHEMA_DIR, f'{path}.yaml')
  try:
    with open(path, encoding='utf-8') as f:
      text = f.read()
  except OSError as e:
    raise SchemaError(f'cannot read schema {path}: {e.strerror}') from None
  except UnicodeDecodeError:
    raise SchemaError(f'schema {path} is not UTF-8 text') from None
  try:
    raw = load_yaml(text, os.path.basename(path))
  except YamlError as e:
    raise SchemaError(str(e)) from None
  if not isinstance(raw, dict):
    raise SchemaError(f'schema {path} must be a mapping')
  c = _Checker(os.path.basename(path))
  c.known_keys(raw, _SECTIONS, '')

  fields = _load_fields(c, raw)
  roles = _load_roles(c, raw, fields)
  label = _load_label(c, raw, fields, roles)
  if label is not None:
    roles['label'] = label.field
    if label.is_classification and fields[label.field].allowed is None:
      # A label outside its classes is a bad record, not a crash later.
      fields[label.field] = dataclasses.replace(
          fields[label.field], allowed=tuple(label.classes))
  if 'id' not in roles:
    # Identified by where it was read: "<file name>:<position>".
    fields = {RECORD_ID: Field(RECORD_ID, 'string', required=True,
                               derived=True), **fields}
  if label is not None and label.field == roles.get('id'):
    c.fail('roles.label', 'the label cannot be the id')

  rules = []
  for i, r in enumerate(raw.get('rules') or []):
    r = c.mapping(r, f'rules[{i}]')
    if 'name' not in r or 'require' not in r:
      c.fail(f'rules[{i}]', 'a rule needs name and require')
    rule = Rule(name=r['name'], when=c.mapping(r.get('when'), f'rules[{i}]'),
                require=c.mapping(r['require'], f'rules[{i}].require'))
    for field in list(rule.when) + list(rule.require):
      if field not in fields:
        c.fail(f'rules.{rule.name}', f'names unknown field {field!r}')
    rules.append(rule)

  histories = _load_history(c, raw, fields, roles)
  aggregates = _load_aggregates(c, raw, fields, roles, histories)
  side_tables = _load_side_tables(c, raw, fields)
  known = {n: f.type for n, f in fields.items()}
  optional = [n for n, f in fields.items() if not f.required and
              not f.derived]
  for table in side_tables.values():
    known.update((n, f.type) for n, f in table['fields'].items())
    optional += [n for n in table['fields'] if n != table['key']]
  for spec in histories:
    known.update(spec.feature_types())
  transform = _load_transform(c, raw, known, optional)
  if label is not None and label.field in transform_names(transform):
    c.fail(f'transform.{label.field}', 'the label is not a model input',
           'remove it from transform')
  drift = dict(c.mapping(raw.get('drift'), 'drift'))
  for name in drift:
    if name not in known:
      c.fail(f'drift.{name}', 'not a field or history feature')
  freshness = {k: c.duration(v, f'freshness.{k}') for k, v in
               c.mapping(raw.get('freshness'), 'freshness').items()}
  if freshness and 'timestamp' not in roles:
    c.fail('freshness', 'needs roles.timestamp')
  negatives = dict(c.mapping(raw.get('negatives'), 'negatives'))
  _check_negatives(c, negatives, fields, roles, label, side_tables,
                   histories, transform)
  risk = _load_risk(c, raw, label)
  min_examples = raw.get('min_examples', 0)
  if not isinstance(min_examples, int) or min_examples < 0:
    c.fail('min_examples', 'must be a non-negative integer')

  dataset = Dataset(
      name=str(raw.get('name', os.path.splitext(c.where)[0])), fields=fields,
      roles=roles, rules=tuple(rules), histories=histories,
      aggregates=aggregates, transform=transform, drift=drift,
      path=os.path.abspath(path), min_examples=min_examples,
      freshness=freshness, label=label, side_tables=side_tables,
      negatives=negatives, risk=risk,
      source=load_source(raw.get('source'), c.fail))
  _check_derived_names(c, dataset)
  return dataset


def transform_names(transform: Dict[str, Any]) -> List[str]:
  return [n for section in transform.values() for n in section]


def _load_side_tables(c: _Checker, raw, fields) -> Dict[str, Any]:
  """side_tables: {name: {key, path, fields}}: small tables joined to every
  record by `key` (e.g. items by item_id)."""
  out = {}
  for name, t in c.mapping(raw.get('side_tables'), 'side_tables').items():
    key = f'side_tables.{name}'
    t = c.mapping(t, key)
    c.known_keys(t, ('key', 'path', 'fields'), key)
    join = t.get('key')
    if join not in fields:
      c.fail(f'{key}.key', f'{join!r} is not a declared field of the records')
    sub = _load_fields(_Checker(f'{c.where}: {key}'), {'fields':
                                                       t.get('fields')})
    if join not in sub or sub[join].type != fields[join].type:
      c.fail(f'{key}.fields', f'must declare the key {join} with the type '
             f'{fields[join].type}')
    for column in sub:
      if column != join and column in fields:
        c.fail(f'{key}.fields.{column}', 'clashes with a record field',
               'rename it')
    out[name] = {'key': join, 'path': t.get('path'), 'fields': sub}
  return out


def _check_negatives(c: _Checker, negatives, fields, roles, label,
                     side_tables, histories, transform):
  """negatives: {item: field, k: int, strategy: uniform|popularity, seed,
  catalogue: side table}: k sampled negatives per positive for training
  (transforms.examples)."""
  if not negatives:
    return
  if 'entity' not in roles or 'timestamp' not in roles:
    c.fail('negatives', 'needs roles.entity (the user) and roles.timestamp')
  id_field = fields.get(roles.get('id'))
  if id_field is not None and id_field.type == 'int' and (
      id_field.min is None or id_field.min < 0):
    c.fail(f'fields.{id_field.name}', 'negatives number their ids below 0',
           'declare min: 0 on the int id')
  c.known_keys(negatives, ('item', 'k', 'strategy', 'seed', 'catalogue'),
               'negatives')
  if label is None or label.task != 'binary':
    c.fail('negatives', 'negative sampling needs a binary label')
  if negatives.get('item') not in fields:
    c.fail('negatives.item', 'must name the item field')
  k = negatives.get('k')
  if not isinstance(k, int) or isinstance(k, bool) or k < 1:
    c.fail('negatives.k', 'must be a positive integer')
  if negatives.setdefault('strategy', 'uniform') not in ('uniform',
                                                         'popularity'):
    c.fail('negatives.strategy', 'use uniform or popularity')
  if not isinstance(negatives.setdefault('seed', 0), int):
    c.fail('negatives.seed', 'must be an integer')
  catalogue = negatives.get('catalogue')
  if catalogue is not None and (catalogue not in side_tables or
                                side_tables[catalogue]['key'] !=
                                negatives['item']):
    c.fail('negatives.catalogue', f'{catalogue!r} is not a side table '
           f'keyed by {negatives["item"]}')
  # A negative never happened: only what can be known of a (user, item,
  # time) may feed the model.
  known = set()
  for spec in histories:
    if spec.entity == negatives['item'] and (spec.novelty or
                                             spec.ratio_to_mean):
      c.fail(f'history ({spec.entity})', 'novelty and ratio_to_mean need '
             "the record's own value, which a sampled negative lacks",
             'remove them from the item history')
    if spec.entity in (roles['entity'], negatives['item']):
      known.update(spec.feature_types())
  for table in side_tables.values():
    if table['key'] == negatives['item']:
      known.update(table['fields'])
  for name in transform_names(transform):
    if name not in known:
      c.fail(f'transform: {name}', 'is a field of the interaction itself, '
             'unknown for a sampled negative', 'use user or item history '
             'features and item side-table columns')


CONFIDENCE = ('band_margin', 'probability')


def _load_risk(c: _Checker, raw, label) -> Dict[str, Any]:
  """risk: {bands: {name: lower score edge, ...}, confidence: method}.

  Bands cut [0, 1] by their lower edges (ascending, the first 0): a score
  is in the last band whose edge it reaches, so every score is in exactly
  one band. Confidence: band_margin (how far the score is from another
  category: 0 on a border with another band, 1 as far as the band allows;
  0 and 1 border nothing) or probability
  (max(score, 1 - score): the model's certainty in its predicted label).
  """
  risk = dict(c.mapping(raw.get('risk'), 'risk'))
  if not risk:
    return {}
  c.known_keys(risk, ('bands', 'confidence'), 'risk')
  if label is None or label.task != 'binary':
    c.fail('risk', 'risk bands cut a binary score', 'declare a binary label')
  bands = c.mapping(risk.get('bands'), 'risk.bands')
  if len(bands) < 2:
    c.fail('risk.bands', 'needs at least two bands',
           'e.g. {low: 0.0, medium: 0.3, high: 0.7}')
  for name, edge in bands.items():
    if isinstance(edge, bool) or not isinstance(edge, (int, float)) or not (
        0 <= edge < 1):
      c.fail(f'risk.bands.{name}', f'{edge!r} is not a score edge in [0, 1)')
  # Ordered by edge, not by how the mapping happens to be written.
  bands = dict(sorted(bands.items(), key=lambda item: item[1]))
  edges = list(bands.values())
  if edges[0] != 0:
    c.fail('risk.bands', 'the lowest band must start at 0',
           'every score then falls in exactly one band')
  if len(set(edges)) != len(edges):
    c.fail('risk.bands', 'two bands start at the same score',
           'give each band its own lower edge')
  confidence = risk.get('confidence', 'band_margin')
  if confidence not in CONFIDENCE:
    c.fail('risk.confidence', f'{confidence!r}',
           f'use one of {", ".join(CONFIDENCE)}')
  return {'bands': [[str(n), float(e)] for n, e in bands.items()],
          'confidence': confidence}
