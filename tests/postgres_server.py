"""A throwaway PostgreSQL cluster for the tests: Debian's `postgresql`
package (.ci/run installs it), initdb in a temp folder, postgres on
127.0.0.1 at a free port with its unix socket in that folder, stopped at
the end. A missing binary fails the test that needs it (never a skip).

PostgreSQL refuses to run as root, and CI runs as root: then initdb and
postgres run as `nobody` (runuser), in a folder of /tmp handed to that
user (pytest's own temp folders are root's alone), removed at the end.

    from tests.postgres_server import PostgresServer
    with PostgresServer(tmp_path) as server:
      ... server.url('db') ...      # postgresql://postgres@127.0.0.1:<port>/db
"""

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import threading
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
    self._owned = os.geteuid() == 0
    self.dir = (tempfile.mkdtemp(prefix='mlpipe-pg-') if self._owned
                else os.path.join(str(directory), 'pg'))
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
    os.makedirs(self.dir, exist_ok=True)
    if self._owned:
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
    if self._owned:
      shutil.rmtree(self.dir, ignore_errors=True)

  def __enter__(self):
    return self.start()

  def __exit__(self, *exc):
    self.stop()


@pytest.fixture(scope='session')
def postgres(tmp_path_factory):
  """A PostgreSQL cluster for the test session; yields a PostgresServer."""
  with PostgresServer(tmp_path_factory.mktemp('postgres')) as server:
    yield server


class DroppingProxy:
  """A TCP proxy on 127.0.0.1 in front of a server that cuts the first
  connection sending more than `drop_after` bytes back to the client (a
  database lost mid-read); every later connection passes whole.
  `dropped` counts the cuts, `connections` the connections."""

  def __init__(self, target_port: int, drop_after: int):
    self.target_port, self.drop_after = target_port, drop_after
    self.dropped = self.connections = 0
    self._server = socket.create_server(('127.0.0.1', 0))
    self.port = self._server.getsockname()[1]
    self._lock = threading.Lock()
    self._closed = False
    threading.Thread(target=self._accept, daemon=True).start()

  def _accept(self):
    while not self._closed:
      try:
        client, _ = self._server.accept()
      except OSError:
        return
      upstream = socket.create_connection(('127.0.0.1', self.target_port))
      with self._lock:
        self.connections += 1
      threading.Thread(target=self._pipe, args=(client, upstream, False),
                       daemon=True).start()
      threading.Thread(target=self._pipe, args=(upstream, client, True),
                       daemon=True).start()

  def _pipe(self, source, target, to_client: bool):
    sent = 0
    try:
      while True:
        data = source.recv(65536)
        if not data:
          break
        target.sendall(data)
        sent += len(data)
        if to_client and sent > self.drop_after:
          with self._lock:
            cut = self.dropped == 0
            self.dropped += cut
          if cut:
            break
    except OSError:
      pass
    for s in (source, target):
      try:
        s.shutdown(socket.SHUT_RDWR)
      except OSError:
        pass
      s.close()

  def close(self):
    self._closed = True
    self._server.close()
