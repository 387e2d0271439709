"""Timestamps as a declaration describes them, per value and per column.

A timestamp field is, by its declaration:
  * RFC 3339 with a zone (the default): '2026-10-01T10:00:00Z';
  * with `zone:` (an IANA name), values without an offset are local times
    in that zone ('2011-01-01 05:00:00' or '2011-01-01T05:00:00');
  * with `format:` (strptime), values in that layout, in `zone` (UTC if no
    zone is declared) unless the format has %z;
  * with `from: {date, hour}`, composed from a date field (in
    `date_format`, default %Y-%m-%d) plus an int hour field, in `zone`.

Local times: an ambiguous time (a DST fall-back hour) is its earlier
instant, as Python's fold=0; a time that does not exist (a DST gap) is an
error. The per-value functions define the result (they raise
`TimestampError` with the message a dead-letter row carries); the column
functions compute the same values for whole Arrow columns and return which
rows they are sure of, leaving the others to the per-value path.
"""

import datetime
import functools
from typing import Optional, Tuple
import zoneinfo

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.base.errors import UsageError
from schemas.dataset import Field
from transforms.common import MICROS, to_micros, true_rows

_UTC = datetime.timezone.utc
_NAIVE_FORMATS = ('%Y-%m-%dT%H:%M:%S', '%Y-%m-%d %H:%M:%S')


class TimestampError(UsageError, ValueError):
  """A value is not a timestamp of its field's declaration."""


@functools.lru_cache(maxsize=None)
def _zone(name: Optional[str]):
  return zoneinfo.ZoneInfo(name) if name else _UTC


def localize(naive: datetime.datetime, field: Field) -> int:
  """A naive local time in the field's zone -> epoch microseconds."""
  zone = _zone(field.zone)
  local = naive.replace(tzinfo=zone)
  # A time in a DST gap does not survive the round trip through UTC.
  if (local.astimezone(_UTC).astimezone(zone).replace(tzinfo=None) !=
      naive):
    raise TimestampError(f'{field.name}: {naive.isoformat()} does not exist '
                         f'in {field.zone} (a daylight-saving gap)')
  return to_micros(local)


def parse_value(field: Field, text: str) -> int:
  """A timestamp field's text -> epoch microseconds."""
  if field.format:
    try:
      parsed = datetime.datetime.strptime(text.strip(), field.format)
    except ValueError:
      raise TimestampError(f'{field.name}: {text!r} does not match '
                           f'{field.format}') from None
  else:
    stripped = text.strip()
    if stripped.endswith(('Z', 'z')):
      stripped = stripped[:-1] + '+00:00'
    try:
      parsed = datetime.datetime.fromisoformat(stripped)
    except ValueError:
      raise TimestampError(f'{field.name}: {text!r} is not an RFC 3339 '
                           'timestamp') from None
    if parsed.tzinfo is None and not field.zone:
      raise TimestampError(f'{field.name}: {text!r} has no time zone; use Z '
                           'or an offset')
  if parsed.tzinfo is None:
    return localize(parsed, field)
  return to_micros(parsed)


def compose_value(field: Field, date_text: str, hour: Optional[int]) -> int:
  """A composed timestamp: date text (+ hour) in the field's zone."""
  date_format = field.compose.get('date_format', '%Y-%m-%d')
  try:
    day = datetime.datetime.strptime(date_text.strip(), date_format)
  except ValueError:
    raise TimestampError(f'{field.name}: date {date_text!r} does not match '
                         f'{date_format}') from None
  if hour is not None:
    if not 0 <= hour <= 23:
      raise TimestampError(f'{field.name}: hour {hour} is not 0-23')
    day += datetime.timedelta(hours=hour)
  return localize(day, field)


# Whole columns ----------------------------------------------------------------
def _strptime(column: pa.Array, fmt: str) -> Tuple[np.ndarray, np.ndarray]:
  """(naive micros, rows sure): Arrow's strptime, trusted only where the
  value prints back exactly (Python's strptime is laxer, e.g. about
  leading zeros: those rows are left to it)."""
  parsed = pc.strptime(column, format=fmt, unit='us', error_is_null=True)
  same = pc.equal(pc.strftime(parsed, format=fmt), pc.utf8_trim_whitespace(
      column))
  sure = true_rows(same)
  micros = pc.fill_null(parsed.cast(pa.int64()), 0).to_numpy(
      zero_copy_only=False).astype(np.int64)
  return micros, sure


def localize_column(naive: np.ndarray, field: Field
                    ) -> Tuple[np.ndarray, np.ndarray]:
  """Naive local micros -> (epoch micros, rows sure): ambiguous times take
  the earlier instant; times in a DST gap are not sure (the per-value path
  rejects them)."""
  if not field.zone or field.zone == 'UTC':
    return naive, np.ones(len(naive), bool)
  local = pa.array(naive, pa.timestamp('us'))
  early = pc.assume_timezone(local, field.zone, ambiguous='earliest',
                             nonexistent='earliest')
  late = pc.assume_timezone(local, field.zone, ambiguous='earliest',
                            nonexistent='latest')
  sure = true_rows(pc.equal(early, late))
  return early.cast(pa.int64()).to_numpy(zero_copy_only=False), sure


def parse_local_column(column: pa.Array, field: Field, rows: np.ndarray
                       ) -> Tuple[np.ndarray, np.ndarray]:
  """Texts of a field with `format` or `zone` -> (micros, rows sure), for
  the rows `rows` (the others: 0, not sure). Formats with %z are left to
  the per-value path."""
  n = len(column)
  micros, sure = np.zeros(n, np.int64), np.zeros(n, bool)
  if field.format and '%z' in field.format:
    return micros, sure
  formats = (field.format,) if field.format else _NAIVE_FORMATS
  for fmt in formats:
    todo = np.flatnonzero(rows & ~sure)
    if not len(todo):
      break
    naive, ok = _strptime(column.take(pa.array(todo)), fmt)
    micros[todo[ok]] = naive[ok]
    sure[todo[ok]] = True
  done = np.flatnonzero(sure)
  if len(done):
    utc, ok = localize_column(micros[done], field)
    micros[done] = utc
    sure[done] = ok
  return micros, sure


def compose_column(field: Field, dates: pa.Array, hours: Optional[pa.Array]
                   ) -> Tuple[np.ndarray, np.ndarray]:
  """Typed date (string) and hour (int64) columns -> (micros, rows sure);
  rows with a missing part are not sure."""
  date_format = field.compose.get('date_format', '%Y-%m-%d')
  naive, sure = _strptime(dates, date_format)
  if hours is not None:
    h = pc.fill_null(hours, -1).to_numpy(zero_copy_only=False)
    sure &= (h >= 0) & (h <= 23)
    naive = naive + np.clip(h, 0, 23) * 3600 * MICROS
  utc, ok = localize_column(naive, field)
  return utc, sure & ok
