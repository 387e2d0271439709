"""A throwaway redis-server for the tests: 127.0.0.1, a free port, a temp
dir, no persistence. `.ci/run` installs Debian's redis-server; a missing
binary fails the test that needs it (never a skip).

    from tests.redis_server import RedisServer
    with RedisServer(tmp_path) as server:
      ... server.url ...           # redis://127.0.0.1:<port>/0
"""

import os
import shutil
import socket
import subprocess
import time

import pytest


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class RedisServer:

  def __init__(self, directory, port: int = 0):
    self.dir = str(directory)
    self.port = port or free_port()
    self.process = None

  def url(self, db: int = 0) -> str:
    return f'redis://127.0.0.1:{self.port}/{db}'

  def start(self) -> 'RedisServer':
    binary = shutil.which('redis-server')
    if binary is None:
      pytest.fail('redis-server is not installed: apt-get install -y '
                  'redis-server (.ci/run does)', pytrace=False)
    os.makedirs(self.dir, exist_ok=True)
    self.process = subprocess.Popen(
        [binary, '--bind', '127.0.0.1', '--port', str(self.port),
         '--dir', self.dir, '--save', '', '--appendonly', 'no',
         '--daemonize', 'no', '--loglevel', 'warning'],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Bounded wait for the port (not a timing assertion: a start-up wait).
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
      if self.process.poll() is not None:
        pytest.fail(f'redis-server exited with {self.process.returncode}',
                    pytrace=False)
      try:
        with socket.create_connection(('127.0.0.1', self.port), 0.2):
          return self
      except OSError:
        time.sleep(0.02)
    self.stop()
    pytest.fail('redis-server did not open its port in 20 s', pytrace=False)

  def stop(self):
    if self.process is not None and self.process.poll() is None:
      self.process.terminate()
      self.process.wait(timeout=20)
    self.process = None

  def __enter__(self):
    return self.start()

  def __exit__(self, *exc):
    self.stop()
