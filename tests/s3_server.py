"""A local S3 for tests: s3:// paths without a network.

    pytest_plugins = ['tests.s3_server']
    def test_x(s3_bucket): ...   # the name of an empty, existing bucket

moto's server mode (`ThreadedMotoServer`, a test dependency in setup.py)
runs in a thread of the test process on a free 127.0.0.1 port. The
fixture points the standard AWS variables at it (AWS_ENDPOINT_URL, a
region and dummy keys), which is all Beam's S3 file system and boto3
need: the code under test is configured exactly as a user configures it
for an S3-compatible server. Everything is in memory and gone at the end
of the session.
"""

import logging
import os
import uuid

import pytest

from pipelines.outputs import files

_ENV = ('AWS_ENDPOINT_URL', 'AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY',
        'AWS_DEFAULT_REGION', 'AWS_SESSION_TOKEN', 'AWS_PROFILE')


@pytest.fixture(scope='session')
def s3_bucket():
  """An empty bucket on a local moto S3 server, for the session."""
  import boto3  # pylint: disable=import-outside-toplevel
  from moto.server import ThreadedMotoServer  # pylint: disable=import-outside-toplevel
  logging.getLogger('werkzeug').setLevel(logging.ERROR)  # one line a request
  server = ThreadedMotoServer(ip_address='127.0.0.1', port=0, verbose=False)
  server.start()
  saved = {k: os.environ.get(k) for k in _ENV}
  try:
    host, port = server.get_host_and_port()
    for key in ('AWS_SESSION_TOKEN', 'AWS_PROFILE'):
      os.environ.pop(key, None)
    os.environ.update(AWS_ENDPOINT_URL=f'http://{host}:{port}',
                      AWS_ACCESS_KEY_ID='testing',
                      AWS_SECRET_ACCESS_KEY='testing',
                      AWS_DEFAULT_REGION='us-east-1')
    bucket = f'mlpipe-test-{uuid.uuid4().hex[:8]}'
    boto3.client('s3').create_bucket(Bucket=bucket)
    files.use_pipeline_options()   # as a command's shell does
    yield bucket
  finally:
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value
    server.stop()
