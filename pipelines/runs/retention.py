"""--retain_runs N: keep the outputs of the latest N runs of a history.

After a run has appended its line (pipelines.history), `retain` looks at
the lines older than the latest N. For each, the run's output folder is
deleted and its line removed, except:

  * a folder that a retained run also wrote (a rerun into the same
    --output_dir): kept, the old line removed;
  * a folder that holds a model registry, its champion, or a model a
    retained run scored with: kept with its line (the champion is never
    deleted; a registry copies its models into its own folder, so a
    separate registry never depends on run folders);
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


def retain(history_path: str, keep: int, registries=()
           ) -> Dict[str, List[str]]:
  """Applies the rules above; returns {'deleted': [folders], 'kept':
  [folders kept for a registry or champion], 'dropped_lines': [seq]}."""
  if keep < 1:
    raise ValueError(f'--retain_runs must be at least 1, got {keep}')
  entries = history.read(history_path)
  if len(entries) <= keep:
    return {'deleted': [], 'kept': [], 'dropped_lines': []}
  older, retained = entries[:-keep], entries[-keep:]
  in_use = [e['output_dir'] for e in retained]
  protected = protected_paths(entries, registries) + [
      (e.get('summary') or {}).get('model', {}).get('dir')
      for e in retained if (e.get('summary') or {}).get('model')]
  protected = [p for p in protected if p]
  result = {'deleted': [], 'kept': [], 'dropped_lines': []}
  remaining = []
  for e in older:
    folder = e['output_dir']
    if any(files.is_within(folder, used) and files.is_within(used, folder)
           for used in in_use):
      result['dropped_lines'].append(e['seq'])
    elif any(files.is_within(path, folder) for path in protected):
      result['kept'].append(folder)
      remaining.append(e)
    elif not FileSystems.exists(files.join(folder, SUMMARY_FILE)):
      result['dropped_lines'].append(e['seq'])
    else:
      files.clear(folder)
      result['deleted'].append(folder)
      result['dropped_lines'].append(e['seq'])
  history.write(history_path, remaining + retained)
  return result


def describe(result: Dict[str, List[str]], keep: int) -> str:
  """The one line a run prints about what `retain` did."""
  return (f'Retention:             kept the latest {keep} run(s); deleted '
          f'{len(result["deleted"])} older run folder(s)' +
          (f', kept {len(result["kept"])} holding a registry or champion'
           if result['kept'] else ''))
