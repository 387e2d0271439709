"""Two fixes to Beam 2.72's S3 file system (apache_beam.io.aws), applied
by `install()`, which the modules that read and write files call when they
are imported (transforms.sinks, pipelines.outputs.files), so they are in
place in every process that touches s3://, workers included.

  * Empty files. Beam writes every file as a multipart upload and
    completes it with the parts it uploaded: none for an empty file (a
    sink's empty shard, a folder's _SUCCESS marker), which S3 refuses
    (MalformedXML: an upload needs at least one part). S3 takes a single
    empty part, so an upload that ends with no part gets one before it is
    completed: the fix other S3 writers made (arrow-rs object_store #91,
    distribution/distribution #3763).
  * One boto3 client per setting, not per call. Beam builds a new boto3
    session and client for every file system call (each open, match,
    exists, delete), 0.1-0.5 s each here, most of an s3:// run's time. A
    client is thread-safe, so one is kept per process for each set of
    settings: Beam's S3 options and the AWS variables boto3 reads.

Each applies once; a later Beam that does either itself is left alone
(an added part is only for an upload with none).
"""

import os
import threading

try:
  from apache_beam.io.aws import s3io
  from apache_beam.io.aws.clients.s3 import boto3_client
except ImportError:  # Beam without its [aws] extra: no s3:// at all
  s3io = boto3_client = None

# The variables boto3 reads that change what a client talks to, and as whom.
_ENV = ('AWS_ENDPOINT_URL', 'AWS_ENDPOINT_URL_S3', 'AWS_ACCESS_KEY_ID',
        'AWS_SECRET_ACCESS_KEY', 'AWS_SESSION_TOKEN', 'AWS_PROFILE',
        'AWS_DEFAULT_REGION', 'AWS_REGION', 'AWS_CONFIG_FILE',
        'AWS_SHARED_CREDENTIALS_FILE', 'AWS_CA_BUNDLE')
_S3_OPTIONS = ('s3_access_key_id', 's3_secret_access_key', 's3_session_token',
               's3_endpoint_url', 's3_region_name', 's3_api_version',
               's3_verify', 's3_disable_ssl')
_clients = {}
_lock = threading.Lock()


def _finish_with_a_part(finish):
  def finish_(self):
    if not self.parts and not self.buffer and self.last_error is None:
      self._write_to_s3(b'')   # pylint: disable=protected-access
    return finish(self)
  finish_.mlpipe_fixed = True
  return finish_


def _settings(options):
  if hasattr(options, 'get_all_options'):
    values = options.get_all_options(drop_default=False)
  else:
    values = dict(options or {})
  return (tuple(str(values.get(k)) for k in _S3_OPTIONS) +
          tuple(os.environ.get(k) for k in _ENV))


def _shared_client(init):
  def init_(self, client=None, options=None):
    if client is None and options is not None:
      key = _settings(options)
      with _lock:
        if key not in _clients:
          _clients[key] = boto3_client.Client(options=options)
      client = _clients[key]
    init(self, client=client, options=options)
  init_.mlpipe_fixed = True
  return init_


def install():
  """Applies both fixes (module docstring), once."""
  if s3io is None:
    return
  if not getattr(s3io.S3Uploader.finish, 'mlpipe_fixed', False):
    s3io.S3Uploader.finish = _finish_with_a_part(s3io.S3Uploader.finish)
  if not getattr(s3io.S3IO.__init__, 'mlpipe_fixed', False):
    s3io.S3IO.__init__ = _shared_client(s3io.S3IO.__init__)
