"""PostgreSQL, what reading and writing share: URLs, connections (ADBC's
libpq driver, which moves Arrow data in and out with binary COPY), retries
of a dropped connection, and SQL quoting.

A URL is libpq's (`postgresql://user@host:port/db?sslmode=...`); the
password comes from PGPASSWORD or ~/.pgpass, as libpq reads them, never
from a flag. Our own parameters (`table`, `query`, `key`, `range_rows`)
are taken out of the URL before libpq sees it.
"""

import time
from typing import Callable, Dict, Tuple, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pipelines.base.errors import RunError, UsageError

SCHEMES = ('postgresql://', 'postgres://')
# Parameters of ours in a URL's query string (libpq gets the others).
OWN_PARAMETERS = ('table', 'query', 'key', 'range_rows')
# A dropped connection is retried this many times, waiting 0.5, 1, 2, 4 s.
RETRIES = 4
_T = TypeVar('_T')


class PostgresUsageError(UsageError, ValueError):
  """A PostgreSQL flag, table or server that cannot work (exit 2)."""


class PostgresRunError(RunError, RuntimeError):
  """The database still failed after its retries, during the run (exit 3)."""


def is_postgres(url) -> bool:
  return isinstance(url, str) and url.lower().startswith(SCHEMES)


def split_url(url: str) -> Tuple[str, Dict[str, str]]:
  """(libpq URL without our parameters, our parameters)."""
  parts = urlsplit(url)
  ours, theirs = {}, []
  for name, value in parse_qsl(parts.query, keep_blank_values=True):
    if name in OWN_PARAMETERS:
      ours[name] = value
    else:
      theirs.append((name, value))
  return urlunsplit(parts._replace(query=urlencode(theirs))), ours


def display_url(url: str) -> str:
  """The URL without a password (for messages, sources and summaries)."""
  parts = urlsplit(url)
  if parts.password is None:
    return url
  host = parts.hostname or ''
  if parts.port:
    host = f'{host}:{parts.port}'
  user = f'{parts.username}@' if parts.username else ''
  return urlunsplit(parts._replace(netloc=user + host))


def connect(url: str, autocommit: bool = True):
  """An ADBC DBAPI connection to `url` (our parameters taken out), with a
  connect timeout unless the URL sets one."""
  import adbc_driver_postgresql.dbapi as pg  # pylint: disable=import-outside-toplevel
  libpq_url, _ = split_url(url)
  if 'connect_timeout=' not in libpq_url:
    libpq_url += ('&' if urlsplit(libpq_url).query else '?') + (
        'connect_timeout=10')
  return pg.connect(libpq_url, autocommit=autocommit)


def connection_problem(url: str) -> str:
  """'' when the server at `url` answers a query, else why not (one line)."""
  try:
    with connect(url) as conn, conn.cursor() as cursor:
      cursor.execute('SELECT 1')
      cursor.fetchall()
  except Exception as e:  # pylint: disable=broad-except
    return first_line(e)
  return ''


def first_line(error: Exception) -> str:
  text = str(error).strip()
  for line in text.splitlines():
    line = line.strip()
    if line and not line.startswith(('[', 'Detail', 'Hint')):
      return line
  return type(error).__name__


def is_dropped_connection(error: Exception) -> bool:
  """A connection error (lost server, reset socket, shutdown), as opposed
  to an error in the SQL or the data, which a retry would only repeat."""
  from adbc_driver_manager import dbapi  # pylint: disable=import-outside-toplevel
  if isinstance(error, (dbapi.ProgrammingError, dbapi.IntegrityError,
                        dbapi.DataError, dbapi.NotSupportedError)):
    return False
  if isinstance(error, (dbapi.OperationalError, dbapi.InternalError,
                        dbapi.DatabaseError, OSError)):
    return True
  text = str(error).lower()
  return any(w in text for w in ('connection', 'server closed', 'terminat'))


def with_retries(what: str, attempt: Callable[[int], _T],
                 retries: int = RETRIES, first_wait: float = 0.5) -> _T:
  """attempt(try number) until it returns; a dropped connection is tried
  again (waiting 0.5, 1, 2 s, ...), anything else raises at once. After
  the last retry: PostgresRunError naming `what`."""
  wait = first_wait
  for number in range(retries + 1):
    try:
      return attempt(number)
    except Exception as e:  # pylint: disable=broad-except
      if not is_dropped_connection(e):
        raise
      if number == retries:
        raise PostgresRunError(f'{what}: the connection failed {retries + 1}'
                               f' times: {first_line(e)}') from e
      time.sleep(wait)
      wait *= 2
  raise AssertionError('unreachable')


def identifier(name: str) -> str:
  """A quoted SQL identifier; `schema.table` is two."""
  if '\0' in name:
    raise PostgresUsageError(f'{name!r}: a NUL in a name')
  return '.'.join('"' + part.replace('"', '""') + '"'
                  for part in name.split('.'))


def literal(text: str) -> str:
  """A quoted SQL string literal (standard_conforming_strings on: the
  connection sets it)."""
  if '\0' in text:
    raise PostgresUsageError(f'{text!r}: a NUL in a value')
  return "'" + text.replace("'", "''") + "'"


STANDARD_STRINGS = 'SET standard_conforming_strings = on'
