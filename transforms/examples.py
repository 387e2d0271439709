"""Training examples of a recommender: positives plus sampled negatives,
each with the features it would have had.

A dataset that declares `negatives:` (e.g. schemas/interactions.yaml)
trains on its positives (label class 1) and k sampled negatives per
positive (`transforms.negatives.NegativeSampling`: items the user had not
interacted with by then). A negative is a (user, item, time) that never
happened, so its features are built, not read:
  * user side, copied from its positive (same user, same time, so the same
    point-in-time user history): the user field, the event time, the user
    entity's history features and the calendar features;
  * item side, computed for the sampled item at that time: the item
    entity's history features (`transforms.history_features.history_at`, windows
    over the item's real interactions strictly before the time) and the
    columns of the side tables keyed by the item;
  * everything else (the interaction's own fields, e.g. its value or type)
    is null: the declaration check keeps such fields out of the model.
The label is the class index (1 for positives, 0 for negatives), as the
model learns it. A negative's id is its positive's id and rank: '<id>#<r>'
for string ids, -(id * k + r) - 1 for int ids (real ids are >= 0).
"""

from typing import Dict, Iterator, List

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc

from schemas.dataset import Dataset
from transforms.common import (DEFAULT_SHARDS, CountRows, concat_batches,
                               pieces, split_by_shard)
from transforms.history_features import history_at
from transforms.negatives import NEGATIVE_OF, NEGATIVE_RANK, NegativeSampling
from transforms.preprocess import with_label_index
from transforms.side_tables import join_side_table


def examples_types(dataset: Dataset) -> Dict[str, str]:
  """The feature table's columns with the label as learned (int)."""
  types = dict(dataset.feature_types())
  types[dataset.label_field] = 'int'
  return types


def examples_schema(dataset: Dataset) -> pa.Schema:
  """RecordBatch schema of the training examples (`examples_types`)."""
  return dataset.batch_schema(examples_types(dataset))


def user_side_columns(dataset: Dataset) -> List[str]:
  """Columns a negative copies from its positive."""
  user = dataset.entity_field
  columns = [user, dataset.timestamp_field]
  for spec in dataset.histories:
    if spec.entity == user:
      columns += list(spec.feature_types())
  return columns


def item_spec(dataset: Dataset):
  item = dataset.negatives['item']
  return next((s for s in dataset.histories if s.entity == item), None)


def _conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
  """The schema's columns in order; absent columns null."""
  n = batch.num_rows
  names = set(batch.schema.names)
  return pa.RecordBatch.from_arrays(
      [batch.column(f.name).cast(f.type) if f.name in names
       else pa.nulls(n, f.type) for f in schema], schema=schema)


def _positives(batch: pa.RecordBatch, dataset: Dataset, schema: pa.Schema
               ) -> Iterator[pa.RecordBatch]:
  labelled = with_label_index(batch, dataset)
  keep = pc.fill_null(pc.equal(labelled.column(dataset.label_field), 1),
                      False)
  positives = labelled.filter(keep)
  if positives.num_rows:
    yield _conform(positives, schema)


def _copy_user_side(element, dataset: Dataset) -> Iterator[pa.RecordBatch]:
  """(user shard, {'positives', 'negatives'}) -> negatives with their
  positive's user-side columns."""
  _, groups = element
  negatives = [b for b in groups['negatives'] if b.num_rows]
  if not negatives:
    return
  negatives = concat_batches(negatives)
  positives = concat_batches(list(groups['positives']))
  row = pc.index_in(negatives.column(NEGATIVE_OF),
                    value_set=positives.column(dataset.id_field))
  columns = {name: negatives.column(name) for name in negatives.column_names}
  for name in user_side_columns(dataset):
    columns[name] = positives.column(name).take(row)
  yield from pieces(pa.RecordBatch.from_arrays(
      [c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c
       for c in columns.values()], names=list(columns)))


def _negative_ids(negatives: pa.Table, dataset: Dataset, k: int) -> pa.Array:
  of = negatives.column(NEGATIVE_OF).combine_chunks()
  rank = negatives.column(NEGATIVE_RANK).combine_chunks()
  if dataset.fields[dataset.id_field].type == 'int':
    ids = (-(of.to_numpy(zero_copy_only=False) * k +
             rank.to_numpy(zero_copy_only=False)) - 1)
    return pa.array(ids, pa.int64())
  return pc.binary_join_element_wise(of, pc.cast(rank, pa.string()), '#')


def _add_item_side(element, dataset: Dataset, tables: Dict[str, pa.Table],
                   schema: pa.Schema, k: int) -> Iterator[pa.RecordBatch]:
  """(item shard, {'events', 'negatives'}) -> negative example rows: the
  item history at each negative's time and the item's side columns."""
  _, groups = element
  negatives = [b for b in groups['negatives'] if b.num_rows]
  if not negatives:
    return
  negatives = concat_batches(negatives)
  item = dataset.negatives['item']
  columns = {name: negatives.column(name).combine_chunks()
             for name in negatives.column_names}
  spec = item_spec(dataset)
  if spec is not None:
    events = concat_batches([b for b in groups['events']] or [],
                            dataset.batch_schema())
    features = history_at(
        events, columns[item],
        columns[dataset.timestamp_field].to_numpy(zero_copy_only=False),
        dataset, spec)
    for name, values in features.items():
      columns[name] = pa.array(values)
  batch = pa.RecordBatch.from_arrays(list(columns.values()),
                                     names=list(columns))
  for name, table in tables.items():
    key = dataset.side_tables[name]['key']
    if key == item:
      batch = join_side_table(batch, table, key)
  ids = _negative_ids(pa.Table.from_batches([batch]), dataset, k)
  batch = pa.RecordBatch.from_arrays(
      [ids] + [batch.column(n) for n in batch.schema.names
               if n not in (NEGATIVE_OF, NEGATIVE_RANK)],
      names=[dataset.id_field] + [n for n in batch.schema.names
                                  if n not in (NEGATIVE_OF, NEGATIVE_RANK)])
  yield from pieces(_conform(batch, schema))


class TrainingExamples(beam.PTransform):
  """PCollection[pa.RecordBatch] feature rows (`Dataset.feature_types()`)
  -> PCollection[pa.RecordBatch] training examples (`examples_schema`):
  the positives and k sampled negatives per positive, with the features of
  this module's docstring. `tables`: the loaded side tables by name (the
  catalogue is the declared one, else every item seen). Counters:
  training_positives, training_negatives (and NegativeSampling's)."""

  def __init__(self, dataset: Dataset, tables: Dict[str, pa.Table],
               num_shards: int = DEFAULT_SHARDS):
    super().__init__()
    self._dataset, self._tables, self._shards = dataset, tables, num_shards

  def expand(self, features):
    d, shards = self._dataset, self._shards
    neg = d.negatives
    item, user = neg['item'], d.entity_field
    schema = examples_schema(d)
    labelled = features | 'LabelAsLearned' >> beam.Map(with_label_index, d)
    positives = (features
                 | 'Positives' >> beam.FlatMap(_positives, d, schema)
                 | 'CountPositives' >> beam.ParDo(
                     CountRows('training_positives')))
    name = neg.get('catalogue')
    if name:
      table = self._tables[name]
      catalogue = features.pipeline | 'Catalogue' >> beam.Create(
          [table.select([d.side_tables[name]['key']]).to_batches()[0]])
    else:
      catalogue = features | 'ItemsSeen' >> beam.Map(
          lambda b: b.select([item]))
    sampled = (labelled, catalogue) | 'SampleNegatives' >> NegativeSampling(
        user, item, d.timestamp_field, d.label_field, neg['k'],
        neg['strategy'], seed=neg['seed'], num_shards=shards,
        id_field=d.id_field)
    with_user = (
        {'positives': positives | 'ShardPositivesByUser' >> beam.FlatMap(
            split_by_shard, user, shards),
         'negatives': sampled | 'ShardNegativesByUser' >> beam.FlatMap(
             split_by_shard, user, shards)}
        | 'MeetByUser' >> beam.CoGroupByKey()
        | 'CopyUserSide' >> beam.FlatMap(_copy_user_side, d))
    negatives = (
        {'events': features | 'ShardEventsByItem' >> beam.FlatMap(
            split_by_shard, item, shards),
         'negatives': with_user | 'ShardNegativesByItem' >> beam.FlatMap(
             split_by_shard, item, shards)}
        | 'MeetByItem' >> beam.CoGroupByKey()
        | 'AddItemSide' >> beam.FlatMap(_add_item_side, d, self._tables,
                                        schema, neg['k'])
        | 'CountNegatives' >> beam.ParDo(CountRows('training_negatives')))
    return (positives, negatives) | 'AllExamples' >> beam.Flatten()
