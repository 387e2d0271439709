"""Output-folder safety: clearing a run's output folder and retention
(--retain_runs) delete only what they name and own.

  * clearing treats a folder path as a name, never a pattern (glob
    characters, `..`, spaces, unicode): nothing outside it is deleted;
  * retention deletes only run folders inside the history's root, resolved,
    and never one that holds, or is inside, a kept run's folder.
"""

import json
import os
import tempfile

from apache_beam.io.filesystems import FileSystems
from hypothesis import assume, example, given, settings, strategies as st

from pipelines.outputs import files
from pipelines.runs import retention
from pipelines.runs import run_history

pytest_plugins = ['tests.gcs_emulator']

# Folder names made of glob characters, dots, separators, spaces and
# non-ASCII letters, and siblings such names could match as patterns
# ('*' matches them all, '?' the one-letter ones, 'run[1]' matches 'run1').
NAME = st.lists(st.sampled_from(
    ['a', 'b', '1', 'run', ' ', 'é', '日', '*', '**', '?', '[', ']', '[1]',
     '[!a]', '{a,b}', '.', '..', '/', '-', '\\']), max_size=8).map(''.join)
SIBLINGS = ('a', 'b', '1', 'ab', 'a1', 'run1', 'runa', 'é', 'a b', '.hidden',
            '日')


def _inside(path: str, folder: str) -> bool:
  return os.path.commonpath([path, folder]) == folder


def _where(path: str) -> str:
  """Where the entry `path` lives: its folder resolved, its own name kept
  (a link is an entry of its folder, not the folder it points to)."""
  return os.path.join(os.path.realpath(os.path.dirname(path)),
                      os.path.basename(path))


def _every_path(top: str):
  out = []
  for folder, dirs, names in os.walk(top):
    out += [os.path.join(folder, n) for n in dirs + names]
  return out


@settings(max_examples=40, deadline=None)
@example('run[1]')
@example('*')
@example('a/../b')
@example('[!a]')
@given(NAME)
def test_clearing_a_folder_deletes_nothing_outside_it(name):
  with tempfile.TemporaryDirectory() as tmp:
    top = os.path.join(tmp, 'top')
    sandbox = os.path.join(top, 'mid', 'sandbox')
    for sibling in SIBLINGS:
      os.makedirs(os.path.join(sandbox, sibling))
      with open(os.path.join(sandbox, sibling, 'part-0'), 'w') as f:
        f.write('a sibling run')
    elsewhere = os.path.join(top, 'elsewhere')
    os.makedirs(elsewhere)
    with open(os.path.join(elsewhere, 'keep'), 'w') as f:
      f.write('not ours')
    target = sandbox + '/' + name   # what --output_dir names, as typed
    real = os.path.realpath(target)
    # '..' past the test's own folder: the machine's files, not the test's.
    assume(_inside(real, top))
    try:
      os.makedirs(target, exist_ok=True)
      with open(os.path.join(target, 'part-0'), 'w') as f:
        f.write('this run')
      # A link inside the folder to a folder outside it: the link goes,
      # never what it points to.
      if not _inside(elsewhere, real):
        os.symlink(elsewhere, os.path.join(target, 'link'))
    except OSError:
      pass   # a name that cannot be a folder (a sibling's file)
    before = _every_path(top)

    files.clear(target)

    outside = [p for p in before if not _inside(_where(p), real)]
    assert [p for p in outside if not os.path.lexists(p)] == []
    assert not os.path.exists(target)


def test_clearing_a_gcs_folder_with_glob_characters_spares_its_sibling(
    gcs_emulator):
  root = f'gs://{gcs_emulator}/out'
  for folder in ('run[1]', 'run1', 'runa'):
    files.write_bytes(f'{root}/{folder}/silver/part-0', b'x')
  files.clear(f'{root}/run[1]')
  assert not FileSystems.exists(f'{root}/run[1]/silver/part-0')
  assert FileSystems.exists(f'{root}/run1/silver/part-0')
  assert FileSystems.exists(f'{root}/runa/silver/part-0')


# Retention ------------------------------------------------------------------
def _run_folder(path):
  """A run's output folder: its summary and one output file."""
  (path / 'predictions').mkdir(parents=True)
  (path / 'predictions' / 'part-0.parquet').write_bytes(b'x')
  (path / 'run_summary.json').write_text('{"status": "ok"}')
  return str(path)


def _history(path, folders):
  run_history.write(str(path), [
      {'seq': i + 1, 'output_dir': folder, 'status': 'ok', 'health': 1.0,
       'summary': {'status': 'ok'}} for i, folder in enumerate(folders)])
  return str(path)


def test_retention_deletes_nothing_outside_the_histories_root(tmp_path):
  root = tmp_path / 'root'
  victim = _run_folder(tmp_path / 'elsewhere' / 'victim')
  victim2 = _run_folder(tmp_path / 'victim2')
  (root / 'link').parent.mkdir(parents=True)
  linked = _run_folder(tmp_path / 'linked')
  (root / 'link').symlink_to(linked)
  old = _run_folder(root / 'old')
  history = _history(root / 'runs.jsonl', [
      victim, str(root / '..' / 'victim2'), str(root / 'link'), str(root),
      old, _run_folder(root / 'new')])

  result = retention.retain(history, 1)

  assert result['deleted'] == [old]
  assert result['outside'] == [victim, str(root / '..' / 'victim2'),
                               str(root / 'link'), str(root)]
  for folder in (victim, victim2, linked, str(root / 'new')):
    assert os.path.exists(os.path.join(folder, 'predictions',
                                       'part-0.parquet')), folder
  assert not os.path.exists(old)
  # Left alone with their lines (a record of runs that happened); the
  # deleted run's line goes.
  assert [e['seq'] for e in run_history.read(history)] == [1, 2, 3, 4, 6]
  assert 'left 4 outside' in retention.describe(result, 1)


def test_retention_never_deletes_a_folder_holding_a_kept_runs_folder(
    tmp_path):
  root = tmp_path / 'root'
  outer = _run_folder(root / 'outer')            # run 1
  inner = _run_folder(root / 'outer' / 'inner')  # run 2, kept
  history = _history(root / 'runs.jsonl', [outer, inner])

  result = retention.retain(history, 1)

  assert result['deleted'] == [] and result['kept'] == [outer]
  assert os.path.exists(os.path.join(inner, 'predictions', 'part-0.parquet'))
  assert [e['seq'] for e in run_history.read(history)] == [1, 2]


def test_retention_never_deletes_a_folder_inside_a_kept_runs_folder(
    tmp_path):
  # The other way round: the kept run 3 wrote a/, older runs wrote a/b/c
  # and a/b inside it (deleting either would delete part of a/).
  root = tmp_path / 'root'
  a = _run_folder(root / 'a')
  b = _run_folder(root / 'a' / 'b')
  c = _run_folder(root / 'a' / 'b' / 'c')
  other = _run_folder(root / 'other')
  history = _history(root / 'runs.jsonl', [c, other, b, a])

  result = retention.retain(history, 1)

  assert result['deleted'] == [other]
  assert sorted(result['kept']) == [b, c]
  for folder in (a, b, c):
    assert os.path.exists(os.path.join(folder, 'run_summary.json'))


def test_retention_never_deletes_a_run_folder_inside_a_registry(tmp_path):
  root = tmp_path / 'root'
  registry = root / 'registry'
  (registry / 'models' / 'v1').mkdir(parents=True)
  (registry / 'index.json').write_text(json.dumps({'versions': [
      {'version': 'v1', 'dir': 'models/v1', 'status': 'champion',
       'history': []}]}))
  inside = _run_folder(registry / 'a_run')
  history = _history(root / 'runs.jsonl', [inside, _run_folder(root / 'new')])

  result = retention.retain(history, 1, registries=[str(registry)])

  assert result['deleted'] == [] and result['kept'] == [inside]
  assert os.path.exists(os.path.join(inside, 'run_summary.json'))


def test_a_runs_features_are_read_from_its_own_folder_not_a_sibling(
    tmp_path):
  """The batch job reads back its feature table (and the retrain command a
  run's) through files.pattern_in: in a folder named 'run[1]' it must read
  run[1]'s rows, never those of the sibling 'run1' that the unescaped
  pattern 'run[1]/features/*.parquet' matches (this test fails with it)."""
  import apache_beam as beam  # pylint: disable=g-import-not-at-top
  from apache_beam.testing.util import assert_that, equal_to  # pylint: disable=g-import-not-at-top
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  from transforms.feature_rows import ReadFeatureRows  # pylint: disable=g-import-not-at-top
  for name, ids in (('run[1]', ['own']), ('run1', ['sibling'])):
    os.makedirs(tmp_path / name / 'features')
    pq.write_table(pa.table({'id': ids}),
                   str(tmp_path / name / 'features' / 'part-0.parquet'))
  glob = files.pattern_in(str(tmp_path / 'run[1]' / 'features'), '*.parquet')
  assert files.files_in(str(tmp_path / 'run[1]' / 'features'),
                        '*.parquet') == [
                            str(tmp_path / 'run[1]' / 'features' /
                                'part-0.parquet')]
  with beam.Pipeline() as p:
    ids = (p | ReadFeatureRows(glob)
           | beam.FlatMap(lambda b: b.column(0).to_pylist()))
    assert_that(ids, equal_to(['own']))
