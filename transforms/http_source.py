"""Records from a paginated JSON API: `--input https://...` with the
declaration's `source: http:` section (schemas/sources.py).

    PBegin -> ReadHttpPages(url, dataset) -> PCollection[pa.RecordBatch]

Pages are read in order (a cursor or a next link is only known from the
page before it) by one reader, which yields one raw batch per page: the
page's records are taken from the JSON body at the declared path, written
one per line, and decoded by the JSON-lines format's decoder
(transforms.formats.jsonl_format.decode_lines), so they are parsed and
validated exactly as the same records in a .jsonl file. A record's SOURCE
is the page's URL with `#page=N` (its page number, from 1), its POSITION
its place in the page.

What can go wrong, and what happens:
  * a request that fails (connection refused or dropped mid-body, a
    timeout, HTTP 429 or 5xx) is made again, `retries` times, after
    `backoff` seconds doubled each time (or the server's Retry-After);
    the page is then read whole;
  * a page whose body is not JSON, or has no list at the records path, is
    one `malformed` dead-letter row naming its URL and page number, with
    the body as `raw`, and the read goes on (page-number pagination; but
    MALFORMED_IN_A_ROW such pages in a row stop the run: the API is not
    what the declaration says); with a cursor or next link the next page
    cannot be found in it, so the run stops (exit 3) rather than read part
    of the source silently;
  * a request that still fails after its retries, a 4xx answer, or more
    than `max_pages` pages stop the run: `HttpSourceError` (exit 3, one
    line).
`rate_limit` spaces the requests' starts at least 1/rate_limit s apart.
"""

import json
import os
import time
from typing import Dict, Iterator, Optional, Sequence
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

import apache_beam as beam
import pyarrow as pa

from pipelines.base.errors import RunError
from schemas.dataset import Dataset
from schemas.sources import HttpSource
from transforms.formats.base import InputError
from transforms.formats.jsonl_format import decode_lines, json_schema
from transforms.formats.lines import split_lines
from transforms.formats.raw import raw_batch, raw_records

# Statuses worth another attempt; every other non-2xx answer is final.
_RETRY_STATUSES = (408, 429, 500, 502, 503, 504)
# At most this much of a malformed page's body is kept as its `raw`.
_RAW_LIMIT = 1 << 20
_PAGE_MARK = '#page='
# Malformed pages in a row that stop a page-number read.
MALFORMED_IN_A_ROW = 3


class HttpSourceError(RunError, RuntimeError):
  """The API did not give a page after its retries (exit 3)."""


def is_http(path: str) -> bool:
  return path.lower().startswith(('http://', 'https://'))


def declared_source(dataset: Dataset, url: str) -> HttpSource:
  source = dataset.source.get('http')
  if source is None:
    raise InputError(f'--input {url}: the declaration of {dataset.name} has '
                     'no source: http: section (records path, pagination, '
                     'auth); see "Inputs" in the README')
  return source


def _headers(source: HttpSource, url: str) -> Dict[str, str]:
  headers = {'Accept': 'application/json'}
  if source.auth_env:
    secret = os.environ.get(source.auth_env)
    if not secret:
      raise InputError(f'--input {url}: the declaration\'s source.http.auth '
                       f'reads the secret from ${source.auth_env}, which is '
                       'not set')
    headers[source.auth_header] = source.auth_prefix + secret
  return headers


def _with_query(url: str, params: Dict[str, object]) -> str:
  """`url` with `params` set: a parameter it has keeps its place."""
  parts = urlsplit(url)
  query = [(k, str(params[k]) if k in params else v) for k, v in
           parse_qsl(parts.query, keep_blank_values=True)]
  query += [(k, str(v)) for k, v in params.items()
            if k not in dict(query)]
  return urlunsplit(parts._replace(query=urlencode(query)))


def _at(body, path: str):
  """The value at a dotted path of a JSON body (None when absent)."""
  for part in [p for p in path.split('.') if p]:
    if not isinstance(body, dict):
      return None
    body = body.get(part)
  return body


class _Client:
  """GETs with the declared timeout, retries, backoff and rate limit."""

  def __init__(self, source: HttpSource, url: str):
    import requests  # pylint: disable=g-import-not-at-top
    self._requests = requests
    self._source = source
    self._session = requests.Session()
    self._session.headers.update(_headers(source, url))
    self._last = None

  def _space(self):
    if self._source.rate_limit and self._last is not None:
      wait = self._last + 1.0 / self._source.rate_limit - time.monotonic()
      if wait > 0:
        time.sleep(wait)
    self._last = time.monotonic()

  def get(self, url: str, attempts: Optional[int] = None) -> bytes:
    """The body of a 2xx answer, read whole; HttpSourceError otherwise."""
    source = self._source
    attempts = source.retries + 1 if attempts is None else attempts
    problem = None
    for attempt in range(attempts):
      if attempt:
        time.sleep(problem[1])
      self._space()
      delay = source.backoff * 2 ** attempt
      try:
        answer = self._session.get(url, timeout=source.timeout)
        body = answer.content   # read whole: a cut body raises here
      except self._requests.RequestException as e:
        problem = (f'{type(e).__name__}: {e}', delay)
        continue
      if 200 <= answer.status_code < 300:
        return body
      reason = f'HTTP {answer.status_code} {answer.reason}'
      if answer.status_code not in _RETRY_STATUSES:
        raise HttpSourceError(f'{url} answered {reason}')
      after = answer.headers.get('Retry-After', '')
      problem = (reason, float(after) if after.isdigit() else delay)
    raise HttpSourceError(f'{url} failed {attempts} time(s), the last: '
                          f'{problem[0]}')


def _page_urls(url: str, source: HttpSource) -> str:
  """The first page's URL."""
  first = url
  if source.pagination == 'page':
    params = {source.param: source.start}
    if source.size_param and source.size:
      params[source.size_param] = source.size
    first = _with_query(url, params)
  return first


def _next_url(url: str, page_url: str, number: int, body,
              had_records: bool, source: HttpSource) -> Optional[str]:
  kind = source.pagination
  if kind == 'page':
    if not had_records:
      return None
    return _with_query(page_url, {source.param: source.start + number})
  if kind == 'cursor':
    cursor = _at(body, source.next)
    return _with_query(url, {source.param: cursor}) if cursor else None
  if kind == 'next_link':
    link = _at(body, source.next)
    return urljoin(page_url, link) if isinstance(link, str) and link else None
  return None


def _page_records(body: bytes, source: HttpSource):
  """(decoded body, records list) or (None, why the page is malformed)."""
  try:
    decoded = json.loads(body)
  except ValueError as e:
    return None, f'not JSON: {e}'
  records = _at(decoded, source.records) if source.records else decoded
  if not isinstance(records, list):
    where = f'at {source.records!r}' if source.records else 'as the body'
    return decoded, f'no list of records {where}'
  return decoded, records


def _malformed_page(name: str, number: int, body: bytes, why: str
                    ) -> pa.RecordBatch:
  text = body[:_RAW_LIMIT].decode('utf-8', 'replace')
  return raw_batch(pa.table({}), name, 0, raw=[text],
                   errors=[f'page {number} of {name.split(_PAGE_MARK)[0]}: '
                           f'{why}'],
                   kinds=['malformed'])


def _records_batches(records, name: str, schema: pa.Schema
                     ) -> Iterator[pa.RecordBatch]:
  data = '\n'.join(json.dumps(r, ensure_ascii=False, separators=(',', ':'))
                   for r in records).encode('utf-8')
  yield from decode_lines(split_lines(data + b'\n'), name, 0, schema)


def http_batches(url: str, dataset: Dataset) -> Iterator[pa.RecordBatch]:
  """Raw batches of every page of the API at `url` (module docstring)."""
  source = declared_source(dataset, url)
  client, schema = _Client(source, url), json_schema(dataset)
  page_url, number, malformed = _page_urls(url, source), 1, 0
  while page_url is not None:
    if number > source.max_pages:
      raise HttpSourceError(f'{url}: more than max_pages={source.max_pages} '
                            'pages; raise source.http.max_pages')
    body = client.get(page_url)
    name = f'{page_url}{_PAGE_MARK}{number}'
    decoded, records = _page_records(body, source)
    if isinstance(records, str):
      if source.pagination in ('cursor', 'next_link'):
        raise HttpSourceError(f'page {number} of {url} ({page_url}): '
                              f'{records}, so its next page cannot be found')
      malformed += 1
      if malformed == MALFORMED_IN_A_ROW:
        raise HttpSourceError(
            f'{url}: pages {number - malformed + 1} to {number} are all '
            f'malformed ({records}); check source.http.records and the URL')
      yield _malformed_page(name, number, body, records)
      had_records = True   # a malformed page does not end the pages
    else:
      malformed = 0
      had_records = bool(records)
      if records:
        yield from _records_batches(records, name, schema)
    page_url = _next_url(url, page_url, number, decoded, had_records, source)
    number += 1


def check_source(url: str, dataset: Dataset) -> str:
  """Preflight: the declaration has the section, the secret is set, and
  the first page answers 2xx (one attempt). Raises InputError (exit 2)."""
  source = declared_source(dataset, url)
  try:
    _Client(source, url).get(_page_urls(url, source), attempts=1)
  except HttpSourceError as e:
    raise InputError(f'--input {url} does not answer: {e}') from None
  return url


def record_texts(name: str, dataset: Dataset, positions: Sequence[int]
                 ) -> Dict[int, str]:
  """{position: the record's text} of a few records of one page (the
  dead-letter text of a duplicate), the page read again."""
  url, _, _ = name.partition(_PAGE_MARK)
  source = declared_source(dataset, url)
  found = {}
  try:
    _, records = _page_records(_Client(source, url).get(url), source)
  except HttpSourceError:
    return found
  if isinstance(records, str):
    return found
  wanted = set(positions)
  for batch in _records_batches(records, name, json_schema(dataset)):
    for raw in raw_records(batch):
      if raw.position in wanted:
        found[raw.position] = raw.text
  return found


class ReadHttpPages(beam.PTransform):
  """PBegin -> PCollection[pa.RecordBatch] raw batches, one per page of
  the API at `url` (module docstring), spread over the workers."""

  def __init__(self, url: str, dataset: Dataset):
    super().__init__()
    self._url, self._dataset = url, dataset

  def expand(self, pbegin):
    return (pbegin
            | 'ApiUrl' >> beam.Create([self._url])
            | 'ReadPages' >> beam.FlatMap(http_batches, self._dataset)
            | 'SpreadPagesOverWorkers' >> beam.Reshuffle())
