"""Parsing and validating raw records against the dataset declaration.

One definition of a valid record, `RecordValidator.validate` (a pure
function of one RawRecord: every rule, and which error wins when a record
breaks several), and two ways of applying it:

  * batch, `ParseAndValidate`: raw RecordBatches in, valid RecordBatches and
    dead-letter RecordBatches out. `BatchValidator` checks whole columns
    with pyarrow.compute and NumPy: types, required, min/max, allowed,
    pattern, max_length, cross-field rules and freshness. A row that any
    check doubts is handed to `RecordValidator` alone, which decides it
    (valid, or the dead-letter kind and message), so the fast path only
    ever needs to be right about the rows it accepts. Duplicate ids are
    then removed by shuffling (shard, RecordBatch) pairs by a hash of the
    id: the copy with the earliest event time wins, then the one read
    first (by file, then position).
  * streaming, `StreamingParseAndValidate`: the same `BatchValidator` on
    each raw batch of the stream, then a stateful DoFn per shard of ids,
    whose state is read and written once per batch, that keeps the first
    copy to arrive within a horizon. In a stream in event-time order (a
    replay) that is the batch rule's copy.

Every record read leaves through exactly one of the two outputs.
"""

import datetime
import math
import os
from typing import Any, Dict, List, Optional, Tuple

import apache_beam as beam
from apache_beam.coders import PickleCoder
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec
from apache_beam.transforms import window
from apache_beam.utils.timestamp import Timestamp
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.base.errors import UsageError
from schemas import patterns
from schemas.dataset import RECORD_ID, Dataset, Field
from transforms.common import (DEAD_LETTER, DEFAULT_SHARDS, MICROS,
                               json_row, micros_to_rfc3339,
                               NAMESPACE, VALID, CountElements, CountRows,
                               Counters, dead_letter_batch,
                               dead_letter_row, split_by_shard, to_micros,
                               true_rows)
from transforms.read import (ERROR, POSITION, SOURCE, UNDECODED, RawRecord,
                             raw_records, record_texts)
from transforms import common, timestamps

__all__ = ['DEAD_LETTER', 'VALID', 'NAMESPACE', 'CountElements',
           'ERROR_KINDS', 'RecordError', 'RecordValidator', 'BatchValidator',
           'ParseAndValidate', 'StreamingParseAndValidate',
           'rfc3339_to_micros']

# Every kind of error a dead-letter row can carry.
ERROR_KINDS = ('malformed', 'unreadable_file', 'missing_required',
               'type_error', 'out_of_range', 'not_allowed',
               'pattern_mismatch', 'too_long', 'rule_violation', 'stale',
               'duplicate', 'late')

# Event times the pipeline computes with: windows and history reach a long
# way before and after an event, and every window bound must still be a
# date (year 1 or 9999 is not, once a week is added or taken away).
EARLIEST, LATEST = '1678-01-01T00:00:00Z', '2261-12-31T00:00:00Z'
EARLIEST_MICROS = -9_214_560_000_000_000
LATEST_MICROS = 9_214_560_000_000_000

# Columns kept beside a valid record until duplicates are removed. Not
# the record's text: carried through the shuffle it doubled the ingest
# job's memory; the few duplicates' texts are read again from their files.
KEEP_META = (SOURCE, POSITION)


class RecordError(UsageError):
  """One record is invalid (a dead-letter row; a 400 from the service)."""

  def __init__(self, kind: str, field: Optional[str], message: str):
    super().__init__(message)
    self.kind, self.field, self.message = kind, field, message


def rfc3339_to_micros(text: str) -> int:
  """'2026-10-01T10:00:00Z' -> epoch microseconds; ValueError if invalid."""
  try:
    return _coerce(Field(name='time', type='timestamp'), text)
  except RecordError:
    raise ValueError(f'{text!r} is not an RFC 3339 timestamp with a time '
                     'zone (e.g. 2026-10-01T10:00:00Z)') from None


def _dead_row(raw: RawRecord, kind: str, field: Optional[str],
              message: str) -> Dict[str, Any]:
  return dead_letter_row(raw.source, raw.position, kind, field, message,
                         raw.text)


# One record -------------------------------------------------------------------
def _missing(value) -> bool:
  return value is None or (isinstance(value, str) and not value.strip())


def _coerce(field: Field, value):
  """Converts a decoded value to the declared type or raises RecordError."""
  name, ftype = field.name, field.type
  if ftype == 'string':
    if isinstance(value, str):
      return value
    raise RecordError('type_error', name, f'{name}: expected a string, '
                      f'got {type(value).__name__} {value!r}')
  if ftype in ('float', 'int'):
    if isinstance(value, bool):
      raise RecordError('type_error', name, f'{name}: expected a number, '
                        f'got {value!r}')
    number = value
    if isinstance(value, str):
      try:
        number = float(value.strip())
      except ValueError:
        raise RecordError('type_error', name, f'{name}: {value!r} is not a '
                          'number') from None
    if not isinstance(number, (int, float)):
      raise RecordError('type_error', name, f'{name}: expected a number, got '
                        f'{type(value).__name__}')
    if isinstance(number, int) and ftype == 'float':
      try:
        number = float(number)
      except OverflowError:
        raise RecordError('type_error', name, f'{name}: {value!r} is too '
                          'large') from None
    if isinstance(number, float) and not math.isfinite(number):
      raise RecordError('type_error', name, f'{name}: {value!r} is not finite')
    if ftype == 'float':
      return float(number)
    if number != int(number):
      raise RecordError('type_error', name, f'{name}: {value!r} is not an '
                        'integer')
    number = int(number)
    if not -2**63 <= number < 2**63:
      raise RecordError('type_error', name, f'{name}: {value!r} is out of '
                        'the 64-bit integer range')
    return number
  # timestamp
  try:
    if isinstance(value, datetime.datetime):
      micros = (to_micros(value) if value.tzinfo is not None else
                timestamps.localize(value, field) if field.zone else None)
      if micros is None:
        raise timestamps.TimestampError(
            f'{name}: {value!r} has no time zone; use Z or an offset')
    elif isinstance(value, str):
      micros = timestamps.parse_value(field, value)
    else:
      raise timestamps.TimestampError(
          f'{name}: expected a timestamp, got {type(value).__name__}')
  except timestamps.TimestampError as e:
    raise RecordError('type_error', name, str(e)) from None
  _check_time_range(name, micros, value)
  return micros


def _check_time_range(name: str, micros: int, value):
  if not EARLIEST_MICROS <= micros <= LATEST_MICROS:
    raise RecordError('out_of_range', name, f'{name}: {value!r} is outside '
                      f'{EARLIEST} .. {LATEST}')


def record_id(source: Optional[str], position: Optional[int]) -> str:
  """The id of a record of a dataset that declares none: where it was
  read, '<file name>:<position>' (the name only, so that a copy of the
  input elsewhere gives the same ids)."""
  return f'{os.path.basename(source or "")}:{position}'


def _derive(dataset: Dataset, record: Dict[str, Any], raw: RawRecord):
  """Fills the derived fields of a typed record (in place)."""
  for name, field in dataset.fields.items():
    if not field.derived:
      continue
    if name == RECORD_ID:
      record[name] = record_id(raw.source, raw.position)
      continue
    date_field = field.compose.get('date')   # None: a fixed date (since)
    date = record.get(date_field) if date_field else None
    hour_field = field.compose.get('hour')
    hour = record.get(hour_field) if hour_field else None
    if (date_field and date is None) or (hour_field and hour is None):
      if field.required:
        raise RecordError('missing_required', name, f'{name} is required '
                          'but its date or hour is missing')
      record[name] = None
      continue
    try:
      micros = timestamps.compose_value(field, date, hour)
    except timestamps.TimestampError as e:
      raise RecordError('type_error', name, str(e)) from None
    _check_time_range(name, micros,
                      f'{date or field.compose["since"]} {hour}')
    record[name] = micros


def _check(field: Field, value):
  name = field.name
  if field.min is not None and value < field.min:
    raise RecordError('out_of_range', name,
                      f'{name}: {value} is below the minimum {field.min}')
  if field.max is not None and value > field.max:
    raise RecordError('out_of_range', name,
                      f'{name}: {value} is above the maximum {field.max}')
  if field.allowed is not None and value not in field.allowed:
    raise RecordError('not_allowed', name,
                      f'{name}: {value!r} is not one of the allowed values')
  if field.max_length is not None and len(value) > field.max_length:
    raise RecordError('too_long', name, f'{name}: longer than '
                      f'{field.max_length} characters')
  if field.pattern is not None and not patterns.match(value, field.pattern):
    raise RecordError('pattern_mismatch', name,
                      f'{name}: {value!r} does not match {field.pattern}')


def _selects(condition: Dict[str, Any], value) -> bool:
  if 'in' in condition and value not in condition['in']:
    return False
  if 'not_in' in condition and value in condition['not_in']:
    return False
  return True


def _satisfies(bounds: Dict[str, float], value) -> bool:
  if value is None:
    return True
  return not (('min' in bounds and value < bounds['min']) or
              ('max' in bounds and value > bounds['max']) or
              ('min_exclusive' in bounds and value <= bounds['min_exclusive'])
              or ('max_exclusive' in bounds and
                  value >= bounds['max_exclusive']))


class RecordValidator:
  """Turns one RawRecord into a typed record dict, or raises RecordError."""

  def __init__(self, dataset: Dataset, reference_micros: Optional[int] = None):
    self.dataset = dataset
    self._reference = reference_micros

  def validate(self, raw: RawRecord) -> Dict[str, Any]:
    if raw.error is not None:
      raise RecordError(raw.error_kind or 'malformed', None, raw.error)
    record = {}
    for name, field in self.dataset.input_fields.items():
      value = raw.values.get(name)
      if _missing(value):
        if field.required:
          raise RecordError('missing_required', name,
                            f'{name} is required but missing')
        record[name] = None
        continue
      value = _coerce(field, value)
      _check(field, value)
      record[name] = value
    _derive(self.dataset, record, raw)
    for rule in self.dataset.rules:
      if all(_selects(cond, record[f]) for f, cond in rule.when.items()):
        for f, bounds in rule.require.items():
          if not _satisfies(bounds, record[f]):
            raise RecordError('rule_violation', f,
                              f'rule {rule.name}: {f}={record[f]!r}')
    if self._reference is not None and self.dataset.timestamp_field:
      self._check_freshness(record)
    return record

  def _check_freshness(self, record):
    ts = self.dataset.timestamp_field
    age = (self._reference - record[ts]) / MICROS
    limits = self.dataset.freshness
    if 'max_age' in limits and age > limits['max_age']:
      raise RecordError('stale', ts, f'{ts} is {age:.0f}s before the '
                        f'reference time (max_age {limits["max_age"]}s)')
    if 'max_future' in limits and -age > limits['max_future']:
      raise RecordError('stale', ts, f'{ts} is {-age:.0f}s after the '
                        f'reference time (max_future {limits["max_future"]}s)')


# Whole columns ----------------------------------------------------------------
_NUMBER = r'^-?[0-9]{1,15}(\.[0-9]{1,15})?$'
_INTEGER = r'^-?[0-9]{1,15}$'
_RFC3339 = (r'^(?P<base>[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:'
            r'[0-9]{2})(?:\.(?P<frac>[0-9]{1,6}))?'
            r'(?:Z|(?P<sign>[+-])(?P<oh>[0-9]{2}):(?P<om>[0-9]{2}))$')
# Integers a float64 holds exactly: the per-record path goes through float.
_EXACT = 2.0 ** 53


def _is_string(t) -> bool:
  return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_number(t) -> bool:
  return pa.types.is_integer(t) or pa.types.is_floating(t)


_ZULU = (r'^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$')


def _parse_rfc3339(column: pa.Array) -> Tuple[np.ndarray, np.ndarray]:
  """Strings in RFC 3339 -> (int64 epoch micros, rows parsed). The common
  whole-second UTC form is parsed in one pass; other canonical forms
  (fractions, offsets) in a second; anything else (other layouts,
  impossible dates) is left to the per-record parser. The regular
  expressions come first because strptime alone is laxer than Python's
  fromisoformat (it takes one-digit months)."""
  zulu = true_rows(pc.match_substring_regex(column, _ZULU))
  base = pc.strptime(column, format='%Y-%m-%dT%H:%M:%SZ', unit='us',
                     error_is_null=True)
  parsed = zulu & true_rows(base.is_valid())
  micros = pc.fill_null(base.cast(pa.int64()), 0).to_numpy(
      zero_copy_only=False).astype(np.int64)
  rest = np.flatnonzero(~parsed & true_rows(column.is_valid()))
  if len(rest):
    other, other_parsed = _parse_rfc3339_offsets(column.take(pa.array(rest)))
    micros[rest] = other
    parsed[rest] = other_parsed
  return micros, parsed


def _parse_rfc3339_offsets(column: pa.Array) -> Tuple[np.ndarray, np.ndarray]:
  parts = pc.extract_regex(column, _RFC3339)
  parsed = true_rows(parts.is_valid())
  base = pc.strptime(parts.field('base'), format='%Y-%m-%dT%H:%M:%S',
                     unit='us', error_is_null=True)
  parsed &= true_rows(base.is_valid())
  micros = pc.fill_null(base.cast(pa.int64()), 0).to_numpy(
      zero_copy_only=False).astype(np.int64)
  frac = pc.utf8_rpad(parts.field('frac'), width=6, padding='0')
  frac = pc.if_else(pc.equal(pc.utf8_length(parts.field('frac')), 0),
                    '000000', frac)
  micros = micros + pc.fill_null(pc.cast(frac, pa.int64(), safe=False),
                                 0).to_numpy(zero_copy_only=False)

  def number(name):
    text = parts.field(name)
    text = pc.if_else(pc.equal(text, ''), '0', text)
    return pc.fill_null(pc.cast(text, pa.int64()), 0).to_numpy(
        zero_copy_only=False)

  oh, om = number('oh'), number('om')
  parsed &= (oh <= 23) & (om <= 59)
  sign = np.where(true_rows(pc.equal(parts.field('sign'), '-')), -1, 1)
  micros = micros - sign * (oh * 3600 + om * 60) * MICROS
  return micros, parsed


class BatchValidator:
  """Raw RecordBatch -> (valid RecordBatch, dead-letter rows).

  The valid batch has `dataset.batch_schema()` columns plus SOURCE and
  POSITION (for the dedupe step). Doubtful rows are decided by
  `RecordValidator`, one at a time.
  """

  def __init__(self, dataset: Dataset, reference_micros: Optional[int] = None):
    self.dataset = dataset
    self._reference = reference_micros
    self._record_validator = RecordValidator(dataset, reference_micros)
    self._schema = dataset.batch_schema()
    self._out_schema = self._schema
    for name in KEEP_META:
      self._out_schema = self._out_schema.append(
          pa.field(name, pa.int64() if name == POSITION else pa.string()))

  def _column(self, batch: pa.RecordBatch, field: Field
              ) -> Tuple[pa.Array, np.ndarray]:
    """(typed column, rows the per-record path must decide)."""
    n = batch.num_rows
    target = self._schema.field(field.name).type
    if field.name not in batch.schema.names:
      return pa.nulls(n, target), np.full(n, field.required)
    column = batch.column(field.name)
    t = column.type
    if pa.types.is_null(t):
      return pa.nulls(n, target), np.full(n, field.required)
    present = true_rows(column.is_valid())
    doubt = np.zeros(n, bool)
    if _is_string(t):
      blank = true_rows(pc.equal(pc.utf8_trim_whitespace(column), ''))
      present &= ~blank
      # A blank value is missing: fine when optional, decided per record
      # (missing_required) when required.
      doubt |= blank & field.required
    doubt |= ~present & field.required
    if field.type == 'string':
      if not _is_string(t):
        return pa.nulls(n, target), doubt | present
      values = column.cast(pa.string())
    elif field.type in ('float', 'int'):
      if pa.types.is_floating(t):
        values = column.cast(pa.float64())
        finite = true_rows(pc.is_finite(values))
        doubt |= present & ~finite
        if field.type == 'int':
          number = pc.fill_null(values, 0.0).to_numpy(zero_copy_only=False)
          integral = (np.isfinite(number) & (np.floor(number) == number) &
                      (np.abs(number) < _EXACT))
          doubt |= present & ~integral
          values = pa.array(np.where(integral, number, 0).astype(np.int64),
                            mask=~present)
      elif pa.types.is_integer(t):
        values = column.cast(pa.int64())
        if field.type == 'float':
          number = pc.fill_null(values, 0).to_numpy(zero_copy_only=False)
          doubt |= present & (np.abs(number) >= _EXACT)
          values = pa.array(number.astype(np.float64), mask=~present)
      elif _is_string(t):
        pattern = _NUMBER if field.type == 'float' else _INTEGER
        ok = true_rows(pc.match_substring_regex(column, pattern))
        doubt |= present & ~ok
        clean = pc.if_else(pa.array(ok), column, '0')
        values = pc.cast(clean, pa.float64())
        if field.type == 'int':
          values = pc.cast(clean, pa.int64())
        values = pc.if_else(pa.array(present & ok), values,
                            pa.scalar(None, values.type))
      else:
        return pa.nulls(n, target), doubt | present
    else:  # timestamp
      if _is_string(t):
        text = column.cast(pa.string())
        if field.format:
          micros, parsed = timestamps.parse_local_column(text, field, present)
        else:
          micros, parsed = _parse_rfc3339(text)
          if field.zone:
            local, sure = timestamps.parse_local_column(
                text, field, present & ~parsed)
            micros = np.where(sure, local, micros)
            parsed |= sure
        doubt |= present & ~parsed
        values = pa.array(micros, pa.int64())
      elif (pa.types.is_timestamp(t) and t.tz is not None and
            t.unit in ('s', 'ms', 'us')):
        values = column.cast(pa.timestamp('us', tz=t.tz)).cast(pa.int64())
      else:
        return pa.nulls(n, target), doubt | present
      values = pc.if_else(pa.array(present), values,
                          pa.scalar(None, pa.int64()))
      times = pc.fill_null(values, 0).to_numpy(zero_copy_only=False)
      doubt |= present & ((times < EARLIEST_MICROS) |
                          (times > LATEST_MICROS))
    values = values.cast(target)
    doubt |= present & self._rule_doubts(field, values)
    # Absent values (missing, or doubted) are null in the typed column.
    values = pc.if_else(pa.array(present & ~doubt), values,
                        pa.scalar(None, target))
    return values, doubt

  def _rule_doubts(self, field: Field, values: pa.Array) -> np.ndarray:
    doubt = np.zeros(len(values), bool)
    if field.min is not None:
      doubt |= true_rows(pc.less(values, field.min))
    if field.max is not None:
      doubt |= true_rows(pc.greater(values, field.max))
    if field.allowed is not None:
      try:
        allowed = pa.array(list(field.allowed), values.type)
      except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return ~doubt   # values of another type: decided per record
      doubt |= ~true_rows(pc.is_in(values, value_set=allowed))
    if field.max_length is not None:
      doubt |= true_rows(pc.greater(pc.utf8_length(values), field.max_length))
    if field.pattern is not None:
      doubt |= ~patterns.matches(values, field.pattern)
    return doubt

  def _cross_field_doubts(self, columns: Dict[str, pa.Array], n: int
                          ) -> np.ndarray:
    doubt = np.zeros(n, bool)
    for rule in self.dataset.rules:
      selected = np.ones(n, bool)
      for name, condition in rule.when.items():
        column = columns[name]
        for key, keep in (('in', True), ('not_in', False)):
          if key not in condition:
            continue
          try:
            value_set = pa.array(list(condition[key]), column.type)
          except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            return np.ones(n, bool)
          member = true_rows(pc.is_in(column, value_set=value_set))
          selected &= member if keep else ~member
      for name, bounds in rule.require.items():
        column = columns[name]
        broken = np.zeros(n, bool)
        for key, op in (('min', pc.less), ('max', pc.greater),
                        ('min_exclusive', pc.less_equal),
                        ('max_exclusive', pc.greater_equal)):
          if key in bounds:
            broken |= true_rows(op(column, bounds[key]))
        doubt |= selected & broken
    return doubt

  def _derived_columns(self, batch: pa.RecordBatch,
                       columns: Dict[str, pa.Array], n: int) -> np.ndarray:
    """Adds the derived fields to `columns`; returns the rows to doubt."""
    doubt = np.zeros(n, bool)
    for name, field in self.dataset.fields.items():
      if not field.derived:
        continue
      if name == RECORD_ID:
        source = (batch.column(SOURCE) if SOURCE in batch.schema.names
                  else pa.nulls(n, pa.string()))
        position = (batch.column(POSITION) if POSITION in batch.schema.names
                    else pa.nulls(n, pa.int64()))
        columns[name] = pc.binary_join_element_wise(
            pc.replace_substring_regex(pc.fill_null(source, ''), '^.*/', ''),
            pc.cast(position, pa.string()), ':')
        continue
      date_field = field.compose.get('date')   # None: a fixed date (since)
      date = columns[date_field] if date_field else None
      hour_field = field.compose.get('hour')
      hours = columns[hour_field] if hour_field else None
      present = np.ones(n, bool)
      for part in (date, hours):
        if part is not None:
          present &= true_rows(part.is_valid())
      micros, sure = timestamps.compose_column(field, date, hours, n)
      sure &= (micros >= EARLIEST_MICROS) & (micros <= LATEST_MICROS)
      doubt |= (present & ~sure) | (~present & field.required)
      columns[name] = pa.array(micros, pa.int64(), mask=~(present & sure))
    return doubt

  def _freshness_doubts(self, times: pa.Array) -> np.ndarray:
    limits = self.dataset.freshness
    if self._reference is None or not limits:
      return np.zeros(len(times), bool)
    t = pc.fill_null(times, self._reference).to_numpy(zero_copy_only=False)
    age = (self._reference - t) / MICROS
    doubt = np.zeros(len(times), bool)
    if 'max_age' in limits:
      doubt |= age > limits['max_age']
    if 'max_future' in limits:
      doubt |= -age > limits['max_future']
    return doubt

  def validate(self, batch: pa.RecordBatch
               ) -> Tuple[pa.RecordBatch, List[Dict[str, Any]]]:
    n = batch.num_rows
    doubt = np.zeros(n, bool)
    if ERROR in batch.schema.names:
      doubt |= true_rows(batch.column(ERROR).is_valid())
    if UNDECODED in batch.schema.names:
      doubt |= true_rows(batch.column(UNDECODED))
    columns = {}
    for name, field in self.dataset.input_fields.items():
      columns[name], field_doubt = self._column(batch, field)
      doubt |= field_doubt
    doubt |= self._derived_columns(batch, columns, n)
    doubt |= self._cross_field_doubts(columns, n)
    if self.dataset.timestamp_field:
      doubt |= self._freshness_doubts(columns[self.dataset.timestamp_field])

    keep = pa.array(~doubt)
    arrays = [columns[name] for name in self._schema.names]
    arrays += [batch.column(name) if name in batch.schema.names else
               pa.nulls(n, self._out_schema.field(name).type)
               for name in KEEP_META]
    valid = pa.RecordBatch.from_arrays(
        arrays, schema=self._out_schema).filter(keep)

    dead, rescued = [], []
    for raw in raw_records(batch, np.flatnonzero(doubt)):
      try:
        record = self._record_validator.validate(raw)
      except RecordError as e:
        dead.append(_dead_row(raw, e.kind, e.field, e.message))
      else:
        record.update({SOURCE: raw.source, POSITION: raw.position})
        rescued.append(record)
    if rescued:
      valid = pa.RecordBatch.from_arrays(
          [pa.concat_arrays([valid.column(i), rescued_column])
           for i, rescued_column in enumerate(pa.RecordBatch.from_pylist(
               rescued, schema=self._out_schema).columns)],
          schema=self._out_schema)
    return valid, dead


class ValidateBatches(beam.DoFn):
  """Raw RecordBatch -> valid RecordBatch (main) and a dead-letter
  RecordBatch (DEAD_LETTER) when any row was rejected."""

  def __init__(self, dataset: Dataset, reference_micros: Optional[int]):
    self._dataset, self._reference = dataset, reference_micros

  def setup(self):
    self._validator = BatchValidator(self._dataset, self._reference)
    self._counters = Counters()

  def process(self, batch: pa.RecordBatch):
    self._counters.inc('records_read', batch.num_rows)
    valid, dead = self._validator.validate(batch)
    if valid.num_rows:
      yield valid
    if dead:
      yield beam.pvalue.TaggedOutput(DEAD_LETTER, dead_letter_batch(dead))


def _first_copy_wins(shard_and_batches, dataset: Dataset):
  """One shard of valid rows -> rows without later copies of an id (main,
  RecordBatches of at most PIECE_ROWS rows, in (id, time, file, position)
  order) and (file, dead-letter row) of those copies (DEAD_LETTER).

  The shard's batches are read as one table without copying them; only
  the sort order is computed whole, and the winners are taken from the
  table a piece at a time, so the worker never holds a sorted or filtered
  copy of the whole shard beside it, and no element grows with the input.
  """
  _, batches = shard_and_batches
  batches = [b for b in batches if b.num_rows]
  if not batches:
    return
  table = pa.Table.from_batches(batches)
  del batches
  id_field, schema = dataset.id_field, dataset.batch_schema()
  keys = [id_field] + ([dataset.timestamp_field] if dataset.timestamp_field
                        else []) + [SOURCE, POSITION]
  order = pc.sort_indices(table, sort_keys=[(k, 'ascending') for k in keys])
  ids = table.column(id_field).take(order).to_numpy()
  first = np.ones(len(ids), bool)
  first[1:] = ids[1:] != ids[:-1]
  winners = order.to_numpy()[first]
  columns = table.select(schema.names)
  step = common.PIECE_ROWS
  for start in range(0, len(winners), step):
    piece = columns.take(winners[start:start + step])
    yield pa.RecordBatch.from_arrays(
        [piece.column(n).combine_chunks() for n in schema.names],
        schema=schema)
  if first.all():
    return
  # Duplicates are few: their rows are built one by one.
  order = order.to_numpy()
  firsts = np.maximum.accumulate(np.where(first, np.arange(len(ids)), 0))
  later = np.flatnonzero(~first)
  sources = table.column(SOURCE).take(pa.array(order[later])).to_pylist()
  positions = table.column(POSITION).take(pa.array(order[later])).to_pylist()
  first_sources = table.column(SOURCE).take(
      pa.array(order[firsts[later]])).to_pylist()
  first_positions = table.column(POSITION).take(
      pa.array(order[firsts[later]])).to_pylist()
  for j, i in enumerate(later):
    # Keyed by file: the texts are read again from it (_with_record_text).
    yield beam.pvalue.TaggedOutput(DEAD_LETTER, (sources[j], dead_letter_row(
        sources[j], positions[j], 'duplicate', None,
        f'id {ids[i]} already read at {first_sources[j]}:'
        f'{first_positions[j]}', None)))


def _with_record_text(source_and_rows, dataset: Dataset,
                      input_format: Optional[str]) -> pa.RecordBatch:
  """(file, dead-letter rows without text) -> a dead-letter batch with
  each row's record text, read again from the file."""
  source, rows = source_and_rows
  rows = sorted(rows, key=lambda r: r['position'])
  texts = record_texts(source, dataset, [r['position'] for r in rows],
                       input_format)
  for row in rows:
    row['raw'] = texts.get(row['position'])
  return dead_letter_batch(rows)


class DropDuplicatesInReadOrder(beam.PTransform):
  """PCollection[pa.RecordBatch] valid rows with SOURCE and POSITION ->
  {'valid': PCollection[pa.RecordBatch] (dataset.batch_schema()),
   'dead_letter': PCollection[pa.RecordBatch] of later copies}.

  Rows are shuffled as (shard of the id, batch) pairs, so all copies of an
  id meet. The copy with the earliest event time wins, then the one read
  first (by file, then position), whatever the shuffle order: the rule a
  stream in event-time order follows too (a replay keeps the same copy).
  Bounded input only.
  """

  def __init__(self, dataset: Dataset, num_shards: int = DEFAULT_SHARDS,
               input_format: Optional[str] = None):
    super().__init__()
    self._dataset, self._shards = dataset, num_shards
    self._format = input_format

  def expand(self, batches):
    id_field, shards = self._dataset.id_field, self._shards
    deduped = (batches
               | 'ShardById' >> beam.FlatMap(split_by_shard, id_field,
                                             shards)
               | 'GroupShards' >> beam.GroupByKey()
               | 'KeepFirstCopy' >> beam.FlatMap(
                   _first_copy_wins, self._dataset).with_outputs(
                       DEAD_LETTER, main=VALID))
    dead = (deduped[DEAD_LETTER]
            | 'GroupByFile' >> beam.GroupByKey()
            | 'ReadRecordTexts' >> beam.Map(
                _with_record_text, self._dataset, self._format))
    return {VALID: deduped[VALID], DEAD_LETTER: dead}


def _record_columns(batch: pa.RecordBatch, schema: pa.Schema
                    ) -> pa.RecordBatch:
  return pa.RecordBatch.from_arrays([batch.column(n) for n in schema.names],
                                    schema=schema)


class _CountDeadLetters(beam.DoFn):

  def setup(self):
    self._counters = Counters()

  def process(self, batch: pa.RecordBatch):
    self._counters.inc('records_dead_lettered', batch.num_rows)
    counts = pc.value_counts(batch.column('error_kind'))
    for item in counts.to_pylist():
      self._counters.inc(f'dead_letter.{item["values"]}', item['counts'])
    yield batch


class ParseAndValidate(beam.PTransform):
  """PCollection[pa.RecordBatch] raw batches (transforms.read) ->
  {'valid': PCollection[pa.RecordBatch], 'dead_letter':
  PCollection[pa.RecordBatch]}.

  Valid batches have `dataset.batch_schema()` columns: every declared field
  typed (timestamps as int64 epoch microseconds, missing optional values
  null). Dead-letter batches have the columns of `DEAD_LETTER_SCHEMA`
  {source_file, position, error_kind, field, message, raw}.
  Counters: records_read, records_valid, records_dead_lettered and
  dead_letter.<kind>. With `reference_micros`, records outside the declared
  freshness limits around it are dead-lettered as `stale`.
  """

  def __init__(self, dataset: Dataset, reference_micros: Optional[int] = None,
               num_shards: int = DEFAULT_SHARDS,
               input_format: Optional[str] = None):
    super().__init__()
    self._dataset = dataset
    self._reference = reference_micros
    self._shards = num_shards
    self._format = input_format

  def expand(self, raw_batches):
    parsed = raw_batches | 'ParseAndCheckRules' >> beam.ParDo(
        ValidateBatches(self._dataset, self._reference)).with_outputs(
            DEAD_LETTER, main=VALID)
    if self._dataset.has_id:
      deduped = parsed[VALID] | 'DropDuplicates' >> DropDuplicatesInReadOrder(
          self._dataset, self._shards, self._format)
    else:
      # Ids are where records were read: no two records share one.
      deduped = {VALID: parsed[VALID] | 'DropReadPositions' >> beam.Map(
          _record_columns, self._dataset.batch_schema()),
                 DEAD_LETTER: parsed[DEAD_LETTER].pipeline | 'NoDuplicates'
                 >> beam.Create([])}
    # Each branch is counted before the Flatten: a step after it runs in
    # both fused stages on Flink, which reports two accumulators of one
    # name, and Beam's Python side keeps one of them (11 dead letters
    # where the kinds added up to 12).
    dead = ((parsed[DEAD_LETTER]
             | 'CountRuleDeadLetters' >> beam.ParDo(_CountDeadLetters()),
             deduped[DEAD_LETTER]
             | 'CountDuplicateDeadLetters' >> beam.ParDo(_CountDeadLetters()))
            | 'AllDeadLetters' >> beam.Flatten())
    valid = deduped[VALID] | 'CountValid' >> beam.ParDo(
        CountRows('records_valid'))
    return {VALID: valid, DEAD_LETTER: dead}


# Streaming --------------------------------------------------------------------
def _earliest_event_time(batch: pa.RecordBatch, dataset: Dataset):
  """A valid batch stamped with its earliest event time (the element
  timestamp every streaming batch carries)."""
  ts = dataset.timestamp_field
  if not ts or batch.num_rows == 0:
    return batch
  return window.TimestampedValue(
      batch, Timestamp(micros=pc.min(batch.column(ts)).as_py()))


def _as_raw_text(row: Dict[str, Any], dataset: Dataset) -> str:
  """A valid record as JSON, its event time in RFC 3339 (the dead-letter
  text of a later copy: ready to re-ingest)."""
  ts = dataset.timestamp_field
  record = {n: row[n] for n in dataset.batch_schema().names}
  if ts and record.get(ts) is not None:
    record[ts] = micros_to_rfc3339(record[ts])
  return json_row(record)


class _ValidateAndShard(ValidateBatches):
  """Raw RecordBatch -> (shard of `shard_field`, by default the id, valid
  RecordBatch with SOURCE and POSITION), stamped with the batch's earliest
  event time, and dead-letter RecordBatches (DEAD_LETTER): one step, as the
  DirectRunner charges each step of each bundle."""

  def __init__(self, dataset: Dataset, reference_micros: Optional[int],
               num_shards: int, shard_field: Optional[str] = None):
    super().__init__(dataset, reference_micros)
    self._shards = num_shards
    self._field = shard_field or dataset.id_field

  def process(self, batch: pa.RecordBatch):
    for out in super().process(batch):
      if isinstance(out, beam.pvalue.TaggedOutput):
        _count_dead_letters(self._counters, out.value)
        yield out
        continue
      stamped = _earliest_event_time(out, self._dataset)
      at = getattr(stamped, 'timestamp', None)
      for shard in split_by_shard(out, self._field, self._shards):
        yield shard if at is None else window.TimestampedValue(shard, at)


def _count_dead_letters(counters: Counters, batch: pa.RecordBatch):
  counters.inc('records_dead_lettered', batch.num_rows)
  for item in pc.value_counts(batch.column('error_kind')).to_pylist():
    counters.inc(f'dead_letter.{item["values"]}', item['counts'])


class _FirstCopyWins(beam.DoFn):
  """(shard of the id, valid RecordBatch with SOURCE and POSITION) ->
  RecordBatch of the rows whose id this shard has not seen (main,
  `dataset.batch_schema()`), and a dead-letter RecordBatch of the later
  copies (DEAD_LETTER).

  In a stream the first copy to arrive wins; copies within one batch
  follow the batch rule (the earliest event time, then file and position),
  so an in-order stream keeps the batch job's copy. State, read and written
  once per batch, no timer: the ids of the shard's winners (id, event
  time, source, position) while the shard's newest event time is within
  `horizon` of theirs; a copy arriving after the stream has moved on that
  far is not recognised as a duplicate.
  """
  SEEN = ReadModifyWriteStateSpec('seen', PickleCoder())

  def __init__(self, dataset: Dataset, horizon_seconds: int):
    self._dataset = dataset
    self._horizon = horizon_seconds * MICROS

  def setup(self):
    self._counters = Counters()

  def process(self, element, seen=beam.DoFn.StateParam(SEEN)):
    _, batch = element
    dataset = self._dataset
    id_field, ts = dataset.id_field, dataset.timestamp_field
    keys = [id_field, ts, SOURCE, POSITION]
    table = pa.Table.from_batches([batch]).sort_by(
        [(k, 'ascending') for k in keys])
    ids = table.column(id_field).combine_chunks()
    n = len(ids)
    first = np.ones(n, bool)
    if n > 1:
      first[1:] = true_rows(pc.not_equal(ids.slice(1), ids.slice(0, n - 1)))
    known = seen.read()
    if known is not None and known.num_rows:
      newest = max(pc.max(known.column(ts)).as_py(),
                   pc.max(table.column(ts)).as_py())
      known = known.filter(pc.greater_equal(known.column(ts),
                                            newest - self._horizon))
    earlier = np.full(n, -1, np.int64)
    if known is not None and known.num_rows:
      earlier = pc.fill_null(pc.index_in(ids, value_set=known.column(
          id_field)), -1).to_numpy(zero_copy_only=False).astype(np.int64)
    keep = first & (earlier < 0)
    winners = table.filter(pa.array(keep))
    schema = dataset.batch_schema()
    if winners.num_rows:
      self._counters.inc('records_valid', winners.num_rows)
      yield pa.RecordBatch.from_arrays(
          [winners.column(name).combine_chunks() for name in schema.names],
          schema=schema)
    if not keep.all():
      copies = self._copies(table, keep, first, earlier, known)
      _count_dead_letters(self._counters, copies)
      yield beam.pvalue.TaggedOutput(DEAD_LETTER, copies)
    remembered = winners.select([id_field, ts, SOURCE, POSITION])
    if known is not None and known.num_rows:
      remembered = pa.concat_tables([known, remembered])
    seen.write(remembered.combine_chunks())

  def _copies(self, table, keep, first, earlier, known) -> pa.RecordBatch:
    """Dead-letter rows of the later copies (few: built one by one)."""
    firsts = np.maximum.accumulate(np.where(first, np.arange(len(keep)), 0))
    rows = []
    later = np.flatnonzero(~keep)
    copies = table.take(pa.array(later)).to_pylist()
    for i, row in zip(later, copies):
      if earlier[i] >= 0:
        where = known.slice(int(earlier[i]), 1).to_pylist()[0]
      else:
        where = table.slice(int(firsts[i]), 1).to_pylist()[0]
      rows.append(dead_letter_row(
          row[SOURCE], row[POSITION], 'duplicate', None,
          f'id {row[self._dataset.id_field]} already read at '
          f'{where[SOURCE]}:{where[POSITION]}',
          _as_raw_text(row, self._dataset)))
    return dead_letter_batch(rows)


class StreamingParseAndValidate(beam.PTransform):
  """PCollection[pa.RecordBatch] raw batches (transforms.stream_sources) ->
  {'valid': PCollection[pa.RecordBatch], 'dead_letter':
  PCollection[pa.RecordBatch]}, for unbounded input.

  The batch form's `BatchValidator` (the same dead-letter kinds and
  messages; a record only its per-record path can decide is decided
  alone) on each raw batch; valid batches have `dataset.batch_schema()`
  and are stamped with their earliest event time. Duplicates: valid rows
  travel as (shard of the id, RecordBatch) pairs (`num_shards` shards) to
  `_FirstCopyWins`, which keeps the first copy to arrive, within
  `dedupe_horizon` seconds of event time. Counters: records_read,
  records_valid, records_dead_lettered, dead_letter.<kind>.

  `shard_field` (default: the id) shards the dedupe by another field of
  the record instead, e.g. the entity of the history computed next: an
  entity's events then go through one dedupe shard, so a runner's
  channels (first in, first out) keep their arrival order up to the
  history step, which features computed on arrival need. Copies of a
  record share every field, so they still meet in one shard; two records
  with one id and different `shard_field` values are then not recognised
  as copies.
  """

  def __init__(self, dataset: Dataset, dedupe_horizon: int = 86400,
               reference_micros: Optional[int] = None,
               num_shards: int = 8, shard_field: Optional[str] = None):
    super().__init__()
    self._dataset = dataset
    self._horizon = dedupe_horizon
    self._reference = reference_micros
    self._shards = num_shards
    self._field = shard_field

  def expand(self, raw_batches):
    dataset = self._dataset
    parsed = raw_batches | 'ParseCheckRulesAndShardById' >> beam.ParDo(
        _ValidateAndShard(dataset, self._reference, self._shards,
                          self._field)).with_outputs(
                              DEAD_LETTER, main=VALID)
    if not dataset.has_id:
      # Ids are where records were read: no two records share one.
      valid = parsed[VALID] | 'DropReadPositions' >> beam.Map(
          lambda kv: _record_columns(kv[1], dataset.batch_schema()))
      return {VALID: valid, DEAD_LETTER: parsed[DEAD_LETTER]}
    deduped = (parsed[VALID]
               | 'DropLaterCopies' >> beam.ParDo(
                   _FirstCopyWins(dataset, self._horizon)).with_outputs(
                       DEAD_LETTER, main=VALID))
    dead = ((parsed[DEAD_LETTER], deduped[DEAD_LETTER])
            | 'AllDeadLetters' >> beam.Flatten())
    return {VALID: deduped[VALID], DEAD_LETTER: dead}
