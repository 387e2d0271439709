"""A local Google Cloud Storage for tests: gs:// paths without a network.

Use it from a test module with

    pytest_plugins = ['tests.gcs_emulator']

and ask for the `gcs_emulator` fixture: it yields the name of an empty,
existing bucket, so `gs://<bucket>/...` works through Beam's FileSystems
(create, open, match, copy, rename, delete), `fileio.MatchFiles` and every
Beam sink and source in this process.

How it works:
  * gcp-storage-emulator (a test dependency in setup.py) runs in a child
    process on a free 127.0.0.1 port, in memory, with the bucket created;
  * STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT makes google-cloud-storage
    (what Beam's GcsIO uses) send every request there with anonymous
    credentials;
  * Beam looks for Google credentials before it builds its GCS client and,
    when there are none, retries google.auth.default() with backoff for about
    20 s before falling back to an anonymous client. The fixture settles that
    lookup to "anonymous" up front (Beam caches the answer per process), so
    the first gs:// call is immediate. Worker processes that Beam starts
    (multi_processing, PROCESS or DOCKER environments) inherit the variable
    but not that shortcut: use the DirectRunner or LOOPBACK with it.

Not covered: TensorFlow's own gs:// filesystem (tf.io.gfile, used by
tf.Transform and by TFDV's load_statistics). TF 2.16's built-in GCS client
always talks to www.googleapis.com and ignores STORAGE_EMULATOR_HOST; the
tensorflow-io-gcs-filesystem plugin (TF_USE_MODULAR_FILESYSTEM=1) reads
CLOUD_STORAGE_EMULATOR_ENDPOINT but crashes the interpreter (SIGSEGV) on the
first gs:// call with TF 2.16 (tensorflow/io#2020). Anything that reaches
gs:// through tf.io.gfile fails against the emulator.
"""

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest

ENV_VAR = 'STORAGE_EMULATOR_HOST'
_START_TIMEOUT_S = 30


def _free_port() -> int:
  with contextlib.closing(socket.socket()) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _wait_until_up(url: str, proc: subprocess.Popen):
  deadline = time.monotonic() + _START_TIMEOUT_S
  while time.monotonic() < deadline:
    if proc.poll() is not None:
      raise RuntimeError(
          f'gcp-storage-emulator exited with code {proc.returncode}')
    try:
      with urllib.request.urlopen(f'{url}/storage/v1/b', timeout=1):
        return
    except OSError:
      time.sleep(0.1)
  raise RuntimeError(f'gcp-storage-emulator did not answer at {url} within '
                     f'{_START_TIMEOUT_S} s')


@contextlib.contextmanager
def _anonymous_beam_credentials():
  """Beam's credential lookup answered "none" (anonymous) in this process."""
  from apache_beam.internal.gcp import auth
  creds = auth._Credentials  # pylint: disable=protected-access
  with creds._credentials_lock:  # pylint: disable=protected-access
    saved = (creds._credentials_init, creds._credentials)  # pylint: disable=protected-access
    creds._credentials_init, creds._credentials = True, None  # pylint: disable=protected-access
  try:
    yield
  finally:
    with creds._credentials_lock:  # pylint: disable=protected-access
      creds._credentials_init, creds._credentials = saved  # pylint: disable=protected-access


@contextlib.contextmanager
def run_emulator(bucket: str):
  """Starts the emulator with `bucket`; yields its http://127.0.0.1:PORT."""
  port = _free_port()
  url = f'http://127.0.0.1:{port}'
  proc = subprocess.Popen(
      [sys.executable, '-m', 'gcp_storage_emulator', 'start',
       '--host', '127.0.0.1', '--port', str(port), '--in-memory',
       '--default-bucket', bucket, '--quiet'],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    _wait_until_up(url, proc)
    yield url
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


@pytest.fixture(scope='session')
def gcs_emulator():
  """The name of an empty bucket on a local GCS emulator (see the module)."""
  bucket = f'mlpipe-test-{uuid.uuid4().hex[:8]}'
  saved = os.environ.get(ENV_VAR)
  with run_emulator(bucket) as url, _anonymous_beam_credentials():
    os.environ[ENV_VAR] = url
    try:
      yield bucket
    finally:
      if saved is None:
        os.environ.pop(ENV_VAR, None)
      else:
        os.environ[ENV_VAR] = saved
