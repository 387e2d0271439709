"""Scoring a request: a raw record and its entity's stored records ->
its history features and the model's answer, as batch computes them.

A request goes through `validate` (one request: the same RecordValidator as
batch and streaming; for an update, also the declared freshness around the
service's clock), `prepare` (one request: side tables, the stored records
but this record's own copy), `predict` (one or more requests: history
features, one transform graph and one model call, on the model thread)
and `answer` (the response body). The store calls in between are the
service's (pipelines/serving/store.py).
"""

import dataclasses
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pyarrow as pa

from pipelines.base.errors import UsageError
from pipelines.serving.store import UpdateConflict, bad_state
from schemas.dataset import Dataset
from transforms import online_store
from transforms.common import micros_to_rfc3339
from transforms.history_features import history_features_of_table
from transforms.inference import LoadedModel, input_types, predict_table
from transforms.parse import RecordValidator
from transforms.stream_sources import decode_message

SOURCE = 'request'


@dataclasses.dataclass(frozen=True)
class Serving:
  """The model being served and what scoring needs of it: replaced whole
  (one attribute assignment), so a request, or a batch of requests, is
  scored and labelled by one model."""
  model: LoadedModel
  version: str
  id_field: str
  schema: pa.Schema


@dataclasses.dataclass(frozen=True)
class Prepared:
  """What a request brings to a batch: its validated record, the side
  tables' columns joined to it, and per declared history (entity field)
  its entity's stored records (decoded JSON, their types checked by the
  batch: `Scorer.features`) but a stored copy of this very record."""
  record: Dict[str, Any]
  joined: Dict[str, Any]
  history: Dict[str, List[Dict[str, Any]]]


@dataclasses.dataclass(frozen=True)
class Scored:
  """What a batch gives each of its requests back."""
  features: Dict[str, Any]
  used: Dict[str, int]
  prediction: Dict[str, Any]


class Scorer:
  """A request's record -> the response body of /score, in four steps:
  `validate`, `prepare`, `predict` (several requests at once) and
  `answer`. Raises RecordError (a bad record, a 400 with its dead-letter
  kind; `stale` for an update outside the declared freshness) or
  UpdateConflict (409).

  The freshness of an update is judged against `reference_micros` when
  given (a fixed instant, for replays), else against the wall clock at
  the request."""

  def __init__(self, dataset: Dataset, model: LoadedModel,
               side_tables: Optional[Dict[str, pa.Table]] = None,
               reference_micros: Optional[int] = None):
    self.dataset, self.reference = dataset, reference_micros
    self.validator = RecordValidator(dataset)
    self.record_names = dataset.batch_schema().names
    self.serving = self._serving(model)
    # Each side table as {key value: its other columns}, in declaration
    # order: the batch job's join (`join_side_table`, pyarrow's index_in)
    # as a dict look-up, nulls for a key the table lacks.
    self.side = []
    for name, table in (side_tables or {}).items():
      key = dataset.side_tables[name]['key']
      others = [n for n in table.column_names if n != key]
      rows = table.select(others).to_pylist()
      self.side.append((key, others, dict(zip(
          table.column(key).to_pylist(), rows))))

  @property
  def version(self) -> str:
    return self.serving.version

  def _serving(self, model: LoadedModel) -> Serving:
    metadata = model.metadata
    wanted = set(metadata['raw_features'])
    missing = sorted(wanted - set(self.dataset.feature_types()))
    if missing:
      raise UsageError(f'model {metadata["model_version"]} needs '
                       f'{missing[0]}, which {self.dataset.name} does not '
                       'make')
    id_field = metadata.get('id_field') or self.dataset.id_field
    return Serving(model, metadata['model_version'], id_field,
                   pa.schema(input_types(metadata, id_field).items()))

  def swap(self, model: LoadedModel):
    """Serves `model` from the next batch on, after checking it scores
    this dataset's rows and warming it up (requests in flight finish with
    the model they started with)."""
    serving = self._serving(model)
    self._warm_up(serving)
    self.serving = serving

  def features(self, items: Sequence[Prepared]
               ) -> List[Tuple[Dict[str, Any], Dict[str, int]]]:
    """(history features, stored records used per entity field) of each
    request, as batch computes them: `history_features` over its entity's
    stored records and the record. An entity the store does not know has
    an empty history.

    One table per declared history for all the requests, its entity
    column replaced by each request's position, so the windows of one
    never hold another's records (two requests for one user included);
    the features depend on the grouping, not on the entity's value. The
    table is also the check of the stored records' types
    (`online_store.records_table`), made here once for the batch rather
    than per request on the event loop: a stored state that fails it is
    a BadStoredValue; in a batch of several requests any error makes the
    Batcher score each alone, so only the request whose state it is gets
    it. The parity tests check the features equal the batch job's."""
    out = [({}, {}) for _ in items]
    for spec in self.dataset.histories:
      entity = spec.entity
      rows, sizes = [], []
      for item in items:
        rows.extend(item.history[entity])
        rows.append(item.record)
        sizes.append(len(item.history[entity]) + 1)
      try:
        table = online_store.records_table(rows, self.dataset)
      except online_store.BadStoredValue as e:
        if len(items) > 1:
          raise
        raise bad_state(entity, items[0].record[entity], e) from None
      as_int = self.dataset.fields[entity].type == 'int'
      at = table.schema.get_field_index(entity)
      table = table.set_column(at, table.schema.field(at), pa.array(
          [i if as_int else str(i) for i, size in enumerate(sizes)
           for _ in range(size)], table.schema.field(at).type))
      features = history_features_of_table(table, self.dataset, spec)
      end = -1
      for i, (item, size) in enumerate(zip(items, sizes)):
        end += size
        out[i][0].update(features[end])
        out[i][1][entity] = size - 1
    return out

  def warm_up(self):
    self._warm_up(self.serving)

  @staticmethod
  def _warm_up(serving: Serving):
    """Scores one made-up row (empty strings, zeros) before serving, so
    the first request does not pay for loading kernels."""
    defaults = {pa.string(): '', pa.float64(): 0.0, pa.int64(): 0}
    row = {f.name: defaults.get(f.type) for f in serving.schema}
    predict_table(serving.model, pa.Table.from_pylist(
        [row], schema=serving.schema), serving.id_field)

  def join(self, record: Dict[str, Any]) -> Dict[str, Any]:
    """The side tables' columns of the record (None where its key is not
    in a table), as the batch job joins them."""
    joined = {}
    for key, others, rows in self.side:
      row = rows.get(record[key])
      joined.update((n, None if row is None else row[n]) for n in others)
    return joined

  def now(self) -> int:
    """The service's clock, epoch microseconds."""
    if self.reference is not None:
      return self.reference
    return time.time_ns() // 1000

  def validate(self, body: bytes, update: bool = False) -> Dict[str, Any]:
    """Raw bytes -> the typed record (RecordError for a bad one). An
    update is also held to the declaration's freshness around `now()`,
    as batch's --reference_time holds its records: one from far in the
    future would otherwise trim the entity's stored history to itself."""
    validator = (RecordValidator(self.dataset, self.now()) if update
                 else self.validator)
    return validator.validate(decode_message(body, SOURCE))

  def prepare(self, record: Dict[str, Any],
              stored: Dict[str, List[Dict[str, Any]]],
              update: bool = False) -> Prepared:
    """The record with its side tables' columns and, per history, its
    entity's stored records (`stored`) but a stored copy of the record
    itself. An update whose id is stored with other values is refused
    here, before scoring (the store's script checks again as it writes)."""
    rid = record[self.dataset.id_field]
    mine = {n: record[n] for n in self.record_names}
    history = {}
    for entity, rows in stored.items():
      history[entity] = [r for r in rows if r.get(self.dataset.id_field)
                         != rid]
      if update and any(r != mine for r in rows
                        if r.get(self.dataset.id_field) == rid):
        raise UpdateConflict(f'record {rid} is stored with other values: '
                             'an update never rewrites a stored record')
    return Prepared(record, self.join(record), history)

  def predict(self, items: Sequence[Prepared]) -> List[Scored]:
    """The features and prediction of each request, in order: history
    features (`features`), then one graph and one estimator call by one
    model (rows are padded to a multiple of PAD_ROWS, so a row's score
    does not depend on the rows scored with it)."""
    found = self.features(items)
    serving = self.serving
    table = pa.Table.from_pylist(
        [dict(item.record, **item.joined, **features)
         for item, (features, _) in zip(items, found)], schema=serving.schema)
    predictions = predict_table(serving.model, table,
                                serving.id_field).to_pylist()
    for prediction in predictions:
      prediction.pop('scored_at', None)
    return [Scored(features, used, prediction)
            for (features, used), prediction in zip(found, predictions)]

  def answer(self, prepared: Prepared, scored: Scored,
             updated: bool = False) -> Dict[str, Any]:
    """The response body (`updated`: the record was merged into the
    store)."""
    record = prepared.record
    ts = self.dataset.timestamp_field
    return dict(scored.prediction, id=record[self.dataset.id_field],
                event_time=micros_to_rfc3339(record[ts]),
                features=scored.features, history_records=scored.used,
                side_tables=prepared.joined, updated=updated)
