"""CSV (.csv): a header line naming the columns, then one record per line
(a quoted field may span lines), decoded by pyarrow's CSV reader with
every column a string (the parser converts them). A repeated column in the
header makes every record malformed: which column holds the value cannot
be known."""

import csv
import io
from typing import Dict, Iterator, List, Optional

import numpy as np
import pyarrow as pa

from schemas.dataset import Dataset
from transforms.formats.base import open_binary
from transforms.formats.lines import (Lines, line_batches, lines_of,
                                      split_lines)
from transforms.formats.raw import BATCH_ROWS, raw_batch, unreadable_batch
from transforms.formats.text import BLOCK_BYTES, BOM, TextFormat

# Bytes that leave a line blank (a blank line is no record).
_BLANK = np.frombuffer(b' \t\r\n\x0b\x0c', np.uint8)


def _csv_row(line: str):
  try:
    return next(csv.reader(io.StringIO(line, newline=''))), None
  except csv.Error as e:
    return None, f'not valid CSV: {e}'
  except StopIteration:
    return [], None


def _quoted_records(data: bytes) -> Optional[Lines]:
  """The records of CSV bytes when a quoted field spans lines, else None
  (then every line is a record). A record goes on over the next line while
  it holds an odd number of quotes; a blank line inside it is kept, a
  '\r' before a line end is dropped."""
  if b'"' not in data:
    return None
  text = data.decode('utf-8', errors='replace')
  physical = text.split('\n')
  if all(line.count('"') % 2 == 0 for line in physical):
    return None
  records, pending, odd = [], [], False
  for line in physical:
    line = line[:-1] if line.endswith('\r') else line
    if not pending and not line.strip():
      continue
    pending.append(line)
    odd ^= line.count('"') % 2 == 1
    if not odd:
      records.append('\n'.join(pending))
      pending = []
  if pending:
    records.append('\n'.join(pending))
  return lines_of(records)


def _csv_block(data: bytes, rows: int, width: int) -> pa.Table:
  import pyarrow.csv as pcsv  # pylint: disable=g-import-not-at-top
  names = [f'c{i}' for i in range(width)]
  table = pcsv.read_csv(
      io.BytesIO(data),
      read_options=pcsv.ReadOptions(column_names=names, use_threads=False,
                                    block_size=max(len(data), 1 << 20)),
      parse_options=pcsv.ParseOptions(newlines_in_values=True),
      convert_options=pcsv.ConvertOptions(
          column_types={n: pa.string() for n in names}))
  if table.num_rows != rows:
    raise ValueError('CSV rows and lines differ')
  return table


class _Header:
  """The header's columns and how a block of records decodes under it."""

  def __init__(self, header: List[str], dataset: Dataset):
    self.width = len(header)
    self.index = {name: i for i, name in enumerate(header)}
    self.declared = [n for n in dataset.fields if n in self.index]
    self.schema = pa.schema([(n, pa.string()) for n in self.declared])
    repeated = sorted({n for n in header if header.count(n) > 1})
    # Which of the columns holds the value cannot be known: every record
    # is malformed, none silently takes one of them.
    self.problem = (f'column {repeated[0]!r} appears more than once in the '
                    'header') if repeated else None

  def decode_block(self, data, rows):
    table = _csv_block(data, rows, self.width)
    return pa.Table.from_arrays(
        [table.column(self.index[n]) for n in self.declared],
        schema=self.schema)

  def decode_line(self, line):
    row, problem = _csv_row(line)
    if row is not None and len(row) != self.width:
      problem = f'expected {self.width} columns, found {len(row)}'
    return row, problem

  def line_values(self, result):
    row, problem = result
    if problem:
      return None, problem, False
    return {n: row[self.index[n]] for n in self.declared}, None, False

  def batches(self, lines: Lines, first_line: int, path: str,
              first_position: int) -> Iterator[pa.RecordBatch]:
    if self.problem is None:
      yield from line_batches(lines, first_line, self.schema, path,
                              first_position, self.decode_block,
                              self.decode_line, self.line_values)
      return
    for a in range(first_line, len(lines), BATCH_ROWS):
      b = min(a + BATCH_ROWS, len(lines))
      nulls = pa.Table.from_arrays(
          [pa.nulls(b - a, pa.string()) for _ in self.declared],
          schema=self.schema)
      yield raw_batch(nulls, path, first_position + a - first_line,
                      raw=lines.text.slice(a, b - a).cast(pa.string()),
                      errors=[self.problem] * (b - a))


class Csv(TextFormat):
  """A header line, then one record per line."""

  name = 'csv'
  extensions = ('.csv',)
  header_records = 1

  def record_end(self, data: bytes) -> int:
    """The last line end outside quotes (an even number of quotes before
    it, counting from the block's start, which is a record's start)."""
    if b'"' not in data:
      return data.rfind(b'\n') + 1
    buffer = np.frombuffer(data, np.uint8)
    newlines = np.flatnonzero(buffer == 10)
    quotes_before = np.searchsorted(np.flatnonzero(buffer == 34), newlines)
    outside = newlines[quotes_before % 2 == 0]
    return int(outside[-1]) + 1 if len(outside) else 0

  def first_record(self, f, start: int):
    """A record starts after a line end outside quotes: the bytes from the
    file's start are scanned with their quote parity, as a whole read
    splits them, so a quoted field that spans lines across `start` stays
    one record and the records before are counted as a whole read counts
    them (blank lines outside quotes are none)."""
    if start == 0:
      return 0, 0
    f.seek(0)
    offset, quotes, content, count = 0, 0, False, 0
    while True:
      chunk = f.read(BLOCK_BYTES)
      if not chunk:
        return None
      buffer = np.frombuffer(chunk, np.uint8)
      newlines = np.flatnonzero(buffer == 10)
      quoted = np.cumsum(buffer == 34)
      outside = newlines[(quotes + quoted[newlines]) % 2 == 0]
      visible = np.cumsum(~np.isin(buffer, _BLANK))
      # Whether each record ending at an outside line end holds anything
      # but blanks (the first one also by what came before this chunk).
      upto = visible[outside]
      since = np.concatenate([[0], upto[:-1]])
      filled = upto - since > 0
      if len(filled):
        filled[0] |= content
      ahead = np.flatnonzero(offset + outside + 1 >= start)
      if len(ahead):
        at = int(ahead[0])
        return (offset + int(outside[at]) + 1,
                count + int(filled[:at + 1].sum()))
      count += int(filled.sum())
      tail = len(outside) and int(outside[-1]) + 1
      content = (content if not len(outside) else False) or bool(
          visible[-1] - (visible[tail - 1] if tail else 0) > 0)
      quotes += int(quoted[-1])
      offset += len(chunk)

  def finish_record(self, f, data: bytes) -> bytes:
    """The last record goes on to the first line end outside quotes (f is
    not read from again: what is read past it is dropped)."""
    odd = data[self.record_end(data):].count(b'"') % 2
    if not odd and data.endswith(b'\n'):
      return data
    pieces = [data]
    while True:
      chunk = f.read(1 << 16)
      if not chunk:
        return b''.join(pieces)
      buffer = np.frombuffer(chunk, np.uint8)
      newlines = np.flatnonzero(buffer == 10)
      quoted = np.cumsum(buffer == 34)
      ends = newlines[(odd + quoted[newlines]) % 2 == 0]
      if len(ends):
        pieces.append(chunk[:int(ends[0]) + 1])
        return b''.join(pieces)
      pieces.append(chunk)
      odd = (odd + int(quoted[-1])) % 2

  def records(self, data: bytes) -> Lines:
    return _quoted_records(data) or split_lines(data)

  def batches(self, path: str, start: int, end: Optional[int],
              dataset: Dataset) -> Iterator[pa.RecordBatch]:
    header = None
    if start > 0 and end is not None:
      with open_binary(path) as f:
        header_lines = split_lines(f.readline().removeprefix(BOM))
      header = self._header(
          header_lines.line(0) if len(header_lines) else '', dataset)
      if isinstance(header, Exception):
        yield unreadable_batch(path, 0, header)
        return
    for before, lines in self.blocks(path, start, end):
      first_line = 0
      if header is None:
        if not len(lines):
          continue
        header, first_line = self._header(lines.line(0), dataset), 1
      if isinstance(header, Exception):
        yield unreadable_batch(path, 0, header)
        return
      # Record line i of the file is record i - 1: the header is line 0.
      yield from header.batches(lines, first_line, path,
                                before + first_line - 1)

  def column_types(self, path: str) -> Optional[Dict[str, str]]:
    """The header's names, each a string (the parser converts the text)."""
    for _, lines in self.blocks(path):
      if len(lines):
        names, _ = _csv_row(lines.line(0))
        return {name: 'string' for name in names or ()}
    return {}

  @staticmethod
  def _header(line: str, dataset: Dataset):
    """The header of a line, or the error that it cannot be one."""
    names, error = _csv_row(line)
    if names is None:
      return ValueError(f'unreadable CSV header: {error}')
    return _Header(names, dataset)
