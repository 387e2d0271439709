"""--input https://... : a paginated JSON API declared in the schema's
`source: http:` section (transforms/http_source.py), against a local
http.server on a free 127.0.0.1 port started by the test.

The same records served as pages and written as a JSON-lines file give
the same valid records and the same dead letters; a connection dropped
mid-body and a 503 are retried and the pages read whole; a malformed page
is one dead-letter row with its URL and page number and the run goes on;
a source that still fails after its retries stops the run with exit 3 and
one line; preflight refuses a source that cannot work with exit 2."""

import http.server
import json
import os
import threading
from urllib.parse import parse_qs, urlsplit

import pyarrow.parquet as pq
import pytest

from pipelines import batch
from tests.services import free_port

TOKEN_ENV = 'MLPIPE_TEST_API_TOKEN'
TOKEN = 'not-a-real-secret'
PAGE_ROWS = 10

DECLARATION = """
name: events
roles: {id: event_id, timestamp: event_time}
fields:
  event_id: {type: string, required: true}
  user_id: {type: string, required: true}
  amount: {type: float, required: true, min: 0}
  event_time: {type: timestamp, required: true}
source:
  http:
    records: data
    pagination: {type: page, param: page, start: 1, size_param: per_page,
                 size: %d}
    retries: 2
    backoff: 0.01
    timeout: 5
    rate_limit: 200
    auth: {env: %s}
""" % (PAGE_ROWS, TOKEN_ENV)


def _records():
  """30 valid events, then 4 broken ones and a later copy of event e3."""
  good = [{'event_id': f'e{i}', 'user_id': f'u{i % 4}',
           'amount': round(1.5 * i, 2),
           'event_time': f'2026-10-01T{i % 24:02d}:00:00Z'}
          for i in range(30)]
  broken = [{'event_id': 'b1', 'user_id': 'u1', 'amount': -1.0,
             'event_time': '2026-10-01T01:00:00Z'},        # out_of_range
            {'event_id': 'b2', 'amount': 2.0,
             'event_time': '2026-10-01T01:00:00Z'},        # missing_required
            {'event_id': 'b3', 'user_id': 'u1', 'amount': 'ten',
             'event_time': '2026-10-01T01:00:00Z'},        # type_error
            ['not', 'an', 'object'],                       # malformed
            dict(good[3], amount=99.0,
                 event_time='2026-10-02T00:00:00Z')]       # duplicate
  return good + broken


class Api:
  """A paginated API: `pages` {page number: a list of records, or 'html'
  (a body that is not JSON) or 'down' (500, every time)}; a page not
  listed is empty (the end). Every request needs the bearer token.
  `faults` {page: [what its first requests get]}: 'drop' (half the body,
  then the connection closed) or 'busy' (503, Retry-After: 0). Counts
  the requests per page."""

  def __init__(self, pages, faults=None):
    self.pages, self.faults = pages, {k: list(v) for k, v in
                                      (faults or {}).items()}
    self.requests = {}
    api = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def log_message(self, *args):  # quiet
        pass

      def do_GET(self):  # pylint: disable=invalid-name
        query = parse_qs(urlsplit(self.path).query)
        page = int(query.get('page', ['1'])[0])
        api.requests[page] = api.requests.get(page, 0) + 1
        if self.headers.get('Authorization') != f'Bearer {TOKEN}':
          return self._send(401, b'{"error": "no token"}')
        fault = (api.faults.get(page) or [None]).pop(0) if api.faults.get(
            page) else None
        content = api.pages.get(page, [])
        if fault == 'busy' or content == 'down':
          return self._send(503 if fault else 500, b'{}',
                            {'Retry-After': '0'})
        if content == 'html':
          return self._send(200, b'<html>maintenance</html>')
        body = json.dumps({'data': content, 'page': page}).encode()
        if fault == 'drop':
          self.send_response(200)
          self.send_header('Content-Length', str(len(body)))
          self.end_headers()
          self.wfile.write(body[:len(body) // 2])
          self.wfile.flush()
          self.close_connection = True
          return None
        return self._send(200, body)

      def _send(self, status, body, headers=None):
        self.send_response(status)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(body)))
        for key, value in (headers or {}).items():
          self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    self.server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    self.url = f'http://127.0.0.1:{self.server.server_port}/v1/events'
    self.thread = threading.Thread(target=self.server.serve_forever,
                                   daemon=True)

  def __enter__(self):
    self.thread.start()
    return self

  def __exit__(self, *exc):
    self.server.shutdown()
    self.server.server_close()


@pytest.fixture(scope='module')
def declaration(tmp_path_factory):
  path = tmp_path_factory.mktemp('http_decl') / 'events.yaml'
  path.write_text(DECLARATION)
  return str(path)


@pytest.fixture
def token(monkeypatch):
  monkeypatch.setenv(TOKEN_ENV, TOKEN)


def _run(declaration, input_path, out):
  # No label: the run stops after statistics and validation.
  return batch.run(['--schema', declaration, '--input', input_path,
                    '--output_dir', str(out), '--no-fail_on_anomalies',
                    '--runner', 'DirectRunner'])


def _silver(out):
  rows = []
  for name in sorted(os.listdir(out / 'silver')):
    if name.endswith('.parquet'):
      rows += pq.read_table(out / 'silver' / name).to_pylist()
  return sorted(rows, key=lambda r: r['event_id'])


def _dead(out):
  rows = []
  for name in sorted(os.listdir(out / 'dead_letter')):
    if name.endswith('.jsonl'):
      rows += [json.loads(l) for l in
               (out / 'dead_letter' / name).read_text().splitlines() if l]
  return rows


def _comparable(row):
  """A dead-letter row without where it was read (a duplicate's message
  names where its first copy was)."""
  return (row['error_kind'], row['field'], row['raw'],
          None if row['error_kind'] == 'duplicate' else row['message'])


def test_api_pages_read_as_the_same_jsonl_file(declaration, token, tmp_path):
  records = _records()
  jsonl = tmp_path / 'events.jsonl'
  # Written compactly: a page's record is kept as compact JSON (its
  # dead-letter `raw`), and the two outputs are compared byte for byte.
  jsonl.write_text(''.join(json.dumps(r, separators=(',', ':')) + '\n'
                           for r in records))
  file_summary = _run(declaration, str(jsonl), tmp_path / 'file')
  # The same records as pages of 10, with a maintenance page (not JSON)
  # between pages 2 and 4; page 2's first answer is cut short mid-body
  # and page 4's is a 503.
  pages = {1: records[0:10], 2: records[10:20], 3: 'html',
           4: records[20:30], 5: records[30:]}
  with Api(pages, {2: ['drop'], 4: ['busy']}) as api:
    summary = _run(declaration, api.url, tmp_path / 'api')

  # Page 1: preflight, then the read; 2 and 4: a retry each; 5 again for
  # the text of its duplicate's dead-letter row; 6 is empty: the end.
  assert api.requests == {1: 2, 2: 2, 3: 1, 4: 2, 5: 2, 6: 1}
  assert file_summary['records_read'] == len(records) == 35
  assert file_summary['records_valid'] == 30
  assert file_summary['records_read_by_source'] == {str(jsonl): 35}
  # Every record, plus one row for the malformed page.
  assert summary['records_read'] == 36
  assert summary['records_read_by_source'] == {api.url: 36}
  report = (tmp_path / 'api' / 'report' / 'index.html').read_text()
  assert f'read from {api.url}' in report
  assert summary['records_valid'] == 30
  assert summary['records_dead_lettered'] == 6
  assert summary['records_accounted_for'] is True
  assert summary['dead_letter_by_kind'] == dict(
      file_summary['dead_letter_by_kind'],
      malformed=file_summary['dead_letter_by_kind']['malformed'] + 1)
  assert _silver(tmp_path / 'api') == _silver(tmp_path / 'file')
  assert len(_silver(tmp_path / 'api')) == 30

  dead = _dead(tmp_path / 'api')
  page = [r for r in dead if r['raw'] == '<html>maintenance</html>']
  assert len(page) == 1
  page_url = f'{api.url}?page=3&per_page={PAGE_ROWS}'
  assert page[0]['source_file'] == f'{page_url}#page=3'
  assert page[0]['error_kind'] == 'malformed'
  assert page[0]['message'].startswith(f'page 3 of {page_url}: not JSON')
  rest = sorted(map(_comparable, [r for r in dead if r not in page]),
                key=repr)
  assert rest == sorted(map(_comparable, _dead(tmp_path / 'file')), key=repr)
  duplicate = [r for r in dead if r['error_kind'] == 'duplicate']
  assert [json.loads(r['raw'])['event_id'] for r in duplicate] == ['e3']
  assert duplicate[0]['source_file'].endswith('#page=5')


def test_a_source_that_keeps_failing_stops_the_run(declaration, token,
                                                    tmp_path, capsys):
  """Page 2 answers 500 to every attempt: exit 3, one line, and the run
  summary says failed (never a silent read of page 1 alone)."""
  records = _records()
  with Api({1: records[:10], 2: 'down', 3: records[10:20]}) as api:
    code = batch.main(['--schema', declaration, '--input', api.url,
                       '--output_dir', str(tmp_path / 'out'),
                       '--runner', 'DirectRunner'])
    requests = dict(api.requests)
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 3
  assert requests == {1: 2, 2: 3}   # page 2: the first attempt, 2 retries
  assert err[-1].startswith('error: the run failed: ')
  assert f'{api.url}?page=2&per_page={PAGE_ROWS} failed 3 time(s), the ' \
      'last: HTTP 500' in err[-1]
  summary = json.loads((tmp_path / 'out' / 'run_summary.json').read_text())
  assert summary['status'] == 'failed'


def test_preflight_refuses_a_source_that_cannot_work(declaration, tmp_path,
                                                     monkeypatch, capsys):
  """Exit 2 and one line before any job starts."""
  transactions = 'transactions'
  with Api({1: _records()[:10]}) as api:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    cases = [
        (declaration, api.url, f'--input {api.url}: the declaration\'s '
         f'source.http.auth reads the secret from ${TOKEN_ENV}, which is '
         'not set'),
        (transactions, api.url, f'--input {api.url}: the declaration of '
         'transactions has no source: http: section'),
    ]
    for schema, url, message in cases:
      code = batch.main(['--schema', schema, '--input', url,
                         '--output_dir', str(tmp_path / 'out')])
      err = capsys.readouterr().err
      assert code == 2
      assert err.startswith(f'error: {message}') and err.count('\n') == 1
    monkeypatch.setenv(TOKEN_ENV, 'wrong')
    code = batch.main(['--schema', declaration, '--input', api.url,
                       '--output_dir', str(tmp_path / 'out')])
    err = capsys.readouterr().err
    assert code == 2
    assert err == (f'error: --input {api.url} does not answer: '
                   f'{api.url}?page=1&per_page={PAGE_ROWS} answered HTTP 401 '
                   'Unauthorized\n')
  closed = f'http://127.0.0.1:{free_port()}/v1'
  monkeypatch.setenv(TOKEN_ENV, TOKEN)
  code = batch.main(['--schema', declaration, '--input', closed,
                     '--output_dir', str(tmp_path / 'out')])
  err = capsys.readouterr().err
  assert code == 2 and err.count('\n') == 1
  assert err.startswith(f'error: --input {closed} does not answer: '
                        f'{closed}?page=1&per_page={PAGE_ROWS} failed 1 '
                        'time(s), the last: ConnectionError')
  assert not os.path.exists(tmp_path / 'out' / 'run_summary.json')


@pytest.mark.parametrize('section,message', [
    ('{http: {pagination: {type: pages}}}',
     'source.http.pagination: needs a type; use type: page | cursor | '
     'next_link'),
    ('{http: {pagination: {type: cursor}}}',
     'source.http.pagination.next: cursor pagination needs the body path of '
     "the next page's cursor; e.g. next: meta.next"),
    ('{http: {retries: -1}}',
     'source.http.retries: must be a whole number >= 0, got -1'),
    ('{http: {auth: {token: abc}}}',
     'source.http.auth: needs env: the environment variable that holds the '
     'secret; e.g. auth: {env: PARTNER_API_TOKEN}'),
    ('{ftp: {}}', 'source: must be a mapping with the key http'),
])
def test_a_bad_source_section_is_one_line(tmp_path, section, message):
  from schemas.dataset import SchemaError, load_dataset
  path = tmp_path / 'events.yaml'
  path.write_text(DECLARATION.split('source:')[0] + f'source: {section}\n')
  with pytest.raises(SchemaError) as error:
    load_dataset(str(path))
  assert str(error.value).startswith(f'events.yaml: {message}')


class _Linked(http.server.BaseHTTPRequestHandler):
  """Three pages behind a cursor (?cursor=) and behind next links
  (/p/<n>); while `broken` is set, the second page is not JSON."""

  broken = False

  def log_message(self, *args):  # quiet
    pass

  def do_GET(self):  # pylint: disable=invalid-name
    parts = urlsplit(self.path)
    query = parse_qs(parts.query)
    if parts.path.startswith('/p/'):
      page = int(parts.path[3:])
    else:
      page = int(query.get('cursor', ['c0'])[0][1:])
    records = _records()[page * 10:(page + 1) * 10]
    last = page == 2
    body = json.dumps({
        'data': records,
        'meta': {'next': None if last else f'c{page + 1}'},
        'links': {'next': None if last else f'/p/{page + 1}'}}).encode()
    if page == 1 and self.broken:
      body = b'{"data": [oops'
    self.send_response(200)
    self.send_header('Content-Length', str(len(body)))
    self.end_headers()
    self.wfile.write(body)


@pytest.mark.parametrize('pagination', [
    '{type: cursor, param: cursor, next: meta.next}',
    '{type: next_link, next: links.next}'])
def test_cursor_and_next_link_pagination(tmp_path, pagination, token):
  from schemas.dataset import load_dataset
  from transforms.http_source import HttpSourceError, http_batches
  from transforms.read import raw_records
  path = tmp_path / 'events.yaml'
  path.write_text(DECLARATION.replace(
      DECLARATION[DECLARATION.index('    pagination'):
                  DECLARATION.index('    retries')],
      f'    pagination: {pagination}\n'))
  dataset = load_dataset(str(path))
  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _Linked)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    url = f'http://127.0.0.1:{server.server_port}/v1/events'
    rows = [(raw.source.rsplit('#', 1)[1], raw.position, raw.values)
            for batch in http_batches(url, dataset)
            for raw in raw_records(batch)]
    assert [values for _, _, values in rows] == _records()[:30]
    assert [(page, position) for page, position, _ in rows] == [
        (f'page={p}', i) for p in (1, 2, 3) for i in range(10)]
    # A page without its next cursor or link: the rest cannot be found,
    # so the read stops rather than end early.
    _Linked.broken = True
    with pytest.raises(HttpSourceError, match='page 2 of .*: not JSON: .*'
                       'so its next page cannot be found'):
      list(http_batches(url, dataset))
  finally:
    _Linked.broken = False
    server.shutdown()
    server.server_close()


def test_malformed_pages_in_a_row_stop_the_read(declaration, token):
  """A records path or URL that is wrong makes every page malformed: the
  third in a row stops the read instead of dead-lettering pages forever."""
  from schemas.dataset import load_dataset
  from transforms.http_source import HttpSourceError, http_batches
  dataset = load_dataset(declaration)
  with Api({1: _records()[:10], 2: 'html', 3: 'html', 4: 'html',
            5: _records()[10:20]}) as api:
    batches = http_batches(api.url, dataset)
    assert next(batches).num_rows == 10
    assert next(batches).num_rows == 1   # page 2's dead-letter row
    assert next(batches).num_rows == 1   # page 3's
    with pytest.raises(HttpSourceError, match='pages 2 to 4 are all '
                       'malformed'):
      next(batches)
