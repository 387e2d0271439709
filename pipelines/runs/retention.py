"""--retain_runs N: keep the outputs of the latest N runs of a history.

After a run has appended its line (pipelines.runs.run_history), `retain`
looks at the lines older than the latest N. For each, the run's output
folder is deleted and its line removed, except:

  * a folder that a retained run also wrote (a rerun into the same
    --output_dir): kept, the old line removed;
  * a folder that is not inside the history's root (the folder holding the
    history file), paths resolved: `/elsewhere/victim`, `root/../victim`,
    a link out of the root, the root itself. Left alone with its line:
    a history line is not a licence to delete anything anywhere;
  * a folder that holds, or is inside, the folder of a kept run (the
    current run's `outer/inner` makes an older `outer/` stay): kept with
    its line;
  * a folder that holds (or is inside) a model registry, its champion, or
    a model a retained run scored with: kept with its line (the champion
    is never deleted; a registry copies its models into its own folder, so
    a separate registry never depends on run folders);
  * a folder without run_summary.json (not a run output any more): left
    alone, the line removed;
  * a folder already gone: the line removed.
"""

from typing import Any, Dict, List, Set

from apache_beam.io.filesystems import FileSystems

from pipelines.runs import run_history as history
from pipelines.outputs import files
from pipelines.model.registry import Registry, RegistryError

SUMMARY_FILE = 'run_summary.json'


def _registries(entries) -> Set[str]:
  roots = set()
  for e in entries:
    registry = (e.get('summary') or {}).get('registry') or {}
    if registry.get('root'):
      roots.add(registry['root'])
  return roots


def protected_paths(entries: List[Dict[str, Any]],
                    registries=()) -> List[str]:
  """Paths no deletion may touch: every registry named by the history (or
  given), its champion's folder, and the models the given runs scored."""
  paths = []
  for root in sorted(_registries(entries) | set(registries)):
    paths.append(root)
    try:
      paths.append(Registry(root).champion_dir())
    except RegistryError:
      pass
  return paths


def _inside_root(folder: str, root: str) -> bool:
  """Whether `folder` lies strictly inside `root`, symlinks and '..'
  resolved. An object-store path with a '.' or '..' part is never inside
  (object names are not normalised: refuse rather than guess)."""
  if '://' in folder:
    if {'.', '..'} & set(folder.split('://', 1)[1].split('/')):
      return False
  return files.is_within(folder, root) and not files.is_within(root, folder)


def _nested(a: str, b: str) -> bool:
  """One of the folders holds the other (or they are the same)."""
  return files.is_within(a, b) or files.is_within(b, a)


def _same(a: str, b: str) -> bool:
  return files.is_within(a, b) and files.is_within(b, a)


def retain(history_path: str, keep: int, registries=()
           ) -> Dict[str, List[str]]:
  """Applies the rules above; returns {'deleted': [folders], 'kept':
  [folders kept for a registry, a champion or a kept run's folder],
  'outside': [folders outside the root, left alone], 'dropped_lines':
  [seq]}."""
  if keep < 1:
    raise ValueError(f'--retain_runs must be at least 1, got {keep}')
  entries = history.read(history_path)
  result = {'deleted': [], 'kept': [], 'outside': [], 'dropped_lines': []}
  if len(entries) <= keep:
    return result
  root = files.parent(history_path)
  older, retained = entries[:-keep], entries[-keep:]
  kept_folders = [e['output_dir'] for e in retained]
  protected = protected_paths(entries, registries) + [
      (e.get('summary') or {}).get('model', {}).get('dir')
      for e in retained if (e.get('summary') or {}).get('model')]
  protected = [p for p in protected if p]
  remaining, candidates = [], []
  for e in older:
    folder = e['output_dir']
    if any(_same(folder, used) for used in kept_folders):
      result['dropped_lines'].append(e['seq'])
    elif not _inside_root(folder, root):
      result['outside'].append(folder)
      remaining.append(e)
    elif any(_nested(path, folder) for path in protected):
      result['kept'].append(folder)
      remaining.append(e)
      kept_folders.append(folder)
    else:
      candidates.append(e)
  # A candidate nested with a kept folder is kept, and keeps in turn the
  # candidates nested with it.
  while True:
    nested = [e for e in candidates if any(
        _nested(e['output_dir'], used) for used in kept_folders)]
    if not nested:
      break
    for e in nested:
      candidates.remove(e)
      result['kept'].append(e['output_dir'])
      remaining.append(e)
      kept_folders.append(e['output_dir'])
  for e in candidates:
    folder = e['output_dir']
    if FileSystems.exists(files.join(folder, SUMMARY_FILE)):
      files.clear(folder)
      result['deleted'].append(folder)
    result['dropped_lines'].append(e['seq'])
  order = {id(e): i for i, e in enumerate(entries)}
  history.write(history_path,
                sorted(remaining, key=lambda e: order[id(e)]) + retained)
  return result


def describe(result: Dict[str, List[str]], keep: int) -> str:
  """The one line a run prints about what `retain` did."""
  return (f'Retention:             kept the latest {keep} run(s); deleted '
          f'{len(result["deleted"])} older run folder(s)' +
          (f', kept {len(result["kept"])} holding a registry, a champion or '
           'a kept run\'s folder' if result['kept'] else '') +
          (f', left {len(result["outside"])} outside the history\'s folder '
           'alone' if result['outside'] else ''))
