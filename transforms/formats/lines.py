"""Record lines of text formats: bytes split at '\n' into Arrow strings,
and the decoding of a block of lines with a fast block decoder, falling
back to one line at a time around the lines it refuses.

A block of lines that pyarrow refuses is split around the line it names
(or halved) until the bad lines stand alone and are decoded one by one, so
one bad record costs a few re-reads, not a slow batch.
"""

import base64
import dataclasses
import re
from typing import Iterator, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from transforms.common import true_rows
from transforms.formats.raw import BATCH_ROWS, ERROR, raw_batch

# A refused block of at most this many lines is decoded line by line.
_SMALL_BLOCK = 8
_DENSE = 4
_ROW_IN_ERROR = re.compile(r' in row (\d+)')
# Bytes split into lines at a time (about: to the next line end).
_SCAN_BYTES = 1 << 18

NOT_UTF8 = 'not valid UTF-8 (U+FFFD in raw); the bytes as read, base64: '


@dataclasses.dataclass(frozen=True)
class Lines:
  """The record lines of a run of bytes: line i is text[i], stored at
  data[starts[i]:ends[i]] (ends[i] past its newline). Blank lines are not
  records and are left out; so are the '\r' and '\n' that end a line."""
  data: bytes
  text: pa.Array           # large_string, one per record line
  starts: np.ndarray
  ends: np.ndarray
  # Record lines that were not UTF-8 -> their bytes as read (the text has
  # U+FFFD in their place).
  not_utf8: Optional[dict] = None

  def __len__(self):
    return len(self.starts)

  def block(self, a: int, b: int) -> bytes:
    """The bytes of lines [a, b), blank lines between them included."""
    return self.data[self.starts[a]:self.ends[b - 1]]

  def line(self, i: int) -> str:
    return self.text[i].as_py()


def _scan(data: bytes, first: int, stop: int
          ) -> Tuple[pa.Array, np.ndarray, np.ndarray]:
  """(text, starts, ends) of the lines in data[first:stop] (whole lines)
  that hold a byte other than an ASCII blank (tab to carriage return,
  space: blanks to Arrow's trim too); the rest are blank lines."""
  buffer = np.frombuffer(data, np.uint8, stop - first, first)
  newlines = np.flatnonzero(buffer == 10)
  offsets = np.empty(len(newlines) + 1, np.int64)
  offsets[0] = 0
  np.add(newlines, 1, out=offsets[1:])
  if stop - first and buffer[-1] != 10:
    offsets = np.append(offsets, stop - first)
  # Bytes that are not blanks, counted up to each line's end: a line with
  # some is a candidate record.
  visible = np.cumsum((buffer != 32) & ((buffer < 9) | (buffer > 13)),
                      dtype=np.int32 if stop - first < 1 << 31 else np.int64)
  counts = np.zeros(len(offsets), visible.dtype)
  counts[1:len(newlines) + 1] = visible[newlines]
  if len(offsets) > len(newlines) + 1:
    counts[-1] = visible[-1]
  del visible, newlines
  candidates = np.flatnonzero(counts[1:] > counts[:-1])
  text = pa.LargeStringArray.from_buffers(
      len(offsets) - 1, pa.py_buffer(offsets),
      pa.py_buffer(data).slice(first, stop - first)).take(
          pa.array(candidates))
  return (text, offsets[:-1][candidates] + first,
          offsets[1:][candidates] + first)


def split_lines(data: bytes) -> Lines:
  """Splits at '\n' with NumPy, _SCAN_BYTES at a time, and makes every line
  that is not blank an Arrow string: a run of blank lines costs a few bytes
  per line for a moment, never an Arrow string each. Lines that are not
  UTF-8 are kept as read in `not_utf8` (their records become dead
  letters), with U+FFFD in the text."""
  texts, starts, ends, first = [], [], [], 0
  while first < len(data):
    stop = data.find(b'\n', first + _SCAN_BYTES - 1) + 1 or len(data)
    text, s, e = _scan(data, first, stop)
    texts.append(text)
    starts.append(s)
    ends.append(e)
    first = stop
  if not texts:
    return Lines(data, pa.array([], pa.large_string()),
                 np.zeros(0, np.int64), np.zeros(0, np.int64))
  text = pa.concat_arrays(texts)
  try:
    text.validate(full=True)
  except pa.ArrowInvalid:
    return _replaced_lines(data)
  text = pc.utf8_rtrim(text, characters='\r\n')
  record = true_rows(pc.not_equal(pc.utf8_trim_whitespace(text), ''))
  keep = np.flatnonzero(record)
  return Lines(data, text.take(pa.array(keep)),
               np.concatenate(starts)[keep], np.concatenate(ends)[keep])


def _replaced_lines(data: bytes) -> Lines:
  """split_lines of bytes that are not all UTF-8: the lines that are not
  are found one by one and kept as read; the rest is read with U+FFFD in
  their place (a replacement never swallows a newline, so lines line up)."""
  offsets = np.concatenate([[0], np.flatnonzero(
      np.frombuffer(data, np.uint8) == 10) + 1])
  if not data.endswith(b'\n'):
    offsets = np.append(offsets, len(data))
  bad = []
  for i in range(len(offsets) - 1):
    try:
      data[offsets[i]:offsets[i + 1]].decode('utf-8')
    except UnicodeDecodeError:
      bad.append(i)
  lines = split_lines(data.decode('utf-8', errors='replace').encode('utf-8'))
  # Physical line -> record line: a bad line is never blank, and the
  # replaced bytes have the same newlines.
  starts = np.concatenate([[0], np.flatnonzero(
      np.frombuffer(lines.data, np.uint8) == 10) + 1])
  record_of = {int(s): i for i, s in enumerate(lines.starts)}
  replaced_starts = starts[bad]
  not_utf8 = {record_of[int(s)]: data[offsets[i]:offsets[i + 1]].rstrip(
      b'\r\n') for i, s in zip(bad, replaced_starts) if int(s) in record_of}
  return dataclasses.replace(lines, not_utf8=not_utf8)


def lines_of(records: List[str]) -> Lines:
  """Lines over given records (which may hold newlines), '\n' between."""
  encoded = [r.encode('utf-8') for r in records]
  lengths = np.array([len(e) + 1 for e in encoded], np.int64)
  ends = np.cumsum(lengths)
  starts = ends - lengths
  return Lines(b'\n'.join(encoded) + b'\n',
               pa.array(records, pa.large_string()), starts, ends)


def _mark_not_utf8(batch: pa.RecordBatch, lines: Lines, a: int, b: int
                   ) -> pa.RecordBatch:
  """Sets ERROR on the rows of lines [a, b) that were not UTF-8: such a
  record is malformed, and its bytes are kept in the message (base64)."""
  rows = {i - a: lines.not_utf8[i] for i in lines.not_utf8 if a <= i < b}
  if not rows:
    return batch
  errors = batch.column(ERROR).to_pylist()
  for row, raw in rows.items():
    errors[row] = NOT_UTF8 + base64.b64encode(raw).decode('ascii')
  index = batch.schema.get_field_index(ERROR)
  arrays = list(batch.columns)
  arrays[index] = pa.array(errors, pa.string())
  return pa.RecordBatch.from_arrays(arrays, schema=batch.schema)


def _decode_lines(lines: Lines, a: int, b: int, decode_block, decode_line
                  ) -> List[Tuple[str, object]]:
  """Segments covering lines [a, b) in order: ('block', Table) for runs the
  fast decoder took, ('line', decode_line(text)) for single lines.

  A refused block is split around the row pyarrow names, or halved, so a
  few bad lines cost a few re-reads of their neighbours. A work list, not
  recursion: a block of thousands of refused lines (a column of numbers
  declared a string) went over Python's recursion limit and the whole
  block became one unreadable-file row. When the named row is the block's
  first `_DENSE` times in a row, the lines are bad one after another: the
  next `_SMALL_BLOCK` are decoded alone, instead of re-reading the rest of
  the block once per bad line."""
  out, todo, streak = [], [('range', a, b)], 0
  while todo:
    item = todo.pop()
    if item[0] == 'line':
      out.append(('line', decode_line(lines.line(item[1]))))
      continue
    _, a, b = item
    if a >= b:
      continue
    if streak >= _DENSE:
      end = min(b, a + _SMALL_BLOCK)
      out += [('line', decode_line(lines.line(i))) for i in range(a, end)]
      todo.append(('range', end, b))
      streak = 0
      continue
    try:
      out.append(('block', decode_block(lines.block(a, b), b - a)))
      streak = 0
      continue
    except (pa.ArrowException, ValueError) as e:
      match = _ROW_IN_ERROR.search(str(e))
    if match and int(match.group(1)) < b - a:
      bad = a + int(match.group(1))
      streak = streak + 1 if bad == a else 0
      # Popped last first: [a, bad), the bad line, then the rest.
      todo += [('range', bad + 1, b), ('line', bad), ('range', a, bad)]
    elif b - a <= _SMALL_BLOCK:
      out += [('line', decode_line(lines.line(i))) for i in range(a, b)]
    else:
      half = (a + b) // 2
      todo += [('range', half, b), ('range', a, half)]
  return out


def _assemble(segments, schema: pa.Schema, source: str, first: int,
              raw: pa.Array, line_values) -> pa.RecordBatch:
  """Segments of one block of lines -> one raw batch, in line order.

  `line_values(result)` turns one line's decode result into (values row or
  None, error or None, undecoded flag)."""
  raw = raw.cast(pa.string())
  if len(segments) == 1 and segments[0][0] == 'block':
    return raw_batch(segments[0][1], source, first, raw=raw)
  tables, errors, undecoded = [], [], []
  for kind, value in segments:
    if kind == 'block':
      tables.append(value)
      errors += [None] * value.num_rows
      undecoded += [False] * value.num_rows
    else:
      row, error, flag = line_values(value)
      tables.append(pa.Table.from_pylist([row or {}], schema=schema))
      errors.append(error)
      undecoded.append(flag)
  table = pa.concat_tables(tables)
  return raw_batch(table, source, first, raw=raw, errors=errors,
                   undecoded=np.array(undecoded, bool))


def line_batches(lines: Lines, first_line: int, schema: pa.Schema,
                 source: str, first_position: int, decode_block,
                 decode_line, line_values) -> Iterator[pa.RecordBatch]:
  """Raw batches of BATCH_ROWS lines from line `first_line` on; line i is
  record first_position + i - first_line."""
  for a in range(first_line, len(lines), BATCH_ROWS):
    b = min(a + BATCH_ROWS, len(lines))
    segments = _decode_lines(lines, a, b, decode_block, decode_line)
    batch = _assemble(segments, schema, source,
                      first_position + a - first_line,
                      lines.text.slice(a, b - a), line_values)
    yield _mark_not_utf8(batch, lines, a, b) if lines.not_utf8 else batch
