"""A declaration drafted from a sample of the data (the command is
`pipelines.declare`).

    draft = draft_declaration('credit.csv', label='default')
    draft.text        # YAML in the format of schemas/*.yaml, with comments

What is inferred, from a sample read by the project's own format readers
(pipelines.declaring.sample):
  * each column's type from its values: JSON numbers and strings, and for
    text (CSV, JSON strings) numbers, integers and timestamps (RFC 3339
    with a zone; without one, in UTC; or one of a few common layouts,
    declared as `format`); a column of mixed values is declared by its
    large majority (the rest become type_error dead letters, said in a
    comment) or, without one, a string, with a comment saying what could
    not be decided;
  * with TFDV (`generate_statistics_from_dataframe`, `infer_schema` on the
    typed sample): whether a field is required (TFDV's presence), ranges,
    the distinct values of low-cardinality strings (TFDV's string
    domains): `allowed` when the whole input was read, else the soft
    `domain` (a value the sample missed must not be a dead letter);
  * roles, when not given: the id (unique, named like an id), the event
    time (the timestamp column), the entity (a repeated id-like column,
    with a time), the label (named like one); each guess is a comment;
  * the label's task from its values: two -> binary with classes (the
    rarer, or a yes-like value, is class 1), a few -> multiclass, numbers
    -> regression;
  * a `transform:` section: numbers z-scored, or log-z-scored when skewed;
    strings of modest cardinality through vocabularies; optional inputs
    imputed with the mean and an indicator; with an entity and a time, a
    `history:` section of counts, recency and the hour.
The draft is checked by the declaration loader before it is returned: a
draft the loader refuses is a bug here (RunError), never the user's.
"""

import dataclasses
import json
import math
import os
import re
import tempfile
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.base.errors import RunError, UsageError
from pipelines.declaring.sample import SAMPLE_ROWS, Sample, read_sample
from schemas.dataset import (RECORD_ID, HistorySpec, SchemaError,
                             load_dataset, output_columns)

# A minority of values below this share that break a column's type or
# presence is read as bad records, not as the column's nature.
OUTLIER_SHARE = 0.01
MISSING_SHARE = 0.001
# Strings with at most this many distinct values get allowed/domain values.
MAX_ALLOWED = 20
# Strings with at most this many distinct values (and repeated values)
# become a vocabulary; more look like free text or ids.
MAX_VOCABULARY = 1000
# A label with at most this many distinct integer values is a class label.
MAX_CLASSES = 10
# |skewness| above this: log_z_score.
SKEW = 1.0
HISTORY_WINDOWS = {'1h': 3600, '24h': 86400, '7d': 604800}

_INT = r'^\s*[+-]?[0-9]+\s*$'
_FLOAT = r'^\s*[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?\s*$'
_RFC3339 = (r'^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?'
            r'([Zz]|[+-]\d{2}:\d{2})$')
_NAIVE_ISO = r'^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?$'
# Layouts tried on text that looks like a date (day-first before
# month-first: where both read every value, a comment says so).
_LAYOUTS = ('%Y-%m-%d', '%Y/%m/%d %H:%M:%S', '%Y/%m/%d %H:%M', '%Y/%m/%d',
            '%d/%m/%Y %H:%M:%S', '%d/%m/%Y %H:%M', '%d/%m/%Y',
            '%m/%d/%Y %H:%M:%S', '%m/%d/%Y %H:%M', '%m/%d/%Y',
            '%d.%m.%Y %H:%M:%S', '%d.%m.%Y %H:%M', '%d.%m.%Y',
            '%d-%m-%Y %H:%M:%S', '%d-%m-%Y %H:%M', '%d-%m-%Y')
_DATE_LIKE = r'^\s*\d{1,4}[-/.]\d{1,2}[-/.]\d{1,4}'
_ID_NAME = re.compile(r'(^|_)([iI][dD]|key|KEY|uuid|UUID|guid|GUID)$|'
                      r'[a-z0-9](Id|ID)$')
_ENTITY_NAME = re.compile(r'user|customer|account|client|member|card|'
                          r'device|session|patient|entity', re.IGNORECASE)
_LABEL_NAME = re.compile(r'^(label|target|class|y|outcome|churn|churned|'
                         r'default|fraud|is_fraud|response)$|^is_|^has_',
                         re.IGNORECASE)
_TIME_NAME = re.compile(r'time|date|_at$|^ts$|timestamp', re.IGNORECASE)
_POSITIVE = {'yes', 'y', 'true', 't', '1', 'positive', 'pos', 'fraud',
             'default', 'churn', 'churned', 'bad', 'spam', 'purchase'}


@dataclasses.dataclass
class Column:
  """What the sample says about one column."""
  name: str
  type: str = 'string'                 # declared type
  present: int = 0                     # values that are not missing
  missing: int = 0
  required: bool = False
  distinct: int = 0
  options: Dict[str, Any] = dataclasses.field(default_factory=dict)
  numbers: Optional[np.ndarray] = None  # numeric values (numeric types)
  texts: Optional[List[str]] = None     # distinct strings (string type)
  notes: List[str] = dataclasses.field(default_factory=list)
  undecided: Optional[str] = None       # what could not be decided

  @property
  def repeated(self) -> bool:
    return self.distinct < self.present

  @property
  def unique(self) -> bool:
    """Distinct but for a few duplicates (later copies: dead letters)."""
    return self.present > 0 and (
        self.present - self.distinct <= self.present * MISSING_SHARE)


@dataclasses.dataclass
class Draft:
  text: str                            # the YAML declaration
  roles: Dict[str, str]
  task: Optional[str]
  guessed: List[str]                   # roles guessed, not given
  undecided: List[str]                 # columns whose type is a guess


# Types ----------------------------------------------------------------------
def _matches(texts: pa.Array, pattern: str) -> np.ndarray:
  return pc.match_substring_regex(texts, pattern).to_numpy(
      zero_copy_only=False)


def _layout_of(texts: pa.Array) -> Tuple[Optional[Dict[str, str]], int, str]:
  """({zone} or {format} of the one timestamp layout of all texts but a
  few, the texts it does not read, ''); (None, 0, why not) otherwise, why
  being '' when the texts are not timestamps at all."""
  n = len(texts)
  date_like = int(_matches(texts, _DATE_LIKE).sum()) if n else 0
  if not n or date_like < n * (1 - OUTLIER_SHARE):
    return None, 0, ''
  counts = {'': int(_matches(texts, _RFC3339).sum()),
            'UTC': int(_matches(texts, _NAIVE_ISO).sum())}
  for layout in _LAYOUTS:
    parsed = pc.strptime(texts, format=layout, unit='us', error_is_null=True)
    # Arrow reads '%Y-%m-%d' from '2026-09-01 10:00' too: the text must be
    # the layout's own rendering of what was read.
    same = pc.equal(pc.strftime(parsed, format=layout), texts)
    counts[layout] = int(pc.sum(pc.fill_null(same, False)).as_py() or 0)
  best = max(counts, key=lambda k: counts[k])   # the first of the most
  if counts[best] >= n * (1 - OUTLIER_SHARE):
    options = ({} if best == '' else {'zone': 'UTC'} if best == 'UTC' else
               {'format': best})
    return options, n - counts[best], ''
  named = {'': 'RFC 3339 with a zone', 'UTC': 'ISO without a zone'}
  seen = sorted(((v, named.get(k, repr(k))) for k, v in counts.items() if v),
                reverse=True)
  layouts = ', '.join(f'{k} ({v} values)' for v, k in seen[:3])
  return None, 0, (f'timestamps in more than one layout: {layouts}; declared '
                   'string: choose one format (the others become '
                   'type_error) or write one layout at the source')


def _example(values: List[Any]) -> str:
  return ', '.join(repr(v) for v in values[:3])


def _infer_type(column: Column, values: List[Any]):
  """Sets column.type (and timestamp options, notes, undecided) from the
  present values."""
  present = [v for v in values if not (
      v is None or (isinstance(v, str) and not v.strip()))]
  column.present, column.missing = len(present), len(values) - len(present)
  if not present:
    column.undecided = ('every sampled value is empty: type unknown, '
                        'declared an optional string and left out of the '
                        'model; drop it or declare its type')
    return
  if any(isinstance(v, bool) for v in present):
    column.undecided = ('holds true/false values, which no declared type '
                        'reads: declared string (they become type_error); '
                        'write them as 0/1 or text at the source')
    return
  strings = [v for v in present if isinstance(v, str)]
  numbers = [v for v in present if isinstance(v, (int, float))]
  others = [v for v in present if not isinstance(v, (str, int, float))]
  if others:
    if all(hasattr(v, 'isoformat') for v in others) and len(others) == len(
        present):
      column.type = 'timestamp'
      return
    column.undecided = (f'holds values of type {type(others[0]).__name__} '
                        '(lists, objects?): declared string')
    return
  texts = pa.array(strings, pa.string())
  is_int = _matches(texts, _INT) if strings else np.zeros(0, bool)
  is_float = _matches(texts, _FLOAT) if strings else np.zeros(0, bool)
  numeric = len(numbers) + int(is_float.sum())
  n = len(present)
  if numeric >= n * (1 - OUTLIER_SHARE) and numeric:
    # Numbers (JSON numbers or numeric text), perhaps with a few bad values.
    ints = (all(type(v) is int for v in numbers) and  # noqa: E721
            bool(is_int[is_float].all()))
    leading_zero = strings and bool(_matches(
        texts.filter(pa.array(is_int)), r'^\s*[+-]?0[0-9]').any())
    if ints and leading_zero and not numbers:
      column.notes.append('digits with leading zeros: kept as a string')
      column.type = 'string'
    else:
      column.type = 'int' if ints else 'float'
      bad = [s for s, ok in zip(strings, is_float) if not ok]
      if bad:
        column.notes.append(
            f'{len(bad)} of {n} sampled values are not numbers '
            f'({_example(bad)}): they become type_error dead letters')
      parsed = [float(s) for s, ok in zip(strings, is_float) if ok]
      column.numbers = np.asarray([float(v) for v in numbers] + parsed)
      if ints and np.abs(column.numbers).max(initial=0) >= 2**53:
        column.type = 'string'
        column.notes.append('integers beyond 2^53: kept as a string')
        column.numbers = None
    return
  if numbers:
    kinds = f'{len(numbers)} numbers and {len(strings)} strings'
    if len(strings) >= n * (1 - OUTLIER_SHARE):
      column.notes.append(f'{len(numbers)} of {n} sampled values are '
                          f'numbers ({_example(numbers)}), not strings: they '
                          'become type_error dead letters')
    else:
      column.undecided = (f'mixed types: {kinds} (e.g. {_example(numbers)}'
                          f', {_example(strings)}); declared string, so the '
                          'numbers become type_error dead letters: decide '
                          'the type (float if the strings are bad values)')
      return
  elif 0 < int(is_float.sum()):
    texts_only = [s for s, ok in zip(strings, is_float) if not ok]
    column.undecided = (
        f'mixed values: {int(is_float.sum())} numbers and {len(texts_only)} '
        f'texts (e.g. {_example(texts_only)}); declared string (every value '
        'is valid): declare float if the texts are bad values')
  layout, unread, why = _layout_of(pa.array(strings, pa.string()))
  if layout is not None:
    column.type = 'timestamp'
    column.options.update(layout)
    if unread:
      column.notes.append(f'{unread} of {n} sampled values are not in this '
                          'layout: they become type_error dead letters')
    if 'zone' in layout:
      column.notes.append('times without an offset: read in UTC; set the '
                          'zone they were written in')
    if 'format' in layout and layout['format'].startswith('%d/%m'):
      month_first = '%m/%d' + layout['format'][5:]
      parsed = pc.strptime(texts, format=month_first, unit='us',
                           error_is_null=True)
      if parsed.null_count == 0:
        column.notes.append(f'day-first and month-first ({month_first!r}) '
                            'both read every value: check which it is')
  elif why:
    column.undecided = why


# TFDV ------------------------------------------------------------------------
def _tfdv_facts(columns: Dict[str, Column], rows: int
                ) -> Dict[str, Dict[str, Any]]:
  """{column: {required, min, max, mean, std, domain}} from
  TFDV's statistics and inferred schema of the typed sample."""
  import pandas as pd
  import tensorflow_data_validation as tfdv
  frame = {}
  for name, c in columns.items():
    if c.numbers is not None:
      values = np.full(rows, np.nan)
      values[:len(c.numbers)] = c.numbers
      frame[name] = values
    elif c.texts is not None:
      frame[name] = np.array(c.texts + [None] * (rows - len(c.texts)),
                             dtype=object)
  if not frame:
    return {}
  stats = tfdv.generate_statistics_from_dataframe(pd.DataFrame(frame))
  schema = tfdv.infer_schema(stats, max_string_domain_size=MAX_ALLOWED)
  domains = {d.name: list(d.value) for d in schema.string_domain}
  facts = {}
  for feature in schema.feature:
    facts[feature.name] = {
        'required': feature.presence.min_fraction == 1.0,
        'domain': domains.get(feature.domain)
                  if feature.HasField('domain') else None}
  for feature in stats.datasets[0].features:
    name = feature.path.step[0]
    if feature.HasField('num_stats'):
      s = feature.num_stats
      facts[name].update(min=s.min, max=s.max, mean=s.mean, std=s.std_dev)
  return facts


def _profile(sample: Sample) -> Dict[str, Column]:
  """Every sampled column typed, with its presence and values."""
  columns = {}
  for name, values in sample.columns.items():
    c = Column(name)
    _infer_type(c, values)
    present = [v for v in values if v is not None and not (
        isinstance(v, str) and not v.strip())]
    if c.type == 'string':
      c.texts = [v if isinstance(v, str) else json.dumps(v) for v in present]
    columns[name] = c
  # TFDV sees the typed values: numbers and strings padded with missing
  # values to the sample's rows.
  facts = _tfdv_facts(columns, sample.rows)
  for name, c in columns.items():
    f = facts.get(name, {})
    c.required = bool(f.get('required')) or (
        c.present and c.missing <= sample.rows * MISSING_SHARE)
    if c.required and c.missing:
      c.notes.append(f'missing in {c.missing} of {sample.rows} sampled '
                     'records: declared required (they become '
                     'missing_required dead letters); make it optional if '
                     'a missing value is legitimate')
    if c.numbers is not None:
      c.distinct = len(np.unique(c.numbers))
      c.options['_range'] = (f.get('min'), f.get('max'))
    elif c.texts is not None:
      # Exact (TFDV's unique count is a sketch's estimate on large data).
      c.distinct = len(pc.unique(pa.array(c.texts, pa.string())))
      if f.get('domain') and c.undecided is None:
        c.options['_values'] = sorted(f['domain'])
  return columns


# Roles and label ---------------------------------------------------------------
def _id_like(c: Column) -> bool:
  return c.type in ('string', 'int') and bool(_ID_NAME.search(c.name))


def _guess_roles(columns: Dict[str, Column], given: Dict[str, Optional[str]]
                 ) -> Tuple[Dict[str, str], Dict[str, str]]:
  """(roles, {role: why}) for the roles not given."""
  roles = {k: v for k, v in given.items() if v}
  why = {}
  taken = set(roles.values())
  if 'label' not in roles:
    for c in columns.values():
      if (c.name not in taken and _LABEL_NAME.search(c.name) and
          c.undecided is None and c.type in ('string', 'int', 'float')):
        roles['label'], why['label'] = c.name, 'named like a label'
        taken.add(c.name)
        break
  if 'id' not in roles:
    for c in columns.values():
      if (c.name not in taken and _id_like(c) and c.required and
          c.unique and c.undecided is None):
        roles['id'] = c.name
        why['id'] = 'unique in the sample, named like an id'
        if c.repeated:
          c.notes.append(f'{c.present - c.distinct} duplicate values in the '
                         'sample: later copies become duplicate dead letters')
        taken.add(c.name)
        break
  if 'timestamp' not in roles:
    times = [c for c in columns.values() if c.type == 'timestamp' and
             c.name not in taken and c.required]
    times.sort(key=lambda c: not _TIME_NAME.search(c.name))
    if times:
      roles['timestamp'] = times[0].name
      why['timestamp'] = ('the timestamp column' if len(times) == 1 else
                          f'the first of {len(times)} timestamp columns')
      taken.add(times[0].name)
  if 'entity' not in roles and 'timestamp' in roles:
    candidates = [c for c in columns.values() if c.name not in taken and
                  _id_like(c) and c.required and c.repeated and
                  c.undecided is None and c.distinct > 1]
    candidates.sort(key=lambda c: not _ENTITY_NAME.search(c.name))
    if candidates:
      roles['entity'] = candidates[0].name
      why['entity'] = 'a repeated id: history is kept per value'
  return roles, why


def _label_spec(c: Column) -> Tuple[Optional[Dict[str, Any]], str]:
  """({task, classes}, comment) from the label's values; (None, why) when
  its task cannot be told."""
  if c.numbers is not None:
    values = np.unique(c.numbers)
    if c.type == 'int' and len(values) == 2:
      return ({'task': 'binary', 'classes': {int(values[0]): 0,
                                             int(values[1]): 1}},
              'two values: binary')
    if c.type == 'int' and 2 < len(values) <= MAX_CLASSES:
      return ({'task': 'multiclass', 'classes': [int(v) for v in values]},
              f'{len(values)} integer values: multiclass (say task: '
              'regression if they are amounts)')
    if len(values) < 2:
      return None, 'a single value: nothing to learn'
    return {'task': 'regression'}, f'{len(values)} distinct numbers: regression'
  if c.texts is None or c.undecided:
    return None, 'its type is undecided'
  counts: Dict[str, int] = {}
  for v in c.texts:
    counts[v] = counts.get(v, 0) + 1
  if len(counts) < 2:
    return None, 'a single value: nothing to learn'
  if len(counts) == 2:
    a, b = sorted(counts)
    yes = [v for v in (a, b) if v.strip().lower() in _POSITIVE]
    if len(yes) == 1:
      positive, why = yes[0], f'{yes[0]!r} reads as the positive class'
    else:
      positive = min((a, b), key=lambda v: (counts[v], v))
      why = f'{positive!r}, the rarer value, taken as the positive class'
    negative = b if positive == a else a
    return ({'task': 'binary', 'classes': {negative: 0, positive: 1}},
            f'two values: binary; {why}')
  if len(counts) <= MAX_ALLOWED:
    return ({'task': 'multiclass', 'classes': sorted(counts)},
            f'{len(counts)} values: multiclass')
  return None, (f'{len(counts)} distinct strings: too many classes to '
                'guess')


# Writing ------------------------------------------------------------------------
_PLAIN = re.compile(r'^[A-Za-z0-9_][A-Za-z0-9_./-]*$')


def scalar(value: Any) -> str:
  """A YAML flow scalar that reads back as `value` (strings that YAML
  would read as something else, 'Yes', 'no', 'null', '1.5', are quoted)."""
  import yaml
  if isinstance(value, bool) or value is None:
    return json.dumps(value)
  if isinstance(value, int):
    return str(value)
  if isinstance(value, float):
    return repr(value) if math.isfinite(value) else json.dumps(str(value))
  text = str(value)
  if _PLAIN.match(text) and yaml.safe_load(text) == text:
    return text
  return json.dumps(text, ensure_ascii=False)


def _flow(mapping: Dict[str, Any]) -> str:
  parts = []
  for k, v in mapping.items():
    if isinstance(v, dict):
      text = _flow(v)
    elif isinstance(v, (list, tuple)):
      text = '[' + ', '.join(scalar(x) for x in v) + ']'
    else:
      text = scalar(v)
    parts.append(f'{scalar(k)}: {text}')
  return '{' + ', '.join(parts) + '}'


def _comment(line: str, note: str, width: int = 44) -> str:
  return f'{line.ljust(width)}  # {note}' if note else line


def _number(value: float) -> str:
  return f'{value:.6g}'


def _transform(columns: Dict[str, Column], roles: Dict[str, str],
               history: Optional[HistorySpec]) -> Tuple[Dict, Dict]:
  """({section: {name: options}}, {name: comment})."""
  numeric, bucketize, categorical, notes = {}, {}, {}, {}
  skip = set(roles.values())
  for c in columns.values():
    if c.name in skip or c.undecided or c.type == 'timestamp':
      continue
    if c.numbers is not None:
      if _id_like(c) and c.type == 'int':
        notes[c.name] = 'named like an id: not a model input'
        continue
      std = float(np.std(c.numbers)) if len(c.numbers) else 0.0
      if std == 0.0:
        notes[c.name] = 'constant in the sample: not a model input'
        continue
      from scipy.stats import skew
      s = float(skew(c.numbers))
      scale = 'log_z_score' if abs(s) > SKEW else 'z_score'
      options = scale if c.required else {
          'scale': scale, 'impute': 'mean', 'indicator': True}
      numeric[c.name] = options
      notes[c.name] = f'skewness {s:.2f}'
    elif c.texts is not None:
      if (_id_like(c) and c.distinct > MAX_ALLOWED) or not c.repeated:
        notes[c.name] = 'an id or free text: not a model input'
        continue
      if c.distinct > MAX_VOCABULARY:
        notes[c.name] = (f'{c.distinct} distinct values: not a model input '
                         '(a vocabulary that large needs review)')
        continue
      categorical[c.name] = {'oov_buckets': 1}
      notes[c.name] = f'{c.distinct} distinct values'
  if history is not None:
    # Counts, sums, means and recency are skewed (most entities have little
    # history): log-z-scored; the hour in quantile buckets.
    for name in history.feature_types():
      if name == 'event_hour':
        bucketize[name] = 6
      else:
        numeric[name] = 'log_z_score'
  out = {}
  for section, entries in (('numeric', numeric), ('bucketize', bucketize),
                           ('categorical', categorical)):
    if entries:
      out[section] = entries
  return out, notes


def _history(columns: Dict[str, Column], roles: Dict[str, str]
             ) -> Optional[HistorySpec]:
  """Per entity: counts over 1h/24h/7d, and the sum and mean of the first
  required numeric input, recency and the hour."""
  entity = roles.get('entity')
  if not entity or 'timestamp' not in roles:
    return None
  value = next((c.name for c in columns.values()
                if c.numbers is not None and c.required and not c.undecided
                and c.name not in roles.values() and not _id_like(c)), None)
  return HistorySpec(
      entity=entity, value=value, windows=dict(HISTORY_WINDOWS),
      aggregates=('count', 'sum', 'mean') if value else ('count',),
      distinct={}, novelty={}, ratio_to_mean=None,
      seconds_since_previous=True, calendar=('hour',))


def _field_line(c: Column, roles: Dict[str, str], complete: bool
                ) -> Tuple[Dict, str]:
  """(options, comment) of one field."""
  options: Dict[str, Any] = {'type': c.type}
  notes = list(c.notes)
  is_label = roles.get('label') == c.name
  if c.required and not is_label:
    options['required'] = True
  if is_label and c.required:
    notes.append('optional: data to score comes without it')
  options.update({k: v for k, v in c.options.items()
                  if not k.startswith('_')})
  low, high = c.options.get('_range', (None, None))
  if low is not None and not is_label:
    if complete and low >= 0:
      options['min'] = 0
    notes.append(f'sample range {_number(low)} .. {_number(high)}')
  values = c.options.get('_values')
  if values and not is_label and c.repeated:
    if complete:
      options['allowed'] = values
    else:
      options['domain'] = values
      notes.append('domain: the values seen in the sample (a new one is a '
                   'warning); allowed: [...] would dead-letter others')
  if c.undecided:
    notes.insert(0, 'UNDECIDED: ' + c.undecided)
  return options, '; '.join(notes)


def _reserved(name: str) -> Optional[str]:
  if name == RECORD_ID or name in output_columns():
    return 'a column the pipeline adds'
  if name.startswith('__'):
    return 'names starting with __ are the reader\'s own columns'
  if name.endswith('_xf'):
    return 'a name of a transformed input'
  return None


def _dataset_name(pattern: str) -> str:
  base = os.path.basename(pattern.rstrip('/'))
  base = re.sub(r'(\.gz)?$', '', base)
  base = os.path.splitext(base)[0]
  base = re.sub(r'[^A-Za-z0-9_]+', '_', base).strip('_')
  return base or 'table'


def render(sample: Sample, columns: Dict[str, Column], roles: Dict[str, str],
           why: Dict[str, str], source: str) -> Draft:
  """The YAML text of the draft."""
  left_out = {n: r for n in columns if (r := _reserved(n))}
  for name in left_out:
    del columns[name]
  for role, name in list(roles.items()):
    if name not in columns:
      raise UsageError(f'--{role} {name}: no such column in {source} '
                       f'(columns: {", ".join(columns)})')
  review, undecided = [], [c.name for c in columns.values() if c.undecided]
  label, label_note = None, ''
  if 'label' in roles:
    label, label_note = _label_spec(columns[roles['label']])
    if label is None:
      review.append(f'label: {roles["label"]} left out ({label_note}); '
                    'declare roles.label and label: yourself')
      why.pop('label', None)
      del roles['label']
  if 'id' in roles and columns[roles['id']].type not in ('string', 'int'):
    raise UsageError(f'--id {roles["id"]}: a {columns[roles["id"]].type} '
                     'column; an id is a string or int column')
  if 'timestamp' in roles and columns[roles['timestamp']].type != 'timestamp':
    raise UsageError(f'--timestamp {roles["timestamp"]}: its values are not '
                     'timestamps of one layout; see the draft without it')
  for role in ('entity', 'id'):
    name = roles.get(role)
    if name and not columns[name].required:
      columns[name].required = True
      columns[name].notes.append(f'the {role}: required')
  history = _history(columns, roles)
  transform, transform_notes = _transform(columns, roles, history)

  out = []
  read_how = (f'all {sample.rows} records' if sample.complete else
              f'the first {sample.rows} records (a sample)')
  out.append(f'# Drafted by `python -m pipelines.declare` from {source}: '
             f'{read_how}.')
  if sample.undecodable:
    out.append(f'# {sample.undecodable} records could not be read at all '
               '(malformed): they are dead letters whatever is declared.')
  out.append('# Review before use:')
  for role, reason in why.items():
    out.append(f'#   - roles.{role}: {roles[role]} is a guess ({reason})')
  missing_roles = [r for r in ('id', 'timestamp', 'label') if r not in roles]
  if missing_roles:
    out.append(f'#   - no {", ".join(missing_roles)} role: pass '
               + ' '.join(f'--{r} COLUMN' for r in missing_roles)
               + ' if the table has one')
  if label:
    out.append(f'#   - label.task: {label["task"]} ({label_note})')
  for line in review:
    out.append(f'#   - {line}')
  if undecided:
    out.append(f'#   - UNDECIDED (see their comments): {", ".join(undecided)}')
  for name, reason in left_out.items():
    out.append(f'#   - left out: {name} ({reason}); rename it at the source')
  out.append('#   - ' + ('allowed values and min: 0 are what the whole input '
                          'holds' if sample.complete else
                          'domain values are what the sample holds (soft: '
                          'a new value is a warning)')
             + '; ranges in comments; transform: scales by skewness')
  out.append(f'name: {scalar(_dataset_name(source))}')
  out.append('')
  if roles:
    out.append('roles:')
    for role in ('id', 'entity', 'timestamp', 'label'):
      if role in roles:
        out.append(_comment(f'  {role}: {scalar(roles[role])}',
                            'guessed' if role in why else ''))
  if label:
    out.append(f'label: {_flow(label)}')
  out.append('')
  out.append('fields:')
  for c in columns.values():
    options, note = _field_line(c, roles, sample.complete)
    out.append(_comment(f'  {scalar(c.name)}: {_flow(options)}', note))
  if history is not None:
    out.append('')
    out.append('# Point-in-time history of each entity (review the windows).')
    out.append('history:')
    if history.value:
      out.append(f'  value: {scalar(history.value)}')
    out.append(f'  windows: {_flow(history.windows)}')
    out.append(f'  aggregates: [{", ".join(history.aggregates)}]')
    out.append('  seconds_since_previous: true')
    out.append('  calendar: [hour]')
  if transform:
    out.append('')
    out.append('transform:')
    for section, entries in transform.items():
      out.append(f'  {section}:')
      for name, opts in entries.items():
        text = _flow(opts) if isinstance(opts, dict) else scalar(opts)
        out.append(_comment(f'    {scalar(name)}: {text}',
                            transform_notes.get(name, '')))
  left = [f'{n}: {r}' for n, r in transform_notes.items()
          if n not in {k for s in transform.values() for k in s}]
  if left:
    out.append('# Not model inputs:')
    out.extend(f'#   {line}' for line in left)
  text = '\n'.join(out) + '\n'
  return Draft(text=text, roles=dict(roles),
               task=label['task'] if label else None,
               guessed=sorted(why), undecided=undecided)


def check(text: str) -> None:
  """The draft loads as a declaration; a refusal is a bug of the drafter."""
  with tempfile.TemporaryDirectory() as folder:
    path = os.path.join(folder, 'draft.yaml')
    with open(path, 'w', encoding='utf-8') as f:
      f.write(text)
    try:
      load_dataset(path)
    except SchemaError as e:
      raise RunError(f'the drafted declaration does not load: {e}') from None


def draft_declaration(pattern: str, *, input_format: Optional[str] = None,
                      label: Optional[str] = None, id_field: Optional[str] = None,
                      timestamp: Optional[str] = None,
                      entity: Optional[str] = None,
                      sample_rows: int = SAMPLE_ROWS) -> Draft:
  """Reads a sample of `pattern` and drafts its declaration (module
  docstring). Raises UsageError for an input that cannot be read or holds
  no records, or a role naming no column."""
  sample = read_sample(pattern, input_format, sample_rows)
  if not sample.rows:
    raise UsageError(f'--input {pattern}: no readable records to draft from')
  columns = _profile(sample)
  given = {'id': id_field, 'timestamp': timestamp, 'entity': entity,
           'label': label}
  for role, name in given.items():
    if name and name not in columns:
      raise UsageError(f'--{role} {name}: no such column in {pattern} '
                       f'(columns: {", ".join(columns)})')
  if entity and not (timestamp or any(
      c.type == 'timestamp' for c in columns.values())):
    raise UsageError(f'--entity {entity}: history per entity needs event '
                     'times, and no column holds timestamps')
  roles, why = _guess_roles(columns, given)
  result = render(sample, columns, roles, why, pattern)
  check(result.text)
  return result
