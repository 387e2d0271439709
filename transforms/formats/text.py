"""What the text formats (JSON lines, CSV) share: a file, or one byte range
of it, read as blocks of whole records of at most about BLOCK_BYTES.

Memory stays within a few blocks whatever a file holds once decompressed
(a small .gz may expand to gigabytes of blank lines). A .gz is read as one
stream: when it breaks (a truncated or corrupt file), the whole records
before the break are given and the error is raised after them. An
uncompressed file is read in byte ranges: a range holds the lines that
start in it, so one large file spreads over the workers of a distributed
runner.
"""

import abc
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from schemas.dataset import Dataset
from transforms.formats.base import Format, Range, open_binary
from transforms.formats.lines import Lines, split_lines

# Decompressed bytes per block; a record longer than this makes its block
# as long as the record.
BLOCK_BYTES = 4 << 20
# Bytes asked of the file at a time: what a break in a .gz may lose of the
# data it had decompressed, at most (only the records after the break).
_READ_BYTES = 1 << 16
# The UTF-8 byte-order mark some editors write at a file's start.
BOM = b'\xef\xbb\xbf'


def _count_lines(data: bytes) -> int:
  """Records in `data` (whole lines): when every line starts with a
  visible ASCII character, as JSON and CSV records do, no line is blank
  and counting newlines is enough; otherwise the lines are split."""
  buffer = np.frombuffer(data, np.uint8)
  starts = np.concatenate([[0], np.flatnonzero(buffer == 10) + 1])
  starts = starts[starts < len(buffer)]
  first = buffer[starts]
  if ((first > 32) & (first < 127)).all():
    return len(starts)
  return len(split_lines(data))


def _count_records(f, upto: int) -> int:
  """Records (non-blank lines) in the first `upto` bytes of f."""
  f.seek(0)
  count, left, tail = 0, upto, b''
  while left > 0:
    chunk = f.read(min(left, BLOCK_BYTES))
    if not chunk:
      break
    left -= len(chunk)
    data = tail + chunk
    cut = data.rfind(b'\n') + 1
    count += _count_lines(data[:cut])
    tail = data[cut:]
  return count + _count_lines(tail)


def _rest_of_line(f) -> bytes:
  """The bytes of f up to and with the next '\n' (or to the end)."""
  rest = []
  while True:
    chunk = f.read(1 << 16)
    if not chunk:
      break
    newline = chunk.find(b'\n')
    if newline >= 0:
      rest.append(chunk[:newline + 1])
      break
    rest.append(chunk)
  return b''.join(rest)


def _skip_to_line_start(f, start: int) -> Optional[int]:
  """Seeks f to the first line start at or after byte `start` and returns
  it; None when the file ends first."""
  if start == 0:
    f.seek(0)
    return 0
  f.seek(start - 1)
  if f.read(1) == b'\n':
    return start
  rest = _rest_of_line(f)
  if not rest.endswith(b'\n'):
    return None
  return start + len(rest)


class TextFormat(Format):
  """A format whose records are lines of text (a record may span lines
  where `record_end` says so). Subclasses give `record_end`, `records` and
  `batches`; `header_records` is how many records before the first are a
  header."""

  compressible = True
  keeps_text = True
  header_records = 0

  def ranges(self, path: str, size: int, split_bytes: int) -> List[Range]:
    del path
    return [(start, min(start + split_bytes, size))
            for start in range(0, size, split_bytes)]

  @abc.abstractmethod
  def record_end(self, data: bytes) -> int:
    """Where the last whole record of `data` ends (past its newline); 0
    when no record ends in it. `data` starts at a record."""

  @abc.abstractmethod
  def records(self, data: bytes) -> Lines:
    """The records of whole-record bytes."""

  def first_record(self, f, start: int) -> Optional[Tuple[int, int]]:
    """(where the first record at or after byte `start` begins, how many
    records come before it), or None when none begins: a record is a line."""
    first = _skip_to_line_start(f, start)
    if first is None:
      return None
    return first, (_count_records(f, first) if first > 0 else 0)

  def finish_record(self, f, data: bytes) -> bytes:
    """`data` (from a record's start) with the rest of its last record
    read from f, which is where `data` stops."""
    return data if data.endswith(b'\n') else data + _rest_of_line(f)

  def blocks(self, path: str, start: int = 0, end: Optional[int] = None,
             block_bytes: Optional[int] = None) -> Iterator[Tuple[int, Lines]]:
    """(records before the block in the file, the block's records) for
    the records that start in bytes [start, end) of the file (end None:
    all of it, the only way a .gz is read)."""
    block_bytes = block_bytes or BLOCK_BYTES
    with open_binary(path) as f:
      before, limit = 0, None
      if end is not None:
        found = self.first_record(f, start)
        if found is None or found[0] >= end:
          return   # no record starts in this range
        first, before = found
        f.seek(first)
        limit = end - first
      for data in self._whole_records(f, limit, block_bytes,
                                      at_file_start=start == 0):
        lines = self.records(data)
        yield before, lines
        before += len(lines)

  def _whole_records(self, f, limit: Optional[int], block_bytes: int,
                     at_file_start: bool) -> Iterator[bytes]:
    """Blocks of whole records of f from its position on; `limit`: the
    bytes to read before finishing the line in progress (a byte range)."""
    read = getattr(f, 'read1', f.read)   # one read: a break loses little
    tail, left, first = b'', limit, at_file_start
    while True:
      pieces, have, done = [tail], len(tail), False
      try:
        while have < block_bytes or len(pieces) == 1:
          want = _READ_BYTES if left is None else min(_READ_BYTES, left)
          piece = read(want) if want > 0 else b''
          if not piece:
            done = True
            break
          pieces.append(piece)
          have += len(piece)
          if left is not None:
            left -= len(piece)
      except Exception:
        # A break: the whole records before it stand.
        data = b''.join(pieces)
        if first:
          data = data.removeprefix(BOM)
        cut = self.record_end(data)
        if cut:
          yield data[:cut]
        raise
      data = b''.join(pieces)
      del pieces
      if first:
        data, first = data.removeprefix(BOM), False
      if done:
        if limit is not None and data:
          data = self.finish_record(f, data)   # the last record goes on
        if data:
          yield data
        return
      cut = self.record_end(data)
      if cut:
        tail = data[cut:]
        yield data[:cut]
      else:
        tail = data   # one record longer than a block: read on

  def record_texts(self, path: str, dataset: Dataset,
                   positions: Sequence[int]) -> dict:
    """{position: the record's text as written}."""
    del dataset
    wanted = sorted(set(positions))
    found = {}
    try:
      for before, lines in self.blocks(path):
        for p in wanted:
          i = p + self.header_records - before
          if 0 <= i < len(lines):
            found[p] = lines.line(i)
    except Exception:  # pylint: disable=broad-except
      pass   # a break: the records before it were found
    return found
