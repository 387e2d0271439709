"""Side tables: small declared tables joined to every record by a key.

A declaration's `side_tables:` section names a table (e.g. `items`), its
join key (a record field, e.g. item_id), its fields and a default path. The
table is read and validated on the driver before any job starts, with the
same validator as records: a bad row, a duplicate key or a missing file is
a one-line error (exit code 2), never a half-joined run. It then travels
with the transform (side tables are small: a product catalogue, a list of
stores); each batch is joined with `pyarrow.compute.index_in`, one column
at a time. A record whose key is not in the table gets nulls, which the
declaration's missing-value handling covers.
"""

import os
from typing import Dict

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc

from schemas.dataset import Dataset
from transforms.common import concat_batches
from transforms.read import InputError, check_input, read_batches


def side_dataset(dataset: Dataset, name: str) -> Dataset:
  """The side table `name` as a dataset of its own (id = its key)."""
  table = dataset.side_tables[name]
  return Dataset(name=f'{dataset.name}.{name}', fields=dict(table['fields']),
                 roles={'id': table['key']}, rules=(), histories=(),
                 aggregates={}, transform={}, drift={}, path=dataset.path)


def side_table_paths(options, dataset: Dataset) -> Dict[str, str]:
  """Each declared side table's path: --side_table NAME=PATH, else the
  declaration's path (relative to the declaration's folder)."""
  given = {}
  for item in getattr(options, 'side_table', None) or ():
    name, sep, path = item.partition('=')
    if not sep or not path:
      raise InputError(f'--side_table {item!r}: use NAME=PATH')
    if name not in dataset.side_tables:
      raise InputError(f'--side_table {name}: the declaration has no side '
                       f'table {name} (it has: '
                       f'{", ".join(dataset.side_tables) or "none"})')
    given[name] = path
  out = {}
  for name, table in dataset.side_tables.items():
    path = given.get(name) or table.get('path')
    if not path:
      raise InputError(f'side table {name}: no path; declare path: or pass '
                       f'--side_table {name}=PATH')
    if '://' not in path and not os.path.isabs(path) and name not in given:
      path = os.path.join(os.path.dirname(dataset.path), path)
    out[name] = path
  return out


def load_side_table(dataset: Dataset, name: str, path: str) -> pa.Table:
  """Reads and validates one side table; InputError on any bad row."""
  from transforms.parse import BatchValidator   # parse imports this module's
  side = side_dataset(dataset, name)            # neighbours: no cycle at load
  paths = check_input(path)
  validator = BatchValidator(side)
  valid = []
  for file in paths:
    for batch in read_batches(file, side):
      good, dead = validator.validate(batch)
      if dead:
        row = dead[0]
        raise InputError(f'side table {name}: {row["source_file"]} record '
                         f'{row["position"]}: {row["message"]} '
                         f'({len(dead)} bad row(s) in this block)')
      valid.append(good)
  schema = side.batch_schema()
  table = concat_batches(valid, schema).select(schema.names).cast(schema)
  key = side.id_field
  if pc.count_distinct(table.column(key)).as_py() != table.num_rows:
    counts = pc.value_counts(table.column(key))
    repeated = counts.filter(pc.greater(counts.field('counts'), 1))[0]
    raise InputError(f'side table {name}: key {key} '
                     f'{repeated["values"].as_py()!r} appears more than once')
  return table


def join_side_table(batch: pa.RecordBatch, table: pa.Table, key: str
                    ) -> pa.RecordBatch:
  """The batch plus the table's other columns, matched on `key` (nulls for
  a key the table lacks)."""
  index = pc.index_in(batch.column(key), value_set=table.column(key))
  arrays, names = list(batch.columns), list(batch.schema.names)
  for name in table.column_names:
    if name != key:
      arrays.append(table.column(name).combine_chunks().take(index))
      names.append(name)
  return pa.RecordBatch.from_arrays(arrays, names=names)


def load_side_tables(dataset: Dataset, paths: Dict[str, str]
                     ) -> Dict[str, pa.Table]:
  """Every side table by name, read and validated (`load_side_table`)."""
  return {name: load_side_table(dataset, name, path)
          for name, path in paths.items()}


class JoinSideTables(beam.PTransform):
  """PCollection[pa.RecordBatch] records -> PCollection[pa.RecordBatch]
  records plus every side table's columns (in declaration order), each
  matched on its key. `tables`: name -> the table, read and validated
  before the pipeline is built (`load_side_tables`), so a bad table stops
  the run before it starts."""

  def __init__(self, dataset: Dataset, tables: Dict[str, pa.Table]):
    super().__init__()
    self._tables = [(dataset.side_tables[name]['key'], table)
                    for name, table in tables.items()]

  def expand(self, batches):
    tables = self._tables

    def join(batch):
      for key, table in tables:
        batch = join_side_table(batch, table, key)
      return batch
    return batches | 'JoinByKey' >> beam.Map(join)
