"""Parquet (.parquet): read natively by pyarrow, BATCH_ROWS rows at a time,
with the file's types; a large file is split by groups of row groups."""

from typing import Iterator, List, Optional

import pyarrow as pa

from schemas.dataset import Dataset
from transforms.formats.base import Format, Range, open_binary
from transforms.formats.raw import BATCH_ROWS, raw_batch


class Parquet(Format):
  """Parquet files; a range is row groups [start, end)."""

  name = 'parquet'
  extensions = ('.parquet',)

  def ranges(self, path: str, size: int, split_bytes: int) -> List[Range]:
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    del size
    with open_binary(path) as f:
      metadata = pq.ParquetFile(f).metadata
    groups, ranges, start, acc = metadata.num_row_groups, [], 0, 0
    for g in range(groups):
      acc += metadata.row_group(g).total_byte_size
      if acc >= split_bytes or g == groups - 1:
        ranges.append((start, g + 1))
        start, acc = g + 1, 0
    return ranges or [(0, None)]

  def batches(self, path: str, start: int, end: Optional[int],
              dataset: Dataset) -> Iterator[pa.RecordBatch]:
    """Row groups [start, end) (all when end is None)."""
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    del dataset
    with open_binary(path) as f:
      parquet = pq.ParquetFile(f)
      groups = range(parquet.num_row_groups)
      if end is not None:
        groups = range(start, min(end, parquet.num_row_groups))
      position = sum(parquet.metadata.row_group(g).num_rows
                     for g in range(groups.start)) if len(groups) else 0
      for batch in parquet.iter_batches(batch_size=BATCH_ROWS,
                                        row_groups=list(groups)):
        yield raw_batch(pa.Table.from_batches([batch]), path, position)
        position += batch.num_rows
