"""The online store: each entity's recent records and latest features in Redis.

What is stored. For each declared history (`Dataset.histories`, e.g. per
user) and each entity value, what a request-time scorer needs to compute
that entity's history features exactly as batch and streaming do: the
entity's records within the longest window (the horizon) of its newest
event, at most `max_records` of them (the newest), and the feature vector
of its newest record with the model version and event time it belongs to.

Key layout (`Keys`; prefix `mlpipe:<dataset>:<entity field>`, the entity
value in braces so that one entity's keys share a Redis Cluster slot):

  mlpipe:transactions:user_id:t:{u00042}   ZSET  record id -> event time
                                                 (epoch microseconds; a
                                                 double holds them exactly)
  mlpipe:transactions:user_id:r:{u00042}   HASH  record id -> record (JSON)
  mlpipe:transactions:user_id:f:{u00042}   HASH  event_time, id, features
                                                 (JSON), model_version
  mlpipe:transactions:meta                 HASH  dataset, format, horizons

Value encoding: JSON, never pickle, so reading the store runs no code. A
record is an object of the declared record fields (`Dataset.batch_schema`:
timestamps as int epoch microseconds, floats as shortest round-trip
decimals, so a float read back is the same float); keys sorted, so the same
record is the same bytes.

Writes are idempotent and commutative: one Lua script (`MERGE_SCRIPT`) per
entity adds records by id (a record written twice is stored once), drops
those older than the horizon before the entity's newest stored event and
beyond `max_records`, and replaces the latest feature vector only by a
later (event time, id). So replays, reruns, and batch and streaming writing
the same entity all converge to the same state, whatever the order.

Writers:
  * batch, `WriteOnlineStore`: PCollection[pa.RecordBatch] feature rows ->
    PCollection[dict] write counts; rows are grouped by a hash of the
    entity (`(shard, RecordBatch)` pairs), each shard's state is computed
    on whole columns and written with redis-py pipelines of
    `entities_per_pipeline` script calls. A failed pipeline is retried
    (`attempts` in all, counted); what still fails is counted, not raised,
    and the run summary says how many writes failed.
  * streaming, `UpdateOnlineStore`: PCollection[pa.RecordBatch] feature
    rows -> the same batches, each batch's entity states merged as it
    passes (the batch writer's states and pipelines, once per batch).
  * request time, the scoring service (pipelines/serving/store.py, on
    redis-py's asyncio client): `decode` and `records_table` check what
    it reads;
    `ADD_SCRIPT` is the merge that refuses to rewrite a stored record.
"""

import json
import time
import urllib.parse
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.base.errors import RunError, UsageError
from schemas.dataset import Dataset, HistorySpec
from transforms.common import (DEFAULT_SHARDS, MICROS, Counters,
                               concat_batches, split_by_shard)

FORMAT = 'json-v1'
DEFAULT_MAX_RECORDS = 10000
DEFAULT_TIMEOUT = 0.25          # seconds: socket connect and read
RETRY_PAUSE = 0.05              # seconds before the first retry, doubling

# KEYS: ZSET of times, HASH of records, HASH of the latest features.
# ARGV: horizon (us), max records, latest time ('' for none), latest id,
# latest features (JSON), model version, n, then n x (id, time, record).
MERGE_SCRIPT = """
local n = tonumber(ARGV[7])
for i = 0, n - 1 do
  local id = ARGV[8 + 3 * i]
  redis.call('ZADD', KEYS[1], ARGV[9 + 3 * i], id)
  redis.call('HSET', KEYS[2], id, ARGV[10 + 3 * i])
end
local newest = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if #newest > 0 then
  local cutoff = tonumber(newest[2]) - tonumber(ARGV[1])
  local old = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf',
                         string.format('(%.0f', cutoff))
  for _, id in ipairs(old) do redis.call('HDEL', KEYS[2], id) end
  if #old > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf',
               string.format('(%.0f', cutoff))
  end
  local extra = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[2])
  if extra > 0 then
    local oldest = redis.call('ZRANGE', KEYS[1], 0, extra - 1)
    for _, id in ipairs(oldest) do redis.call('HDEL', KEYS[2], id) end
    redis.call('ZREMRANGEBYRANK', KEYS[1], 0, extra - 1)
  end
end
if ARGV[3] ~= '' then
  local t = tonumber(ARGV[3])
  local current = redis.call('HMGET', KEYS[3], 'event_time', 'id')
  local ct = tonumber(current[1])
  if (not ct) or t > ct or (t == ct and ARGV[4] >= current[2]) then
    redis.call('HSET', KEYS[3], 'event_time', ARGV[3], 'id', ARGV[4],
               'features', ARGV[5], 'model_version', ARGV[6])
  end
end
return n
"""

# A request's merge: MERGE_SCRIPT, but a record id already stored with
# other bytes is refused before anything is written (returns -1): a
# request may add a record or repeat one, never rewrite one. (The batch
# and streaming writers replay their own records, so they keep the plain
# merge.) Lua allows a `local` to be declared again, so the two compose.
ADD_SCRIPT = """
local n = tonumber(ARGV[7])
for i = 0, n - 1 do
  local stored = redis.call('HGET', KEYS[2], ARGV[8 + 3 * i])
  if stored and stored ~= ARGV[10 + 3 * i] then return -1 end
end
""" + MERGE_SCRIPT


class StoreError(UsageError, RuntimeError):
  """The online store cannot be reached or refuses (a one-line reason)."""


# Connections ------------------------------------------------------------------
def check_url(url: str) -> str:
  """A redis:// (or rediss://, unix://) URL, else ValueError naming the fix."""
  scheme = urllib.parse.urlsplit(url or '').scheme
  if scheme not in ('redis', 'rediss', 'unix'):
    raise ValueError(f'--online_store {url!r}: give a redis:// URL, e.g. '
                     'redis://127.0.0.1:6379/0')
  return url


def shown_url(url: str) -> str:
  """The URL without its password, for messages and summaries."""
  parts = urllib.parse.urlsplit(url)
  if parts.password is None:
    return url
  host = parts.hostname or ''
  netloc = f'{parts.username or ""}:***@{host}' + (
      f':{parts.port}' if parts.port else '')
  return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def connect(url: str, timeout: float = DEFAULT_TIMEOUT):
  """A redis-py client with short socket timeouts and no hidden retries:
  a store that is down or slow fails fast, and our callers decide (and
  count) what to retry."""
  import redis  # pylint: disable=g-import-not-at-top
  from redis.backoff import NoBackoff  # pylint: disable=g-import-not-at-top
  from redis.retry import Retry  # pylint: disable=g-import-not-at-top
  return redis.Redis.from_url(
      check_url(url), socket_timeout=timeout, socket_connect_timeout=timeout,
      retry=Retry(NoBackoff(), 0), retry_on_error=[], health_check_interval=0)


def ping(url: str, timeout: float = DEFAULT_TIMEOUT):
  """Raises StoreError with one line when the store does not answer."""
  import redis  # pylint: disable=g-import-not-at-top
  try:
    connect(url, timeout).ping()
  except redis.RedisError as e:
    raise StoreError(f'--online_store {shown_url(url)} does not answer: '
                     f'{reason(e)}') from None


def reason(error: Exception) -> str:
  text = str(error).strip().splitlines()
  return f'{type(error).__name__}: {text[0]}' if text else type(
      error).__name__


# Keys and values --------------------------------------------------------------
class Keys:
  """The key names of one declared history's entities."""

  def __init__(self, dataset: Dataset, spec: HistorySpec,
               namespace: str = 'mlpipe'):
    self.prefix = f'{namespace}:{dataset.name}:{spec.entity}'
    self.meta = f'{namespace}:{dataset.name}:meta'

  def of(self, entity) -> Tuple[str, str, str]:
    """(times ZSET, records HASH, latest HASH) of one entity value."""
    tag = '{' + str(entity) + '}'
    return (f'{self.prefix}:t:{tag}', f'{self.prefix}:r:{tag}',
            f'{self.prefix}:f:{tag}')


def encode(row: Dict[str, Any]) -> str:
  """A record or feature vector -> its stored JSON text."""
  return json.dumps(row, sort_keys=True, separators=(',', ':'),
                    allow_nan=False)


class BadStoredValue(RunError, ValueError):
  """A stored value is not the documented JSON (a 500 for the request that
  read it, and for that request only)."""


def decode(data) -> Dict[str, Any]:
  """Stored JSON -> dict. Plain JSON only: nothing in it can run code."""
  try:
    value = json.loads(data)
  except ValueError as e:      # JSONDecodeError, UnicodeDecodeError
    raise BadStoredValue(f'a stored value is not JSON: {e}') from None
  if not isinstance(value, dict):
    raise BadStoredValue('a stored value is not a JSON object')
  return value


def read_records(values: Sequence[bytes], dataset: Dataset
                 ) -> List[Dict[str, Any]]:
  """An entity's stored record values -> the records, each checked to be
  the documented JSON: an object (`decode`) whose fields have the
  declared types and whose required fields are present
  (`records_table`); else BadStoredValue naming the first fault."""
  rows = [decode(v) for v in values]
  records_table(rows, dataset)
  return rows


def records_table(rows: Sequence[Dict[str, Any]], dataset: Dataset
                  ) -> pa.Table:
  """Decoded stored records -> their table (`Dataset.batch_schema`), the
  whole list converted at once by Arrow; BadStoredValue when a field does
  not have its declared type or a required field is missing. The
  scoring service checks a batch's stored records this way once, on its
  model thread, and computes the history features from the very table
  (pipelines/serving/scorer.py)."""
  try:
    table = pa.Table.from_pylist(rows, schema=dataset.batch_schema())
  except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError,
          OverflowError) as e:
    raise BadStoredValue(f'a stored record does not have the declared '
                         f'types: {e}') from None
  for name, field in dataset.fields.items():
    if field.required and table.column(name).null_count:
      raise BadStoredValue(f'a stored record lacks {name}, which '
                           f'{dataset.name} requires')
  return table


def merge_args(spec: HistorySpec, max_records: int,
                records: Sequence[Tuple[str, int, str]],
                latest: Optional[Tuple[int, str, str]],
                model_version: Optional[str]) -> List:
  args = [spec.horizon * MICROS, max_records]
  if latest is None:
    args += ['', '', '', '']
  else:
    args += [latest[0], latest[1], latest[2], model_version or '']
  args.append(len(records))
  for rid, t, text in records:
    args += [rid, t, text]
  return args


def write_meta(client, dataset: Dataset, max_records: int):
  """The store's description: dataset, value format, horizons."""
  for spec in dataset.histories:
    keys = Keys(dataset, spec)
    client.hset(keys.meta, mapping={
        'dataset': dataset.name, 'format': FORMAT,
        'max_records': max_records,
        f'horizon.{spec.entity}': spec.horizon})


# Batch: the state of a shard of entities, from whole columns ------------------
def entity_states(table: pa.Table, dataset: Dataset, spec: HistorySpec,
                  max_records: int = DEFAULT_MAX_RECORDS
                  ) -> Iterator[Tuple[Any, List[Tuple[str, int, str]],
                                      Tuple[int, str, str]]]:
  """Feature rows of any entities -> (entity, records to keep as (id,
  time, JSON), latest (time, id, features JSON)) per entity.

  Rows are ordered by (entity, time, id) on whole columns; an entity keeps
  the rows at or after its newest time minus the horizon, at most
  `max_records` newest; its latest feature vector is that of its last row
  in that order (the newest time, then the largest id), as the store's
  merge decides."""
  if table.num_rows == 0:
    return
  ts, idf = dataset.timestamp_field, dataset.id_field
  order = pc.sort_indices(table, sort_keys=[
      (spec.entity, 'ascending'), (ts, 'ascending'), (idf, 'ascending')])
  table = table.take(order)
  entity = table.column(spec.entity).combine_chunks()
  t = table.column(ts).combine_chunks().cast(pa.int64()).to_numpy()
  n = table.num_rows
  changed = np.ones(n, dtype=bool)
  if n > 1:
    changed[1:] = pc.not_equal(entity.slice(1), entity.slice(0, n - 1)
                               ).to_numpy(zero_copy_only=False)
  starts = np.flatnonzero(changed)
  ends = np.append(starts[1:], n)
  group = np.repeat(np.arange(len(starts)), ends - starts)
  newest = t[ends - 1][group]
  from_end = ends[group] - np.arange(n)          # 1 for the entity's last row
  keep = (t >= newest - spec.horizon * MICROS) & (from_end <= max_records)
  record_names = dataset.batch_schema().names
  rows = np.flatnonzero(keep)
  kept = table.select(record_names).take(pa.array(rows))
  columns = [kept.column(name).to_pylist() for name in record_names]
  texts = [encode(dict(zip(record_names, values)))
           for values in zip(*columns)]
  ids = [str(v) for v in kept.column(idf).to_pylist()]
  times = t[rows].tolist()
  feature_names = list(spec.feature_types())
  last = table.select(feature_names).take(pa.array(ends - 1))
  feature_columns = [last.column(name).to_pylist() for name in feature_names]
  latest = [encode(dict(zip(feature_names, values)))
            for values in zip(*feature_columns)]
  last_ids = table.column(idf).take(pa.array(ends - 1)).to_pylist()
  values = entity.take(pa.array(starts)).to_pylist()
  bounds = np.searchsorted(rows, np.append(starts, n))
  for g, value in enumerate(values):
    a, b = int(bounds[g]), int(bounds[g + 1])
    yield (value, list(zip(ids[a:b], times[a:b], texts[a:b])),
           (int(t[ends[g] - 1]), str(last_ids[g]), latest[g]))


class _WriteShards(beam.DoFn):
  """(shard, [RecordBatch]) -> one dict of counts per shard, after writing
  every entity of the shard with pipelined merge-script calls."""

  def __init__(self, dataset: Dataset, spec: HistorySpec, url: str,
               model_version: Optional[str], max_records: int,
               entities_per_pipeline: int, attempts: int, timeout: float):
    self._dataset, self._spec, self._url = dataset, spec, url
    self._version, self._max = model_version, max_records
    self._per_pipeline, self._attempts = entities_per_pipeline, attempts
    self._timeout = timeout

  def setup(self):
    self._counters = Counters()
    self._client = connect(self._url, self._timeout)
    self._script = self._client.register_script(MERGE_SCRIPT)
    self._keys = Keys(self._dataset, self._spec)

  def process(self, shard_and_batches):
    _, batches = shard_and_batches
    batches = list(batches)
    if not batches:
      return
    table = concat_batches(batches, batches[0].schema)
    counts = {'entities': 0, 'records': 0, 'retries': 0,
              'entities_failed': 0, 'records_failed': 0}
    chunk = []
    for state in entity_states(table, self._dataset, self._spec, self._max):
      chunk.append(state)
      if len(chunk) == self._per_pipeline:
        self._write(chunk, counts)
        chunk = []
    if chunk:
      self._write(chunk, counts)
    yield counts

  def _write(self, chunk, counts):
    import redis  # pylint: disable=g-import-not-at-top
    records = sum(len(r) for _, r, _ in chunk)
    pause = RETRY_PAUSE
    for attempt in range(self._attempts):
      try:
        pipe = self._client.pipeline(transaction=False)
        for entity, rows, latest in chunk:
          self._script(keys=self._keys.of(entity), client=pipe,
                       args=merge_args(self._spec, self._max, rows, latest,
                                        self._version))
        pipe.execute()
        counts['entities'] += len(chunk)
        counts['records'] += records
        self._counters.inc('online_store_entities_written', len(chunk))
        self._counters.inc('online_store_records_written', records)
        return
      except redis.RedisError:
        if attempt + 1 < self._attempts:
          counts['retries'] += 1
          self._counters.inc('online_store_retries')
          time.sleep(pause)
          pause *= 2
    counts['entities_failed'] += len(chunk)
    counts['records_failed'] += records
    self._counters.inc('online_store_entities_failed', len(chunk))
    self._counters.inc('online_store_records_failed', records)

  def teardown(self):
    client = getattr(self, '_client', None)
    if client is not None:
      client.close()


class WriteOnlineStore(beam.PTransform):
  """PCollection[pa.RecordBatch] feature rows -> PCollection[dict] counts.

  Input: feature rows (`Dataset.batch_schema(Dataset.feature_types())`),
  any entities, any order. For every declared history, rows are split into
  `num_shards` shards by a hash of the entity, each shard's entities'
  states are computed on whole columns (`entity_states`) and merged into
  the store at `url` by pipelines of `entities_per_pipeline` script calls.
  Output: one dict per shard and history with `entities`, `records`,
  `retries`, `entities_failed`, `records_failed` (also Beam counters
  `online_store_*`). The store ends as if every row had been written one
  at a time: each entity's state as of its newest row.
  """

  def __init__(self, dataset: Dataset, url: str,
               model_version: Optional[str] = None, *,
               num_shards: int = DEFAULT_SHARDS,
               max_records: int = DEFAULT_MAX_RECORDS,
               entities_per_pipeline: int = 500, attempts: int = 3,
               timeout: float = 2.0):
    super().__init__()
    if not dataset.histories:
      raise ValueError(f'{dataset.name} declares no history: nothing to '
                       'keep in an online store')
    self._dataset, self._url = dataset, check_url(url)
    self._version, self._shards = model_version, num_shards
    self._settings = (max_records, entities_per_pipeline, attempts, timeout)

  def expand(self, rows):
    counts = []
    for spec in self._dataset.histories:
      e = spec.entity
      counts.append(
          rows
          | f'SplitRowsIntoShards[{e}]' >> beam.FlatMap(
              split_by_shard, e, self._shards)
          | f'GroupRowsByShard[{e}]' >> beam.GroupByKey()
          | f'MergeStatesIntoStore[{e}]' >> beam.ParDo(_WriteShards(
              self._dataset, spec, self._url, self._version,
              *self._settings)))
    return counts | 'AllWriteCounts' >> beam.Flatten()


def add_counts(counts: Sequence[Dict[str, int]]) -> Dict[str, int]:
  total = {'entities': 0, 'records': 0, 'retries': 0, 'entities_failed': 0,
           'records_failed': 0}
  for c in counts:
    for k in total:
      total[k] += c.get(k, 0)
  return total


# Streaming: one pipeline of merges per batch ----------------------------------
class _UpdatePerBatch(beam.DoFn):
  """Feature RecordBatch -> the same batch, after merging the state of
  every entity it holds, for every declared history, into the store: the
  batch writer's `entity_states` and pipelined script calls
  (`_WriteShards`), once per batch."""

  def __init__(self, dataset: Dataset, url: str,
               model_version: Optional[str], max_records: int,
               entities_per_pipeline: int, attempts: int, timeout: float):
    self._writers = [
        _WriteShards(dataset, spec, url, model_version, max_records,
                     entities_per_pipeline, attempts, timeout)
        for spec in dataset.histories]

  def setup(self):
    for writer in self._writers:
      writer.setup()

  def process(self, batch: pa.RecordBatch):
    if batch.num_rows:
      for writer in self._writers:
        for _ in writer.process((None, [batch])):
          pass   # counts go to the writer's counters
    yield batch

  def teardown(self):
    for writer in self._writers:
      writer.teardown()


class UpdateOnlineStore(beam.PTransform):
  """PCollection[pa.RecordBatch] feature rows -> the same PCollection,
  each batch merged into the store at `url` as it passes (the streaming
  twin of `WriteOnlineStore`: the same states and script, so both
  converge to the same store)."""

  def __init__(self, dataset: Dataset, url: str,
               model_version: Optional[str] = None, *,
               max_records: int = DEFAULT_MAX_RECORDS,
               entities_per_pipeline: int = 500, attempts: int = 3,
               timeout: float = 2.0):
    super().__init__()
    self._args = (dataset, check_url(url), model_version, max_records,
                  entities_per_pipeline, attempts, timeout)

  def expand(self, batches):
    return batches | 'MergeEachBatchIntoStore' >> beam.ParDo(
        _UpdatePerBatch(*self._args))


# Request time -----------------------------------------------------------------
class OnlineStore:
  """Reads and merges entity states for one dataset, synchronously (the
  streaming writer; the scoring service's asynchronous twin is
  pipelines/serving/store.py). Errors are redis-py's `RedisError`."""

  def __init__(self, client, dataset: Dataset,
               max_records: int = DEFAULT_MAX_RECORDS):
    self.client, self.dataset, self._max = client, dataset, max_records
    self._keys = {spec.entity: Keys(dataset, spec)
                  for spec in dataset.histories}
    self._script = client.register_script(MERGE_SCRIPT)
    self._record_names = dataset.batch_schema().names

  def state(self, record: Dict[str, Any]
            ) -> Dict[str, Tuple[List[Dict[str, Any]], Dict[str, Any]]]:
    """{entity field: (stored records of the record's entity, latest
    HASH decoded)} for every declared history, in one round trip."""
    pipe = self.client.pipeline(transaction=False)
    for spec in self.dataset.histories:
      _, records, latest = self._keys[spec.entity].of(record[spec.entity])
      pipe.hvals(records)
      pipe.hgetall(latest)
    replies = pipe.execute()
    out = {}
    for i, spec in enumerate(self.dataset.histories):
      rows = read_records(replies[2 * i], self.dataset)
      latest = {k.decode(): v.decode() for k, v in replies[2 * i + 1].items()}
      out[spec.entity] = (rows, latest)
    return out

  def append(self, record: Dict[str, Any], features: Dict[str, Any],
             model_version: Optional[str], client=None):
    """Merges one record and its features into each of its entities'
    states (one script call per history, in one round trip)."""
    ts, idf = self.dataset.timestamp_field, self.dataset.id_field
    text = encode({name: record[name] for name in self._record_names})
    rid, t = str(record[idf]), int(record[ts])
    pipe = self.client.pipeline(transaction=False)
    for spec in self.dataset.histories:
      vector = encode({name: features[name] for name in spec.feature_types()})
      self._script(keys=self._keys[spec.entity].of(record[spec.entity]),
                   client=pipe,
                   args=merge_args(spec, self._max, [(rid, t, text)],
                                    (t, rid, vector), model_version))
    pipe.execute()


def preflight(url: str):
  """Before a job starts: a redis:// URL whose store answers, else
  InputError (one line, exit 2 in the entry points)."""
  from transforms.read import InputError  # pylint: disable=g-import-not-at-top
  try:
    ping(check_url(url))
  except (ValueError, StoreError) as e:
    raise InputError(str(e)) from None


def model_version_of(model_dir: Optional[str]) -> Optional[str]:
  """The version in a model directory's metadata (None without one)."""
  if not model_dir:
    return None
  from transforms.inference import read_metadata  # pylint: disable=g-import-not-at-top
  return read_metadata(model_dir).get('model_version')
