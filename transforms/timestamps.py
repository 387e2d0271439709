"""Timestamps as a declaration describes them, per value and per column.

A timestamp field is, by its declaration:
  * RFC 3339 with a zone (the default): '2026-10-01T10:00:00Z';
  * with `zone:` (an IANA name), values without an offset are local times
    in that zone ('2011-01-01 05:00:00' or '2011-01-01T05:00:00');
  * with `format:` (strptime), values in that layout, in `zone` (UTC if no
    zone is declared) unless the format has %z;
  * with `from: {date, hour}`, composed from a date field (in
    `date_format`, default %Y-%m-%d) plus an int hour field (0-23), in
    `zone`; `year` gives the year a date format without one lacks (day of
    year '%j', '%m-%d'); `since` replaces the date field by a fixed date, the
    hour then counting from its midnight (hour of the year, 0-8783, or
    more).

Local times: an ambiguous time (a DST fall-back hour) is its earlier
instant, as Python's fold=0; a time that does not exist (a DST gap) is an
error. The per-value functions define the result (they raise
`TimestampError` with the message a dead-letter row carries); the column
functions compute the same values for whole Arrow columns and return which
rows they are sure of, leaving the others to the per-value path. Arrow's
strptime is trusted only with formats `arrow_parses` accepts: it ignores
some directives ('%j' alone gives 1899-12-31, which prints back as '365')
and fills missing parts otherwise than Python. Other formats are parsed by
the per-value definition itself, once per distinct text of the column.
"""

import datetime
import functools
from typing import Callable, Optional, Tuple
import zoneinfo

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.base.errors import UsageError
from schemas.dataset import Field, time_directives
from transforms.common import MICROS, to_micros, true_rows

_UTC = datetime.timezone.utc
_NAIVE_FORMATS = ('%Y-%m-%dT%H:%M:%S', '%Y-%m-%d %H:%M:%S')
# Directives Arrow's strptime reads as Python's does, given a year, a month
# and a day (without them Arrow's default date is 1899-12-31, Python's
# 1900-01-01); '%%' is a literal.
_ARROW_DIRECTIVES = frozenset('YymdHMS%')
# Local times from this one on are localised per value (see localize_column).
_ZONE_RULES_END = 2114380800 * MICROS      # 2037-01-01T00:00:00
# With `from.since`, the hours a composed time may count from the date.
MAX_HOURS_FROM_DATE = 100 * 8784


class TimestampError(UsageError, ValueError):
  """A value is not a timestamp of its field's declaration."""


def arrow_parses(fmt: str) -> bool:
  """True when Arrow's strptime, checked by printing back, gives what
  Python's strptime gives for every value of `fmt`."""
  used = set(time_directives(fmt))
  return (used <= _ARROW_DIRECTIVES and bool(used & {'Y', 'y'}) and
          {'m', 'd'} <= used)


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


def _date_format(field: Field) -> str:
  """The format a composed date is read with: a declared `year` is put
  before the text ('2011 365' in '%Y %j')."""
  date_format = field.compose.get('date_format', '%Y-%m-%d')
  if field.compose.get('year') is not None:
    return f'%Y {date_format}'
  return date_format


def _date_text(field: Field, text: str) -> str:
  year = field.compose.get('year')
  return text.strip() if year is None else f'{year} {text.strip()}'


def compose_date(field: Field, date_text: str) -> datetime.datetime:
  """The naive local date (and time) a composed timestamp starts from."""
  since = field.compose.get('since')
  if since is not None:
    return datetime.datetime.fromisoformat(since)
  try:
    return datetime.datetime.strptime(_date_text(field, date_text),
                                      _date_format(field))
  except ValueError:
    date_format = field.compose.get('date_format', '%Y-%m-%d')
    year = field.compose.get('year')
    raise TimestampError(f'{field.name}: date {date_text!r} does not match '
                         f'{date_format}' + (f' in {year}' if year else '')
                         ) from None


def compose_value(field: Field, date_text: Optional[str],
                  hour: Optional[int]) -> int:
  """A composed timestamp: date text (or the declared date) + hour, in the
  field's zone."""
  day = compose_date(field, date_text)
  if hour is not None:
    if field.compose.get('since') is not None:
      if not 0 <= hour <= MAX_HOURS_FROM_DATE:
        raise TimestampError(f'{field.name}: hour {hour} is not 0-'
                             f'{MAX_HOURS_FROM_DATE} (hours from '
                             f'{field.compose["since"]})')
    elif not 0 <= hour <= 23:
      raise TimestampError(f'{field.name}: hour {hour} is not 0-23')
    day += datetime.timedelta(hours=hour)
  return localize(day, field)


# Whole columns ----------------------------------------------------------------
def _naive_micros(value: datetime.datetime) -> int:
  return to_micros(value.replace(tzinfo=_UTC))


def _by_distinct_text(column: pa.Array, parse: Callable[[str], int]
                      ) -> Tuple[np.ndarray, np.ndarray]:
  """(parse(text) of each row, rows parsed): the per-value definition run
  once per distinct text (dates repeat: 365 of them in an hourly year).
  Null rows and texts it refuses are not parsed."""
  n = len(column)
  texts = pc.unique(column.drop_null()) if n else column
  if not len(texts):
    return np.zeros(n, np.int64), np.zeros(n, bool)
  values, ok = np.zeros(len(texts), np.int64), np.zeros(len(texts), bool)
  for i, text in enumerate(texts.to_pylist()):
    try:
      values[i], ok[i] = parse(text), True
    except TimestampError:
      pass
  index = pc.index_in(column, value_set=texts)
  found = true_rows(index.is_valid())
  at = pc.fill_null(index, 0).to_numpy(zero_copy_only=False)
  return np.where(found, values[at], 0), found & ok[at]


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
  # Arrow's zone rules end in 2037 (the system's zone files list
  # transitions that far; Python's zoneinfo goes on with their rule).
  sure = true_rows(pc.equal(early, late)) & (naive < _ZONE_RULES_END)
  return early.cast(pa.int64()).to_numpy(zero_copy_only=False), sure


def parse_local_column(column: pa.Array, field: Field, rows: np.ndarray
                       ) -> Tuple[np.ndarray, np.ndarray]:
  """Texts of a field with `format` or `zone` -> (micros, rows sure), for
  the rows `rows` (the others: 0, not sure). Formats with %z are left to
  the per-value path."""
  n = len(column)
  micros, sure = np.zeros(n, np.int64), np.zeros(n, bool)
  if field.format and not arrow_parses(field.format):
    todo = np.flatnonzero(rows)
    values, ok = _by_distinct_text(column.take(pa.array(todo, pa.int64())),
                                   functools.partial(parse_value, field))
    micros[todo], sure[todo] = values, ok
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


def compose_column(field: Field, dates: Optional[pa.Array],
                   hours: Optional[pa.Array], n: int
                   ) -> Tuple[np.ndarray, np.ndarray]:
  """Typed date (string; None with a declared date `since`) and hour (int64)
  columns of `n` rows -> (micros, rows sure); rows with a missing part are
  not sure."""
  if field.compose.get('since') is not None:
    start = _naive_micros(compose_date(field, None))
    naive, sure = np.full(n, start, np.int64), np.ones(n, bool)
    most = MAX_HOURS_FROM_DATE
  elif arrow_parses(_date_format(field)):
    if field.compose.get('year') is not None:
      dates = pc.binary_join_element_wise(str(field.compose['year']),
                                          dates, ' ')
    naive, sure = _strptime(dates, _date_format(field))
    most = 23
  else:
    naive, sure = _by_distinct_text(dates, lambda text: _naive_micros(
        compose_date(field, text)))
    most = 23
  if hours is not None:
    h = pc.fill_null(hours, -1).to_numpy(zero_copy_only=False)
    sure &= (h >= 0) & (h <= most)
    naive = naive + np.clip(h, 0, most) * 3600 * MICROS
  utc, ok = localize_column(naive, field)
  return utc, sure & ok
