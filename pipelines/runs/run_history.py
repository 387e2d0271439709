"""The run history: one JSON line per batch run, and its trend (printed by
`python -m pipelines.history`).

Each batch run appends one line to its history file: `--history`, by
default `runs.jsonl` in the parent of `--output_dir` (the output root that
holds one folder per run: data/run1, data/run2 -> data/runs.jsonl). A line
is {"seq", "output_dir", "status", "health", "summary"}: `seq` numbers the
runs of the file (1, 2, ...; no clock), `summary` is the run's
run_summary.json. `--retain_runs` (pipelines.runs.retention) removes the lines
of the runs it deletes.
"""

import json
import os
import posixpath
from typing import Any, Dict, List, NamedTuple, Optional

from apache_beam.io.filesystems import FileSystems

from pipelines.outputs import files

HISTORY_FILE = 'runs.jsonl'


def default_path(output_dir: str) -> str:
  """runs.jsonl in the folder that holds `output_dir`."""
  if '://' in output_dir:
    scheme, rest = output_dir.split('://', 1)
    parent = posixpath.dirname(rest.rstrip('/'))
    return f'{scheme}://{parent}/{HISTORY_FILE}'
  return os.path.join(os.path.dirname(os.path.abspath(output_dir)),
                      HISTORY_FILE)


class History(NamedTuple):
  """The history's run lines, oldest first, and how many lines were
  skipped: not JSON (a line cut by a crash or a full disk), or not a run's
  line ({"seq": int, "output_dir": str, ...})."""
  entries: List[Dict[str, Any]]
  broken: int


def _entry(line: str) -> Optional[Dict[str, Any]]:
  """The run line `line` holds, or None when it holds none."""
  try:
    entry = json.loads(line)
  except ValueError:
    return None
  if not (isinstance(entry, dict) and type(entry.get('seq')) is int
          and isinstance(entry.get('output_dir'), str)
          and entry['output_dir']
          and isinstance(entry.get('summary') or {}, dict)):
    return None
  return entry


def load(path: str) -> History:
  """The history's lines (none when there is no file), skipping and
  counting broken ones: one bad line never stops a run or a report."""
  if not FileSystems.exists(path):
    return History([], 0)
  text = files.read_bytes(path).decode('utf-8', errors='replace')
  found = [_entry(line) for line in text.splitlines() if line.strip()]
  entries = [e for e in found if e is not None]
  return History(entries, len(found) - len(entries))


def read(path: str) -> List[Dict[str, Any]]:
  """The history's run lines, oldest first (broken lines skipped)."""
  return load(path).entries


def skipped_note(broken: int) -> str:
  """What a reader of the history says about the lines it skipped."""
  return f'skipped {broken} broken line(s) of the history'


def _line(entry: Dict[str, Any]) -> str:
  return json.dumps(entry, sort_keys=True) + '\n'


def write(path: str, entries: List[Dict[str, Any]]):
  """Replaces the history with `entries` (locally: a temporary file
  renamed into place, so a reader never sees half of it)."""
  files.write_atomic(path, ''.join(_line(e) for e in entries).encode('utf-8'))


def append(path: str, summary: Dict[str, Any], output_dir: str
           ) -> Dict[str, Any]:
  """Appends the run's line; returns it. Locally one append of one line
  (O_APPEND: two runs finishing together do not mix their lines)."""
  entries = read(path)
  entry = {'seq': max((e.get('seq', 0) for e in entries), default=0) + 1,
           'output_dir': output_dir, 'status': summary.get('status'),
           'health': (summary.get('health') or {}).get('score'),
           'summary': summary}
  if '://' in path:
    write(path, entries + [entry])
  else:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'a+b') as f:
      # A last line cut short (a crash mid-write) must not swallow ours.
      cut = False
      if f.seek(0, os.SEEK_END) > 0:
        f.seek(-1, os.SEEK_END)
        cut = f.read(1) != b'\n'
      f.write((b'\n' if cut else b'') + _line(entry).encode('utf-8'))
  return entry


# The trend --------------------------------------------------------------------
def _eval_metric(summary) -> str:
  model = summary.get('model') or {}
  metrics = (model.get('metrics') or {}).get('eval') or {}
  for key in ('roc_auc', 'log_loss', 'rmse'):
    if metrics.get(key) is not None:
      return f'{key} {metrics[key]:.3f}'
  return '-'


def rows(entries: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
  """One dict of trend columns per run."""
  out = []
  for e in entries:
    s = e.get('summary') or {}
    checked = s.get('validation') or {}
    counts = checked.get('anomalies') or {}
    read = s.get('records_read')
    # Features over their drift or skew threshold, each counted once
    # (a feature that drifted and is skewed is one feature).
    drifted = len(set(checked.get('drifted') or []) |
                  set(checked.get('skewed') or []))
    out.append({
        'run': e.get('seq'),
        'status': e.get('status') or '-',
        'read': read,
        'valid %': (f'{100.0 * s.get("records_valid", 0) / read:.1f}'
                    if read else '-'),
        'dead': s.get('records_dead_lettered'),
        'errors': counts.get('ERROR', 0),
        'warnings': counts.get('WARNING', 0),
        'drifted': drifted,
        'model': (s.get('model') or {}).get('version') or '-',
        'eval': _eval_metric(s),
        'health': e.get('health'),
        'output': e.get('output_dir'),
    })
  return out


def _trend(values: List[Optional[float]]) -> str:
  known = [v for v in values if v is not None]
  if len(known) < 2:
    return 'not enough runs for a trend'
  first, last = known[0], known[-1]
  word = 'up' if last > first else 'down' if last < first else 'flat'
  return f'health {first:.3f} -> {last:.3f} over {len(known)} runs ({word})'


def table(entries: List[Dict[str, Any]]) -> str:
  """The trend as a text table, oldest run first, and a closing line."""
  data = rows(entries)
  if not data:
    return 'no runs recorded'
  columns = list(data[0])
  cells = [[('-' if r[c] is None else f'{r[c]:.3f}' if isinstance(r[c], float)
             else str(r[c])) for c in columns] for r in data]
  widths = [max(len(c), *(len(row[i]) for row in cells))
            for i, c in enumerate(columns)]
  lines = ['  '.join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
  lines += ['  '.join(v.ljust(w) for v, w in zip(row, widths)).rstrip()
            for row in cells]
  lines.append(_trend([r['health'] for r in data]))
  return '\n'.join(lines)
