"""What an input format is: the interface every module of this package
implements (as tfx-bsl's TFXIO does), and opening a file of any format.

A format says what it can do, so nothing outside its module branches on
its name: its file extensions, whether a whole-file .gz of it is a stream
of its records, whether a raw batch keeps each record's text, how a large
file splits into ranges, and the reader of one range into raw batches
(transforms.formats.raw).
"""

import abc
import contextlib
import gzip
from typing import (ClassVar, Dict, Iterator, List, Optional, Sequence,
                    Tuple)

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
import pyarrow as pa

from pipelines.base.errors import UsageError
from schemas.dataset import Dataset
from transforms.formats.raw import POSITION, raw_records

# Where a range starts and ends: byte offsets, or row groups (Parquet);
# end None: to the end of the file.
Range = Tuple[int, Optional[int]]


class InputError(UsageError, ValueError):
  """The input cannot be read at all (no files, unknown format)."""


@contextlib.contextmanager
def open_binary(path: str):
  """A binary file object, gunzipped for .gz names, local or remote."""
  with FileSystems.open(
      path, compression_type=CompressionTypes.UNCOMPRESSED) as raw:
    if path.endswith('.gz'):
      with gzip.GzipFile(fileobj=raw) as f:
        yield f
    else:
      yield raw


class Format(abc.ABC):
  """One input format. Subclasses set the class attributes and `batches`;
  the other hooks have defaults that read the whole file."""

  name: ClassVar[str]
  # Lower-case file name endings that name this format (before any .gz).
  extensions: ClassVar[Tuple[str, ...]]
  # A .gz of the whole file is read as one stream, in bounded blocks, and
  # the records before a break in it stand (text formats). Formats that
  # compress inside (Avro, Parquet) are False: their writers refuse .gz.
  compressible: ClassVar[bool] = False
  # RAW holds each record's text as written; otherwise a record's
  # dead-letter text is built from its values.
  keeps_text: ClassVar[bool] = False

  def ranges(self, path: str, size: int, split_bytes: int) -> List[Range]:
    """How an uncompressed file larger than `split_bytes` is split."""
    del path, size, split_bytes
    return [(0, None)]

  def column_types(self, path: str) -> Optional[Dict[str, str]]:
    """{column: declared type its values decode as} of a file, for a
    reader that decodes only declared fields (a draft declaration needs
    them before anything is declared); None when `batches` gives every
    column of the file, in its own types, whatever is declared."""
    del path
    return None

  @abc.abstractmethod
  def batches(self, path: str, start: int, end: Optional[int],
              dataset: Dataset) -> Iterator[pa.RecordBatch]:
    """The raw batches of one range. A break in the file raises, after the
    batches of the records before it (the caller adds the one
    `unreadable_file` row)."""

  def record_texts(self, path: str, dataset: Dataset,
                   positions: Sequence[int]) -> dict:
    """{position: the record's text} for a few records, read again (the
    dead-letter text of a duplicate): the record's values as JSON."""
    wanted, found = sorted(set(positions)), {}
    try:
      for batch in self.batches(path, 0, None, dataset):
        if not batch.num_rows:
          continue
        first = batch.column(POSITION)[0].as_py()
        rows = [p - first for p in wanted if 0 <= p - first < batch.num_rows]
        for raw in raw_records(batch, rows):
          found[raw.position] = raw.text
    except Exception:  # pylint: disable=broad-except
      pass   # a break: the records before it were found
    return found
