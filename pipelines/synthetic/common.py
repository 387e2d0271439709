"""What both generators (transactions, interactions) share: the broken
record's shape and where it goes, the text writers (JSON lines, CSV,
optionally gzip, byte-identical reruns), the output format of a path, the
start time, and the flags both generator commands take.
"""

import argparse
import csv
import gzip
import io
import json
from typing import Dict, List, NamedTuple, Optional, Sequence, Union

from pipelines.base.errors import UsageError
from transforms.parse import rfc3339_to_micros
from transforms.formats import (FORMATS, InputError, compressible_formats,
                                format_of, text_formats)

DEFAULT_START = '2026-09-01T00:00:00Z'
TEXT_FORMATS = text_formats()


class Broken(NamedTuple):
  """A deliberately broken record and where it goes.

  `record` is a dict (typed-level errors, any format) or a raw text line
  (malformed, JSON lines/CSV only); it is inserted after clean record
  `position`. `kind` is the parser's expected error kind.
  """
  kind: str
  record: Union[dict, str]
  position: int


def insert_broken(clean: List[dict], broken: Sequence[Broken]) -> list:
  """Clean records with each broken one inserted after its position."""
  after: Dict[int, list] = {}
  for b in broken:
    after.setdefault(b.position, []).append(b.record)
  out = []
  for i, record in enumerate(clean):
    out.append(record)
    out.extend(after.get(i, ()))
  return out


def parse_start(text: str) -> int:
  """RFC 3339 with a zone -> epoch seconds (floored to the second)."""
  try:
    return rfc3339_to_micros(text) // 1_000_000
  except ValueError as e:
    raise UsageError(f'--start: {e}') from None


# Writers -------------------------------------------------------------------
_JSON = json.JSONEncoder(separators=(',', ':'))  # built once: faster


def json_line(record: dict) -> str:
  return _JSON.encode(record)


def csv_line(values: Sequence) -> str:
  out = io.StringIO()
  csv.writer(out, lineterminator='').writerow(
      ['' if v is None else v for v in values])
  return out.getvalue()


def output_format(path: str, explicit: Optional[str] = None) -> str:
  """The format to write: `explicit`, else from the extension."""
  if explicit is not None and explicit not in FORMATS:
    raise UsageError(f'unknown --format {explicit!r}; use one of '
                     f'{", ".join(FORMATS)}')
  try:
    fmt = format_of(path, explicit)
  except InputError:
    raise UsageError(f'cannot tell the format of {path}: use a .jsonl/.csv/'
                     '.avro/.parquet name (.gz for jsonl/csv) or pass '
                     '--format') from None
  if path.endswith('.gz') and fmt not in compressible_formats():
    raise UsageError(f'{fmt} files are compressed inside; drop the .gz '
                     f'from {path}')
  return fmt


def open_text(path: str):
  raw = open(path, 'wb')
  if path.endswith('.gz'):  # no name, no mtime: byte-identical reruns
    raw = gzip.GzipFile(filename='', mode='wb', fileobj=raw, mtime=0,
                        compresslevel=6)
  return io.TextIOWrapper(raw, encoding='utf-8', newline='')


def write_jsonl(records, path, names):
  del names
  with open_text(path) as f:
    for record in records:
      f.write(record if isinstance(record, str) else json_line(record))
      f.write('\n')


def write_csv(records, path, names):
  with open_text(path) as f:
    f.write(csv_line(names) + '\n')
    for record in records:
      f.write(record if isinstance(record, str) else
              csv_line([record.get(n) for n in names]))
      f.write('\n')


# The flags of both generator commands ---------------------------------------
class Parser(argparse.ArgumentParser):
  """Bad flags: one line on stderr and exit 2, no usage dump."""

  def error(self, message):
    self.exit(2, f'{self.prog}: error: {message}\n')


def add_common_flags(p: argparse.ArgumentParser, users_help: str):
  """The flags every generator takes (output, format, size, seed, period,
  broken records), so both datasets' commands read the same."""
  p.add_argument('--output', required=True,
                 help='File to write (.jsonl/.csv, optionally .gz; .avro; '
                 '.parquet).')
  p.add_argument('--format', default=None,
                 help=f'Override the format: {", ".join(FORMATS)}.')
  p.add_argument('--rows', type=int, default=30000,
                 help='Clean records to generate (default 30000).')
  p.add_argument('--users', type=int, default=None, help=users_help)
  p.add_argument('--seed', type=int, default=7, help='Random seed.')
  p.add_argument('--start', default=DEFAULT_START,
                 help=f'RFC 3339 start (default {DEFAULT_START}).')
  p.add_argument('--days', type=int, default=28,
                 help='Length of the period in days (default 28).')
  p.add_argument('--broken', type=int, default=0,
                 help='Broken records to mix in (default 0).')


# Broken records both generators make ----------------------------------------
def truncated(rec: dict, fmt: str, csv_columns: int) -> str:
  """A record cut short: a CSV row of its first `csv_columns` values (too
  few columns), or the first half of its JSON line."""
  if fmt == 'csv':
    return csv_line(list(rec.values())[:csv_columns])
  line = json_line(rec)
  return line[:len(line) // 2]


def not_a_record(rec: dict, fmt: str) -> str:
  """A line that is no record: a CSV row with an extra column, or text."""
  if fmt == 'csv':
    return csv_line(list(rec.values()) + ['manual-override'])
  return 'export interrupted: connection reset by peer'
