"""The run history (runs.jsonl, python -m pipelines.history) and
--retain_runs."""

import json

import pytest

from pipelines import history as history_command
from pipelines.runs import run_history as history
from pipelines.reporting import report
from pipelines.runs import record as run_record
from pipelines.runs import retention


def test_each_run_appends_its_summary_to_the_history(report_runs):
  lines = history.read(str(report_runs.history))
  assert [(e['seq'], e['output_dir']) for e in lines] == [
      (1, str(report_runs.features_only)), (2, str(report_runs.full)),
      (3, str(report_runs.drifted))]
  for e in lines:
    on_disk = json.loads(
        (report_runs.root / e['output_dir'] / 'run_summary.json').read_text())
    assert e['summary'] == on_disk
    assert e['health'] == on_disk['health']['score']
    assert e['status'] == on_disk['status'] == 'ok'
  assert history.default_path(str(report_runs.full)) == str(
      report_runs.history)


def test_history_command_prints_the_trend(report_runs, capsys):
  assert history_command.main(['--runs', str(report_runs.history)]) == 0
  out = capsys.readouterr().out.splitlines()
  assert out[0].split()[:4] == ['run', 'status', 'read', 'valid']
  assert len(out) == 1 + 3 + 1
  full = report_runs.summary['full']
  row = out[2].split()
  assert row[0] == '2' and row[2] == str(full['records_read'])
  assert full['model']['version'] in out[2]
  first = report_runs.summary['features_only']['health']['score']
  last = report_runs.summary['drifted']['health']['score']
  assert out[-1].startswith(f'health {first:.3f} -> {last:.3f} over 3 runs')
  assert history_command.main(['--runs', str(report_runs.root / 'none.jsonl')]) == 2


def test_retain_runs_on_a_batch_run_keeps_the_registry(report_runs):
  # The stopped run kept 1 run: its own. The older plain run folder is
  # deleted with its line; the one holding a registry and its champion is
  # kept, with its line.
  lines = history.read(str(report_runs.stopped_history))
  assert [e['output_dir'] for e in lines] == [
      str(report_runs.registry_holder), str(report_runs.stopped)]
  assert not report_runs.old_run.exists()
  assert (report_runs.registry_holder / 'registry' / 'models' / 'v1').is_dir()
  assert (report_runs.stopped / 'run_summary.json').exists()
  assert 'Retention:' in report_runs.stdout['stopped']


def _run_folder(path, summary=None):
  path.mkdir(parents=True)
  (path / 'silver').mkdir()
  (path / 'silver' / 'part.parquet').write_bytes(b'x')
  (path / 'run_summary.json').write_text(json.dumps(summary or {}))
  return str(path)


def _line(seq, folder, summary=None):
  return {'seq': seq, 'output_dir': folder, 'status': 'ok', 'health': 1.0,
          'summary': summary or {'status': 'ok'}}


def test_retention_deletes_only_what_it_should(tmp_path):
  registry = tmp_path / 'registry'
  (registry / 'models' / 'v9').mkdir(parents=True)
  (registry / 'index.json').write_text(json.dumps({'versions': [
      {'version': 'v9', 'dir': 'models/v9', 'status': 'champion',
       'history': []}]}))
  runs = tmp_path / 'runs'
  old = _run_folder(runs / 'old')
  reused = _run_folder(runs / 'reused')
  scored_with = _run_folder(runs / 'trained')   # a kept run scores with it
  not_a_run = str(runs / 'not_a_run')
  (runs / 'not_a_run').mkdir()
  (runs / 'not_a_run' / 'keep.txt').write_text('mine')
  gone = str(runs / 'gone')
  newest = _run_folder(runs / 'newest')
  # A registry inside a run folder (its champion lives there).
  holder = _run_folder(runs / 'holder')
  inner = runs / 'holder' / 'registry'
  (inner / 'models' / 'v1').mkdir(parents=True)
  (inner / 'index.json').write_text(json.dumps({'versions': [
      {'version': 'v1', 'dir': 'models/v1', 'status': 'champion',
       'history': []}]}))
  path = tmp_path / 'runs.jsonl'
  history.write(str(path), [
      _line(1, old), _line(2, reused), _line(3, scored_with),
      _line(4, not_a_run), _line(5, gone),
      _line(6, holder, {'status': 'ok', 'registry': {'root': str(inner)}}),
      _line(7, reused),
      _line(8, newest, {'status': 'ok', 'model': {
          'dir': str(runs / 'trained' / 'model')}})])

  result = retention.retain(str(path), 2, registries=[str(registry)])

  assert result['deleted'] == [old]
  assert result['kept'] == [scored_with, holder]
  assert sorted(result['dropped_lines']) == [1, 2, 4, 5]
  assert [e['seq'] for e in history.read(str(path))] == [3, 6, 7, 8]
  assert not (runs / 'old').exists()
  for kept in ('reused', 'trained', 'newest', 'holder'):
    assert (runs / kept / 'run_summary.json').exists()
  assert (runs / 'not_a_run' / 'keep.txt').read_text() == 'mine'
  assert (inner / 'models' / 'v1').is_dir()
  assert (registry / 'models' / 'v9').is_dir()
  # Nothing older than the kept runs: nothing more to do.
  assert retention.retain(str(path), 4)['deleted'] == []
  with pytest.raises(ValueError):
    retention.retain(str(path), 0)


def test_a_broken_history_line_is_skipped_and_said_and_the_run_goes_on(
    tmp_path, capsys):
  # A crash cut the last line short; a hand edit left a line that is JSON
  # but not a run's line. Neither stops the next run, its report or the
  # history command.
  path = tmp_path / 'runs.jsonl'
  runs = [_run_folder(tmp_path / f'run{i}') for i in (1, 2, 3)]
  cut = json.dumps(_line(3, runs[2]))[:40]
  path.write_text(json.dumps(_line(1, runs[0])) + '\n' +
                  json.dumps({'seq': 'two', 'output_dir': runs[1]}) + '\n' +
                  json.dumps(_line(2, runs[1])) + '\n' + cut)
  summary = {'status': 'ok', 'health': {'score': 0.5}}
  out = _run_folder(tmp_path / 'run4')

  lines = run_record.record(str(path), summary, out, retain_runs=5)

  assert lines[0] == (f'History:               {path} (run 3; skipped 2 '
                      'broken line(s) of the history)')
  assert [e['seq'] for e in history.read(str(path))] == [1, 2, 3]
  assert history.load(str(path)).broken == 2
  assert history.read(str(path))[-1]['output_dir'] == out   # not glued on
  page = report.render(out, summary, str(path))
  assert 'skipped 2 broken line(s) of the history' in page
  assert history_command.main(['--runs', str(path)]) == 0
  printed = capsys.readouterr().out.splitlines()
  assert len(printed) == 1 + 3 + 2   # header, 3 runs, trend, the note
  assert printed[-1] == 'skipped 2 broken line(s) of the history'


def test_a_feature_that_drifted_and_is_skewed_counts_once():
  """The trend's `drifted` column counts features over their drift or
  skew threshold: amount in both lists is one feature, not two."""
  summary = {'records_read': 10, 'records_valid': 10,
             'validation': {'anomalies': {}, 'drifted': ['amount', 'country'],
                            'skewed': ['amount', 'channel']}}
  row, = history.rows([{'seq': 1, 'output_dir': 'o', 'summary': summary}])
  assert row['drifted'] == 3
  only_skew = dict(summary, validation={'skewed': ['amount'],
                                        'drifted': None})
  row, = history.rows([{'seq': 1, 'output_dir': 'o', 'summary': only_skew}])
  assert row['drifted'] == 1
