"""The model registry: every trained model version, and which one serves
(the command is `pipelines.registry`).

A registry is a folder, local or gs://:

    index.json            every version: status, metrics, data and declaration
                          hashes, model type, task, training range, and its
                          history of status changes (when and why)
    models/<version>/     the model directory (as pipelines.train writes it)
    promotions/<n>.json   one pointer per champion change, {"version",
                          "dir"}, numbered: the streaming job watches these
                          to follow the champion without a restart

Statuses: candidate (registered), champion (the one that scores; at most
one), retired (a former champion). The first model registered becomes the
champion; later ones are candidates until promoted. Registering a version
the registry already holds changes nothing (reruns are idempotent).

Times in the index come from the caller (`at`: the run's --reference_time,
else the latest event time of the model's training data), never from the
clock, so the same runs give the same index. The index is written whole to
a temporary file and renamed over the old one (on object stores, one
object upload), so a crash leaves the old index or the new one, never half
of one; a model directory is copied before the index names it, and a
champion pointer is written only after the index that names its champion
(a crash between the two leaves the pointer missing, never a pointer to a
model that is not the champion; the next write adds it).

Writers take the registry's lock (`lock`: an exclusive `fcntl` lock on
`<registry>/index.lock`) around their read-modify-write of the index, so
two promotions at once both land, one after the other. On gs:// there is
no lock: run one writer at a time (one retraining loop, promotions by hand
only while it is idle). Readers never wait. The index is checked on every
read (`check_index`): a file of the wrong shape is one RegistryError line.
"""

import pipelines.base.quiet  # noqa: F401  (first: silences start-up noise)

import contextlib
import functools
import json
import os
from typing import Any, Dict, Iterator, List, Optional

from apache_beam.io.filesystems import FileSystems

from pipelines.base.errors import UsageError
from pipelines.outputs import files
from transforms import inference

INDEX = 'index.json'
LOCK = 'index.lock'
MODELS = 'models'
PROMOTIONS = 'promotions'
CANDIDATE, CHAMPION, RETIRED = 'candidate', 'champion', 'retired'
STATUSES = (CANDIDATE, CHAMPION, RETIRED)


# Raw features an entry lists by permutation importance.
TOP_FEATURES = 10


def top_features(importance: Optional[Dict[str, Any]]
                 ) -> Optional[Dict[str, Any]]:
  """The registry's view of a model's importance (pipelines.model.
  importance): its metric and the TOP_FEATURES most important raw
  features, {feature: mean drop of the metric}, most important first."""
  if not importance:
    return None
  return {'metric': importance['metric'],
          'top': {f['feature']: round(f['mean'], 6)
                  for f in importance['features'][:TOP_FEATURES]}}


class RegistryError(UsageError, ValueError):
  """The registry cannot do what was asked (exit code 2 on the command line)."""


def _shape_error(index: Any) -> Optional[str]:
  """What is wrong with the shape of an index (None when nothing is):
  the fields the registry reads, with their types."""
  if not isinstance(index, dict) or not isinstance(index.get('versions'),
                                                   list):
    return 'it holds no list of versions'
  for key in ('promotions', 'changes'):
    if key in index and (not isinstance(index[key], int) or
                         isinstance(index[key], bool) or index[key] < 0):
      return f'{key} is not a count'
  seen = set()
  for i, entry in enumerate(index['versions']):
    if not isinstance(entry, dict):
      return f'version #{i + 1} is not an object'
    version = entry.get('version')
    if not isinstance(version, str) or not version:
      return f'version #{i + 1} has no version name (a string)'
    if version in seen:
      return f'{version} is listed twice'
    seen.add(version)
    if entry.get('status') not in STATUSES:
      return (f'{version} has status {entry.get("status")!r}, not one of '
              f'{", ".join(STATUSES)}')
    folder = entry.get('dir')
    if not isinstance(folder, str) or folder != f'{MODELS}/{version}':
      return f'{version} has dir {folder!r}, not {MODELS}/{version}'
    history = entry.get('history')
    if not isinstance(history, list) or not all(
        isinstance(h, dict) and isinstance(h.get('seq'), int) and
        isinstance(h.get('reason'), str) and h.get('status') in STATUSES
        for h in history):
      return f'{version} has no history of status changes'
    if entry['status'] != CANDIDATE and not history:
      return f'{version} is {entry["status"]} without a history'
  if sum(e['status'] == CHAMPION for e in index['versions']) > 1:
    return 'it has more than one champion'
  return None


def check_index(index: Any, path: str) -> Dict[str, Any]:
  """The index, or RegistryError when its shape is not the registry's."""
  problem = _shape_error(index)
  if problem:
    raise RegistryError(f'{path} is not a registry index: {problem}')
  return index


def _locked(method):
  """Runs a writer method of Registry under the registry's lock, so its
  read of the index and its write of the next one are one step."""
  @functools.wraps(method)
  def locked(self, *args, **kwargs):
    with self.lock():
      return method(self, *args, **kwargs)
  return locked


class Registry:
  """A registry folder (see the module docstring)."""

  def __init__(self, root: str):
    self.root = root.rstrip('/')

  # Reading ------------------------------------------------------------------
  def _index(self) -> Dict[str, Any]:
    path = files.join(self.root, INDEX)
    if not FileSystems.exists(path):
      return {'versions': []}
    try:
      index = files.read_json(path)
    except ValueError as e:
      raise RegistryError(f'{path} is not valid JSON: {e}') from None
    return check_index(index, path)

  def entries(self) -> List[Dict[str, Any]]:
    """Every version, oldest first."""
    return self._index()['versions']

  def get(self, version: str) -> Dict[str, Any]:
    for entry in self.entries():
      if entry['version'] == version:
        return entry
    raise RegistryError(f'{self.root} holds no version {version}')

  def champion(self) -> Optional[Dict[str, Any]]:
    return next((e for e in self.entries() if e['status'] == CHAMPION), None)

  def model_dir(self, version: str) -> str:
    return files.join(self.root, self.get(version)['dir'])

  def champion_dir(self) -> str:
    """The champion's model directory; RegistryError when there is none."""
    champion = self.champion()
    if champion is None:
      raise RegistryError(f'{self.root} has no champion model yet (train '
                          'with --registry, or promote a candidate)')
    return files.join(self.root, champion['dir'])

  # Writing ------------------------------------------------------------------
  @contextlib.contextmanager
  def lock(self) -> Iterator[None]:
    """Holds the registry's writer lock (local folders: an exclusive
    `fcntl.flock` on index.lock, released when the block ends or the
    process dies; gs://: none, see the module docstring)."""
    if '://' in self.root:
      yield
      return
    import fcntl  # pylint: disable=g-import-not-at-top
    os.makedirs(self.root, exist_ok=True)
    with open(os.path.join(self.root, LOCK), 'a+b') as f:
      fcntl.flock(f.fileno(), fcntl.LOCK_EX)
      try:
        yield
      finally:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)

  def _pointer_path(self, number: int) -> str:
    return files.join(self.root, PROMOTIONS, f'{number:06d}.json')

  def _write(self, index: Dict[str, Any]):
    """Writes the index, then the pointer to its champion when the index
    counts a promotion that has none yet (the one just made, or one a
    crash after an earlier index write left without its pointer)."""
    files.write_atomic(files.join(self.root, INDEX), json.dumps(
        index, indent=2, sort_keys=True).encode('utf-8'))
    number = index.get('promotions', 0)
    champion = next((e for e in index['versions']
                     if e['status'] == CHAMPION), None)
    if number and champion and not FileSystems.exists(
        self._pointer_path(number)):
      files.write_atomic(self._pointer_path(number), json.dumps(
          {'version': champion['version'],
           'dir': files.join(self.root, champion['dir'])},
          indent=2, sort_keys=True).encode('utf-8'))

  @staticmethod
  def _point_to_champion(index: Dict[str, Any]):
    """Counts a champion change: `_write` adds promotions/<n>.json (watched
    by streaming jobs) after the index."""
    index['promotions'] = index.get('promotions', 0) + 1

  @staticmethod
  def _change(index, entry, status: str, reason: str, at: Optional[str]):
    """Sets a status and records the change, numbered across the whole
    registry (`seq`), so the order of changes is known without clocks."""
    index['changes'] = index.get('changes', 0) + 1
    entry['status'] = status
    entry['history'].append({'seq': index['changes'], 'status': status,
                             'at': at, 'reason': reason})

  @_locked
  def register(self, model_dir: str, reason: str,
               at: Optional[str] = None) -> Dict[str, Any]:
    """Copies a verified model directory in as a candidate (the champion
    when it is the first); returns its entry."""
    metadata = inference.verify_model_dir(model_dir)
    version = metadata['model_version']
    index = self._index()
    for entry in index['versions']:
      if entry['version'] == version:
        return entry
    relative = f'{MODELS}/{version}'
    target = files.join(self.root, relative)
    model_files = inference.list_files(model_dir)
    files.clear(target)
    # metadata.json last: a reader never sees a half-copied model.
    for rel in sorted(model_files, key=lambda r: r == inference.METADATA_FILE):
      files.write_bytes(inference.join_path(target, rel),
                        files.read_bytes(model_files[rel]))
    training = metadata.get('training', {})
    entry = {
        'version': version, 'dir': relative, 'status': CANDIDATE,
        'model_type': metadata.get('model_type'),
        'task': metadata.get('task', 'binary'),
        'dataset': metadata.get('dataset'),
        'metrics': metadata.get('metrics', {}).get('eval'),
        'compared': metadata.get('compared'),
        'importance': top_features(metadata.get('importance')),
        'threshold': metadata.get('threshold'),
        'training': {k: training.get(k) for k in (
            'rows', 'split', 'train_time_range', 'eval_time_range')},
        'data_hash': metadata.get('data_hash'),
        'declaration_hash': metadata.get('declaration_hash'),
        'files_digest': metadata['digest'],
        'registered_at': at, 'history': [],
    }
    self._change(index, entry, CANDIDATE, reason, at)
    index['versions'].append(entry)
    if not any(e['status'] == CHAMPION for e in index['versions']):
      self._change(index, entry, CHAMPION, 'the first model of this registry',
                   at)
      self._point_to_champion(index)
    self._write(index)
    return entry

  @_locked
  def promote(self, version: str, reason: str,
              at: Optional[str] = None) -> Dict[str, Any]:
    """Makes `version` the champion; the old champion is retired."""
    index = self._index()
    entry = next((e for e in index['versions'] if e['version'] == version),
                 None)
    if entry is None:
      raise RegistryError(f'{self.root} holds no version {version}')
    if entry['status'] == CHAMPION:
      raise RegistryError(f'{version} is already the champion')
    for other in index['versions']:
      if other['status'] == CHAMPION:
        self._change(index, other, RETIRED, f'replaced by {version}: {reason}',
                     at)
    self._change(index, entry, CHAMPION, reason, at)
    self._point_to_champion(index)
    self._write(index)
    return entry

  @_locked
  def rollback(self, reason: str, at: Optional[str] = None
               ) -> Dict[str, Any]:
    """Retires the champion and brings back the one it replaced."""
    index = self._index()
    current = next((e for e in index['versions']
                    if e['status'] == CHAMPION), None)
    if current is None:
      raise RegistryError(f'{self.root} has no champion to roll back')
    # The previous champion: the latest one retired before this one won.
    former = [e for e in index['versions'] if e['status'] == RETIRED and
              not e['history'][-1]['reason'].startswith('rolled back')]
    if not former:
      raise RegistryError(f'{current["version"]} has no predecessor to roll '
                          'back to')
    previous = max(former, key=lambda e: e['history'][-1]['seq'])
    self._change(index, current, RETIRED, f'rolled back: {reason}', at)
    self._change(index, previous, CHAMPION,
                 f'rollback from {current["version"]}: {reason}', at)
    self._point_to_champion(index)
    self._write(index)
    return previous
