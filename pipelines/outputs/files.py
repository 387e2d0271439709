"""Driver-side file helpers that work the same on local paths, gs:// and
s3://: JSON files, clearing and checking output folders, success markers."""

import glob
import json
import os
import posixpath
import shutil
from typing import List

from apache_beam.io.filesystems import FileSystems

from pipelines.base.errors import UsageError
from transforms import beam_s3


beam_s3.install()   # Beam's S3 file system, fixed (see the module)


def use_pipeline_options(options=None):
  """Gives Beam's file systems the run's options on the driver. Beam's S3
  file system (s3://) is built from pipeline options even outside a
  pipeline (--s3_endpoint_url, --s3_region_name, ...; without them boto3
  reads the standard AWS variables, AWS_ENDPOINT_URL among them) and
  refuses to open anything before it has some; local and gs:// paths do
  not need them. A Pipeline sets them too, when it is built."""
  from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=g-import-not-at-top
  FileSystems.set_options(options if options is not None
                          else PipelineOptions([]))


def join(*parts: str) -> str:
  return FileSystems.join(*parts)


def clear(path: str):
  """Deletes the folder `path` and everything in it, if there is any, so
  that no shard of an earlier run is mixed with this run's shards.

  `path` is a name, never a pattern: `out/run[1]` clears that folder, not
  `out/run1` (glob characters are legal in folder names). Locally the
  folder is removed as a tree that is not followed through links (a link
  is removed, never what it points to). Object stores have no folders
  (gs://b/out/silver does not "exist"), so the objects under it are listed
  with the name's glob characters escaped and deleted one by one, each by
  its literal name.
  """
  path = path.rstrip('/') or '/'
  if '://' not in path:
    path = _entry(path)
    if os.path.islink(path) or os.path.isfile(path):
      os.remove(path)
    elif os.path.isdir(path):
      shutil.rmtree(path)
    return
  found = [m.path for m in
           FileSystems.match([glob.escape(path) + '/**'])[0].metadata_list]
  if FileSystems.exists(path):
    found.append(path)
  if found:
    FileSystems.delete([_literal(p) for p in found])


def _literal(path: str) -> str:
  """`path` as FileSystems.delete takes it literally: Beam's GCS delete
  matches each path as a pattern again (gs://b/run[1]/x would delete
  gs://b/run1/x), so its glob characters are escaped there."""
  return glob.escape(path) if path.startswith('gs://') else path


def _entry(path: str) -> str:
  """The local path `path` names, as the system resolves it (links and
  '..' before its last part), its last part kept as it is: a link stays
  the link, never its target."""
  if os.path.basename(path) in ('', '.', '..'):
    return os.path.realpath(path)
  return os.path.join(os.path.realpath(os.path.dirname(path) or '.'),
                      os.path.basename(path))


def pattern_in(folder: str, pattern: str) -> str:
  """A glob of the files of `folder` whose names match `pattern` (e.g.
  '*.parquet'): the folder is a name, its glob characters escaped, so a
  run into 'run[1]' never reads the sibling 'run1'."""
  return join(glob.escape(folder), pattern)


def files_in(folder: str, pattern: str) -> List[str]:
  """The files of `folder` (a name) whose names match `pattern`, sorted."""
  return sorted(m.path for m in FileSystems.match(
      [pattern_in(folder, pattern)])[0].metadata_list)


def write_json(path: str, value):
  with FileSystems.create(path) as f:
    f.write(json.dumps(value, indent=2, sort_keys=True).encode('utf-8'))


def read_json(path: str):
  with FileSystems.open(path) as f:
    return json.loads(f.read().decode('utf-8'))


def write_bytes(path: str, data: bytes):
  with FileSystems.create(path) as f:
    f.write(data)


def write_atomic(path: str, data: bytes):
  """Writes a file whole or not at all: locally to a temporary file of its
  own (hidden, unique to this call: two threads writing one path never
  share it) that is flushed to disk and renamed over `path`, and the
  folder's entry flushed too; on an object store (gs://, s3://) one
  upload, which is atomic already. A crash leaves the old file or the new
  one, never half of either."""
  if '://' in path:
    write_bytes(path, data)
    return
  import threading  # pylint: disable=g-import-not-at-top
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  temporary = os.path.join(folder, f'.{os.path.basename(path)}.'
                           f'{os.getpid()}-{threading.get_ident()}.tmp')
  try:
    with open(temporary, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(temporary, path)
  except BaseException:
    if os.path.exists(temporary):
      os.remove(temporary)
    raise
  directory = os.open(folder, os.O_RDONLY)
  try:
    os.fsync(directory)
  finally:
    os.close(directory)


def failure_line(error: BaseException, log: str, what: str) -> str:
  """The one stderr line of a command that failed mid-run: `what` failed,
  the error's first line, and where its traceback went (written to `log`
  when that can be written; the traceback of the exception being handled)."""
  import traceback
  message = f'{type(error).__name__}: {error}'.splitlines()[0]
  try:
    write_bytes(log, traceback.format_exc().encode('utf-8'))
  except Exception:  # pylint: disable=broad-except
    log = None   # the output folder cannot be written either
  return f'error: {what} failed: {message}' + (
      f' (details in {log})' if log else '')


def read_bytes(path: str) -> bytes:
  with FileSystems.open(path) as f:
    return f.read()


SUCCESS = '_SUCCESS'


def mark_complete(folder: str):
  """Writes the folder's success marker: every file of it is written."""
  write_bytes(join(folder, SUCCESS), b'')


def parent(path: str) -> str:
  """The folder that holds `path` (local: absolute; gs://b/x/f -> gs://b/x)."""
  if '://' in path:
    scheme, rest = path.split('://', 1)
    return f'{scheme}://{posixpath.dirname(rest.rstrip("/"))}'
  return os.path.dirname(os.path.abspath(path))


def _resolved(path: str) -> str:
  if '://' in path:
    return path.rstrip('/') + '/'
  return os.path.realpath(path).rstrip(os.sep) + os.sep


def is_within(path: str, folder: str) -> bool:
  """Whether `path` is `folder` or lies inside it (symlinks resolved)."""
  return _resolved(path).startswith(_resolved(folder))


class OutputError(UsageError, ValueError):
  """--output_dir cannot be used (exit 2, before anything is deleted)."""


def check_output_dir(output_dir: str, inputs, folders):
  """Refuses an output folder that is a file or cannot be written, and one
  whose clean-up would delete an input (`inputs`: paths or None)."""
  for path in inputs:
    if path and any(is_within(path, folder) for folder in folders):
      raise OutputError(f'{path} is inside {output_dir}, which this run '
                        'clears first: read it from elsewhere or write to '
                        'another --output_dir')
  if '://' in output_dir:
    return
  if os.path.exists(output_dir) and not os.path.isdir(output_dir):
    raise OutputError(f'--output_dir {output_dir} is a file, not a folder')
  try:
    os.makedirs(output_dir, exist_ok=True)
    probe = os.path.join(output_dir, '.write_test')
    with open(probe, 'wb'):
      pass
    os.remove(probe)
  except OSError as e:
    raise OutputError(f'--output_dir {output_dir} cannot be written: '
                      f'{e.strerror}') from None
