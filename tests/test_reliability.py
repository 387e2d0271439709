"""Nothing lost, nothing trusted blindly: arbitrary input, exit codes, a
failed or killed run, inputs inside the output folder."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
from hypothesis import assume, given, settings, strategies as st

from pipelines import batch
from pipelines.cli.options import DEFAULT_INPUT, REPO_ROOT
from schemas.dataset import load_dataset
from transforms.parse import BatchValidator, RecordError, RecordValidator
from transforms.read import read_batches
from transforms.stream_sources import decode_message

DATASET = load_dataset()


def _account(path):
  """(records read, valid, dead-lettered) of one file through the batch
  reader and validator."""
  validator = BatchValidator(DATASET)
  read = valid = dead = 0
  for raw in read_batches(str(path), DATASET):
    read += raw.num_rows
    good, bad = validator.validate(raw)
    valid += good.num_rows
    dead += len(bad)
  return read, valid, dead


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=120), max_size=25))
def test_arbitrary_bytes_never_raise_and_every_record_is_counted(
    tmp_path_factory, lines):
  path = tmp_path_factory.mktemp('bytes') / 'junk.jsonl'
  path.write_bytes(b'\n'.join(lines))
  read, valid, dead = _account(path)
  assert read == valid + dead
  # Every non-blank line is one record (a byte-order mark is not one;
  # Arrow and Python differ on whether \x1c-\x1f and \x85 are blanks).
  data = b'\n'.join(lines)
  data = data[3:] if data.startswith(b'\xef\xbb\xbf') else data
  text = data.decode('utf-8', errors='replace')
  assume(not any(c in text for c in '\x1c\x1d\x1e\x1f\x85'))
  assert read == sum(1 for line in text.split('\n') if line.strip())


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.text(max_size=8), inner, max_size=3), max_leaves=8)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.dictionaries(
    st.sampled_from(list(DATASET.fields) + ['extra']), _JSON, max_size=10),
                max_size=15))
def test_arbitrary_json_never_raises_in_batch_or_stream(tmp_path_factory,
                                                        objects):
  path = tmp_path_factory.mktemp('json') / 'objects.jsonl'
  lines = [json.dumps(o) for o in objects]
  path.write_text('\n'.join(lines))
  read, valid, dead = _account(path)
  assert (read, read) == (len(lines), valid + dead)
  # The streaming path: one message at a time through the same validator.
  validator = RecordValidator(DATASET)
  for line in lines:
    try:
      validator.validate(decode_message(line.encode('utf-8'), 'pubsub:t'))
    except RecordError:
      pass


def _run(*args, **kwargs):
  return subprocess.run(
      [sys.executable, '-m', 'pipelines.batch', '--runner', 'DirectRunner',
       *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
      **kwargs)


def test_a_misspelled_flag_is_exit_2_before_anything_runs(tmp_path, capsys):
  assert batch.main(['--ouput_dir', str(tmp_path / 'x')]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and 'unknown flag --ouput_dir' in err[0]
  assert not os.path.exists(tmp_path / 'x')


def test_output_dir_that_is_a_file_is_exit_2(tmp_path, capsys):
  target = tmp_path / 'file'
  target.write_text('keep me')
  assert batch.main(['--output_dir', str(target)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and 'is a file' in err[0]
  assert target.read_text() == 'keep me'


def test_an_input_inside_a_folder_the_run_clears_is_refused(tmp_path, capsys):
  dead = tmp_path / 'out' / 'dead_letter'
  dead.mkdir(parents=True)
  kept = dead / 'again.jsonl'
  kept.write_text(open(DEFAULT_INPUT, encoding='utf-8').readline())
  assert batch.main(['--input', str(kept), '--output_dir',
                     str(tmp_path / 'out')]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and 'clears first' in err[0]
  assert kept.exists()


def test_a_failure_during_the_run_is_exit_3_one_line_and_a_log(tmp_path):
  # A model whose transform graph is not a graph: it passes the hash check
  # (the hashes are rewritten) and fails when the Predict job loads it.
  source = tmp_path / 'first'
  assert _run('--output_dir', str(source)).returncode == 0
  model = source / 'model'
  graph = model / 'transform_fn' / 'transform_fn' / 'saved_model.pb'
  graph.write_bytes(b'not a saved model')
  metadata = json.loads((model / 'metadata.json').read_text())
  import hashlib
  metadata['files']['transform_fn/transform_fn/saved_model.pb'] = (
      hashlib.sha256(b'not a saved model').hexdigest())
  (model / 'metadata.json').write_text(json.dumps(metadata))
  out = tmp_path / 'scored'
  # An older run's model in the folder must not survive a scoring run.
  (out / 'model').mkdir(parents=True)
  (out / 'model' / 'metadata.json').write_text('{}')
  result = _run('--model_dir', str(model), '--output_dir', str(out))
  assert result.returncode == 3
  err = [l for l in result.stderr.splitlines() if l.startswith('error:')]
  assert len(err) == 1 and 'run.log' in err[0]
  assert 'Traceback' not in result.stderr
  summary = json.loads((out / 'run_summary.json').read_text())
  assert summary['status'] == 'failed' and summary['records_read'] == 20012
  assert 'Traceback' in (out / 'run.log').read_text()
  assert os.path.exists(out / 'features' / '_SUCCESS')
  assert not os.path.exists(out / 'predictions' / '_SUCCESS')
  assert not os.path.exists(out / 'model')


def _features(out):
  rows = [r for p in sorted(glob.glob(f'{out}/features/*.parquet'))
          for r in pq.read_table(p).to_pylist()]
  return sorted(rows, key=lambda r: r['transaction_id'])


def _predictions(out):
  rows = [json.loads(line) for p in sorted(glob.glob(
      f'{out}/predictions/*.jsonl')) for line in open(p, encoding='utf-8')]
  return sorted(rows, key=lambda r: r['transaction_id'])


def test_a_killed_run_says_so_and_a_rerun_gives_the_same_outputs(tmp_path):
  out = tmp_path / 'out'
  process = subprocess.Popen(
      [sys.executable, '-m', 'pipelines.batch', '--runner', 'DirectRunner',
       '--output_dir', str(out)], cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE, text=True, start_new_session=True)
  # Kill it once the ingest job is under way.
  for line in process.stderr:
    if line.startswith('== Ingest'):
      time.sleep(2)
      break
  os.killpg(process.pid, signal.SIGKILL)
  process.wait(timeout=60)
  summary = json.loads((out / 'run_summary.json').read_text())
  assert summary['status'] == 'running'      # it never said it finished
  assert not os.path.exists(out / 'predictions' / '_SUCCESS')

  assert _run('--output_dir', str(out)).returncode == 0
  assert json.loads((out / 'run_summary.json').read_text())['status'] == 'ok'
  clean = tmp_path / 'clean'
  assert _run('--output_dir', str(clean)).returncode == 0
  assert _features(out) == _features(clean)
  assert _predictions(out) == _predictions(clean)


def test_streaming_runs_the_same_preflight_checks(tmp_path, capsys):
  from pipelines import streaming
  inside = tmp_path / 'out' / 'streaming' / 'dead_letter'
  inside.mkdir(parents=True)
  kept = inside / 'again.jsonl'
  kept.write_text(open(DEFAULT_INPUT, encoding='utf-8').readline())
  assert streaming.main(['--input', str(kept), '--output_dir',
                         str(tmp_path / 'out')]) == 2
  assert kept.exists()
  assert streaming.main(['--ouput_dir', str(tmp_path)]) == 2
  assert streaming.main(['--runner', 'DataflowRunner', '--output_dir',
                         str(tmp_path)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 3
  assert 'clears first' in err[0] and 'unknown flag' in err[1]
