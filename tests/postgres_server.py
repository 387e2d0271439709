"""A throwaway PostgreSQL cluster for the tests: Debian's `postgresql`
package (.ci/run installs it), initdb in a temp folder, postgres on
127.0.0.1 at a free port with its unix socket in that folder, stopped at
the end. A missing binary fails the test that needs it (never a skip).

PostgreSQL refuses to run as root, and CI runs as root: then initdb and
postgres run as `nobody` (runuser), in a folder handed to that user.

    from tests.postgres_server import PostgresServer
    with PostgresServer(tmp_path) as server:
      ... server.url('db') ...      # postgresql://postgres@127.0.0.1:<port>/db
"""

import glob
import os
import shutil
import socket
import subprocess
import time

import pytest

USER = 'postgres'   # the cluster's superuser (not an OS account)
_RUN_AS = 'nobody'  # the OS account postgres runs as when we are root


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def postgres_bin() -> str:
  """The folder of Debian's PostgreSQL binaries (the newest major)."""
  found = sorted(glob.glob('/usr/lib/postgresql/*/bin/postgres'),
                 key=lambda p: int(p.split('/')[4]))
  if not found:
    found = [shutil.which('postgres') or '']
  if not found[-1]:
    pytest.fail('PostgreSQL is not installed: apt-get install -y postgresql '
                '(.ci/run does)', pytrace=False)
  return os.path.dirname(found[-1])


class PostgresServer:
  """One cluster; `url(db)` names a database on it, `create_database(db)`
  makes one."""

  def __init__(self, directory, port: int = 0):
    self.dir = os.path.join(str(directory), 'pg')
    self.port = port or free_port()
    self.process = None
    self._bin = postgres_bin()

  def url(self, db: str = 'postgres', **query) -> str:
    tail = '&'.join(f'{k}={v}' for k, v in query.items())
    return (f'postgresql://{USER}@127.0.0.1:{self.port}/{db}' +
            (f'?{tail}' if tail else ''))

  def _command(self, *args) -> list:
    if os.geteuid() == 0:
      return ['runuser', '-u', _RUN_AS, '--', *args]
    return list(args)

  def _run(self, *args):
    done = subprocess.run(self._command(*args), capture_output=True,
                          text=True, check=False, timeout=120)
    if done.returncode != 0:
      pytest.fail(f'{os.path.basename(args[0])} failed: '
                  f'{(done.stderr or done.stdout).strip()}', pytrace=False)
    return done

  def start(self) -> 'PostgresServer':
    os.makedirs(self.dir)
    if os.geteuid() == 0:
      # The temp folder's parents are root's; postgres needs its own.
      parent = os.path.dirname(self.dir)
      os.chmod(parent, 0o755)
      shutil.chown(self.dir, _RUN_AS)
    data = os.path.join(self.dir, 'data')
    self._run(os.path.join(self._bin, 'initdb'), '-D', data, '-U', USER,
              '-A', 'trust', '-E', 'UTF8', '--locale', 'C', '--no-sync')
    self.process = subprocess.Popen(
        self._command(os.path.join(self._bin, 'postgres'), '-D', data,
                      '-h', '127.0.0.1', '-p', str(self.port),
                      '-k', self.dir, '-c', 'fsync=off',
                      '-c', 'synchronous_commit=off',
                      '-c', 'full_page_writes=off',
                      '-c', 'logging_collector=off'),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Bounded wait for the server to accept queries (a start-up wait, not
    # a timing assertion).
    deadline = time.monotonic() + 60
    ready = os.path.join(self._bin, 'pg_isready')
    while time.monotonic() < deadline:
      if self.process.poll() is not None:
        pytest.fail(f'postgres exited with {self.process.returncode}',
                    pytrace=False)
      if subprocess.run([ready, '-q', '-h', '127.0.0.1', '-p',
                         str(self.port)], check=False).returncode == 0:
        return self
      time.sleep(0.1)
    self.stop()
    pytest.fail('postgres did not accept connections in 60 s',
                pytrace=False)

  def create_database(self, db: str) -> str:
    """Creates database `db`; returns its url."""
    self.execute(f'CREATE DATABASE "{db}"')
    return self.url(db)

  def execute(self, sql: str, db: str = 'postgres'):
    """Runs `sql` with psql (autocommit); returns its text output."""
    return subprocess.run(
        [os.path.join(self._bin, 'psql'), '-X', '-q', '-A', '-t',
         '-v', 'ON_ERROR_STOP=1', '-h', '127.0.0.1', '-p', str(self.port),
         '-U', USER, '-d', db, '-c', sql],
        capture_output=True, text=True, check=True, timeout=120).stdout

  def stop(self):
    if self.process is not None and self.process.poll() is None:
      self.process.terminate()   # SIGTERM: postgres' smart shutdown
      try:
        self.process.wait(timeout=30)
      except subprocess.TimeoutExpired:
        self.process.kill()
        self.process.wait(timeout=30)
    self.process = None

  def __enter__(self):
    return self.start()

  def __exit__(self, *exc):
    self.stop()


@pytest.fixture(scope='session')
def postgres(tmp_path_factory):
  """A PostgreSQL cluster for the test session; yields a PostgresServer."""
  with PostgresServer(tmp_path_factory.mktemp('postgres')) as server:
    yield server
