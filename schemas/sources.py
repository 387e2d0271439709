"""The declaration's `source:` section: where records come from when they
are not files. Today one kind, `http`, a paginated JSON API read by
`--input https://...` (transforms/http_source.py):

    source:
      http:
        records: data          # where the records list is in each page's
                               # JSON body (dotted path; '' the body itself)
        pagination:            # one of (default: a single page)
          {type: page, param: page, start: 1, size_param: per_page, size: 100}
          {type: cursor, param: cursor, next: meta.next_cursor}
          {type: next_link, next: links.next}
        rate_limit: 5          # requests per second at most (default: none)
        retries: 3             # attempts after the first (default 3)
        backoff: 0.5           # seconds before the first retry, doubled each time
        timeout: 30            # seconds per request (connect and each read)
        max_pages: 100000      # more pages than this stop the run
        auth: {env: PARTNER_API_TOKEN, header: Authorization, prefix: 'Bearer '}

A secret is never in the declaration nor in a flag: `auth.env` names the
environment variable that holds it.
"""

import dataclasses
from typing import Any, Callable, Dict, Optional

_HTTP_KEYS = ('records', 'pagination', 'rate_limit', 'retries', 'backoff',
              'timeout', 'max_pages', 'auth')
_PAGINATION_KEYS = {'page': ('type', 'param', 'start', 'size_param', 'size'),
                    'cursor': ('type', 'param', 'next'),
                    'next_link': ('type', 'next')}
_AUTH_KEYS = ('env', 'header', 'prefix')


@dataclasses.dataclass(frozen=True)
class HttpSource:
  """A declared paginated JSON API (module docstring)."""
  records: str = ''
  pagination: str = 'none'          # none, page, cursor or next_link
  param: Optional[str] = None       # page number or cursor query parameter
  start: int = 1                    # first page number
  size_param: Optional[str] = None  # page size query parameter
  size: Optional[int] = None
  next: Optional[str] = None        # body path of the next cursor or link
  rate_limit: Optional[float] = None
  retries: int = 3
  backoff: float = 0.5
  timeout: float = 30.0
  max_pages: int = 100000
  auth_env: Optional[str] = None
  auth_header: str = 'Authorization'
  auth_prefix: str = 'Bearer '


def _number(fail, key, value, kind=float, minimum=0.0):
  if isinstance(value, bool) or not isinstance(value, (int, float)) or (
      kind is int and not isinstance(value, int)) or value < minimum:
    fail(key, f'must be a {"whole " if kind is int else ""}number >= '
         f'{minimum:g}, got {value!r}')
  return kind(value)


def _text(fail, key, value):
  if not isinstance(value, str):
    fail(key, f'must be a string, got {value!r}')
  return value


def load_source(value: Any, fail: Callable[..., None]
                ) -> Dict[str, HttpSource]:
  """The `source:` section -> {'http': HttpSource}; `fail(key, problem,
  fix)` raises the declaration's one-line error."""
  if value is None:
    return {}
  if not isinstance(value, dict) or set(value) - {'http'}:
    fail('source', 'must be a mapping with the key http',
         'see "Inputs" in the README')
  http = value.get('http') or {}
  if not isinstance(http, dict):
    fail('source.http', 'must be a mapping')
  for name in http:
    if name not in _HTTP_KEYS:
      fail(f'source.http.{name}', 'unknown key',
           f'use one of {", ".join(_HTTP_KEYS)}')
  out: Dict[str, Any] = {}
  if 'records' in http:
    out['records'] = _text(fail, 'source.http.records', http['records'] or '')
  paging = http.get('pagination')
  if paging is not None:
    if not isinstance(paging, dict) or paging.get('type') not in (
        _PAGINATION_KEYS):
      fail('source.http.pagination', 'needs a type',
           f'use type: {" | ".join(_PAGINATION_KEYS)}')
    kind = paging['type']
    for name in paging:
      if name not in _PAGINATION_KEYS[kind]:
        fail(f'source.http.pagination.{name}', f'unknown key for {kind}',
             f'use {", ".join(_PAGINATION_KEYS[kind])}')
    out['pagination'] = kind
    for name in ('param', 'size_param', 'next'):
      if name in paging:
        out[name] = _text(fail, f'source.http.pagination.{name}',
                          paging[name])
    if kind == 'page':
      out.setdefault('param', 'page')
      if 'start' in paging:
        out['start'] = _number(fail, 'source.http.pagination.start',
                               paging['start'], int)
      if 'size' in paging:
        out['size'] = _number(fail, 'source.http.pagination.size',
                              paging['size'], int, 1)
    elif kind == 'cursor':
      out.setdefault('param', 'cursor')
    if kind in ('cursor', 'next_link') and not out.get('next'):
      fail('source.http.pagination.next', f'{kind} pagination needs the '
           'body path of the next page\'s ' +
           ('cursor' if kind == 'cursor' else 'URL'), 'e.g. next: meta.next')
  for name, kind, minimum in (('rate_limit', float, 0.001),
                              ('retries', int, 0), ('backoff', float, 0.0),
                              ('timeout', float, 0.001),
                              ('max_pages', int, 1)):
    if name in http:
      out[name] = _number(fail, f'source.http.{name}', http[name], kind,
                          minimum)
  auth = http.get('auth')
  if auth is not None:
    if not isinstance(auth, dict) or 'env' not in auth:
      fail('source.http.auth', 'needs env: the environment variable that '
           'holds the secret', 'e.g. auth: {env: PARTNER_API_TOKEN}')
    for name in auth:
      if name not in _AUTH_KEYS:
        fail(f'source.http.auth.{name}', 'unknown key',
             f'use one of {", ".join(_AUTH_KEYS)}')
    out['auth_env'] = _text(fail, 'source.http.auth.env', auth['env'])
    if 'header' in auth:
      out['auth_header'] = _text(fail, 'source.http.auth.header',
                                 auth['header'])
    if 'prefix' in auth:
      out['auth_prefix'] = _text(fail, 'source.http.auth.prefix',
                                 auth['prefix'])
  return {'http': HttpSource(**out)}
