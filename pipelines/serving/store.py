"""The online store as the scoring service reads and writes it: off the
event loop, each call bounded.

redis-py's asyncio client, so a request waiting for Redis holds no thread
and blocks no other request; every call (connection, command, reply) runs
under one deadline, `timeout`, after which it is a StoreUnavailable (503).
The pool holds at most `max_connections` connections: one per request in
flight, which the service bounds (--max_waiting). The client belongs to
the event loop it was made on (uvicorn runs one; a test client may run a
loop per request), so a new loop gets a client of its own.

What is read is checked: a stored value that is not a JSON object
(`online_store.decode`, here, on the event loop) or whose fields do not
have the declared types (`online_store.records_table`, on the model
thread, once for a batch: pipelines/serving/scorer.py) is a
BadStoredValue for the request that read it (`bad_state`). What is written goes through `online_store.ADD_SCRIPT`: a record
id stored with other values is an UpdateConflict (409), nothing written.
"""

import asyncio
from typing import Any, Dict, List, Optional

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from pipelines.base.errors import RunError, UsageError
from schemas.dataset import Dataset
from transforms import online_store


class StoreUnavailable(RunError):
  """The store did not answer within the timeout, or refused (503)."""
  http_status = 503


class UpdateConflict(UsageError):
  """?update=true with a record id the store holds with other values."""
  http_status = 409


def check_store(url: str, dataset: Dataset, timeout: float):
  """Before serving: the store answers (else StoreError) and holds this
  dataset, if it says which (else UsageError)."""
  online_store.ping(url, timeout)
  client = online_store.connect(url, timeout)
  try:
    meta = client.hgetall(
        online_store.Keys(dataset, dataset.histories[0]).meta)
  finally:
    client.close()
  stored = meta.get(b'dataset')
  if stored is not None and stored.decode() != dataset.name:
    raise UsageError(f'--online_store holds {stored.decode()}, not '
                     f'{dataset.name}')


def bad_state(entity: str, value: Any, error: Exception
              ) -> online_store.BadStoredValue:
  """The error of a request whose entity's stored state is not the
  documented JSON (500), naming the entity."""
  return online_store.BadStoredValue(
      f'the online store\'s state of {entity} {value} is not the '
      f'documented JSON: {error}')


class RequestStore:
  """Reads and adds one request's records, asynchronously."""

  def __init__(self, url: str, dataset: Dataset, *, timeout: float,
               max_records: int = online_store.DEFAULT_MAX_RECORDS,
               max_connections: int = 256):
    self.url, self.shown = url, online_store.shown_url(url)
    self.dataset, self.timeout = dataset, timeout
    self._max, self._connections = max_records, max_connections
    self._keys = {spec.entity: online_store.Keys(dataset, spec)
                  for spec in dataset.histories}
    self._record_names = dataset.batch_schema().names
    self._loop: Optional[asyncio.AbstractEventLoop] = None
    self._client = self._script = None

  def _client_of_this_loop(self):
    loop = asyncio.get_running_loop()
    if self._loop is not loop:
      # No hidden retries (as online_store.connect): our deadline decides.
      self._client = aioredis.Redis.from_url(
          self.url, socket_timeout=self.timeout,
          socket_connect_timeout=self.timeout, retry_on_error=[],
          retry=Retry(NoBackoff(), 0), health_check_interval=0,
          max_connections=self._connections)
      self._script = self._client.register_script(online_store.ADD_SCRIPT)
      self._loop = loop
    return self._client

  async def _bounded(self, call):
    """Runs `call(client)` within the deadline; redis-py's errors and the
    deadline become StoreUnavailable with the reason."""
    client = self._client_of_this_loop()
    try:
      async with asyncio.timeout(self.timeout):
        return await call(client)
    except (redis.RedisError, TimeoutError, OSError) as e:
      if isinstance(e, TimeoutError) and not isinstance(e, redis.RedisError):
        e = redis.TimeoutError(f'no answer within {self.timeout * 1000:g} ms')
      raise StoreUnavailable(f'online store {self.shown} unavailable: '
                             f'{online_store.reason(e)}') from None

  async def ping(self):
    await self._bounded(lambda client: client.ping())

  async def records(self, record: Dict[str, Any]
                    ) -> Dict[str, List[Dict[str, Any]]]:
    """{entity field: the stored records of the record's entity, decoded}
    for every declared history, in one round trip; a stored value that is
    not a JSON object is a BadStoredValue naming the entity. Their types
    are checked where they are converted for the features, once for a
    batch of requests (`Scorer.features`), not here on the event loop,
    which every request shares."""
    async def read(client):
      pipe = client.pipeline(transaction=False)
      for spec in self.dataset.histories:
        pipe.hvals(self._keys[spec.entity].of(record[spec.entity])[1])
      return await pipe.execute()
    replies = await self._bounded(read)
    out = {}
    for spec, values in zip(self.dataset.histories, replies):
      try:
        out[spec.entity] = [online_store.decode(v) for v in values]
      except online_store.BadStoredValue as e:
        raise bad_state(spec.entity, record[spec.entity], e) from None
    return out

  def stored_text(self, record: Dict[str, Any]) -> str:
    """The record as the store keeps it (its declared fields, JSON)."""
    return online_store.encode({n: record[n] for n in self._record_names})

  async def add(self, record: Dict[str, Any], features: Dict[str, Any],
                model_version: Optional[str]):
    """Merges the record and its features into each of its entities'
    states (one ADD_SCRIPT call per history, one round trip); a record id
    stored with other values is an UpdateConflict, and that history's
    state is left as it was."""
    ts, idf = self.dataset.timestamp_field, self.dataset.id_field
    text = self.stored_text(record)
    rid, t = str(record[idf]), int(record[ts])

    async def write(client):
      pipe = client.pipeline(transaction=False)
      for spec in self.dataset.histories:
        vector = online_store.encode(
            {name: features[name] for name in spec.feature_types()})
        await self._script(
            keys=self._keys[spec.entity].of(record[spec.entity]),
            args=online_store.merge_args(spec, self._max, [(rid, t, text)],
                                         (t, rid, vector), model_version),
            client=pipe)
      return await pipe.execute()
    if any(reply == -1 for reply in await self._bounded(write)):
      raise UpdateConflict(f'record {rid} is stored with other values: an '
                           'update never rewrites a stored record')
